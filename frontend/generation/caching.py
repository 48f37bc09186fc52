"""The result cache as generation uses it: which requests have a key (deterministic ones without
prompt logprobs), the lookup (counted in the metrics and the access log), a hit replayed as a
stream, and a complete generation stored."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

from frontend.cache import CachedResult, ResultCache, cache_key, is_cacheable
from frontend.engine.protocol import Engine
from frontend.generation.types import Completion, GenerationRequest, StreamItem, TextChunk
from frontend.observability import GatewayMetrics
from frontend.observability.requests import current_request


def key(engine: Engine, req: GenerationRequest) -> str | None:
    """The request's cache key; None when its result must not be cached."""
    if not is_cacheable(req.sampling.temperature, req.seed) or req.prompt_logprobs >= 0:
        return None  # prompt logprobs are not kept in the cache
    model = engine.model
    return cache_key(
        model=model.name, model_version=model.version, prompt_ids=req.prompt_ids, params=req.cache_params()
    )


async def lookup(cache: ResultCache, metrics: GatewayMetrics, key: str) -> CachedResult | None:
    hit = await cache.get(key)
    metrics.cache_lookup(hit is not None)
    record = current_request()  # the access log's counts (frontend.observability.requests)
    if record is not None:
        record.add_cache_lookup(hit is not None)
        if hit is not None:
            record.add_generation(prompt_tokens=hit.prompt_tokens, generated_tokens=hit.completion_tokens)
    return hit


async def replay(hit: CachedResult, started: float) -> AsyncIterator[StreamItem]:
    """A cached result as the stream that produced it (its chunks, then a `cached` Completion)."""
    chunks = []
    for record in hit.logprobs or []:
        chunk = TextChunk(
            record["text"],
            record["token_id"],
            record["position"],
            record["logprob"],
            tuple((int(t), float(lp)) for t, lp in record["top_logprobs"]),
        )
        chunks.append(chunk)
        yield chunk
    yield Completion(
        hit.text,
        list(hit.token_ids),
        hit.finish_reason,
        hit.prompt_tokens,
        hit.completion_tokens,
        cached=True,
        chunks=chunks,
        time_to_first_token_s=time.monotonic() - started,
        total_s=time.monotonic() - started,
    )


async def store(cache: ResultCache, key: str, completion: Completion) -> None:
    await cache.put(key, to_cached(completion))


def to_cached(c: Completion) -> CachedResult:
    records = [
        {
            "text": ch.text,
            "token_id": ch.token_id,
            "position": ch.position,
            "logprob": ch.logprob if ch.logprob is None or math.isfinite(ch.logprob) else None,
            "top_logprobs": [[t, lp] for t, lp in ch.top_logprobs],
        }
        for ch in c.chunks
    ]
    return CachedResult(
        text=c.text,
        token_ids=c.token_ids,
        pieces=[ch.text for ch in c.chunks],
        finish_reason=c.finish_reason,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        logprobs=records,
    )
