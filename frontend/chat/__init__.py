"""Chat prompts: a conversation rendered into one prompt by the checkpoint's Jinja chat template
(Hugging Face's `chat_template`) or the one the gateway was started with (`GATEWAY_CHAT_TEMPLATE`)."""

from frontend.chat.template import ChatTemplateMissing, load_chat_template, render_chat

__all__ = ["ChatTemplateMissing", "load_chat_template", "render_chat"]
