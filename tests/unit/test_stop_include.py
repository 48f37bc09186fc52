"""StopMatcher's include_stop (vLLM's include_stop_str_in_output): the stop string is kept, what
follows it is not, however the text is split into pushes."""

from __future__ import annotations

import pytest

from frontend.text import StopMatcher

pytestmark = pytest.mark.unit


def _run(stops: list[str], pieces: list[str], include: bool) -> tuple[str, bool]:
    matcher = StopMatcher(stops, include_stop=include)
    out = ""
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out += text
        if stopped:
            return out, True
    return out + matcher.flush(), False


@pytest.mark.parametrize("split", [1, 2, 3, 100])
def test_the_stop_string_is_kept_and_the_rest_dropped(split: int) -> None:
    text = "say hello world. Then more"
    pieces = [text[i : i + split] for i in range(0, len(text), split)]
    assert _run(["world", "Then"], pieces, include=True) == ("say hello world", True)
    assert _run(["world", "Then"], pieces, include=False) == ("say hello ", True)


def test_earliest_completing_stop_wins_with_include() -> None:
    assert _run(["abcd", "bc"], ["abcd"], include=True) == ("abc", True)


def test_no_stop_releases_everything() -> None:
    assert _run(["zz"], ["abc z"], include=True) == ("abc z", False)
