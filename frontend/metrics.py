"""Kept for imports written before the split: the metrics live in `frontend.observability.metrics`."""

from frontend.observability.metrics import GatewayMetrics, MetricsMiddleware, route_template

__all__ = ["GatewayMetrics", "MetricsMiddleware", "route_template"]
