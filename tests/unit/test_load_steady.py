"""The load tool's steady-state rate (benchmarks/load/steady.py) and its /v1/completions client, the
latter against a small aiohttp server on the loopback that streams as the gateway does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

import aiohttp
import pytest
from aiohttp import web

from benchmarks import load
from benchmarks.load.steady import tokens_between

pytestmark = pytest.mark.unit


def _result(
    user: int, start: float, latency: float, tokens: int = 100, *, ok: bool = True, ttft: float | None = None
) -> load.RequestResult:
    r = load.RequestResult(0, user, "generate", ok=ok, start_s=start, latency_s=latency, completion_tokens=tokens)
    r.ttft_s = ttft
    return r


def test_steady_window_runs_from_every_first_answer_to_the_first_last_answer() -> None:
    # user 0: [0, 1], [1, 2], [2, 3]; user 1: [0, 1.5], [1.5, 2.5], [2.5, 4]
    results = [_result(0, s, 1.0) for s in (0.0, 1.0, 2.0)]
    results += [_result(1, 0.0, 1.5), _result(1, 1.5, 1.0), _result(1, 2.5, 1.5)]
    assert load.steady_window(results) == (1.5, 3.0)
    st = load.steady_state(results)
    assert st is not None and st.window_s == pytest.approx(1.5)
    # inside [1.5, 3]: user 0's 2nd half (50) + 3rd (100); user 1's 2nd (100) + 3rd's first 0.5 of 1.5 s (33.3)
    assert st.tokens == pytest.approx(50 + 100 + 100 + 100 / 3)
    assert st.tokens_per_s == pytest.approx(st.tokens / 1.5)
    assert st.share_of_tokens == pytest.approx(st.tokens / 600)


def test_steady_tokens_start_at_the_first_token_and_skip_failures() -> None:
    streamed = _result(0, 0.0, 2.0, ttft=1.0)  # tokens spread over [1, 2]
    assert tokens_between(streamed, 0.0, 1.0) == 0.0
    assert tokens_between(streamed, 1.5, 9.0) == pytest.approx(50.0)
    point = _result(0, 1.0, 0.0)
    assert tokens_between(point, 0.5, 1.5) == 100.0 and tokens_between(point, 1.5, 2.0) == 0.0
    results = [_result(0, 0.0, 1.0), _result(0, 1.0, 1.0, ok=False), _result(0, 2.0, 1.0)]
    results += [_result(1, 0.0, 1.0), _result(1, 1.0, 1.0), _result(1, 2.0, 1.0)]
    st = load.steady_state(results)
    assert st is not None and (st.start_s, st.end_s) == (1.0, 3.0)
    assert st.tokens == pytest.approx(300.0)  # the failed request's 100 tokens do not count


def test_no_steady_window_with_one_request_per_user_or_overlapping_edges() -> None:
    assert load.steady_state([_result(0, 0.0, 1.0), _result(1, 0.0, 2.0)]) is None
    # user 1's first answer comes after user 0's last: no instant with both busy
    results = [_result(0, 0.0, 1.0), _result(0, 1.0, 1.0), _result(1, 0.0, 3.0), _result(1, 3.0, 1.0)]
    assert load.steady_state(results) is None
    assert load.steady_state([]) is None


def test_summarize_reports_the_steady_rate(tmp_path) -> None:
    cfg = load.RunConfig("r", "generate", "closed", "http://x", 100, load.Sampling(), 0, False, 10.0, users=2)
    results = [_result(u, s, 1.0) for u in (0, 1) for s in (0.0, 1.0, 2.0)]
    s = load.summarize(load.RunResult(cfg, results, 3.0, 2))
    assert s.tokens_per_s == pytest.approx(200.0) and s.steady is not None
    assert (s.steady.start_s, s.steady.end_s, s.steady.tokens_per_s) == (1.0, 3.0, pytest.approx(200.0))
    assert "| 200.0 | 200.0 |" in load.summary_table([(cfg, s)])


# ------------------------------------------------------------------------------ /v1/completions


def _chunk(text: str | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = [] if text is None else [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]
    body = {"id": "cmpl-1", "object": "text_completion", "model": "gpt2", "choices": choices, "usage": usage}
    return f"data: {json.dumps(body)}\n\n".encode()


async def _serve(handler) -> AsyncGenerator[str, None]:
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _send(handler, *, ignore_eos: bool = True) -> tuple[load.RequestResult, list[dict]]:
    seen: list[dict] = []

    async def recording(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return await handler(request)

    gen = _serve(recording)
    base = await gen.__anext__()
    try:
        cfg = load.RunConfig(
            "c", "completions", "closed", base, 3, load.Sampling(0.7, 0.9, 0), 0, False, 5.0, ignore_eos=ignore_eos
        )
        async with aiohttp.ClientSession(base_url=base) as client:
            res = await load.send(client, cfg, load.RequestPlan(0, 0, ("Hello",), (None,)), 0.0)
    finally:
        await gen.aclose()
    return res, seen


async def _stream(request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for c in chunks:
        await resp.write(c)
        await asyncio.sleep(0.01)
    await resp.write_eof()
    return resp


def test_completions_stream_counts_text_chunks_and_reads_usage() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    chunks = [_chunk("a"), _chunk("b c"), _chunk("", "length"), _chunk(usage=usage), b"data: [DONE]\n\n"]
    res, seen = asyncio.run(_send(lambda request: _stream(request, chunks)))
    assert res.ok and res.error is None, res.error
    assert (res.completion_tokens, res.prompt_tokens, res.finish_reason) == (3, 5, "length")
    assert res.ttft_s is not None and len(res.itl_s) == 1  # two text chunks: one gap (the 2nd coalesced two tokens)
    body = seen[0]
    assert body["model"] == "gpt2" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == (3, 0.7, 0.9, 0)
    assert body["ignore_eos"] is True and "max_new_tokens" not in body


def test_completions_stream_failures_are_failed_results() -> None:
    error = b'data: {"error": {"message": "engine down", "type": "server_error"}}\n\ndata: [DONE]\n\n'
    res, _ = asyncio.run(_send(lambda request: _stream(request, [_chunk("a"), error])))
    assert not res.ok and "engine down" in (res.error or "")
    res, _ = asyncio.run(_send(lambda request: _stream(request, [_chunk("a")])))  # no [DONE]
    assert not res.ok and "without [DONE]" in (res.error or "")

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "busy"}}, status=503)

    res, seen = asyncio.run(_send(refuse, ignore_eos=False))
    assert not res.ok and res.status == 503 and "busy" in (res.error or "")
    assert "ignore_eos" not in seen[0]
