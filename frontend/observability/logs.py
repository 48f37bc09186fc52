"""Log set-up of the gateway's processes: plain text (default) or one JSON object per line.

`GATEWAY_LOG_FORMAT=json` uses python-json-logger: every record becomes an object with
`timestamp`, `level`, `logger`, `message`, `request_id` and the record's extra fields (the access
log's `method`, `path`, `status`, ... are top-level keys). uvicorn's own loggers are left to
propagate to the root logger then (`uvicorn_log_config`), so they are JSON too.
"""

from __future__ import annotations

import logging
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from frontend.observability.requests import RequestIdFilter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_gateway_handler"


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Install the gateway's one root handler (stderr); idempotent, replaces an earlier one of ours.

    A root handler someone else installed (pytest's capture, an embedding application) is kept
    when the format is text; JSON replaces the formatter of every root handler."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _MARK, False)]
    for handler in ours:
        root.removeHandler(handler)
    formatter = json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    if not root.handlers:
        handler = logging.StreamHandler()
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    for handler in root.handlers:
        if log_format == "json" or getattr(handler, _MARK, False):
            handler.setFormatter(formatter)
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
    root.setLevel(level)


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
        rename_fields={"asctime": "timestamp", "levelname": "level", "name": "logger"},
        timestamp=False,
    )


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's `log_config`: its default (coloured text) for text, None (propagate to ours) for JSON."""
    if log_format == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
