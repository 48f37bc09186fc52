"""What a generation is asked for and what it gives back: `GenerationRequest` (with the parameters
that make its cache key) and the items a stream yields (`TextChunk`s, or a `MergedChunk` of several
when the reader or the process fell behind, a `PromptLogprobs` when asked for, then one final `Completion`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from frontend.engine.request import EngineRequest
from frontend.observability.requests import current_request_id
from frontend.sampling import SamplingParams

__all__ = [
    "Completion",
    "GenerationRequest",
    "MergedChunk",
    "PromptLogprobs",
    "StreamItem",
    "TextChunk",
    "token_chunks",
]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    seed: int | None = None
    timeout_s: float | None = None  # the client's deadline (capped by settings.request_timeout_s)
    # vLLM's stop controls (carried to the engine) and text options (applied here).
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int = -1  # >= 0: the prompt's logprobs come first (OpenAI echo); never cached
    # The HTTP request's id (X-Request-Id), for the engine to pass on; never part of the cache key.
    request_id: str | None = field(default_factory=current_request_id, compare=False)

    def engine_request(self) -> EngineRequest:
        """What the engine is asked for (the text options stay here: stop strings, detokenizing)."""
        return EngineRequest(
            self.prompt_ids,
            self.sampling,
            self.max_new_tokens,
            self.seed,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids,
            request_id=self.request_id,
            prompt_logprobs=self.prompt_logprobs,
        )

    def cache_params(self) -> dict[str, Any]:
        sampling = asdict(self.sampling)
        for name, neutral in _NEUTRAL_SAMPLING.items():  # keys of plain requests stay as they were
            if sampling[name] == neutral:
                del sampling[name]
        params: dict[str, Any] = {
            **sampling,
            "max_new_tokens": self.max_new_tokens,
            "stop": list(self.stop),
            "seed": self.seed,
        }
        # Only options that differ from their neutral value: keys of plain requests stay as they were.
        for name, neutral in _NEUTRAL_OPTIONS.items():
            value = getattr(self, name)
            if value != neutral:
                params[name] = list(value) if isinstance(value, tuple) else value
        return params


_NEUTRAL_SAMPLING: dict[str, object] = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": ()}
_NEUTRAL_OPTIONS: dict[str, object] = {
    "ignore_eos": False,
    "min_tokens": 0,
    "stop_token_ids": (),
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "prompt_logprobs": -1,
}


@dataclass(frozen=True)
class TextChunk:
    """New text. `token_id`/`position` name the token that produced it; both are None for text
    held back (a possible stop-string prefix) and released when the generation ends."""

    text: str
    token_id: int | None
    position: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()

    @property
    def token_count(self) -> int:
        """Generated tokens this item carries (0 for held-back text)."""
        return 0 if self.token_id is None else 1


@dataclass(frozen=True)
class MergedChunk:
    """Several `TextChunk`s in one stream item: the tokens that were waiting when the reader (the
    SSE writer) pulled again, so one event carries them all (vLLM's coalescing of a slow stream).
    `text` is the concatenation of `chunks`' texts; `chunks` are each token's own, in order (the
    last may be held-back text with no token). A reader that keeps up, in a process that keeps up
    (frontend.generation.pacing), never gets one. Tokens that shared one decode
    (`TextAssembler(per_token_text=False)`) carry their text in the first of them."""

    chunks: tuple[TextChunk, ...]
    text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", "".join(c.text for c in self.chunks))

    @property
    def token_count(self) -> int:
        return sum(c.token_id is not None for c in self.chunks)


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's own logprobs (a request with `prompt_logprobs` >= 0), before its first
    `TextChunk`: entry t for prompt token t (None at t = 0) and its top alternatives."""

    logprobs: tuple[float | None, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    chunks: list[TextChunk] = field(default_factory=list)
    time_to_first_token_s: float | None = None
    total_s: float = 0.0
    # The prompt's own logprobs when asked (echo): entry t for prompt token t (None at t = 0).
    prompt_logprobs: tuple[float | None, ...] | None = None
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


StreamItem = TextChunk | MergedChunk | PromptLogprobs | Completion  # what `GenerationService.stream` yields


def token_chunks(item: TextChunk | MergedChunk) -> tuple[TextChunk, ...]:
    """The per-token chunks a text item carries, in order (one for a `TextChunk`)."""
    return (item,) if isinstance(item, TextChunk) else item.chunks
