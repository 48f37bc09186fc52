"""The steady-state rate of a closed-loop run: tokens generated while every user was busy (pure).

A closed-loop run starts with every user sending at once (a prefill storm, then a first wave of
answers) and ends with users dropping out one by one; its whole-run tok/s mixes both with the
steady state. The steady window here runs from the moment every user has had its first answer to
the moment the first user has had its last one: inside it every user is in a request or in its
think time, so the server sees the run's full concurrency. The steady-state rate is the tokens
generated inside the window over the window's length.

A request's tokens are spread evenly between its first token and its end (the first token at
start + TTFT: the client's for streams, the gateway's own `timings` for /generate, else the
request's start), so a request that straddles an edge of the window counts for its share inside.
Only successful requests' tokens count, as in the whole-run tok/s. Runs whose users send fewer
than two requests, and open-loop runs, have no steady window (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.load.client import RequestResult


@dataclass(frozen=True)
class SteadyState:
    """The steady window (seconds from the run's start) and what was generated inside it."""

    start_s: float
    end_s: float
    tokens: float
    tokens_per_s: float
    share_of_tokens: float | None  # of the run's tokens (successful requests)

    @property
    def window_s(self) -> float:
        return self.end_s - self.start_s


def _span(r: RequestResult) -> tuple[float, float]:
    """(first token, end) of a request, seconds from the run's start."""
    latency = r.latency_s or 0.0
    first = r.ttft_s if r.ttft_s is not None else r.server_ttft_s
    first = min(max(first or 0.0, 0.0), latency)
    return r.start_s + first, r.start_s + latency


def tokens_between(r: RequestResult, start_s: float, end_s: float) -> float:
    """The share of `r`'s completion tokens generated in [start_s, end_s] (tokens spread evenly)."""
    first, end = _span(r)
    if end <= first:  # all at one instant
        return float(r.completion_tokens) if start_s <= end <= end_s else 0.0
    overlap = min(end, end_s) - max(first, start_s)
    return r.completion_tokens * max(0.0, overlap) / (end - first)


def steady_window(results: Sequence[RequestResult]) -> tuple[float, float] | None:
    """(every user's first request done, the first user's last request done); None without one."""
    by_user: dict[int, list[RequestResult]] = {}
    for r in results:
        if r.user >= 0 and r.latency_s is not None:
            by_user.setdefault(r.user, []).append(r)
    if not by_user or any(len(mine) < 2 for mine in by_user.values()):
        return None
    firsts, lasts = [], []
    for mine in by_user.values():
        mine.sort(key=lambda r: r.start_s)
        firsts.append(_span(mine[0])[1])
        lasts.append(_span(mine[-1])[1])
    start, end = max(firsts), min(lasts)
    return (start, end) if end > start else None


def steady_state(results: Sequence[RequestResult]) -> SteadyState | None:
    """The run's steady window and rate (module docstring); None when there is no window."""
    window = steady_window(results)
    if window is None:
        return None
    start, end = window
    ok = [r for r in results if r.ok]
    tokens = sum(tokens_between(r, start, end) for r in ok)
    total = sum(r.completion_tokens for r in ok)
    return SteadyState(start, end, tokens, tokens / (end - start), tokens / total if total else None)
