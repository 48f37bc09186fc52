"""The cached value: a complete, replayable generation result."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["CacheEntryError", "CachedResult"]

# Bumped whenever the serialised layout changes; entries written with another version
# fail to decode and are therefore treated as misses instead of being misread.
_FORMAT_VERSION = 1


class CacheEntryError(ValueError):
    """A stored entry cannot be decoded (corrupt, foreign or another format version)."""


@dataclass(frozen=True)
class CachedResult:
    """One finished generation, with everything needed to replay it.

    Contract:
      * Only a *complete* result is ever built and stored (there is no partial write);
        failed or cancelled generations are never turned into a ``CachedResult``.
      * ``pieces`` are the per-token text chunks in emission order, so a cached stream
        can be replayed chunk by chunk; ``text`` is the full text the non-streaming
        API returns. The cache does not check that ``"".join(pieces) == text``
        (echo and stop-string trimming may legitimately differ).
      * ``logprobs`` is free-form JSON-able data, opaque to the cache.
      * ``to_json()`` / ``from_json()`` round-trip exactly (including non-ASCII text).
        ``from_json`` raises ``CacheEntryError`` (a ``ValueError``) for anything malformed
        or written by another format version, so a corrupt or foreign entry becomes a miss.
    """

    text: str
    token_ids: list[int]
    pieces: list[str]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[Any] | None = None

    def to_json(self) -> str:
        """Serialise to a compact JSON string (UTF-8 friendly, non-ASCII kept as is).

        Raises ``TypeError``/``ValueError`` if ``logprobs`` is not JSON-able.
        """
        payload = {
            "v": _FORMAT_VERSION,
            "text": self.text,
            "token_ids": self.token_ids,
            "pieces": self.pieces,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "logprobs": self.logprobs,
        }
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes | bytearray) -> CachedResult:
        """Parse what ``to_json`` produced (``str`` or UTF-8 ``bytes``).

        Raises ``CacheEntryError`` (a ``ValueError``) on malformed JSON, wrong field types or
        another format version.
        """
        try:
            obj = json.loads(data)
        except (TypeError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError
            raise CacheEntryError(f"cached result is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise CacheEntryError("cached result must be a JSON object")
        if obj.get("v") != _FORMAT_VERSION:
            raise CacheEntryError(f"unsupported cached result format version: {obj.get('v')!r}")
        logprobs = obj.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, list):
            raise CacheEntryError("field 'logprobs' must be a list or null")
        return cls(
            text=_expect_str(obj, "text"),
            token_ids=_expect_int_list(obj, "token_ids"),
            pieces=_expect_str_list(obj, "pieces"),
            finish_reason=_expect_str(obj, "finish_reason"),
            prompt_tokens=_expect_count(obj, "prompt_tokens"),
            completion_tokens=_expect_count(obj, "completion_tokens"),
            logprobs=logprobs,
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect_str(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise CacheEntryError(f"field {name!r} must be a string")
    return value


def _expect_count(obj: dict[str, Any], name: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CacheEntryError(f"field {name!r} must be a non-negative integer")
    return value


def _expect_int_list(obj: dict[str, Any], name: str) -> list[int]:
    value = obj.get(name)
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise CacheEntryError(f"field {name!r} must be a list of integers")
    return value


def _expect_str_list(obj: dict[str, Any], name: str) -> list[str]:
    value = obj.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CacheEntryError(f"field {name!r} must be a list of strings")
    return value
