"""Request and response models of the native routes (/generate, /generate/stream, /generate/batch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from frontend.api.sampling_fields import (
    FrequencyPenalty,
    LogitBias,
    NativeTemperature,
    PresencePenalty,
    RepetitionPenalty,
    logit_bias_pairs,
)
from frontend.api.text_fields import Text
from frontend.generation.params import GenerationParams


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(min_length=1, description="the text to continue (any Unicode)")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate at most")
    temperature: NativeTemperature = 1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: PresencePenalty = 0.0
    frequency_penalty: FrequencyPenalty = 0.0
    logit_bias: LogitBias = None
    stop: list[Text] = Field(
        default_factory=list,
        description="stop strings (not returned); count and length limited by the server's settings",
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible (and cacheable)")
    timeout: float | None = Field(
        None, gt=0, description="seconds this generation may take (capped by the server's maximum); then 504"
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="/generate only: also return each prompt token's logprob given the tokens before it, "
        "with this many alternatives (as OpenAI's echo + logprobs)",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    def to_generation_params(self, *, timeout_s: float | None = None) -> GenerationParams:
        """`timeout_s`: the X-Request-Timeout header's, used when the body sets no `timeout`."""
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=logit_bias_pairs(self.logit_bias),
            stop=tuple(self.stop),
            seed=self.seed,
            prompt_logprobs=-1 if self.prompt_logprobs is None else self.prompt_logprobs,
            timeout_s=self.timeout or timeout_s,
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    time_to_first_token_s: float | None
    total_s: float


class TokenLogprob(BaseModel):
    token_id: int
    logprob: float


class PromptTokenLogprob(BaseModel):
    token_id: int
    text: str
    logprob: float | None  # None for the first token (nothing precedes it)
    top_logprobs: list[TokenLogprob]


class GenerateResponse(BaseModel):
    generated_text: str
    model: str
    finish_reason: str
    completion_tokens: int
    usage: Usage
    cached: bool
    timings: Timings
    prompt_logprobs: list[PromptTokenLogprob] | None = None  # when the request asked (`prompt_logprobs`)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[GenerateRequest] = Field(min_length=1)


class BatchItem(BaseModel):
    generated_text: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    usage: Usage | None = None
    cached: bool = False
    error: dict[str, object] | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]
    cache_hits: int
