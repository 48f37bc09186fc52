"""Incremental detokenization that never splits a multi-byte character.

Contract of :class:`IncrementalDecoder` (pure: no I/O, no global state):

* ``push(token_id)`` returns the text that became final with this token, possibly ``""``.
  Text is held back while the decoded window ends in U+FFFD, i.e. while the last token(s) hold
  only part of a UTF-8 character (byte-level BPE tokens often carry half a Japanese character or
  emoji). Text that is already final before such a partial character is emitted at once.
* ``flush()`` returns whatever is still held back at the end of generation; only then does a
  dangling partial character become U+FFFD. After ``flush()`` the decoder is finished and
  ``push`` raises ``RuntimeError``; a second ``flush()`` returns ``""``.
* ``"".join(pushes) + flush() == tokenizer.decode(generated_ids, skip_special_tokens=...)``
  exactly, for tokenizers whose decode of a sequence equals the decode of its parts split at
  character boundaries (byte-level BPE with ``clean_up_tokenization_spaces=False``, such as
  GPT-2 and the one built by ``export.tokenizer_builder``).

Why not ``tokenizers.decoders.DecodeStream``: it has no end-of-generation flush (a dangling
partial character is silently dropped, so the concatenation contract above would not hold) and
takes no prompt context; the technique is small enough to own and test here.

Technique (as in vLLM / TGI): keep ``prefix_offset <= read_offset`` into a small window of
recent ids. ``prefix_text = decode(ids[prefix_offset:read_offset])`` is context already emitted;
each push decodes ``ids[prefix_offset:]`` and emits what lies beyond ``prefix_text``. When the
decoded window does not end in U+FFFD the token boundary is a character boundary, and the offsets
advance (``prefix_offset = read_offset``, ``read_offset = len(ids)``); ids before
``prefix_offset`` are dropped, so per-push cost and memory depend only on the window, not on the
sequence length. One refinement: while the window ends in U+FFFD, text before the trailing run of
U+FFFD is still emitted (it ends with a complete character, so later bytes cannot change it);
only the trailing run is held.

The window is the tokens since the last-but-one token boundary that fell on a character
boundary: at most a handful for valid UTF-8 output. It grows only while every token boundary
falls inside a character or inside invalid bytes (e.g. a model emitting a long run of stray
UTF-8 lead bytes), and shrinks again at the next clean boundary.

``prompt_ids`` are optional left context: the last few prompt tokens seed the window so that
tokenizers whose decode depends on left context (leading-space handling) decode the first
generated tokens as they would appear after the prompt. The prompt text itself is never emitted.
Context whose decode ends in U+FFFD (a prompt cut inside a character) is ignored, so the output
still equals ``decode(generated_ids)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["REPLACEMENT_CHAR", "IncrementalDecoder", "SupportsDecode"]

REPLACEMENT_CHAR = "\ufffd"
#: Prompt tokens kept as left context (vLLM uses 5).
_PROMPT_CONTEXT_TOKENS = 5


class SupportsDecode(Protocol):
    """The one tokenizer method relied on (a transformers ``PreTrainedTokenizerFast`` fits).

    transformers annotates the result as ``str | list[str]`` (it also takes batches); for a
    flat list of ids it is always ``str``, which :class:`IncrementalDecoder` checks.
    """

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = False,
    ) -> str | list[str]: ...


def _fast_decoder(tokenizer: SupportsDecode) -> SupportsDecode:
    """The Rust `tokenizers.Tokenizer` behind a transformers fast tokenizer when decoding through
    it is the same (no clean-up of tokenization spaces): transformers' own `decode` wraps the same
    call in ~40 us of Python per token, paid twice per generated token here."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend  # type: ignore[no-any-return]
    return tokenizer


class IncrementalDecoder:
    """Turn a stream of token ids into a stream of final text chunks; see the module docstring."""

    __slots__ = (
        "_emitted_beyond_prefix",
        "_finished",
        "_ids",
        "_prefix_text",
        "_read_offset",
        "_skip_special_tokens",
        "_tokenizer",
    )

    def __init__(
        self,
        tokenizer: SupportsDecode,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = _fast_decoder(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        # Window of ids; index 0 is the prefix offset (older ids are dropped).
        self._ids: list[int] = []
        self._read_offset = 0
        # decode(self._ids[:self._read_offset]); already emitted (or prompt context).
        self._prefix_text = ""
        # Characters of decode(self._ids) beyond prefix_text emitted while the window was
        # still ending in U+FFFD.
        self._emitted_beyond_prefix = 0
        self._finished = False

        context = [int(t) for t in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]]
        if context:
            context_text = self._decode(context)
            if not context_text.endswith(REPLACEMENT_CHAR):
                self._ids = context
                self._read_offset = len(context)
                self._prefix_text = context_text

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
        if not isinstance(text, str):
            raise TypeError(f"tokenizer.decode returned {type(text).__name__}, expected str")
        return text

    @property
    def window_size(self) -> int:
        """Number of ids currently kept (for monitoring; small for normal text)."""
        return len(self._ids)

    @property
    def has_pending(self) -> bool:
        """True when tokens were pushed whose text has not been fully emitted yet."""
        return len(self._ids) > self._read_offset

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now final (possibly ``""``)."""
        if self._finished:
            raise RuntimeError("IncrementalDecoder.push() called after flush()")
        self._ids.append(int(token_id))
        return self._advance()

    def push_many(self, token_ids: Sequence[int]) -> str:
        """Add several generated tokens at once; return the text that is now final: what their
        ``push`` calls would have returned, joined, for one or two decodes instead of two per
        token (the tokens a stream reads together). The window holds them all until the next
        character boundary, as it holds a run of partial characters."""
        if self._finished:
            raise RuntimeError("IncrementalDecoder.push_many() called after flush()")
        self._ids.extend(int(t) for t in token_ids)
        return self._advance()

    def _advance(self) -> str:
        """The text final now that the window has new ids (the module docstring's technique)."""
        text = self._decode(self._ids)
        start = len(self._prefix_text) + self._emitted_beyond_prefix

        if not text.endswith(REPLACEMENT_CHAR):
            # The window ends on a character boundary: emit and advance both offsets.
            out = text[start:]
            read_ids = self._ids[self._read_offset :]
            # A suffix of `text` after a character boundary: never ends in U+FFFD.
            self._prefix_text = self._decode(read_ids)
            self._ids = read_ids
            self._read_offset = len(read_ids)
            self._emitted_beyond_prefix = 0
            return out

        # Trailing U+FFFD may be a character still being completed: hold that run back, but
        # release what precedes it (it ends with a complete character, hence is final).
        stable = len(text.rstrip(REPLACEMENT_CHAR))
        if stable <= start:
            return ""
        self._emitted_beyond_prefix += stable - start
        return text[start:stable]

    def flush(self) -> str:
        """Return the held-back text (a dangling partial character becomes U+FFFD)."""
        if self._finished:
            return ""
        self._finished = True
        if not self.has_pending:
            return ""
        text = self._decode(self._ids)
        return text[len(self._prefix_text) + self._emitted_beyond_prefix :]
