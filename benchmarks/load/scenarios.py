"""Scenarios, prompts and the request plans of a run: what to send and when."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.report import (
    to_jsonable,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
THINK_TIME_S = 0.1
BATCH_SIZE = 4  # prompts per /generate/batch request
ENDPOINTS = {
    "generate": "/generate",
    "stream": "/generate/stream",
    "batch": "/generate/batch",
    "completions": "/v1/completions",  # OpenAI's legacy completions, streamed (`stream: true`) as OpenAI clients send
}
DEFAULT_MODEL = "gpt2"  # the served model's name: /v1/completions requests carry it


@dataclass(frozen=True)
class Scenario:
    """A closed-loop scenario of the seed article: `users` x `requests_per_user`, `max_new_tokens` each."""

    name: str
    users: int
    requests_per_user: int
    max_new_tokens: int


SCENARIOS: dict[str, Scenario] = {
    "light": Scenario("light", users=5, requests_per_user=10, max_new_tokens=50),
    "medium": Scenario("medium", users=15, requests_per_user=10, max_new_tokens=100),
    "heavy": Scenario("heavy", users=30, requests_per_user=5, max_new_tokens=200),
}


@dataclass(frozen=True)
class SeedRow:
    """One row of the seed article's published results (hardware unknown)."""

    endpoint: str
    success_rate: float
    mean_s: float
    p95_s: float
    requests_per_s: float


SEED_ARTICLE: dict[str, SeedRow] = {
    "/generate/robust": SeedRow("/generate/robust", 0.992, 1.234, 2.156, 24.3),
    "/generate/secure": SeedRow("/generate/secure", 0.987, 1.387, 2.245, 21.8),
    "/generate/batch": SeedRow("/generate/batch", 0.998, 0.892, 1.432, 33.7),
}

# Deterministic prompt pool: varied English and Japanese. Order matters (the --seed picks by index).
PROMPTS: tuple[str, ...] = (
    "The history of the printing press begins",
    "Once upon a time, in a small village by the sea,",
    "Write a short product description for a waterproof hiking backpack:",
    "The three most important things to know about photosynthesis are",
    "In today's news, scientists announced",
    "def fibonacci(n):",
    "Dear hiring manager, I am writing to apply for",
    "The recipe calls for two cups of flour, one egg, and",
    "Explain to a ten-year-old why the sky is blue.",
    "The stock market opened lower on Monday as investors",
    "Here is a haiku about autumn leaves:",
    "Q: What is the capital of Australia?\nA:",
    "The old lighthouse keeper climbed the stairs one last time and",
    "Summary of the meeting: the team agreed to",
    "昔々、ある山奥の村に",
    "今日の東京の天気は",
    "人工知能の未来について考えると、",
    "このレストランのおすすめ料理は",
    "日本の四季の中で一番好きなのは",
    "新しいスマートフォンの特徴を説明します。まず、",
    "吾輩は猫である。名前はまだ無い。",
    "東京から大阪まで新幹線で行くと、",
)

# Words that are a single GPT-2 BPE token each when preceded by a space; used to pad prompts.
_FILLER = (
    "the of and to in is was for on that with as it by at from this be are or an not but have had one "
    "all were we when there can more if will so about out up into time some could them other than then "
    "now only its over new also after two most made way may first well water long little very"
)
_PIECE = re.compile(r"[A-Za-z]+|\d|\s+|[^\sA-Za-z\d]")


def estimate_tokens(text: str) -> int:
    """Rough GPT-2 BPE token count without a tokenizer: one per ASCII word/digit/symbol, two per non-ASCII char.

    Only used to size prompts for `--prompt-tokens` when no `--tokenizer` is given; the count the server
    reports (`usage.prompt_tokens`) is what gets recorded.
    """
    count = 0
    for piece in _PIECE.findall(text):
        if piece.isspace():
            continue
        count += 2 * len(piece) if not piece.isascii() else 1
    return count


def _longest_prefix(text: str, limit: int, counter: Any) -> str:
    """The longest prefix of `text` (at least one character) with at most `limit` tokens."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if counter(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def fit_prompt(prompt: str, target_tokens: int, count_tokens: Any = None) -> str:
    """`prompt` truncated, or padded with common English words, to about `target_tokens` tokens.

    `count_tokens(text) -> int` is the exact counter if given (a tokenizer), else `estimate_tokens`.
    The result never has more than `target_tokens` tokens by that counter (unless one character alone
    does) and usually has exactly that many. Deterministic.
    """
    counter = count_tokens or estimate_tokens
    if target_tokens <= 0:
        raise ValueError("target_tokens must be positive")
    if counter(prompt) > target_tokens:
        return _longest_prefix(prompt, target_tokens, counter)
    words = _FILLER.split()
    text = prompt
    i = 0
    while counter(text) < target_tokens:
        text += " " + words[i % len(words)]
        i += 1
    return text if counter(text) == target_tokens else _longest_prefix(text, target_tokens, counter)


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters sent with every request."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    # Sent only when set (not 0 / 1): OpenAI's penalties and the repetition penalty.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. `api_key` is never written to reports."""

    name: str
    endpoint: str  # generate | stream | batch
    mode: str  # closed | open
    base_url: str
    max_new_tokens: int
    sampling: Sampling
    seed: int
    seeded: bool
    timeout_s: float
    users: int = 0  # closed loop
    requests_per_user: int = 0  # closed loop
    think_time_s: float = THINK_TIME_S  # closed loop
    rate: float = 0.0  # open loop, requests per second
    duration_s: float = 0.0  # open loop
    prompt_tokens: int | None = None
    scenario: str | None = None  # light|medium|heavy when run as a named scenario
    modified: bool = False  # the named scenario's sizes were overridden by flags
    warmup: int = 1
    processes: int = 1  # load processes the users / arrivals are spread over (runner.py)
    model: str = DEFAULT_MODEL  # /v1/completions only
    ignore_eos: bool = False  # /v1/completions only: every request generates max_new_tokens (vLLM's extension)
    api_key: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """Parameters for reports (no secret; `api_key` becomes a boolean)."""
        d = to_jsonable(self)
        d.pop("api_key", None)
        d["auth"] = self.api_key is not None
        return d


@dataclass(frozen=True)
class RequestPlan:
    """One HTTP request to send. `prompts` has 1 entry, or BATCH_SIZE for the batch endpoint."""

    index: int
    user: int  # closed loop user id; -1 in open loop
    prompts: tuple[str, ...]
    seeds: tuple[int | None, ...]
    scheduled_s: float | None = None  # open loop: arrival offset from the run start


def make_plan(
    index: int, user: int, rng: random.Random, cfg: RunConfig, prompts: Sequence[str], scheduled_s: float | None = None
) -> RequestPlan:
    """One request: random prompt(s) and seed(s) from `rng` (seeds drawn even when unused, so --seeded
    does not change which prompts are picked)."""
    n = BATCH_SIZE if cfg.endpoint == "batch" else 1
    chosen = tuple(rng.choice(prompts) for _ in range(n))
    seeds = tuple(rng.randrange(2**31) for _ in range(n))
    return RequestPlan(index, user, chosen, seeds if cfg.seeded else (None,) * n, scheduled_s)


def closed_loop_plans(cfg: RunConfig, prompts: Sequence[str]) -> list[list[RequestPlan]]:
    """Per user, the list of requests it sends in order. Deterministic in `cfg.seed`."""
    rng = random.Random(cfg.seed)
    plans: list[list[RequestPlan]] = []
    index = 0
    for user in range(cfg.users):
        mine = []
        for _ in range(cfg.requests_per_user):
            mine.append(make_plan(index, user, rng, cfg, prompts))
            index += 1
        plans.append(mine)
    return plans


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival offsets (seconds) of a Poisson process of `rate` per second within [0, duration_s)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(seed * 2 + 1)
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def open_loop_plans(cfg: RunConfig, prompts: Sequence[str]) -> list[RequestPlan]:
    """Requests with their scheduled arrival offsets. Deterministic in `cfg.seed`."""
    rng = random.Random(cfg.seed)
    arrivals = poisson_arrivals(cfg.rate, cfg.duration_s, cfg.seed)
    return [make_plan(i, -1, rng, cfg, prompts, scheduled_s=t) for i, t in enumerate(arrivals)]


def prompt_pool(prompt_tokens: int | None, tokenizer: str | None = None) -> list[str]:
    """PROMPTS, each fitted to `prompt_tokens` tokens when given (exactly with `tokenizer`, else estimated)."""
    if prompt_tokens is None:
        return list(PROMPTS)
    counter = None
    if tokenizer:
        from transformers import AutoTokenizer  # heavy import only when asked for

        tok = AutoTokenizer.from_pretrained(tokenizer)

        def counter(text: str) -> int:
            return len(tok(text)["input_ids"])

    return [fit_prompt(p, prompt_tokens, counter) for p in PROMPTS]
