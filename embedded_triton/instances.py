"""Several instances of one model in a Triton model repository: one KV pool each, one per GPU.

Triton's `instance_group { count: N }` would spread one model's requests over N instances, but a
sequence's KV cache lives in one instance, so the gateway must choose (`frontend.engine.placement`).
The model is therefore served as N models of one instance each: <name> itself, then <name>_1,
<name>_2, ... (`step_model.contract.model_config.instance_names`), each added one with <name>'s
config.pbtxt under its own name and instance group and with links to <name>'s version
directories. Written by `python -m export --instances N`, and by `python -m embedded_triton
--instances N` / `make run INSTANCES=N` at start (here, not in export/: the Triton image ships
embedded_triton/ and the contract, not the exporter). Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from step_model.contract import model_config


class InstancesError(ValueError):
    """The instance models cannot be written (no such model, a foreign directory in the way, ...)."""


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
        raise InstancesError(
            "config.pbtxt must have one `name: ...` line and one one-line `instance_group [ ... ]` "
            "(as the exporter writes it) for instances to be derived from it"
        )
    config = _NAME_LINE.sub(f'name: "{name}"', config)
    return _GROUP_LINE.sub(group, config)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def derived_instances(repository: Path, name: str) -> int:
    """How many instance models of `name` (`name_1` ...) `write_instances` wrote that are there now."""
    count = 0
    while True:
        config = repository / f"{name}_{count + 1}" / "config.pbtxt"
        try:
            if not config.read_text().startswith(_INSTANCE_MARK.format(index=count + 1, model=name)):
                return count
        except OSError:
            return count
        count += 1


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
        raise InstancesError("instances must be >= 1")
    base = repository / name
    config_path = base / "config.pbtxt"
    try:
        config = config_path.read_text()
    except OSError as err:
        raise InstancesError(f"no model {name!r} in {repository} ({err.strerror or err})") from err
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
            raise InstancesError(f"{model_dir} exists and is not an instance of {name!r}: remove it or rename it")
        model_dir.mkdir(parents=True, exist_ok=True)
        for entry in model_dir.iterdir():
            if entry.is_symlink() and entry.name not in versions:
                entry.unlink()
        for version in versions:
            link = model_dir / version
            if link.is_symlink():
                continue
            if link.exists():
                raise InstancesError(f"{link} is a directory of its own, not a link to {base / version}")
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
