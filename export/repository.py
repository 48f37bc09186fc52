"""Write a model version into a Triton model repository, atomically.

Layout: <repository>/<name>/config.pbtxt and <repository>/<name>/<version>/ holding model.onnx,
model.py (the Python-backend entry, `step_model/triton_model.py`) with the `step_model` package
beside it, tokenizer/ and metadata.json. A version is
assembled in a hidden staging directory next to its final place and renamed into place in one
step, so Triton (or a reader) never sees half a version.

Several instances of one model (one KV pool each, one per GPU) are more models of the same
repository, written by `embedded_triton.instances.write_instances` (`--instances`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import step_model
from step_model import contract
from step_model.contract import model_config

STEP_MODEL_DIR = Path(step_model.__file__).parent
# What runs inside Triton, relative to the package: all of it (a hand list here fell behind
# once), the entry module itself excepted (it is written as the version's model.py).
STEP_MODEL_FILES = tuple(
    sorted(
        str(p.relative_to(STEP_MODEL_DIR))
        for p in STEP_MODEL_DIR.rglob("*.py")
        if p.name != "triton_model.py" and "__pycache__" not in p.parts
    )
)


class RepositoryError(ValueError):
    """The repository cannot be written (not writable, version taken, ...)."""


@dataclass(frozen=True)
class ServingConfig:
    """Settings written into config.pbtxt; each can be overridden at serve time (GPT2_<KEY>)."""

    kv_capacity: int = 64
    kv_partitions: int = 1  # the pool cut into this many equal slot ranges, one per gateway lane
    idle_timeout_s: float = 60.0
    default_window: int = 64
    max_batch_size: int = 1024
    serve_versions: int = 1
    device: str = "auto"
    strict_device: bool = False
    cuda_graphs: bool = True
    invariant_slots: int = 0


def next_version(model_dir: Path) -> int:
    versions = (
        [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    )
    return max(versions, default=0) + 1


def check_writable(repository: Path) -> None:
    try:
        repository.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=repository, prefix=".probe-"):
            pass
    except OSError as err:
        raise RepositoryError(f"repository {repository} is not writable: {err.strerror or err}") from err


def _tensor_list(
    tensors: dict[str, tuple[str, list[int]]],
    ragged: frozenset[str] = frozenset(),
    optional: frozenset[str] = frozenset(),
) -> str:
    lines = []
    for name, (dtype, dims) in tensors.items():
        extra = " allow_ragged_batch: true" if name in ragged else ""
        extra += " optional: true" if name in optional else ""
        lines.append(f'  {{ name: "{name}" data_type: TYPE_{dtype} dims: {dims}{extra} }}')
    return ",\n".join(lines)


def config_pbtxt(name: str, serving: ServingConfig) -> str:
    params = {
        contract.CONFIG_KV_CAPACITY: serving.kv_capacity,
        contract.CONFIG_KV_PARTITIONS: serving.kv_partitions,
        contract.CONFIG_IDLE_TIMEOUT_S: serving.idle_timeout_s,
        contract.CONFIG_DEFAULT_WINDOW: serving.default_window,
        contract.CONFIG_DEVICE: serving.device,
        contract.CONFIG_STRICT_DEVICE: int(serving.strict_device),
        contract.CONFIG_CUDA_GRAPHS: int(serving.cuda_graphs),
        contract.CONFIG_INVARIANT_SLOTS: serving.invariant_slots,
    }
    parameters = model_config.format_parameters(params)
    inputs = _tensor_list(
        contract.INPUTS,
        ragged=frozenset({contract.INPUT_IDS, contract.EXTRA_IDS}),
        optional=contract.OPTIONAL_INPUTS,
    )
    outputs = _tensor_list(contract.OUTPUTS)
    return f"""# Written by `python -m export`; the contract is step_model/contract/.
name: "{name}"
backend: "python"
max_batch_size: {serving.max_batch_size}
version_policy: {{ latest {{ num_versions: {serving.serve_versions} }} }}
dynamic_batching {{ }}
instance_group [ {{ count: 1, kind: KIND_MODEL }} ]
input [
{inputs}
]
output [
{outputs}
]
{parameters}
"""


def write_version(
    repository: Path,
    name: str,
    version: int | None,
    *,
    onnx_path: Path,
    tokenizer_dir: Path,
    metadata: dict[str, Any],
    serving: ServingConfig,
    extra_files: list[Path] | None = None,
) -> Path:
    """Install one version; returns its directory. Nothing is left behind on failure."""
    check_writable(repository)
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_dir)
    final = model_dir / str(version)
    if final.exists():
        raise RepositoryError(f"{final} already exists; pick another --version")
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        shutil.copy2(onnx_path, staging / contract.VERSION_ONNX)
        for extra in extra_files or []:
            shutil.copy2(extra, staging / extra.name)
        shutil.copy2(STEP_MODEL_DIR / "triton_model.py", staging / contract.VERSION_ENTRY)
        for file in STEP_MODEL_FILES:
            target = staging / "step_model" / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(STEP_MODEL_DIR / file, target)
        shutil.copytree(tokenizer_dir, staging / contract.VERSION_TOKENIZER)
        text = json.dumps({**metadata, contract.META_VERSION: version}, indent=2) + "\n"
        (staging / contract.VERSION_METADATA).write_text(text)
        staging.chmod(0o755)  # mkdtemp makes it private; Triton and the gateway must read it
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    config = model_dir / "config.pbtxt"
    tmp = config.with_suffix(".pbtxt.tmp")
    tmp.write_text(config_pbtxt(name, serving))
    os.replace(tmp, config)
    return final
