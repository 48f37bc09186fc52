"""vLLM's tokenization shapes (vllm/entrypoints/openai/protocol.py): a prompt or a chat
conversation in, ids (and optionally their token strings) out; ids in, text out."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from frontend.api.openai.chat.protocol import ChatMessage
from frontend.api.text_fields import Text


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) and TokenizeChatRequest (`messages`) in one model:
    exactly one of the two, and each field's error names the field itself (not a union member)."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    prompt: Text | None = Field(None, description="text to tokenize (vLLM's TokenizeCompletionRequest)")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="a conversation, rendered by the chat template (vLLM's TokenizeChatRequest)"
    )
    add_generation_prompt: bool = Field(True, description="messages: end with the template's assistant turn")
    add_special_tokens: bool | None = Field(
        None, description="add the tokenizer's special tokens (e.g. BOS); default true for prompt, false for messages"
    )
    return_token_strs: bool | None = Field(False, description="also return each token's string")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
