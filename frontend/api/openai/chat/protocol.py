"""Chat completions as the official `openai` SDK sends and reads them, with vLLM's extensions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from frontend import errors
from frontend.api.openai.protocol import FinishReason, SamplingRequest, Usage
from frontend.api.text_fields import Text
from frontend.generation.params import GenerationParams


class TextPart(BaseModel):
    """A text content part; other kinds (images, audio) a text model cannot take."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: Text | None = Field(None, max_length=256)

    def text(self) -> str:
        """The content as one string (text parts joined, as vLLM's "string" content format)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI: max_completion_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
    # vLLM's chat extensions.
    add_generation_prompt: bool = Field(True, description="end the prompt with the template's assistant turn")

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise errors.InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def max_tokens_field(self) -> str:
        return (
            "max_tokens"
            if self.max_completion_tokens is None and self.max_tokens is not None
            else ("max_completion_tokens")
        )

    def to_generation_params(self, *, timeout_s: float | None = None) -> GenerationParams:
        """`timeout_s`: the X-Request-Timeout header's, used when the body sets no `timeout`."""
        max_new_tokens = self.max_completion_tokens or self.max_tokens or 16
        return self._generation_params(
            max_new_tokens=max_new_tokens, logprobs=self.top_logprobs or 0, timeout_s=timeout_s
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
