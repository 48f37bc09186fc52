"""`EngineRequest`: one generation as every engine takes it (vLLM's `EngineCoreRequest`), in
process and across the engine core's wire alike."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from frontend.sampling import SamplingParams

__all__ = ["EngineRequest"]


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What to generate: `max_new_tokens` tokens after `prompt_ids`, drawn with `params` from the
    stream of uniforms `seed` names (None: a fresh one).

    vLLM's stop controls: `ignore_eos` (the end-of-text token is emitted like any other and does
    not finish the generation), `stop_token_ids` (emitting one finishes it with FinishEvent("stop")
    right after its TokenEvent), `min_tokens` (while fewer were generated, end-of-text and the stop
    ids have probability 0, the distribution renormalised). `request_id` (the HTTP request's
    X-Request-Id) travels with the generation's step rows to Triton
    (`step_model.contract.PARAM_REQUEST_IDS`). `prompt_logprobs` >= 0: a PromptLogprobsEvent with
    that many alternatives per position comes before the first token (OpenAI `echo`); with
    `max_new_tokens` 0 the generation ends after it."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    max_new_tokens: int
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Sequence[int] = ()
    request_id: str | None = None
    prompt_logprobs: int = -1

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickled once per generation on the engine core's wire, so as plain tuples: the fields in
        # order, SamplingParams' too. A slotted frozen dataclass's default pickle (its state, its
        # class looked up by name) made the submit frame ~40% slower to write and read than the
        # loose tuple it replaced; this one is no slower (measured on 200-token prompts).
        return (
            _from_wire,
            (
                self.prompt_ids,
                _params_fields(self.params),
                self.max_new_tokens,
                self.seed,
                self.ignore_eos,
                self.min_tokens,
                self.stop_token_ids,
                self.request_id,
                self.prompt_logprobs,
            ),
        )


_params_fields = operator.attrgetter(*(f.name for f in fields(SamplingParams)))


def _from_wire(prompt_ids: Sequence[int], params: tuple[Any, ...], *rest: Any) -> EngineRequest:
    """The request `EngineRequest.__reduce__` wrote."""
    return EngineRequest(prompt_ids, SamplingParams(*params), *rest)
