"""The balancer tier: HAProxy (deploy/balancer/haproxy.cfg) in front of two real units, each a
tritonserver and a `python -m frontend` process, sharing one redis-server (`make test-balancer`;
.ci/run runs it as its own step). A plain `pytest` (`make test`) deselects it: it needs Debian's
haproxy, which `make test-balancer` installs. Asked for (`-m balancer`) without haproxy, it fails.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "balancer" in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("balancer") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("balancer") is None]
