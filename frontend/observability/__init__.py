"""What an operator reads: metrics, request ids and access logs, log format, tracing.

metrics.py       GatewayMetrics (gateway_* and vllm:* series), MetricsMiddleware
multiprocess.py  PROMETHEUS_MULTIPROC_DIR for `--workers N`
requests.py      request ids, the per-request record, the access log
logs.py          text or JSON logs
tracing.py       optional OpenTelemetry (OTLP) tracing
"""

from frontend.observability.logs import configure_logging
from frontend.observability.metrics import GatewayMetrics, MetricsMiddleware
from frontend.observability.requests import (
    HEADER as REQUEST_ID_HEADER,
)
from frontend.observability.requests import (
    RequestContextMiddleware,
    current_request,
    current_request_id,
    note_api_key,
)
from frontend.observability.tracing import install_tracing

__all__ = [
    "REQUEST_ID_HEADER",
    "GatewayMetrics",
    "MetricsMiddleware",
    "RequestContextMiddleware",
    "configure_logging",
    "current_request",
    "current_request_id",
    "install_tracing",
    "note_api_key",
]
