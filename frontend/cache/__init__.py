"""Result cache for deterministic generations (greedy, or sampled with an explicit seed).

Public API::

    is_cacheable(temperature, seed) -> bool
    cache_key(model=..., model_version=..., prompt_ids=..., params=...) -> str  # SHA-256 hex
    CachedResult                      # complete, replayable result (JSON round-trippable)
    ResultCache                       # async protocol: get / put / close / stats
    MemoryResultCache, RedisResultCache, CacheStats, CacheEntryError
    build_result_cache(url, max_entries=..., ttl_s=..., max_bytes=...) -> ResultCache

Typical use in a request handler::

    if is_cacheable(params["temperature"], params["seed"]):
        key = cache_key(model=name, model_version=version, prompt_ids=ids, params=params)
        hit = await cache.get(key)
        ...
        # only after the generation finished successfully:
        await cache.put(key, CachedResult(...))
"""

from frontend.cache.base import CacheStats, ResultCache
from frontend.cache.factory import build_result_cache
from frontend.cache.keys import cache_key, is_cacheable
from frontend.cache.memory import MemoryResultCache
from frontend.cache.redis_cache import RedisResultCache
from frontend.cache.result import CachedResult, CacheEntryError

__all__ = [
    "CacheEntryError",
    "CacheStats",
    "CachedResult",
    "MemoryResultCache",
    "RedisResultCache",
    "ResultCache",
    "build_result_cache",
    "cache_key",
    "is_cacheable",
]
