"""Write a model version into a Triton model repository, atomically.

Layout: <repository>/<name>/config.pbtxt and <repository>/<name>/<version>/ holding model.onnx,
model.py (the Python-backend entry, `step_model/triton_model.py`) with the `step_model` package
beside it, tokenizer/ and metadata.json. A version is
assembled in a hidden staging directory next to its final place and renamed into place in one
step, so Triton (or a reader) never sees half a version.

Several instances of one model (one KV pool each, one per GPU: `write_instances`) are more models
of the same repository: <name>_1, <name>_2, ... whose config.pbtxt is <name>'s under their own name
and instance group, and whose version directories are links to <name>'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
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
    idle_timeout_s: float = 60.0
    default_window: int = 64
    max_batch_size: int = 1024
    serve_versions: int = 1
    device: str = "auto"
    strict_device: bool = False
    cuda_graphs: bool = True


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
        contract.CONFIG_IDLE_TIMEOUT_S: serving.idle_timeout_s,
        contract.CONFIG_DEFAULT_WINDOW: serving.default_window,
        contract.CONFIG_DEVICE: serving.device,
        contract.CONFIG_STRICT_DEVICE: int(serving.strict_device),
        contract.CONFIG_CUDA_GRAPHS: int(serving.cuda_graphs),
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


# The first line of a config.pbtxt that write_instances derived (it removes only what it wrote).
_INSTANCE_MARK = "# Instance {index} of model {model!r}, derived from its config.pbtxt by write_instances"
_NAME_LINE = re.compile(r"^name:\s*\"[^\"\n]*\"[ \t]*$", re.M)
_GROUP_LINE = re.compile(r"^instance_group\s*\[[^\n]*\][ \t]*$", re.M)


def instance_group(gpu: int | None) -> str:
    """config.pbtxt's instance_group: one instance, on GPU `gpu` (KIND_GPU: Triton hands the model
    that device id), or where the model's `device` setting puts it (KIND_MODEL: GPU 0 or the CPU)."""
    if gpu is None:
        return "instance_group [ { count: 1, kind: KIND_MODEL } ]"
    return f"instance_group [ {{ count: 1, kind: KIND_GPU, gpus: [ {int(gpu)} ] }} ]"


def _with(config: str, name: str, group: str) -> str:
    if len(_NAME_LINE.findall(config)) != 1 or len(_GROUP_LINE.findall(config)) != 1:
        raise RepositoryError(
            "config.pbtxt must have one `name: ...` line and one one-line `instance_group [ ... ]` "
            "(as the exporter writes it) for instances to be derived from it"
        )
    config = _NAME_LINE.sub(f'name: "{name}"', config)
    return _GROUP_LINE.sub(group, config)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_instances(repository: Path, name: str, instances: int, gpus: Sequence[int] = ()) -> list[str]:
    """Serve model `name` as `instances` Triton models, each one instance with its own KV pool:
    `name` itself and `name_1` ... `name_<instances-1>` (`model_config.instance_names`), the
    gateway's placement layer (GATEWAY_MODEL_INSTANCES) choosing one per sequence.

    Each added model's config.pbtxt is `name`'s with its own name and instance group, and its
    version directories are relative links to `name`'s (one copy of the files on disk; every
    instance loads its own weights and KV pool). `gpus` pins instance i to GPU gpus[i % len(gpus)]
    (KIND_GPU), `name` included; empty: every instance goes where `device` puts it (KIND_MODEL).
    Idempotent: run again after each export (new versions are linked, removed ones unlinked), and
    instance models beyond `instances` that it wrote are removed (1 removes them all). Returns
    the models' names."""
    if instances < 1:
        raise RepositoryError("instances must be >= 1")
    base = repository / name
    config_path = base / "config.pbtxt"
    try:
        config = config_path.read_text()
    except OSError as err:
        raise RepositoryError(f"no model {name!r} in {repository} ({err.strerror or err})") from err
    names = model_config.instance_names(name, instances)
    group = lambda i: instance_group(gpus[i % len(gpus)] if gpus else None)  # noqa: E731
    base_config = _with(config, name, group(0))
    if base_config != config:
        _write_text(config_path, base_config)
    versions = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name.isdigit() and not p.is_symlink())
    for index, instance in enumerate(names[1:], start=1):
        model_dir = repository / instance
        derived = model_dir / "config.pbtxt"
        mark = _INSTANCE_MARK.format(index=index, model=name)
        if derived.exists() and not derived.read_text().startswith(mark):
            raise RepositoryError(f"{model_dir} exists and is not an instance of {name!r}: remove it or rename it")
        model_dir.mkdir(parents=True, exist_ok=True)
        for entry in model_dir.iterdir():
            if entry.is_symlink() and entry.name not in versions:
                entry.unlink()
        for version in versions:
            link = model_dir / version
            if link.is_symlink():
                continue
            if link.exists():
                raise RepositoryError(f"{link} is a directory of its own, not a link to {base / version}")
            os.symlink(Path("..") / name / version, link, target_is_directory=True)
        _write_text(derived, f"{mark}\n{_with(config, instance, group(index))}")
    for stale in repository.glob(f"{name}_*"):
        suffix = stale.name[len(name) + 1 :]
        if not suffix.isdigit() or int(suffix) < instances or not stale.is_dir():
            continue
        derived = stale / "config.pbtxt"
        if derived.exists() and derived.read_text().startswith(_INSTANCE_MARK.format(index=int(suffix), model=name)):
            for entry in stale.iterdir():
                if entry.is_symlink() or entry.is_file():
                    entry.unlink()
            with contextlib.suppress(OSError):
                stale.rmdir()
    return names
