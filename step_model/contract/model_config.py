"""The `parameters` of a step model's config.pbtxt, written by the exporter and read by the gateway
and the Triton model: one writer and one reader of the same text.

A parameter is `parameters { key: "<key>" value: { string_value: "<value>" } }` (Triton's
ModelParameter). The keys are `step_model.contract.CONFIG_*`; each can be overridden at serve
time by the environment variable `env_name(key)`. The reader parses protobuf's text format (the
subset config.pbtxt uses: fields, nested messages, lists, quoted strings, comments), so it does
not depend on how the file is laid out, and needs no protobuf package.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias

_TOKEN = re.compile(
    r"""\s+|\#[^\n]*                     # whitespace, comments
    |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<punct>[{}\[\]<>:,;])
    |(?P<word>[^\s{}\[\]<>:,;"'\#]+)""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}
_CLOSE = {"{": "}", "<": ">"}

# A message as its fields in order: (name, scalar text or nested message); a repeated field appears
# once per value.
Message: TypeAlias = list[tuple[str, "str | Message"]]


class ConfigSyntaxError(ValueError):
    """The text is not protobuf text format (as far as this reader understands it)."""


def env_name(key: str) -> str:
    """The environment variable that overrides config parameter `key` at serve time."""
    return f"GPT2_{key.upper()}"


def setting(params: Mapping[str, str], key: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    """Parameter `key`: its environment variable when set and not empty (empty means unset), else
    `params[key]`, else `default`."""
    env = os.environ if environ is None else environ
    return env.get(env_name(key)) or params.get(key, default)


def format_parameters(params: Mapping[str, object]) -> str:
    """config.pbtxt lines for `params`, one `parameters { ... }` entry per key, values as strings."""
    return "\n".join(
        f'parameters {{ key: "{_quote(key)}" value: {{ string_value: "{_quote(str(value))}" }} }}'
        for key, value in params.items()
    )


def parameters(config_text: str) -> dict[str, str]:
    """The `parameters` of a config.pbtxt text as {key: string_value} (a later key wins)."""
    out: dict[str, str] = {}
    for name, entry in parse(config_text):
        if name != "parameters" or isinstance(entry, str):
            continue
        fields = dict(entry)
        value = fields.get("value")
        key = fields.get("key")
        if isinstance(key, str) and not isinstance(value, str) and value is not None:
            string_value = dict(value).get("string_value")
            if isinstance(string_value, str):
                out[key] = string_value
    return out


def read_parameters(config_path: Path) -> dict[str, str]:
    """`parameters()` of the file at `config_path` (OSError when it cannot be read)."""
    return parameters(config_path.read_text())


def parse(text: str) -> Message:
    """Parse protobuf text format into its top-level fields (strings unquoted, numbers as text)."""
    tokens = _tokens(text)
    message, end = _message(tokens, 0, closer=None)
    assert end == len(tokens)
    return message


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unquote(token: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), token[1:-1])


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; kind is "string", "punct" or "word"."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ConfigSyntaxError(f"unexpected character {text[pos]!r} at offset {pos}")
        pos = match.end()
        if match.lastgroup:
            out.append((match.lastgroup, match.group(match.lastgroup)))
    return out


def _message(tokens: list[tuple[str, str]], i: int, closer: str | None) -> tuple[Message, int]:
    """Fields from tokens[i] up to `closer` (None: the end); returns them and the index after."""
    fields: Message = []
    while i < len(tokens) and tokens[i] != ("punct", closer):
        kind, name = tokens[i]
        if kind != "word":
            raise ConfigSyntaxError(f"expected a field name, got {name!r}")
        i += 1
        if i < len(tokens) and tokens[i] == ("punct", ":"):
            i += 1
        if i < len(tokens) and tokens[i] == ("punct", "["):
            i += 1
            while tokens[i : i + 1] != [("punct", "]")]:
                value, i = _value(tokens, i)
                fields.append((name, value))
                if i < len(tokens) and tokens[i] == ("punct", ","):
                    i += 1
            i += 1  # the "]"
        else:
            value, i = _value(tokens, i)
            fields.append((name, value))
        if i < len(tokens) and tokens[i] in (("punct", ","), ("punct", ";")):
            i += 1
    if closer is not None and i >= len(tokens):
        raise ConfigSyntaxError(f"missing {closer!r}")
    return fields, i + (closer is not None)


def _value(tokens: list[tuple[str, str]], i: int) -> tuple[str | Message, int]:
    """One value at tokens[i]: a nested message, adjacent strings (joined) or a bare word."""
    if i >= len(tokens):
        raise ConfigSyntaxError("a field has no value")
    kind, text = tokens[i]
    if kind == "punct" and text in _CLOSE:
        return _message(tokens, i + 1, closer=_CLOSE[text])
    if kind == "word":
        return text, i + 1
    if kind != "string":
        raise ConfigSyntaxError(f"expected a value, got {text!r}")
    parts = []
    while i < len(tokens) and tokens[i][0] == "string":
        parts.append(_unquote(tokens[i][1]))
        i += 1
    return "".join(parts), i


def instance_names(model: str, instances: int) -> list[str]:
    """The Triton models that serve `model` as `instances` instances, each with its own KV pool:
    `model` itself, then `model_1`, `model_2`, ... (`export.repository.write_instances` writes
    them beside it; the gateway's placement layer steps each sequence on one of them)."""
    if instances < 1:
        raise ValueError("instances must be >= 1")
    return [model, *(f"{model}_{i}" for i in range(1, instances))]
