"""Prometheus multiprocess mode for `python -m frontend --workers N`.

prometheus-client decides at import time, from PROMETHEUS_MULTIPROC_DIR, whether metric values
live in this process's memory or in per-process files that any process can sum. The launcher
creates one private directory per run before it starts the HTTP workers (they inherit it), and
removes it when they have stopped, so no run reads a previous run's counts. The engine-core
process is started before the variable is set: its scheduler series stay in its own memory and
reach a scrape through the core's socket (`frontend.observability.metrics`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    """Whether this process's metrics are multiprocess values (fixed when prometheus_client loaded)."""
    return bool(os.environ.get(ENV) or os.environ.get(ENV.lower()))


@contextmanager
def multiprocess_dir() -> Iterator[Path]:
    """A fresh PROMETHEUS_MULTIPROC_DIR for the processes started inside the block; removed after.

    Any value the caller's environment had is replaced for the block (a directory shared with an
    earlier run would add that run's counts) and restored afterwards."""
    previous = {name: os.environ.get(name) for name in (ENV, ENV.lower())}
    path = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    os.environ.pop(ENV.lower(), None)
    os.environ[ENV] = str(path)
    try:
        yield path
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(path, ignore_errors=True)
