"""`python -m export`: a GPT-2-family checkpoint -> ONNX -> a Triton model version.

Each step is a function of its own module (checkpoint, graph, parity, repository) so tests call
them directly; this module only parses arguments, reports progress and maps failures to exit
codes: 2 for bad input (one line, no traceback), 1 when the graph fails the parity check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import onnx

from embedded_triton.instances import InstancesError, write_instances
from export.checkpoint import Checkpoint, CheckpointError, build_random, load_pretrained, state_dict_numpy
from export.graph import GraphError, GraphSpec, build_graph
from export.parity import ParityError, check_parity, scratch_dir
from export.repository import RepositoryError, ServingConfig, check_writable, write_version
from step_model import contract
from step_model.engine import ModelMeta

# Past this size a single protobuf file is unsafe (2 GiB limit): weights go to model.onnx.data.
_EXTERNAL_DATA_BYTES = 1_500_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint directory or hub id (from_pretrained)")
    source.add_argument(
        "--random-config", choices=["tiny", "gpt2"], help="random weights of this shape, tokenizer built here"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and the parity inputs")
    p.add_argument("--name", default="gpt2", help="model name in the repository (default: gpt2)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--version", type=int, default=None, help="version number (default: next free)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--kv-capacity", type=int, default=64, help="KV-cache slots (concurrent sequences)")
    p.add_argument(
        "--kv-partitions",
        type=int,
        default=None,
        help="cut the KV pool into this many equal slot ranges, one per step the gateway keeps in flight "
        "(default: 2 with --device cuda, else 1)",
    )
    p.add_argument("--max-context", type=int, default=None, help="cap the context (default: the model's n_positions)")
    p.add_argument("--idle-timeout-s", type=float, default=60.0, help="free a sequence untouched this long")
    p.add_argument("--default-window", type=int, default=64, help="top-K window when a request names none")
    p.add_argument("--serve-versions", type=int, default=1, help="how many latest versions Triton serves")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="parity-check and serving device")
    p.add_argument("--strict-device", action="store_true", help="fail instead of falling back to the CPU for any node")
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="serve decode steps eagerly on the GPU instead of replaying captured CUDA graphs",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=None,
        help="serve the model as this many Triton models, one KV pool each (<name>_1 ...; GATEWAY_MODEL_INSTANCES)",
    )
    p.add_argument(
        "--gpus", default="", help="with --instances: GPU ids, instance i on the i-th in turn (default: `device`)"
    )
    p.add_argument(
        "--invariant-slots",
        type=int,
        default=0,
        help="KV slots reserved for batch-invariant rows (seeded and greedy requests): decoded in a run of "
        "this fixed row count, prefilled alone; 0 = none (docs/architecture.md, Batch invariance)",
    )
    # For tooling, and for the GPT-2-shape fixture of the tests (tests/conftest.py; the tiny model's tests
    # check the graph builder's parity), never for a model that serves.
    p.add_argument("--skip-parity", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("kv_capacity", "default_window", "serve_versions"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.instances is not None and args.instances < 1:
        p.error("--instances must be >= 1")
    try:
        args.gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        p.error("--gpus: a comma list of GPU ids, e.g. 0,1")
    if not 0 <= args.invariant_slots < args.kv_capacity:
        p.error("--invariant-slots must be in [0, --kv-capacity)")
    if args.version is not None and args.version < 1:
        p.error("--version must be >= 1")
    # On the GPU a second step in flight hides the gateway's sampling and the round trip behind the
    # other's compute; on the CPU both share the cores, and each step has its fixed cost.
    if args.kv_partitions is None:
        args.kv_partitions = 2 if args.device == "cuda" and args.kv_capacity % 2 == 0 else 1
    if args.kv_partitions < 1 or args.kv_capacity % args.kv_partitions:
        p.error("--kv-partitions must be >= 1 and divide --kv-capacity (equal slot ranges)")
    return args


def _log(message: str) -> None:
    print(f"[export {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _metadata(meta: ModelMeta, spec: GraphSpec, source: str, parity: dict[str, Any]) -> dict[str, Any]:
    """metadata.json of a version (the repository adds its version number)."""
    return {
        contract.META_N_LAYER: meta.n_layer,
        contract.META_N_HEAD: meta.n_head,
        contract.META_HEAD_DIM: meta.head_dim,
        contract.META_VOCAB_SIZE: meta.vocab_size,
        contract.META_MAX_CONTEXT: meta.max_context,
        contract.META_DTYPE: meta.dtype,
        contract.META_EOS_TOKEN_ID: meta.eos_token_id,
        contract.META_N_EMBD: spec.n_embd,
        contract.META_SOURCE: source,
        contract.META_PARITY: parity,
        contract.META_EXPORTED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def export(args: argparse.Namespace) -> Path:
    check_writable(args.repository)
    with scratch_dir() as tmp:
        work = Path(tmp)
        _log(f"loading {'random ' + args.random_config if args.random_config else args.model} ...")
        ckpt: Checkpoint = (
            build_random(args.random_config, args.seed, work) if args.random_config else load_pretrained(args.model)
        )
        spec = GraphSpec.from_config(ckpt.model.config)
        max_context = min(args.max_context or spec.n_positions, spec.n_positions)
        eos = ckpt.model.config.eos_token_id
        eos = eos if isinstance(eos, int) else getattr(ckpt.tokenizer, "eos_token_id", None)
        if eos is None:
            raise CheckpointError("checkpoint names no eos_token_id")
        _log(f"building the {args.dtype} graph: {spec.n_layer} layers, {spec.n_embd} wide, vocab {spec.vocab_size}")
        model_proto = build_graph(spec, state_dict_numpy(ckpt.model), args.dtype)
        onnx_dir = work / "onnx"
        onnx_dir.mkdir()
        onnx_path = onnx_dir / contract.VERSION_ONNX
        external = model_proto.ByteSize() > _EXTERNAL_DATA_BYTES
        onnx.save_model(model_proto, str(onnx_path), save_as_external_data=external, location="model.onnx.data")
        del model_proto
        tokenizer_dir = work / "tokenizer_out"
        ckpt.tokenizer.save_pretrained(str(tokenizer_dir))
        meta = ModelMeta(spec.n_layer, spec.n_head, spec.head_dim, spec.vocab_size, max_context, args.dtype, int(eos))
        parity: dict[str, Any] = {"skipped": True}
        if not args.skip_parity:
            _log("checking logits against transformers (prefill + cached decode steps) ...")
            report = check_parity(
                ckpt.model,
                onnx_path,
                meta,
                seed=args.seed,
                device=args.device,
                strict_device=args.strict_device,
                cuda_graphs=args.cuda_graphs,
                progress=_log,
            )
            parity = report.as_dict()
            _log(
                f"parity OK on {report.device}: max abs error {report.max_abs_error:.3g}, "
                f"max relative error {report.max_rel_error:.3g} over {report.compared_rows} rows"
            )
        metadata = _metadata(meta, spec, ckpt.source, parity)
        serving = ServingConfig(
            kv_capacity=args.kv_capacity,
            kv_partitions=args.kv_partitions,
            idle_timeout_s=args.idle_timeout_s,
            default_window=args.default_window,
            serve_versions=args.serve_versions,
            device=args.device,
            strict_device=args.strict_device,
            cuda_graphs=args.cuda_graphs,
            invariant_slots=args.invariant_slots,
        )
        final = write_version(
            args.repository,
            args.name,
            args.version,
            onnx_path=onnx_path,
            tokenizer_dir=tokenizer_dir,
            metadata=metadata,
            serving=serving,
            extra_files=[onnx_dir / "model.onnx.data"] if external else [],
        )
    _log(f"wrote {final}")
    if args.instances is not None:
        names = write_instances(args.repository, args.name, args.instances, args.gpus)
        _log(f"serving {args.name} as {len(names)} instances: {', '.join(names)}")
    return final


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        final = export(args)
    except ParityError as err:
        print(f"error: parity check failed: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, GraphError, RepositoryError, InstancesError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(json.dumps({"version_dir": str(final)}))
    return 0
