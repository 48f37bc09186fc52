"""embedded_triton's cleanup waits until the killed process group is really gone (a stub holding
GBs takes a while to exit after SIGKILL: a caller that exits or restarts must find it gone)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedded_triton.server import TritonServer, _live_group_members

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc")


def test_cleanup_returns_only_when_no_member_of_the_group_runs(tmp_path: Path) -> None:
    # A leader with a child that ignores SIGTERM, in a session of its own: like tritonserver and its stubs.
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); time.sleep(60)",
        ],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while len(_live_group_members(leader.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server = TritonServer(tmp_path)
        server.process = leader
        server.cleanup()
        assert _live_group_members(leader.pid) == []
    finally:
        if leader.poll() is None:
            leader.kill()
            leader.wait()


def test_no_members_for_a_group_that_does_not_exist() -> None:
    assert _live_group_members(2**22 + 12345) == []
