"""frontend.api.fanin: the `n` choice streams of one request, merged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from frontend import errors
from frontend.api.fanin import collect, merge_streams

pytestmark = [pytest.mark.api, pytest.mark.asyncio]


class Source:
    """An async generator that records whether it was closed (its `finally` ran)."""

    def __init__(self, items: list[object], *, fail_at: int | None = None, error: Exception | None = None) -> None:
        self.items, self.fail_at, self.error = items, fail_at, error
        self.closed = False
        self.release = asyncio.Event()

    async def run(self, hold: bool = False) -> AsyncIterator[object]:
        try:
            for i, item in enumerate(self.items):
                if i == self.fail_at:
                    raise self.error or errors.UpstreamUnavailable("gone")
                await asyncio.sleep(0)
                yield item
            if hold:
                await self.release.wait()
        finally:
            self.closed = True


async def test_items_keep_their_stream_index() -> None:
    a, b = Source(["a1", "a2"]), Source(["b1", "b2", "b3"])
    got = await collect([a.run(), b.run()])
    assert got == {0: ["a1", "a2"], 1: ["b1", "b2", "b3"]}
    assert a.closed and b.closed


async def test_a_failure_before_the_first_item_raises_from_merge() -> None:
    failing, slow = Source(["x"], fail_at=0), Source(["y"])
    with pytest.raises(errors.UpstreamUnavailable):
        await merge_streams([failing.run(), slow.run(hold=True)])
    await asyncio.sleep(0)
    assert failing.closed and slow.closed  # the sibling was cancelled, its `finally` ran


async def test_a_later_failure_ends_the_merged_stream_and_cancels_siblings() -> None:
    failing, held = Source(["x1", "x2"], fail_at=1), Source(["y1"])
    merged = await merge_streams([failing.run(), held.run(hold=True)])
    seen = []
    with pytest.raises(errors.UpstreamUnavailable):
        async for index, item in merged:
            seen.append((index, item))
    assert (0, "x1") in seen
    assert held.closed


async def test_an_unexpected_exception_becomes_an_internal_api_error() -> None:
    broken = Source(["x"], fail_at=0, error=KeyError("bug"))
    with pytest.raises(errors.APIError) as info:
        await merge_streams([broken.run()])
    assert type(info.value) is errors.APIError and info.value.status_code == 500


async def test_closing_the_merged_stream_cancels_every_choice() -> None:
    a, b = Source(["a"]), Source(["b"])
    merged = await merge_streams([a.run(hold=True), b.run(hold=True)])
    assert await anext(merged) in {(0, "a"), (1, "b")}
    await merged.aclose()  # type: ignore[attr-defined]
    assert a.closed and b.closed
