"""`make run`: the whole service on embedded defaults, one command, Ctrl-C stops it.

1. If the repository holds no version of MODEL, export one: the hub's `gpt2` where the hub is
   reachable, otherwise a locally built GPT-2-shaped model with random weights (loudly: its text
   is noise; it exists so the stack runs anywhere).
2. Start the embedded tritonserver on the repository and wait until it is ready (with
   `--instances N`, `make run INSTANCES=N`: MODEL served as N Triton models, one KV pool each, one
   per GPU where there are several; the gateway places each sequence on one).
3. Start the gateway (`python -m frontend`) against it and print the URLs (and, when the newest
   version has random weights, say so again: that export may have happened on an earlier run).

Ctrl-C: the terminal sends SIGINT to its foreground process group. tritonserver and the gateway
run in their own sessions, so only this process gets it, and it stops each of them ONCE (the
gateway with SIGTERM): the gateway drains and shuts down cleanly (a second signal would make it
stop at once, mid-shutdown).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from embedded_triton.instances import InstancesError, derived_instances, write_instances
from embedded_triton.server import (
    ModelHealth,
    PortInUse,
    StopFlag,
    TritonNotReady,
    TritonPorts,
    TritonServer,
    die_with_parent,
    instance_gpus,
    port_in_use,
    recover,
)

BANNER = "=" * 78
HEALTH_INTERVAL_S, HEALTH_FAILURES = 5.0, 3  # a real step per model every 5 s; 3 failures restart Triton
# How a user of `make run` moves each Triton port (the variables are read by this module's flags).
PORT_SETTINGS = {
    "HTTP": "TRITON_HTTP_PORT=... (make run) or --triton-http-port",
    "gRPC": "TRITON_GRPC_PORT=... (make run) or --triton-grpc-port",
    "metrics": "TRITON_METRICS_PORT=... (make run) or --triton-metrics-port",
}


def has_version(repository: Path, model: str) -> bool:
    model_dir = repository / model
    return model_dir.is_dir() and any(p.name.isdigit() and (p / "model.onnx").exists() for p in model_dir.iterdir())


def random_weights_source(repository: Path, model: str) -> str | None:
    """The newest version's `source` when it was exported with random weights (`random:<shape>...`)."""
    model_dir = repository / model
    versions = sorted((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), reverse=True)
    for version in versions:
        meta = model_dir / str(version) / "metadata.json"
        if not meta.is_file():
            continue
        try:
            source = str(json.loads(meta.read_text()).get("source", ""))
        except (OSError, ValueError):
            return None
        return source if source.startswith("random:") else None
    return None


def random_weights_warning(model: str) -> str:
    return (
        f"\n{BANNER}\nWARNING: the model {model!r} has RANDOM weights and a locally built tokenizer (no model hub\n"
        f"was reachable when it was exported). It runs the whole stack at real cost, but its text is noise.\n"
        f"Export a real checkpoint with:\n"
        f'    make export ARGS="--model /path/to/gpt2 --name {model}"\n{BANNER}\n'
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        host = urllib.parse.urlparse(constants.ENDPOINT).hostname or ""
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except (OSError, ImportError):
        return False


def gpu_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def export_default(repository: Path, model: str) -> None:
    gpu = gpu_present()
    common = [
        "--name",
        model,
        "--repository",
        str(repository),
        "--dtype",
        "fp16" if gpu else "fp32",
        "--kv-capacity",
        "512" if gpu else "16",
        "--kv-partitions",  # on the GPU: the gateway keeps 2 steps in flight (frontend.engine.lanes)
        "2" if gpu else "1",
    ]
    if hub_reachable():
        print(f"exporting the hub's gpt2 into {repository}/{model} ...", flush=True)
        cmd = [sys.executable, "-m", "export", "--model", "gpt2", *common]
    else:
        print(random_weights_warning(model), flush=True)
        cmd = [sys.executable, "-m", "export", "--random-config", "gpt2", *common]
    subprocess.run(cmd, check=True)


def wait_ready(url: str, processes: list[subprocess.Popen[bytes]], stop: StopFlag, timeout_s: float) -> bool:
    """Poll the gateway's readiness until it answers 200, one of `processes` exits, or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.requested and all(p.poll() is None for p in processes):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def ports_taken(triton: TritonServer, port: int) -> str | None:
    """The first of the stack's ports (Triton's three, the gateway's) already in use, as an error
    naming it and the setting that moves it; None when all are free."""
    gateway_host = os.environ.get("GATEWAY_HOST") or "127.0.0.1"
    try:
        triton.check_ports()
    except PortInUse as err:
        return str(err)
    if port_in_use(port, gateway_host):
        return (
            f"the gateway's port {port} on {gateway_host} is already in use: "
            "stop what holds it or choose another port with PORT=... (make run) or --port"
        )
    return None


def start_gateway(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Its own session: the terminal's SIGINT reaches only this process, which forwards one.
    # SIGTERM when this process dies, even SIGKILLed: the gateway drains and stops, not orphaned.
    return subprocess.Popen(
        [sys.executable, "-m", "frontend", "--port", str(port)],
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )


def serve(gateway: subprocess.Popen[bytes], triton: TritonServer, stop: StopFlag, code: int) -> int:
    """Until Ctrl-C or a child exits; then stop the gateway (it drains) and tritonserver, once each."""
    health = ModelHealth(triton, HEALTH_INTERVAL_S, HEALTH_FAILURES)
    try:
        while not stop.wait(0.5):
            if gateway.poll() is not None:
                print("error: the gateway exited", file=sys.stderr)
                code = 1
                break
            if triton.process is None or triton.process.poll() is not None:
                print(f"error: tritonserver exited\n{triton.log_tail()}", file=sys.stderr)
                code = 1
                break
            if health.failing():  # alive but a model cannot step: restart it (the gateway resumes), or
                # with several instances reload the broken one alone (the gateway moves its work)
                print(f"error: {health.why}; recovering", file=sys.stderr, flush=True)
                try:
                    done = recover(triton, health, 600)
                except TritonNotReady as err:
                    print(f"error: {err}", file=sys.stderr)
                    code = 1
                    break
                print(f"tritonserver serving again ({done})", file=sys.stderr, flush=True)
                health = ModelHealth(triton, HEALTH_INTERVAL_S, HEALTH_FAILURES)
    finally:
        if gateway.poll() is None:
            # Once, and SIGTERM: the gateway drains (GATEWAY_DRAIN_TIMEOUT_S) and stops. uvicorn re-raises
            # the signal it caught after its shutdown; a re-raised SIGINT meets asyncio's own handler
            # and ends in a CancelledError/KeyboardInterrupt traceback, SIGTERM just ends the process.
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(gateway.pid, signal.SIGKILL)
                gateway.wait()
        triton.stop()
        print("stopped.", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedded_triton.stack", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--triton-http-port", type=int, default=int(os.environ.get("TRITON_HTTP_PORT") or 8000))
    p.add_argument("--triton-grpc-port", type=int, default=int(os.environ.get("TRITON_GRPC_PORT") or 8001))
    p.add_argument("--triton-metrics-port", type=int, default=int(os.environ.get("TRITON_METRICS_PORT") or 8002))
    p.add_argument(
        "--instances", type=int, default=1, help="Triton models serving MODEL, one KV pool each (one per GPU)"
    )
    p.add_argument("--gpus", default="auto", help="with --instances: auto, none, or GPU ids (0,1: one per instance)")
    args = p.parse_args(argv)
    if args.instances < 1:
        p.error("--instances must be >= 1")

    ports = TritonPorts(args.triton_http_port, args.triton_grpc_port, args.triton_metrics_port)
    log_path = Path("build") / "triton.log"
    triton = TritonServer(
        args.repository,
        ports=ports,
        log_path=log_path,
        port_settings=PORT_SETTINGS,
        model_control=args.instances > 1,  # a broken instance is reloaded alone
    )
    # Every port before any work: a taken one would otherwise surface as a gateway waiting minutes
    # on a readiness answered by whatever holds it.
    taken = ports_taken(triton, args.port)
    if taken:
        print(f"error: {taken}", file=sys.stderr)
        return 1
    if not has_version(args.repository, args.model):
        try:
            export_default(args.repository, args.model)
        except subprocess.CalledProcessError as err:
            print(f"error: exporting the default model failed ({err.returncode})", file=sys.stderr)
            return 1
    if args.instances > 1 or derived_instances(args.repository, args.model):  # 1: remove earlier runs' instances
        try:
            names = write_instances(args.repository, args.model, args.instances, instance_gpus(args.gpus))
        except (InstancesError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if len(names) > 1:
            print(f"serving {args.model} as {len(names)} instances: {', '.join(names)}", flush=True)
    print(f"starting tritonserver on {args.repository} (log: {log_path}) ...", flush=True)
    try:
        triton.start(timeout_s=600)
    except TritonNotReady as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    env = dict(
        os.environ,
        GATEWAY_TRITON_URL=triton.grpc_url,
        GATEWAY_MODEL=args.model,
        GATEWAY_MODEL_INSTANCES=str(args.instances),
        GATEWAY_REPOSITORY=str(args.repository.resolve()),
    )
    stop = StopFlag()  # before the gateway starts: from here a Ctrl-C is a request, not an exception
    try:
        gateway = start_gateway(args.port, env)
    except OSError:
        triton.stop()
        raise
    base = f"http://127.0.0.1:{args.port}"
    code = 0
    children = [gateway] + ([triton.process] if triton.process is not None else [])
    if wait_ready(f"{base}/health/ready", children, stop, timeout_s=180):
        urls = f"(docs {base}/docs, ready {base}/health/ready, metrics {base}/metrics)"
        print(
            f"\n{BANNER}\n  gateway      {base}  {urls}\n"
            f"  triton       grpc {triton.grpc_url}, http {triton.http_url}, metrics {triton.metrics_url}\n"
            f"  Ctrl-C stops both.\n{BANNER}\n",
            flush=True,
        )
        if random_weights_source(args.repository, args.model):
            print(random_weights_warning(args.model), flush=True)
    elif not stop.requested:
        triton_died = triton.process is None or triton.process.poll() is not None
        tail = f"tritonserver exited before the gateway was ready\n{triton.log_tail()}"
        print(
            f"error: {tail if triton_died else 'the gateway did not become ready (see its log above)'}", file=sys.stderr
        )
        stop.requested = True
        code = 1
    return serve(gateway, triton, stop, code)


if __name__ == "__main__":
    sys.exit(main())
