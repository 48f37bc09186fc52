"""Stop-string matching over streamed text (OpenAI ``stop`` semantics).

Contract of :class:`StopMatcher` (pure: no I/O, no global state):

* ``push(text)`` returns ``(safe_text, stopped)``. ``safe_text`` is text that can be sent to the
  client now. While no stop string has appeared, the longest suffix of the text seen so far that
  is a proper prefix of some stop string is held back, since it may still become a stop string.
* When a stop string appears, ``push`` returns the text before it and ``stopped=True``; the stop
  string and anything after it are never emitted. Later ``push`` calls return ``("", True)``.
  With ``include_stop=True`` (vLLM's ``include_stop_str_in_output``) the stop string itself is
  returned too; what follows it still never is.
* ``flush()`` releases the held-back text when generation ends for another reason (eos, length);
  after a stop it returns ``""``. After ``flush()``, ``push`` raises ``RuntimeError``.
* With an empty stop list everything passes straight through.

Which match wins: the stop that *completes first* in the text, i.e. the one with the smallest end
position; if several complete at the same position, the longest (earliest-starting) one, so the
least text is emitted. This is what checking after every character would give, so the result does
not depend on how the text is split into pushes. Examples: with stops ``["ab", "abc"]``, ``"xabc"``
emits ``"x"`` (``"ab"`` completes first; both start at the same place, so the emitted text is the
same either way); with ``["abcd", "bc"]``, ``"abcd"`` emits ``"a"`` because ``"bc"`` completes
before ``"abcd"`` could.

Cost per push is O(len(text) * number of stops) for the search plus O(L^2) for the hold-back
check, L being the longest stop string; the held-back text is always shorter than L.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Find stop strings in streamed text; see the module docstring for the contract."""

    __slots__ = (
        "_flushed",
        "_held",
        "_include_stop",
        "_matched",
        "_max_hold",
        "_prefixes",
        "_stopped",
        "_stops",
    )

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False) -> None:
        if isinstance(stops, str):
            raise TypeError("stops must be a sequence of strings, not a single string")
        unique = list(dict.fromkeys(stops))
        if any(not isinstance(s, str) or not s for s in unique):
            raise ValueError("stop strings must be non-empty str")
        self._stops: tuple[str, ...] = tuple(unique)
        self._include_stop = include_stop
        # Proper prefixes of any stop string: candidates to hold back.
        prefixes = (stop[:i] for stop in self._stops for i in range(1, len(stop)))
        self._prefixes: frozenset[str] = frozenset(prefixes)
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""
        self._stopped = False
        self._matched: str | None = None
        self._flushed = False

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings, deduplicated, in the given order."""
        return self._stops

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared."""
        return self._stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended generation, or None."""
        return self._matched

    @property
    def held(self) -> str:
        """Text currently held back (a possible start of a stop string)."""
        return self._held

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return ``(text safe to emit now, stopped?)``."""
        if self._flushed:
            raise RuntimeError("StopMatcher.push() called after flush()")
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        if not text:
            return "", False

        buf = self._held + text
        # `buf` has no complete stop inside the held part, so every match found here ends in
        # `text`; the first occurrence of each stop is its earliest-ending one.
        best_start = -1
        best_end = len(buf) + 1
        best: str | None = None
        for stop in self._stops:
            start = buf.find(stop)
            if start < 0:
                continue
            end = start + len(stop)
            if end < best_end or (end == best_end and start < best_start):
                best_start, best_end, best = start, end, stop
        if best is not None:
            self._stopped = True
            self._matched = best
            self._held = ""
            return buf[: best_end if self._include_stop else best_start], True

        hold = self._hold_length(buf)
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def _hold_length(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[len(buf) - k :] in self._prefixes:
                return k
        return 0

    def flush(self) -> str:
        """End of generation for another reason: release held-back text (``""`` if stopped)."""
        self._flushed = True
        held, self._held = self._held, ""
        return "" if self._stopped else held
