"""String fields that cannot hurt: text must be encodable Unicode.

JSON lets a client send a lone surrogate (`"abc\\ud800def"`); Python decodes it into a `str` that
cannot be encoded as UTF-8, so the tokenizer (and anything else that encodes it) fails. Every
string field of the request models is `Text`, which refuses such strings with a 400. Everything
else is text as the client wrote it: any script, NUL, bidi controls (the model takes them as it
takes any other characters; nothing here renders or logs them).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field


def _encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"must be valid Unicode text: a lone surrogate U+{ord(value[err.start]):04X} at character {err.start}"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_encodable)]
