"""Request field types shared by the OpenAI and native routes."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit too)
# Below this a temperature is greedy (vLLM's _SAMPLING_EPS): the server divides fp32 logits by it,
# and a tinier one (1e-40, or 1e-300, which is 0 in fp32) would make the row infinite.
GREEDY_BELOW_TEMPERATURE = 1e-5
# 1/100 scales a logit by 100 at most; below that a penalty only overflows float32 (1e-300 did).
MIN_REPETITION_PENALTY = 0.01


def _greedy_when_tiny(value: float | None) -> float | None:
    return 0.0 if value is not None and value < GREEDY_BELOW_TEMPERATURE else value


def _check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    for key, bias in (value or {}).items():
        if not key.isascii() or not key.isdigit():
            raise ValueError(f"logit_bias keys must be token ids, got {key[:32]!r}")
        if not -100.0 <= bias <= 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
    return value


# OpenAI's logit_bias: {"token id": bias}. Ids beyond the vocabulary are refused by the service.
LogitBias = Annotated[
    dict[str, float] | None,
    Field(
        max_length=MAX_LOGIT_BIAS,
        description="token id (as a string) -> bias in [-100, 100] added to its logit before sampling",
    ),
    AfterValidator(_check_logit_bias),
]
PresencePenalty = Annotated[
    float, Field(ge=-2.0, le=2.0, description="subtracted from the logit of every token generated so far")
]
FrequencyPenalty = Annotated[
    float, Field(ge=-2.0, le=2.0, description="subtracted from a token's logit once per time it was generated")
]


_TEMPERATURE_HELP = f"0 = greedy (so is anything below {GREEDY_BELOW_TEMPERATURE:g})"
OpenAITemperature = Annotated[
    float | None, Field(ge=0.0, le=2.0, description=_TEMPERATURE_HELP), AfterValidator(_greedy_when_tiny)
]
NativeTemperature = Annotated[
    float, Field(ge=0.0, le=5.0, description=_TEMPERATURE_HELP), AfterValidator(_greedy_when_tiny)
]
RepetitionPenalty = Annotated[
    float,
    Field(
        ge=MIN_REPETITION_PENALTY,
        le=10.0,
        description="divides the positive logits (multiplies the negative ones) of tokens already in the prompt "
        "or the output; 1 = off",
    ),
]


def logit_bias_pairs(value: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """The validated mapping as (token id, bias) pairs sorted by id."""
    return tuple(sorted((int(k), float(v)) for k, v in (value or {}).items()))
