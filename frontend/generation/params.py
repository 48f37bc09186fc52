"""What a client asks of one generation, independent of the route that asked.

Request models convert themselves into `GenerationParams` (`to_generation_params()`); the service
checks them against the model and the server's limits (`GenerationService.prepare`) and turns them
into a `GenerationRequest`. `FieldNames` maps each parameter to the client's own field name, so an
error says `max_tokens` on /v1/completions, `max_completion_tokens` on chat and
`requests[2].max_new_tokens` in a native batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GenerationParams:
    """Sampling, stopping and text options of one generation (defaults are the neutral values).

    `ignore_eos`, `min_tokens` and `stop_token_ids` are carried down to the engine (`submit`);
    `stop_token_ids` is also enforced by the service. `include_stop_str_in_output` and
    `skip_special_tokens` are text-level and handled by the service alone.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int = 0  # alternatives per token in top_logprobs
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int = -1  # >= 0: the prompt's own logprobs with this many alternatives (echo)
    timeout_s: float | None = None  # the client's deadline (capped by settings.request_timeout_s)

    def for_choice(self, j: int) -> GenerationParams:
        """Choice `j` of `n`: sampled with `seed + j` (the same seed would give n equal choices)."""
        return self if self.seed is None or j == 0 else replace(self, seed=self.seed + j)


@dataclass(frozen=True)
class FieldNames:
    """The client's names of the fields behind each parameter, for error messages."""

    prompt: str = "prompt"
    max_new_tokens: str = "max_new_tokens"
    stop: str = "stop"
    min_tokens: str = "min_tokens"
    stop_token_ids: str = "stop_token_ids"
    ignore_eos: str = "ignore_eos"
    logit_bias: str = "logit_bias"

    def under(self, prefix: str) -> FieldNames:
        """The same names inside a list item, e.g. `requests[2].`."""
        return FieldNames(**{k: prefix + v for k, v in self.__dict__.items()})
