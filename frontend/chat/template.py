"""Render a conversation into a prompt with a Hugging Face Jinja chat template.

Rendering goes through transformers' `apply_chat_template` rather than jinja2 directly: it is the
renderer the checkpoints' templates are written and tested against (a sandboxed environment,
`raise_exception`, `strftime_now`, the tokenizer's special tokens such as `eos_token` and
`bos_token` as variables, loop controls), so a template behaves here as it does in transformers
and vLLM. Which template: the file the gateway was started with (`GATEWAY_CHAT_TEMPLATE`, as
vLLM's `--chat-template`) wins over the checkpoint's own (`chat_template` in its
tokenizer_config.json, or chat_template.jinja, loaded with the tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from frontend import errors

EXAMPLE_TEMPLATE = "examples/chat_template.jinja"


class ChatTemplateMissing(errors.InvalidRequest):
    code = "chat_template_missing"


def load_chat_template(path: Path | None) -> str | None:
    """The template text of `path` (None: none configured). A missing or unreadable file fails
    the start, not the first chat request."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"GATEWAY_CHAT_TEMPLATE={path}: cannot read the chat template ({err})") from err
    try:
        jinja2.Environment().parse(text)  # a syntax error fails the start too
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"GATEWAY_CHAT_TEMPLATE={path}: line {err.lineno}: {err.message}") from err
    return text


def render_chat(
    tokenizer: Any,
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    param: str = "messages",
) -> str:
    """The prompt text for `messages` (dicts with `role` and string `content`)."""
    if template is None:
        raise ChatTemplateMissing(
            "This model has no chat template, so /v1/chat/completions cannot build a prompt: its "
            "tokenizer_config.json carries no `chat_template`. Start the gateway with "
            f"GATEWAY_CHAT_TEMPLATE=/path/to/template.jinja (an example for GPT-2: {EXAMPLE_TEMPLATE}), "
            "or send the prompt yourself to /v1/completions.",
            param=param,
        )
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except jinja2.TemplateError as err:  # raise_exception() in the template, or a template bug
        raise errors.InvalidRequest(f"the chat template refused the conversation: {err}", param=param) from err
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text
