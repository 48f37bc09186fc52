"""Requests prepared and checked against the served model and the server's limits (field ranges
are the schema's job): tokenizing, detokenizing, rendering a chat, and `prepare` itself.

The model is read from the engine where it is needed (it raises UpstreamUnavailable until the
engine has started), so a refusal that needs no model comes first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from frontend import errors
from frontend.chat import render_chat
from frontend.engine.model import ServedModel
from frontend.engine.protocol import Engine
from frontend.generation.params import FieldNames, GenerationParams
from frontend.generation.types import GenerationRequest
from frontend.sampling import SamplingParams
from frontend.settings import Settings

FIELD_NAMES = FieldNames()  # the native field names, for error messages


def check_model(engine: Engine, name: str | None, *, param: str = "model") -> None:
    """404 (model_not_found) unless `name` is the served model (None: any)."""
    served = engine.model.name
    if name is not None and name != served:
        raise errors.ModelNotFound(f"The model `{name}` does not exist. This server serves `{served}`.", param=param)


def chat_template(engine: Engine, configured: str | None) -> str | None:
    """`configured` (GATEWAY_CHAT_TEMPLATE's template), else the checkpoint's own, else None."""
    return configured or getattr(engine.model.tokenizer, "chat_template", None)


def chat_prompt(
    engine: Engine,
    configured_template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    param: str = "messages",
) -> str:
    """The conversation rendered by the chat template (400 with how to configure one when there is none)."""
    if not messages:
        raise errors.InvalidRequest("messages must not be empty", param=param)
    return render_chat(
        engine.model.tokenizer,
        chat_template(engine, configured_template),
        messages,
        add_generation_prompt=add_generation_prompt,
        param=param,
    )


def detokenize(
    engine: Engine, token_ids: Sequence[int], *, param: str = "tokens", skip_special_tokens: bool = False
) -> str:
    check_token_ids(engine.model, token_ids, param)
    return str(engine.model.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))


def check_token_ids(model: ServedModel, token_ids: Sequence[int], param: str) -> None:
    vocab_size = model.vocab_size
    if any(t < 0 or t >= vocab_size for t in token_ids):
        raise errors.InvalidRequest(f"token ids must be in [0, {vocab_size})", param=param)


def tokenize(
    engine: Engine,
    settings: Settings,
    prompt: str | Sequence[int],
    *,
    param: str = "prompt",
    add_special_tokens: bool = True,
) -> tuple[int, ...]:
    model = engine.model
    if isinstance(prompt, str):
        if not prompt:
            raise errors.InvalidRequest("prompt must not be empty", param=param)
        limit = settings.max_prompt_chars
        if len(prompt) > limit:
            raise errors.InvalidRequest(
                f"prompt has {len(prompt)} characters; this server accepts at most {limit}", param=param
            )
        ids = tuple(model.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    else:
        ids = tuple(int(t) for t in prompt)
        check_token_ids(model, ids, param)
    if not ids:
        raise errors.InvalidRequest("prompt must not be empty", param=param)
    return ids


def prepare(
    engine: Engine,
    settings: Settings,
    prompt_ids: tuple[int, ...],
    params: GenerationParams,
    names: FieldNames = FIELD_NAMES,
) -> GenerationRequest:
    """Check what needs the model or the server's limits and build the request. `names` are the
    client's field names, for error messages."""
    check_stops(settings, params.stop, names.stop)
    model = engine.model
    max_new_tokens = params.max_new_tokens
    limit = settings.max_new_tokens_limit
    if max_new_tokens > limit:
        raise errors.InvalidRequest(
            f"{names.max_new_tokens} {max_new_tokens} exceeds this server's limit of {limit}",
            param=names.max_new_tokens,
        )
    total = len(prompt_ids) + max_new_tokens
    if total > model.max_context:
        raise errors.ContextLengthExceeded(
            f"This model's maximum context length is {model.max_context} tokens, however you requested "
            f"{total} tokens ({len(prompt_ids)} in your prompt; {max_new_tokens} for the completion).",
            param=names.prompt,
        )
    check_stop_controls(model, settings, params, names)
    sampling = SamplingParams(
        temperature=float(params.temperature),
        top_k=0 if params.top_k >= model.vocab_size else int(params.top_k),
        top_p=float(params.top_p),
        min_p=float(params.min_p),
        repetition_penalty=float(params.repetition_penalty),
        logprobs=int(params.logprobs),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        logit_bias=params.logit_bias,
    )
    return GenerationRequest(
        prompt_ids,
        max_new_tokens,
        sampling,
        tuple(params.stop),
        params.seed,
        params.timeout_s,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        stop_token_ids=tuple(dict.fromkeys(params.stop_token_ids)),
        include_stop_str_in_output=params.include_stop_str_in_output,
        skip_special_tokens=params.skip_special_tokens,
        prompt_logprobs=params.prompt_logprobs,
    )


def check_stop_controls(model: ServedModel, settings: Settings, params: GenerationParams, names: FieldNames) -> None:
    if params.min_tokens > params.max_new_tokens:
        raise errors.InvalidRequest(
            f"{names.min_tokens} ({params.min_tokens}) must not exceed {names.max_new_tokens} "
            f"({params.max_new_tokens})",
            param=names.min_tokens,
        )
    if len(params.stop_token_ids) > settings.max_stop_token_ids:
        raise errors.InvalidRequest(
            f"at most {settings.max_stop_token_ids} stop token ids are allowed, got {len(params.stop_token_ids)}",
            param=names.stop_token_ids,
        )
    check_token_ids(model, params.stop_token_ids, names.stop_token_ids)
    check_token_ids(model, [i for i, _ in params.logit_bias], names.logit_bias)


def check_stops(settings: Settings, stop: Sequence[str], param: str) -> None:
    most, longest = settings.max_stop_sequences, settings.max_stop_chars
    if len(stop) > most:
        raise errors.InvalidRequest(f"at most {most} stop sequences are allowed, got {len(stop)}", param=param)
    for s in stop:
        if len(s) > longest:
            raise errors.InvalidRequest(
                f"a stop sequence has {len(s)} characters; this server accepts at most {longest}", param=param
            )
