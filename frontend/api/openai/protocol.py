"""Request and response models shared by the OpenAI routes, and those of legacy completions and
models, as the official `openai` SDK sends and reads them. Requests convert themselves into
generation parameters (`to_generation_params()`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from frontend import errors
from frontend.api.sampling_fields import (
    FrequencyPenalty,
    LogitBias,
    OpenAITemperature,
    PresencePenalty,
    RepetitionPenalty,
    logit_bias_pairs,
)
from frontend.api.text_fields import NonEmptyText, Text
from frontend.generation.params import GenerationParams

Prompt = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | Annotated[list[int], Field(min_length=1)]
    | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
)
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The sampling and stopping fields /v1/completions and /v1/chat/completions share: OpenAI's,
    then vLLM's extensions (pass them with the SDK's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    model: Text
    temperature: OpenAITemperature = 1.0
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    timeout: float | None = Field(
        None, gt=0, description="seconds this completion may take (capped by the server's maximum); then 504"
    )
    user: Text | None = Field(None, max_length=256)
    presence_penalty: PresencePenalty | None = 0.0
    frequency_penalty: FrequencyPenalty | None = 0.0
    logit_bias: LogitBias = None
    # vLLM's sampling extensions.
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 = off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: RepetitionPenalty = 1.0
    ignore_eos: bool = Field(False, description="keep generating after the end-of-text token")
    min_tokens: int = Field(0, ge=0, description="tokens to generate before eos, stop_token_ids or stop may end it")
    stop_token_ids: list[TokenId] | None = Field(None, description="token ids that end the generation (finish stop)")
    include_stop_str_in_output: bool = Field(False, description="keep the stop string or stop token in the text")
    skip_special_tokens: bool = Field(True, description="leave special tokens out of the text")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_supported(self) -> None:
        """Fields the schema accepts but this server does not implement (400 that names them)."""

    def _generation_params(self, *, max_new_tokens: int, logprobs: int, timeout_s: float | None) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=logit_bias_pairs(self.logit_bias),
            stop=tuple(self.stop_list()),
            seed=self.seed,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            timeout_s=self.timeout or timeout_s,
        )


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: the prompt and its logprobs alone")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    # Accepted for compatibility; only their neutral values are supported (check_supported).
    best_of: int | None = Field(None, ge=1)
    suffix: Text | None = None

    def check_supported(self) -> None:
        if self.best_of not in (None, self.n):
            raise errors.InvalidRequest("best_of is not supported", param="best_of")
        super().check_supported()
        if self.suffix:
            raise errors.InvalidRequest("suffix is not supported", param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise errors.InvalidRequest("max_tokens must be at least 1 (0 only with echo)", param="max_tokens")

    def to_generation_params(self, *, timeout_s: float | None = None) -> GenerationParams:
        """`timeout_s`: the X-Request-Timeout header's, used when the body sets no `timeout`."""
        params = self._generation_params(
            max_new_tokens=16 if self.max_tokens is None else self.max_tokens,
            logprobs=self.logprobs or 0,
            timeout_s=timeout_s,
        )
        # echo + logprobs: the prompt's own logprobs too (computed in the prefill, lm-eval's
        # loglikelihood requests).
        return replace(params, prompt_logprobs=self.logprobs) if self.echo and self.logprobs is not None else params


class LogProbs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    def __add__(self, other: LogProbs) -> LogProbs:
        """These tokens, then `other`'s (the echoed prompt, then the completion)."""
        return LogProbs(
            tokens=self.tokens + other.tokens,
            token_logprobs=self.token_logprobs + other.token_logprobs,
            top_logprobs=self.top_logprobs + other.top_logprobs,
            text_offset=self.text_offset + other.text_offset,
        )


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    text: str
    index: int
    logprobs: LogProbs | None = None
    finish_reason: FinishReason | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2-serving"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
