"""Cache keys and the cacheability rule.

A result may be cached only when it is fully determined by its inputs: greedy decoding
(temperature 0) or sampling with an explicit seed. The key covers every input that can
change the output: model name, model version, prompt token ids and the complete
generation parameter mapping.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["cache_key", "is_cacheable"]

# Part of the hashed payload: bump it when canonicalisation changes so old keys stop matching.
_KEY_SCHEMA = 1


def is_cacheable(temperature: float, seed: int | None) -> bool:
    """Return True when a generation's output is determined by its inputs.

    * ``temperature == 0`` (greedy): cacheable, with or without a seed.
    * ``temperature > 0``: cacheable only with an explicit ``seed``.
    * Anything invalid (negative, NaN, infinite, not a number): not cacheable. This
      function never raises; request validation belongs elsewhere.
    """
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        return False
    if not math.isfinite(t) or t < 0:
        return False
    if t == 0:
        return True
    return seed is not None


def cache_key(
    *,
    model: str,
    model_version: str,
    prompt_ids: Sequence[int],
    params: Mapping[str, Any],
) -> str:
    """Return the SHA-256 hex digest (64 chars) identifying one deterministic generation.

    Contract:
      * ``params`` must be the *complete, resolved* generation parameters (max_new_tokens,
        temperature, top_p, top_k, min_p, repetition_penalty, stop, seed, logprobs, echo,
        n, ...) with defaults filled in. The cache does not interpret them: an omitted
        key, an explicit ``None`` and an explicit default all give different keys.
      * Canonicalisation is purely representational: mapping keys are sorted, tuples
        equal lists, integral floats equal ints (``1 == 1.0``, ``-0.0 == 0``), other
        floats are compared exactly (shortest round-trip repr). ``True`` is NOT ``1``.
      * Sequence order is significant everywhere, including ``stop``: ``["a", "b"]`` and
        ``["b", "a"]`` are different keys. The cache cannot know whether the engine's
        stop handling is order-independent, so it errs towards a miss, never a wrong hit.
        Callers that know better may sort/deduplicate ``stop`` before calling.
      * ``model_version`` must identify weights *and* tokenizer (decoded text is cached).
      * Raises ``ValueError`` for empty model/version or NaN/inf values and ``TypeError``
        for values that have no unambiguous JSON form (sets, bytes, non-str mapping keys,
        arbitrary objects). Nothing is ever stringified implicitly.
    """
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    if not isinstance(model_version, str) or not model_version:
        raise ValueError("model_version must be a non-empty string")
    if isinstance(prompt_ids, (str, bytes, bytearray)):
        raise TypeError("prompt_ids must be a sequence of token ids, not text")
    ids: list[int] = []
    for tok in prompt_ids:
        if isinstance(tok, bool):
            raise TypeError("prompt_ids must contain integers, not booleans")
        ids.append(operator.index(tok))
    if not isinstance(params, Mapping):
        raise TypeError("params must be a mapping")
    payload = {
        "k": _KEY_SCHEMA,
        "model": model,
        "model_version": model_version,
        "prompt_ids": ids,
        "params": _canonical(params, "params"),
    }
    # ensure_ascii keeps even lone surrogates encodable, so hashing never fails on text.
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def _canonical(value: Any, path: str) -> Any:
    """Map ``value`` to a plain JSON value with one representation per meaning."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floats, Fraction
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"{path}: NaN/infinite values cannot be part of a cache key")
        return int(f) if f.is_integer() else f
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: mapping keys must be str, got {type(k).__name__}")
            out[k] = _canonical(v, f"{path}.{k}")
        return out
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{path}: unsupported type {type(value).__name__} in cache key params")
