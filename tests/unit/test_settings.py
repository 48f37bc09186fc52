"""Settings read from the environment: an empty variable means unset, everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedded_triton import stack
from frontend.settings import Settings

pytestmark = pytest.mark.unit


def test_an_empty_gateway_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run MODEL=<not gpt2>` passes GATEWAY_CHAT_TEMPLATE= empty: it was read as the path
    "." and the start failed with "Is a directory"."""
    monkeypatch.setenv("GATEWAY_CHAT_TEMPLATE", "")
    monkeypatch.setenv("GATEWAY_KEYS_PATH", "")
    monkeypatch.setenv("GATEWAY_PORT", "")
    settings = Settings()
    assert settings.chat_template is None and settings.keys_path is None and settings.port == 8080
    monkeypatch.setenv("GATEWAY_CHAT_TEMPLATE", "examples/chat_template.jinja")
    assert Settings().chat_template == Path("examples/chat_template.jinja")


def test_empty_triton_port_variables_take_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT"):
        monkeypatch.setenv(name, "")
    seen: list[object] = []

    def stop_at_the_port_check(triton: object, port: int) -> str | None:
        seen.append(triton)
        raise SystemExit(0)

    monkeypatch.setattr(stack, "ports_taken", stop_at_the_port_check)
    with pytest.raises(SystemExit):
        stack.main(["--model", "other"])  # argparse built its defaults without int("")
    ports = seen[0].ports  # type: ignore[attr-defined]
    assert (ports.http, ports.grpc, ports.metrics) == (8000, 8001, 8002)
