"""The compose tier: the images of docker/ built from this checkout and the stack of
docker-compose.yml run with a real Docker engine (`make test-compose`; .ci/run runs it as its own
step after `make test`).

It runs only when asked for by its marker (`-m compose`): a plain `pytest` (`make test`) deselects
it, because building the images takes minutes and needs a Docker engine (docker/engine.sh starts
one). Asked for and without an engine, it fails: a missing engine is a broken setup, not a skip.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "compose" in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("compose") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("compose") is None]
