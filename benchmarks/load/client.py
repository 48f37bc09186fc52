"""One HTTP request of a run (generate, stream or batch) and what happened to it: `send` never raises.

The client is aiohttp: against a server that answers in a fixed 1.5 s, one process with 512
concurrent users got 209 requests/s with aiohttp and 59 with httpx (one pool of 512 connections;
25 with a client per user) on the 2-core machine, 2026-12-01, and on the H200 host httpx made the
load generator, not the gateway, the bottleneck of the 512-stream runs (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.load.scenarios import ENDPOINTS, RequestPlan, RunConfig, Sampling
from benchmarks.load.sse import sse_events


@dataclass
class RequestResult:
    """What happened to one request. Times are seconds; `start_s` is relative to the run start."""

    index: int
    user: int
    endpoint: str
    ok: bool = False
    status: int | None = None
    error: str | None = None
    start_s: float = 0.0
    latency_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    items: int = 1
    items_ok: int = 0
    cache_hits: int | None = None  # items served from the gateway's result cache ("cached" / "cache_hits")
    server_ttft_s: float | None = None  # /generate only: the gateway's own timings
    server_total_s: float | None = None
    scheduled_s: float | None = None
    dispatch_lag_s: float | None = None

    def row(self) -> dict[str, Any]:
        """One CSV row (times in seconds, ITLs as a JSON list of milliseconds)."""
        return {
            "index": self.index,
            "user": self.user,
            "endpoint": self.endpoint,
            "ok": int(self.ok),
            "status": self.status,
            "error": self.error,
            "start_s": round(self.start_s, 6),
            "latency_s": None if self.latency_s is None else round(self.latency_s, 6),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6),
            "n_itl": len(self.itl_s),
            "itl_ms": [round(x * 1000, 3) for x in self.itl_s],
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "items": self.items,
            "items_ok": self.items_ok,
            "cache_hits": self.cache_hits,
            "server_ttft_s": self.server_ttft_s,
            "server_total_s": self.server_total_s,
            "scheduled_s": None if self.scheduled_s is None else round(self.scheduled_s, 6),
            "dispatch_lag_s": None if self.dispatch_lag_s is None else round(self.dispatch_lag_s, 6),
        }


CSV_FIELDS = list(RequestResult(0, 0, "").row())


def request_body(prompt: str, max_new_tokens: int, sampling: Sampling, seed: int | None) -> dict[str, Any]:
    """The JSON body of /generate and /generate/stream (and one item of /generate/batch)."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": seed,
    }
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if getattr(sampling, name) != neutral:
            body[name] = getattr(sampling, name)
    return body


def _tokens_from(payload: Any) -> tuple[int, int | None]:
    """(completion_tokens, prompt_tokens) from a generate response or a batch result."""
    usage = payload.get("usage") if isinstance(payload, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    completion = usage.get("completion_tokens", payload.get("completion_tokens", 0) if isinstance(payload, dict) else 0)
    prompt = usage.get("prompt_tokens")
    return int(completion or 0), (int(prompt) if prompt is not None else None)


def _cached(payload: Any) -> int | None:
    """1/0 from a response's boolean "cached" field, None when the gateway does not say."""
    value = payload.get("cached") if isinstance(payload, dict) else None
    return int(value) if isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _error_text(status: int, body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip().replace("\n", " ")
    return f"HTTP {status}: {text[:200]}"


async def _post_json(client: aiohttp.ClientSession, path: str, body: Any, res: RequestResult) -> Any:
    """POST, record latency and status; the decoded body on 200, else None with `res.error` set."""
    t0 = time.perf_counter()
    async with client.post(path, json=body) as resp:
        content = await resp.read()
    res.latency_s = time.perf_counter() - t0
    res.status = resp.status
    if resp.status != 200:
        res.error = _error_text(resp.status, content)
        return None
    return json.loads(content)


async def _lines(resp: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    """The response body's lines, without their terminators (what the SSE parser is fed)."""
    async for raw in resp.content:
        yield raw.decode("utf-8").rstrip("\r\n")


async def _do_generate(client: aiohttp.ClientSession, cfg: RunConfig, plan: RequestPlan, res: RequestResult) -> None:
    body = request_body(plan.prompts[0], cfg.max_new_tokens, cfg.sampling, plan.seeds[0])
    payload = await _post_json(client, ENDPOINTS["generate"], body, res)
    if res.error is not None:
        return
    if not isinstance(payload, dict) or "generated_text" not in payload:
        res.error = "malformed response: no generated_text"
        return
    res.completion_tokens, res.prompt_tokens = _tokens_from(payload)
    res.finish_reason = payload.get("finish_reason")
    res.cache_hits = _cached(payload)
    timings = payload.get("timings")
    if isinstance(timings, dict):
        res.server_ttft_s = _float_or_none(timings.get("time_to_first_token_s"))
        res.server_total_s = _float_or_none(timings.get("total_s"))
    res.ok, res.items_ok = True, 1


async def _do_batch(client: aiohttp.ClientSession, cfg: RunConfig, plan: RequestPlan, res: RequestResult) -> None:
    items = [
        request_body(p, cfg.max_new_tokens, cfg.sampling, s) for p, s in zip(plan.prompts, plan.seeds, strict=True)
    ]
    res.items = len(items)
    payload = await _post_json(client, ENDPOINTS["batch"], {"requests": items}, res)
    if res.error is not None:
        return
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        res.error = "malformed response: no results list"
        return
    res.cache_hits = payload.get("cache_hits")
    prompt_total = 0
    for item in results:
        if isinstance(item, dict) and item.get("error") is None and isinstance(item.get("generated_text"), str):
            res.items_ok += 1
            completion, prompt = _tokens_from(item)
            res.completion_tokens += completion
            prompt_total += prompt or 0
    res.prompt_tokens = prompt_total or None
    if len(results) != len(items):
        res.error = f"batch returned {len(results)} results for {len(items)} requests"
    elif res.items_ok != len(items):
        res.error = f"batch: {len(items) - res.items_ok} of {len(items)} items failed"
    else:
        res.ok = True


async def _do_stream(client: aiohttp.ClientSession, cfg: RunConfig, plan: RequestPlan, res: RequestResult) -> None:
    body = request_body(plan.prompts[0], cfg.max_new_tokens, cfg.sampling, plan.seeds[0])
    tokens = 0
    last_token_t: float | None = None
    done: dict[str, Any] | None = None
    t0 = time.perf_counter()
    async with client.post(ENDPOINTS["stream"], json=body) as resp:
        res.status = resp.status
        if resp.status != 200:
            res.error = _error_text(resp.status, await resp.read())
            res.latency_s = time.perf_counter() - t0
            return
        async with aclosing(sse_events(_lines(resp))) as events:
            async for event in events:
                now = time.perf_counter()
                if event.event == "token":
                    tokens += 1
                    if last_token_t is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last_token_t)
                    last_token_t = now
                elif event.event == "done":
                    res.latency_s = now - t0
                    done = json.loads(event.data) if event.data else {}
                    break
                elif event.event == "error":
                    res.latency_s = now - t0
                    res.error = f"error event: {event.data[:200]}"
                    return
    if done is None:
        res.latency_s = time.perf_counter() - t0
        res.error = f"stream ended without a done event after {tokens} tokens"
        return
    completion, res.prompt_tokens = _tokens_from(done)
    res.completion_tokens = completion or tokens
    res.finish_reason = done.get("finish_reason") if isinstance(done, dict) else None
    res.cache_hits = _cached(done)
    res.ok, res.items_ok = True, 1


def completions_body(prompt: str, cfg: RunConfig, seed: int | None) -> dict[str, Any]:
    """The JSON body of a streamed /v1/completions request, as OpenAI clients send it (with the usage
    chunk asked for, so the token count is the server's)."""
    body = request_body(prompt, cfg.max_new_tokens, cfg.sampling, seed)
    body["max_tokens"] = body.pop("max_new_tokens")
    body |= {"model": cfg.model, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


def _completion_chunk(data: str) -> dict[str, Any]:
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError("a completion chunk is not a JSON object")
    if isinstance(chunk.get("error"), dict):  # a failure mid-stream: the last data event before [DONE]
        raise RuntimeError(f"error chunk: {json.dumps(chunk['error'])[:200]}")
    return chunk


async def _do_completions(client: aiohttp.ClientSession, cfg: RunConfig, plan: RequestPlan, res: RequestResult) -> None:
    """A streamed /v1/completions request: one `data:` chunk per text piece, then a usage chunk (no
    choices), then `data: [DONE]`. TTFT is the first chunk that carries text, ITLs the gaps between
    such chunks (a chunk that coalesces several tokens is one gap); the token count is the usage's."""
    body = completions_body(plan.prompts[0], cfg, plan.seeds[0])
    pieces = 0
    last_t: float | None = None
    usage: dict[str, Any] | None = None
    t0 = time.perf_counter()
    async with client.post(ENDPOINTS["completions"], json=body) as resp:
        res.status = resp.status
        if resp.status != 200:
            res.error = _error_text(resp.status, await resp.read())
            res.latency_s = time.perf_counter() - t0
            return
        async with aclosing(sse_events(_lines(resp))) as events:
            async for event in events:
                now = time.perf_counter()
                if event.data == "[DONE]":
                    res.latency_s = now - t0
                    break
                chunk = _completion_chunk(event.data)
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason") is not None:
                        res.finish_reason = choice["finish_reason"]
                    if not choice.get("text"):
                        continue
                    pieces += 1
                    if last_t is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last_t)
                    last_t = now
    if res.latency_s is None:
        res.latency_s = time.perf_counter() - t0
        res.error = f"stream ended without [DONE] after {pieces} text chunks"
        return
    res.completion_tokens, res.prompt_tokens = _tokens_from({"usage": usage} if usage else {})
    res.completion_tokens = res.completion_tokens or pieces
    res.ok, res.items_ok = True, 1


_HANDLERS = {"generate": _do_generate, "stream": _do_stream, "batch": _do_batch, "completions": _do_completions}


async def send(client: aiohttp.ClientSession, cfg: RunConfig, plan: RequestPlan, run_t0: float) -> RequestResult:
    """Send one planned request and return its result. Never raises (except on cancellation)."""
    res = RequestResult(plan.index, plan.user, cfg.endpoint, items=len(plan.prompts), scheduled_s=plan.scheduled_s)
    start = time.perf_counter()
    res.start_s = start - run_t0
    if plan.scheduled_s is not None:
        res.dispatch_lag_s = max(0.0, res.start_s - plan.scheduled_s)
    try:
        async with asyncio.timeout(cfg.timeout_s):
            await _HANDLERS[cfg.endpoint](client, cfg, plan, res)
    except TimeoutError:
        res.ok, res.error = False, f"timeout after {cfg.timeout_s:g} s"
    except aiohttp.ClientError as err:
        res.ok, res.error = False, f"{type(err).__name__}: {str(err)[:200] or 'connection error'}"
    except Exception as err:  # malformed JSON or an unexpected shape: a failed request, not a crashed run
        res.ok, res.error = False, f"{type(err).__name__}: {str(err)[:200]}"
    if res.latency_s is None or not res.ok:
        res.latency_s = time.perf_counter() - start
    return res
