"""Request field types shared by the OpenAI and native routes."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit too)


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


def logit_bias_pairs(value: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """The validated mapping as (token id, bias) pairs sorted by id."""
    return tuple(sorted((int(k), float(v)) for k, v in (value or {}).items()))
