"""Unit tests for frontend.text: incremental detokenization and stop strings."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from transformers import PreTrainedTokenizerFast

from export.tokenizer_builder import build_tokenizer
from frontend.text import REPLACEMENT_CHAR, IncrementalDecoder, StopMatcher

pytestmark = pytest.mark.unit

Tok = PreTrainedTokenizerFast
VOCAB_SIZE = 512
JAPANESE_EMOJI = (
    "こんにちは、世界！🙂 日本語のテキストです。カタカナ、ひらがな、漢字。\n"
    "絵文字 👩\u200d👩\u200d👧 と 🇯🇵 も大丈夫？ 🎉🎉 end"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return build_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB_SIZE)


def _gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's bytes_to_unicode table: the vocab symbol of each raw byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@pytest.fixture(scope="module")
def byte_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    """byte_ids[b] is the id of the single-byte token for byte b."""
    table = _gpt2_byte_to_char()
    ids = [tok.get_vocab()[table[b]] for b in range(256)]
    assert len(set(ids)) == 256
    return ids


def stream(decoder: IncrementalDecoder, ids: Sequence[int]) -> list[str]:
    """All pushes, then the flush, as a list of chunks."""
    return [decoder.push(i) for i in ids] + [decoder.flush()]


class ByteTokenizer:
    """A tokenizer whose tokens are arbitrary byte strings (to build exact splits)."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = list(pieces)
        self.decoded_ids = 0
        self.max_ids_per_call = 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        del skip_special_tokens
        self.decoded_ids += len(token_ids)
        self.max_ids_per_call = max(self.max_ids_per_call, len(token_ids))
        return b"".join(self.pieces[i] for i in token_ids).decode("utf-8", errors="replace")


class CountingTokenizer:
    """Wraps a real tokenizer and records how many ids each decode call sees."""

    def __init__(self, inner: PreTrainedTokenizerFast) -> None:
        self.inner = inner
        self.max_ids_per_call = 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.max_ids_per_call = max(self.max_ids_per_call, len(token_ids))
        return str(self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens))


# ---------------------------------------------------------------------------------------------
# IncrementalDecoder
# ---------------------------------------------------------------------------------------------


def test_stream_japanese_emoji_never_yields_replacement_char(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(JAPANESE_EMOJI)
    # The test is only meaningful if some tokens hold part of a character.
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)
    chunks = stream(IncrementalDecoder(tok), ids)
    assert not any(REPLACEMENT_CHAR in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == JAPANESE_EMOJI
    assert chunks[-1] == ""  # valid text: nothing left for flush


def test_stream_one_byte_per_token(tok: Tok, byte_ids: list[int]) -> None:
    """Worst split: every UTF-8 byte is its own token."""
    ids = [byte_ids[b] for b in JAPANESE_EMOJI.encode("utf-8")]
    decoder = IncrementalDecoder(tok)
    chunks = stream(decoder, ids)
    assert not any(REPLACEMENT_CHAR in c for c in chunks)
    assert "".join(chunks) == JAPANESE_EMOJI
    # Each character comes out as soon as its last byte arrives.
    emitted = [c for c in chunks if c]
    assert "".join(emitted[:2]) == "こん"


def test_stream_random_unicode_text(tok: PreTrainedTokenizerFast) -> None:
    rng = random.Random(99)
    alphabet = "abc xyz\n。、！こんにちは世界漢字カタカナ🙂🎉👍é"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        ids = tok.encode(text)
        chunks = stream(IncrementalDecoder(tok), ids)
        assert not any(REPLACEMENT_CHAR in c for c in chunks), text
        assert "".join(chunks) == text


def test_random_ids_match_full_decode_exactly(tok: Tok, byte_ids: list[int]) -> None:
    """Arbitrary id sequences (invalid UTF-8 included) still concatenate to decode(ids)."""
    rng = random.Random(2024)
    high_bytes = [byte_ids[b] for b in range(0x80, 0x100)]
    for trial in range(300):
        n = rng.randint(0, 40)
        if trial % 2:
            ids = [rng.randrange(VOCAB_SIZE) for _ in range(n)]
        else:  # mostly stray lead / continuation bytes
            ids = [rng.choice(high_bytes) for _ in range(n)]
            ids = [i if rng.random() < 0.8 else rng.randrange(VOCAB_SIZE) for i in ids]
        chunks = stream(IncrementalDecoder(tok), ids)
        assert "".join(chunks) == tok.decode(ids), ids


def test_dangling_partial_character_only_at_flush(tok: Tok, byte_ids: list[int]) -> None:
    ids = [byte_ids[b] for b in "ok こ".encode()[:-1]]  # "ok " + 2 of 3 bytes of こ
    decoder = IncrementalDecoder(tok)
    pushed = [decoder.push(i) for i in ids]
    assert "".join(pushed) == "ok "
    assert decoder.has_pending
    assert decoder.flush() == REPLACEMENT_CHAR == tok.decode(ids)[len("ok ") :]
    assert decoder.flush() == ""
    with pytest.raises(RuntimeError):
        decoder.push(ids[0])


def test_text_before_partial_character_is_not_held() -> None:
    """A token ending in half a character still releases the complete text before it."""
    pieces = [b"ok \xe3\x81", b"\x93!", b"\xf0\x9f", b"\x99", b"\x82", b"x\xe3", b"\x81\x93"]
    t = ByteTokenizer(pieces)
    decoder = IncrementalDecoder(t)
    assert decoder.push(0) == "ok "
    assert decoder.push(1) == "こ!"
    assert decoder.push(2) == ""
    assert decoder.push(3) == ""
    assert decoder.push(4) == "🙂"
    assert decoder.push(5) == "x"
    assert decoder.push(6) == "こ"
    assert decoder.flush() == ""


def test_every_boundary_inside_a_character() -> None:
    """Tokens that each end mid-character: text still streams, nothing is lost or doubled."""
    pieces = [b"\xe3\x81", b"\x93\xe3", b"\x81\x93\xe3", b"\x82\x93"]
    t = ByteTokenizer(pieces)
    chunks = stream(IncrementalDecoder(t), [0, 1, 2, 3])
    assert chunks == ["", "こ", "こ", "ん", ""]


def test_cost_per_push_does_not_grow_with_length(tok: PreTrainedTokenizerFast) -> None:
    counting = CountingTokenizer(tok)
    ids = tok.encode(JAPANESE_EMOJI * 40)
    assert len(ids) > 1000
    decoder = IncrementalDecoder(counting, ids[:100])
    chunks = stream(decoder, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert counting.max_ids_per_call <= 16
    assert decoder.window_size <= 16


def test_long_run_of_invalid_bytes_is_exact() -> None:
    pieces = [bytes([b]) for b in range(256)]
    t = ByteTokenizer(pieces)
    ids = [0xE3] * 50 + [ord("a")] + [0x81] * 50 + [ord("b")]
    chunks = stream(IncrementalDecoder(t), ids)
    assert "".join(chunks) == t.decode(ids)
    assert chunks[50] == REPLACEMENT_CHAR * 50 + "a"  # released by the first valid character


def test_prompt_context_is_not_emitted(tok: Tok, byte_ids: list[int]) -> None:
    prompt = tok.encode("Prompt: 日本語で答えて。")
    generated = tok.encode(" はい、🙂です")
    chunks = stream(IncrementalDecoder(tok, prompt), generated)
    assert "".join(chunks) == tok.decode(generated) == " はい、🙂です"

    # A prompt cut inside a character is ignored as context: output stays decode(generated).
    raw = "日本".encode()
    prompt_ids = [byte_ids[b] for b in raw[:-1]]
    generated_ids = [byte_ids[raw[-1]], *tok.encode("語")]
    chunks = stream(IncrementalDecoder(tok, prompt_ids), generated_ids)
    assert "".join(chunks) == tok.decode(generated_ids)


def test_special_tokens(tok: Tok, byte_ids: list[int]) -> None:
    eos = tok.eos_token_id
    raw = "こ".encode()
    ids = [byte_ids[raw[0]], eos, byte_ids[raw[1]], byte_ids[raw[2]], *tok.encode("ok"), eos]
    for skip in (False, True):
        chunks = stream(IncrementalDecoder(tok, skip_special_tokens=skip), ids)
        assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(stream(IncrementalDecoder(tok), [eos])) == "<|endoftext|>"


def test_empty_stream() -> None:
    decoder = IncrementalDecoder(ByteTokenizer([]))
    assert not decoder.has_pending
    assert decoder.flush() == ""


# ---------------------------------------------------------------------------------------------
# StopMatcher
# ---------------------------------------------------------------------------------------------


def reference_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Check after every character; the longest stop among those completing first wins."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[: end - len(max(done, key=len))], True
    return text, False


def run_matcher(stops: Sequence[str], pieces: Sequence[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        emitted, stopped = matcher.push(piece)
        out.append(emitted)
        if stopped:
            assert matcher.flush() == ""
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_across_token_boundaries(tok: PreTrainedTokenizerFast) -> None:
    text = "The answer is 42.\n\nQuestion: what is 6 * 7?"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    matcher = StopMatcher(["\n\nQuestion:"])
    emitted: list[str] = []
    stopped_at = None
    for n, token_id in enumerate(ids):
        chunk, stopped = matcher.push(decoder.push(token_id))
        emitted.append(chunk)
        if stopped:
            stopped_at = n
            break
    assert "".join(emitted) == "The answer is 42."
    assert stopped_at is not None
    # Generation stops on the token that completes the stop string, not later.
    assert "Question:" in tok.decode(ids[: stopped_at + 1])
    assert "Question:" not in tok.decode(ids[:stopped_at])
    assert matcher.matched == "\n\nQuestion:"


def test_japanese_stop_across_split_characters(tok: Tok, byte_ids: list[int]) -> None:
    text = "今日は晴れ。世界へようこそ"
    ids = [byte_ids[b] for b in text.encode()]  # one byte per token
    decoder = IncrementalDecoder(tok)
    matcher = StopMatcher(["。世界"])
    emitted = []
    for token_id in ids:
        chunk, stopped = matcher.push(decoder.push(token_id))
        emitted.append(chunk)
        if stopped:
            break
    assert stopped
    assert "".join(emitted) == "今日は晴れ"


def test_stop_at_very_start() -> None:
    assert run_matcher(["Hello"], ["Hel", "lo world"]) == ("", True)
    assert run_matcher(["Hello"], ["Hello world"]) == ("", True)
    matcher = StopMatcher(["<|im_end|>", "\n"])
    assert matcher.push("\nmore") == ("", True)
    assert matcher.matched == "\n"


def test_overlapping_stops_earliest_completed_wins() -> None:
    # "ab" completes before "abc": same start, so the emitted text is the same either way.
    assert run_matcher(["ab", "abc"], ["xabcd"]) == ("x", True)
    assert run_matcher(["abc", "ab"], ["x", "a", "b", "c"]) == ("x", True)
    # A shorter stop completing first beats a longer one that started earlier.
    assert run_matcher(["abcd", "bc"], ["abcd"]) == ("a", True)
    assert run_matcher(["abcd", "bc"], ["a", "b", "c", "d"]) == ("a", True)
    # Same end position: the longer (earlier-starting) stop wins, so less text is emitted.
    matcher = StopMatcher(["bc", "abc"])
    assert matcher.push("xab") == ("x", False)
    assert matcher.push("c") == ("", True)
    assert matcher.matched == "abc"


def test_held_back_text_released_by_flush() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abc ST") == ("abc ", False)
    assert matcher.held == "ST"
    assert matcher.push("O") == ("", False)
    assert matcher.flush() == "STO"
    with pytest.raises(RuntimeError):
        matcher.push("P")


def test_false_start_is_released_as_soon_as_it_cannot_match() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("ST") == ("", False)
    assert matcher.push("ART") == ("START", False)
    assert matcher.push("S") == ("", False)
    assert matcher.push("S") == ("S", False)  # "SS": only the last "S" may start "STOP"
    assert matcher.flush() == "S"


def test_stop_spanning_many_pushes_with_multiple_candidates() -> None:
    stops = ["</answer>", "\n\n\n", "END"]
    pieces = ["The ", "result", " is <", "/", "ans", "w", "e", "r", ">", " ignored"]
    assert run_matcher(stops, pieces) == ("The result is ", True)
    pieces = ["x\n", "\nE", "N", "D tail"]
    assert run_matcher(stops, pieces) == ("x\n\n", True)


def test_after_stop_everything_is_dropped() -> None:
    matcher = StopMatcher(["stop"])
    assert matcher.push("go stop go") == ("go ", True)
    assert matcher.stopped
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_empty_stop_list_passes_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("anything \n\n at all") == ("anything \n\n at all", False)
    assert matcher.push("") == ("", False)
    assert matcher.flush() == ""
    assert not matcher.stopped and matcher.matched is None


def test_invalid_stops_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])
    with pytest.raises(TypeError):
        StopMatcher("STOP")


def test_matches_reference_for_any_chunking() -> None:
    rng = random.Random(31337)
    for _ in range(2000):
        n_stops = rng.randint(0, 3)
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(n_stops)]
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 25)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert run_matcher(stops, pieces) == reference_stop(text, stops), (stops, pieces)


def test_emitted_text_never_contains_a_stop_and_hold_is_short() -> None:
    rng = random.Random(5)
    stops = ["abca", "cc", "bab"]
    matcher = StopMatcher(stops)
    seen = ""
    emitted = ""
    for _ in range(500):
        piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))
        out, stopped = matcher.push(piece)
        emitted += out
        seen += piece
        if stopped:
            break
        assert emitted + matcher.held == seen
        assert len(matcher.held) <= max(map(len, stops)) - 1
    assert not any(s in emitted for s in stops)
