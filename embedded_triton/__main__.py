"""`python -m embedded_triton --repository model_repository`: serve until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embedded_triton.instances import InstancesError, derived_instances, write_instances
from embedded_triton.server import (
    ModelHealth,
    StopFlag,
    TritonNotReady,
    TritonPorts,
    TritonServer,
    instance_gpus,
    recover,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedded_triton", description="Run the embedded tritonserver.")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--address", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes Triton)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--timeout-s", type=float, default=300.0, help="how long to wait for readiness")
    p.add_argument(
        "--health-interval-s",
        type=float,
        default=5.0,
        help="seconds between health checks (each served model runs a real step; 0: off)",
    )
    p.add_argument(
        "--health-failures",
        type=int,
        default=3,
        help="failed health checks in a row that restart tritonserver (with --instances > 1: reload the broken ones)",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        help="serve --model as this many Triton models, one KV pool each (GATEWAY_MODEL_INSTANCES must match)",
    )
    p.add_argument("--model", default="gpt2", help="the model --instances applies to")
    p.add_argument("--gpus", default="auto", help="with --instances: auto, none, or GPU ids (0,1: one per instance)")
    args = p.parse_args(argv)
    if not args.repository.is_dir():
        print(f"error: no model repository at {args.repository}", file=sys.stderr)
        return 2
    if args.instances > 1 or derived_instances(args.repository, args.model):  # 1: remove earlier runs' instances
        try:
            names = write_instances(args.repository, args.model, args.instances, instance_gpus(args.gpus))
        except (InstancesError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"serving {args.model} as {len(names)} instances: {', '.join(names)}", flush=True)
    ports = TritonPorts(args.http_port, args.grpc_port, args.metrics_port)
    # Several instances: explicit model control, so a broken one is reloaded alone.
    server = TritonServer(args.repository, ports=ports, address=args.address, model_control=args.instances > 1)
    try:
        server.start(args.timeout_s)
    except TritonNotReady as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"triton ready: grpc {server.grpc_url}, http {server.http_url}, metrics {server.metrics_url}", flush=True)
    stop = StopFlag()
    health = ModelHealth(server, args.health_interval_s, args.health_failures)
    while not stop.wait(1.0):
        if server.process is None or server.process.poll() is not None:
            code = server.process.returncode if server.process is not None else None
            print(f"error: tritonserver exited ({code}); stopping its backend stubs", file=sys.stderr)
            server.cleanup()  # its process group (stubs included) and its /dev/shm regions
            return 1
        if health.failing():
            # Alive, maybe even "ready", but its models cannot step (a dead or wedged Python stub):
            # a restart is what a supervisor's liveness probe would do, done here (or, one
            # instance of several, a reload of that one alone).
            print(f"error: {health.why}; recovering", file=sys.stderr, flush=True)
            try:
                done = recover(server, health, args.timeout_s)
            except TritonNotReady as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            print(f"triton ready again ({done}): grpc {server.grpc_url}, http {server.http_url}", flush=True)
            health = ModelHealth(server, args.health_interval_s, args.health_failures)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
