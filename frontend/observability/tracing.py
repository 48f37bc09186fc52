"""Optional OpenTelemetry tracing: off unless `GATEWAY_OTLP_ENDPOINT` is set.

When on, every HTTP request becomes a server span (opentelemetry-instrumentation-fastapi)
exported in batches over OTLP/HTTP to that endpoint (e.g. `http://collector:4318/v1/traces`),
with the service name `GATEWAY_OTEL_SERVICE_NAME` and the request id as the span attribute
`gateway.request_id`. The packages are in requirements.txt; if they are missing anyway, the
gateway logs one warning and serves without tracing.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

log = logging.getLogger(__name__)

REQUEST_ID_ATTRIBUTE = "gateway.request_id"


def install_tracing(
    app: FastAPI, endpoint: str | None, *, service_name: str = "gpt2-gateway", exporter: Any = None
) -> Any:
    """Instrument `app` when `endpoint` (or a test's `exporter`) is given; returns the tracer
    provider (None when tracing stays off). The provider is the app's own, never the global one."""
    if not endpoint and exporter is None:
        return None
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as err:
        log.warning("GATEWAY_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s): no tracing", err)
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("tracing: OTLP spans to %s", endpoint)
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, exclude_spans=["receive", "send"])
    return provider


def tag_current_span(request_id: str) -> None:
    """Put the request id on the active server span (a no-op without OpenTelemetry or tracing)."""
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - the API package comes with the SDK
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
