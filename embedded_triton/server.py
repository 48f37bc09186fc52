"""The embedded Triton process; see the package docstring."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from step_model import contract


class StopFlag:
    """Raised by SIGINT/SIGTERM for a foreground loop. A plain attribute on purpose: a signal
    handler calling threading.Event.set() while the main thread sits in Event.wait() needs the
    lock the waiter holds, and deadlocks (seen with Ctrl-C followed by SIGTERM)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, *_: object) -> None:
        self.requested = True

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` in short naps; returns whether a stop was requested."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.requested


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that has the kernel send `sig` to the child when this process dies, even by
    SIGKILL (Linux only: prctl(PR_SET_PDEATHSIG); elsewhere it does nothing). Without it a killed
    launcher leaves tritonserver holding its ports, and the next start fails "Address already in use".
    The signal follows the THREAD that forked: start children from a thread that outlives them."""
    parent = os.getpid()

    def preexec() -> None:
        if not sys.platform.startswith("linux"):
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), sig)

    return preexec


class TritonNotReady(RuntimeError):
    """tritonserver exited or did not become ready in time; the message carries its log tail."""


class PortInUse(TritonNotReady):
    """A port we are to serve on is taken before we start (another tritonserver, say): starting
    anyway would have our server exit while the other one answers our readiness checks."""


def port_in_use(port: int, address: str = "127.0.0.1") -> bool:
    """Whether binding `address:port` fails now. SO_REUSEADDR as servers set it: a port left in
    TIME_WAIT by a server that just stopped counts as free, a listening one does not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> TritonPorts:
        """Three ports the OS says are free now (for tests running side by side)."""
        socks = [socket.socket() for _ in range(3)]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
            http, grpc, metrics = (s.getsockname()[1] for s in socks)
        finally:
            for s in socks:
                s.close()
        return cls(http, grpc, metrics)


@dataclass(frozen=True)
class WheelLayout:
    binary: Path
    python_backend: Path
    stub: Path
    libs: Path


def find_wheel() -> WheelLayout:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotReady("the nvidia-pytriton wheel is not installed (pip install nvidia-pytriton)")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    layout = WheelLayout(
        binary=root / "bin" / "tritonserver",
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / py / "triton_python_backend_stub",
        libs=root.parent.parent / "nvidia_pytriton.libs",
    )
    for path in (layout.binary, layout.python_backend, layout.stub, layout.libs):
        if not path.exists():
            raise TritonNotReady(f"nvidia-pytriton wheel is missing {path}")
    return layout


def _backend_dir(layout: WheelLayout, work: Path) -> Path:
    """<work>/backends/python = the wheel's Python backend + the stub for this Python."""
    target = work / "backends" / "python"
    if not (target / "triton_python_backend_stub").exists():
        tmp = work / "backends" / f".python-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(layout.python_backend, tmp, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(layout.stub, tmp / "triton_python_backend_stub")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return work / "backends"


class TritonServer:
    """A tritonserver child process. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        repository: Path,
        *,
        ports: TritonPorts | None = None,
        work_dir: Path | None = None,
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        address: str = "127.0.0.1",
        port_settings: dict[str, str] | None = None,
        model_control: bool = False,
    ) -> None:
        self.repository = Path(repository).resolve()
        # Explicit model control (every model loaded at start): one model can then be unloaded and
        # loaded again alone (`reload`), e.g. one instance of several whose stub died.
        self.model_control = model_control
        self.address = address  # loopback by default: Triton has no authentication of its own
        self.ports = ports or TritonPorts()
        self.work_dir = Path(work_dir or Path.home() / ".cache" / "gpt2-serving" / "triton").resolve()
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.env = env or {}
        # How a user changes each port, for the error when one is taken (this default: the flags
        # of `python -m embedded_triton`; `make run` passes its own).
        self.port_settings = port_settings or {
            "HTTP": "--http-port",
            "gRPC": "--grpc-port",
            "metrics": "--metrics-port",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: object = None
        # The Python backend names its /dev/shm regions <prefix><n>: a prefix of our own lets
        # cleanup() remove exactly this server's regions, even after it was SIGKILLed.
        self.shm_prefix = f"triton_gpt2_{os.getpid()}_{secrets.token_hex(4)}_"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def command(self) -> tuple[list[str], dict[str, str]]:
        layout = find_wheel()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        backends = _backend_dir(layout, self.work_dir)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(layout.libs), env.get("LD_LIBRARY_PATH")]))
        # The Python backend stub runs the first `python3` on PATH: make it this interpreter's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # Packages only the model's stub should see first (e.g. numpy<2 for Triton 2.51's stub on
        # an image whose own tools need numpy 2): TRITON_STUB_PYTHONPATH is prepended for the child.
        stub_path = env.get("TRITON_STUB_PYTHONPATH")
        if stub_path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [stub_path, env.get("PYTHONPATH")]))
        env.update(self.env)
        args = [
            str(layout.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            "--allow-metrics=true",
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--log-verbose=0",
            *(["--model-control-mode=explicit", "--load-model=*"] if self.model_control else []),
            *self.extra_args,
        ]
        return args, env

    def check_ports(self) -> None:
        """Raise PortInUse naming the first of our ports that is taken, and the setting to change."""
        for name, port in (("HTTP", self.ports.http), ("gRPC", self.ports.grpc), ("metrics", self.ports.metrics)):
            if port_in_use(port, self.address):
                raise PortInUse(
                    f"Triton's {name} port {port} on {self.address} is already in use (another tritonserver?): "
                    f"stop what holds it or choose another port with {self.port_settings[name]}"
                )

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        self.check_ports()
        args, env = self.command()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            out = self._log_file
        else:
            out = None
        self.process = subprocess.Popen(
            args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stop() signals the server and its stubs together
            preexec_fn=die_with_parent(),  # and it dies with us, even if we are SIGKILLed
        )
        self.wait_ready(timeout_s)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise TritonNotReady(f"tritonserver exited with {self.process.returncode}\n{self.log_tail()}")
            if self.is_ready() and self.process is not None and self.process.poll() is None:
                return  # ready, and (checked after) still ours: a server that lost a port race exits
            time.sleep(0.2)
        self.stop()
        raise TritonNotReady(f"tritonserver not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def ready_models(self) -> list[str]:
        """The models of the repository index Triton reports READY (empty when it does not answer)."""
        request = urllib.request.Request(f"{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                index = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return []
        return sorted({str(m["name"]) for m in index if m.get("state") == "READY" and "name" in m})

    def _repository_call(self, model: str, action: str, timeout_s: float) -> None:
        request = urllib.request.Request(
            f"{self.http_url}/v2/repository/models/{model}/{action}", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                pass
        except (urllib.error.URLError, OSError) as err:
            raise TritonNotReady(f"{action} of model {model} failed: {err}") from err

    def unload_model(self, model: str, timeout_s: float = 30.0) -> None:
        """Unload `model` (explicit model control): Triton stops it once its requests in flight
        are answered, and refuses new ones. Returns before it has finished."""
        self._repository_call(model, "unload", timeout_s)

    def load_model(self, model: str, timeout_s: float = 300.0) -> None:
        """(Re)load `model` from the repository (explicit model control); returns once it is ready."""
        self._repository_call(model, "load", timeout_s)

    def reload(self, models: list[str], timeout_s: float = 300.0) -> None:
        """Unload and load `models` again (a new stub process each), leaving the others serving."""
        for model in models:
            self.unload_model(model)
        deadline = time.monotonic() + timeout_s
        for model in models:  # an unload finishes in the background: wait until it has
            while model in self.ready_models() and time.monotonic() < deadline:
                time.sleep(0.1)
        for model in models:
            self.load_model(model, max(1.0, deadline - time.monotonic()))

    def model_steps(self, model: str, timeout_s: float = 5.0) -> bool:
        """`model` runs a real step (one token that starts and ends a new sequence, as the
        gateway's warm-up), answered within `timeout_s`. Triton reports the model ready while its
        Python-backend stub is dead (seen after SIGSTOP/SIGCONT of the stub); only a step shows it."""

        def column(name: str, value: object) -> dict[str, object]:
            return {"name": name, "datatype": contract.INPUTS[name][0], "shape": [1, 1], "data": [value]}

        body = {
            "id": "embedded-triton-health",
            "parameters": {contract.PARAM_LOGITS_WINDOW: 1},
            "inputs": [
                column(contract.SEQUENCE_ID, secrets.randbits(63)),
                column(contract.INPUT_IDS, 0),
                column(contract.LENGTH, 1),
                column(contract.START, True),
                column(contract.END, True),
                column(contract.TEMPERATURE, 1.0),
            ],
            "outputs": [{"name": contract.STATUS}],
        }
        request = urllib.request.Request(
            f"{self.http_url}/v2/models/{model}/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as r:
                outputs = json.loads(r.read()).get("outputs", [])
        except (urllib.error.URLError, OSError, ValueError):
            return False
        status = next((o.get("data", [None])[0] for o in outputs if o.get("name") == contract.STATUS), None)
        return status in (contract.RowStatus.OK, contract.RowStatus.CACHE_FULL)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return "(no log file)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def shm_regions(self) -> list[Path]:
        """This server's shared-memory regions that exist now."""
        return sorted(Path("/dev/shm").glob(f"{self.shm_prefix}*"))

    def cleanup(self) -> None:
        """After tritonserver has died (or was stopped): kill what is left of its process group
        (Python-backend stubs hold up to GBs each) and remove its /dev/shm regions."""
        proc = self.process
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group id is the server's pid (own session)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            # SIGKILL is delivered at once but a stub holding GBs takes a while to exit: wait for
            # it, so that whoever follows (a restart, the caller's exit) finds the memory freed.
            deadline = time.monotonic() + 10
            while _live_group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        for region in self.shm_regions():
            with contextlib.suppress(OSError):
                region.unlink()

    def stop(self, timeout_s: float = 20.0) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group: server and its backend stubs
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)
        self.cleanup()  # stubs that outlived the server, and its shared memory
        self.process = None
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.stop()


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that have not exited yet (zombies are gone for our purposes:
    their reaper is their parent's business). Linux's /proc; elsewhere an empty list."""
    members = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


class ModelHealth:
    """Every `interval_s`, each READY model runs a real step; `failures` failed checks in a row
    (or a server that stays unready that long) mean tritonserver must be restarted, or, when it
    runs with explicit model control and is ready itself, only the `broken` models reloaded."""

    def __init__(self, server: TritonServer, interval_s: float, failures: int) -> None:
        self.server = server
        self.interval_s = interval_s
        self.failures = failures
        self.failed = 0
        self.why = ""
        self.broken: list[str] = []  # the models whose step failed at the last check
        self.models = server.ready_models()  # what it served when it became ready
        self._next = time.monotonic() + interval_s

    def failing(self) -> bool:
        if self.interval_s <= 0 or time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.interval_s
        broken = self.broken = [m for m in self.models if not self.server.model_steps(m)]
        if not self.server.is_ready():
            self.failed, self.why = self.failed + 1, "tritonserver is not ready"
        elif broken:
            self.failed, self.why = self.failed + 1, f"model {', '.join(broken)} cannot run a step"
        else:
            self.failed = 0
        if self.failed:
            print(f"warning: {self.why} ({self.failed} of {self.failures} checks)", file=sys.stderr, flush=True)
        return self.failed >= self.failures

    def reloadable(self) -> bool:
        """Reloading the broken models alone suffices: the server has explicit model control, is
        ready, and some (not all) of its models step."""
        return (
            self.server.model_control
            and bool(self.broken)
            and len(self.broken) < len(self.models)
            and self.server.is_ready()
        )


def recover(server: TritonServer, health: ModelHealth, timeout_s: float) -> str:
    """After `health.failing()`: reload the broken models alone when that suffices (the other
    instances keep serving), else restart tritonserver. Returns what was done (raises
    TritonNotReady when the restarted server does not become ready)."""
    if health.reloadable():
        models = list(health.broken)
        try:
            server.reload(models, timeout_s)
            return f"reloaded {', '.join(models)}"
        except TritonNotReady as err:
            print(f"error: {err}; restarting tritonserver", file=sys.stderr, flush=True)
    server.stop()
    server.start(timeout_s)
    return "restarted tritonserver"


def instance_gpus(spec: str) -> list[int]:
    """`--gpus`: "auto" (every GPU torch sees, in turn; none: the CPU), "none" (the model's `device`
    setting places each instance), or a comma list of GPU ids (instance i on the i-th, in turn)."""
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return []
    if spec == "auto":
        try:
            import torch

            return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        except ImportError:
            return []
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"--gpus {spec!r}: auto, none, or a comma list of GPU ids") from err
