"""The contract package every deployable ships: the gateway's image copies what the gateway
imports, that part is light (no torch, no ONNX Runtime), config.pbtxt's parameters are read as
written, and the exported graph's names are the contract's."""

from __future__ import annotations

import ast
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.graph import GraphSpec, build_graph
from export.repository import STEP_MODEL_DIR, STEP_MODEL_FILES, ServingConfig, config_pbtxt
from step_model import contract
from step_model.contract import graph_io, model_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "gateway.Dockerfile"
HEAVY = ("torch", "onnxruntime", "onnx")


def _gateway_imports() -> set[str]:
    """Every module `frontend` imports by name (absolute imports, any depth of the tree)."""
    names: set[str] = set()
    for path in (ROOT / "frontend").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                # `from step_model import contract` imports a module too
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _local_modules(names: set[str]) -> set[str]:
    """The names that are this repository's modules (files or packages), frontend's own aside."""
    local = set()
    for name in names:
        if name.split(".")[0] == "frontend":
            continue
        path = ROOT.joinpath(*name.split("."))
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            local.add(name)
    return local


def _dockerfile_copies() -> list[tuple[str, str]]:
    """(source, destination) of every COPY of code (a directory or a .py file) from the build
    context (not from another stage)."""
    copies = []
    for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        copies += [(src, args[-1]) for src in args[:-1] if src.endswith(("/", ".py"))]
    return copies


def _import_report(modules: list[str], cwd: Path) -> dict[str, list[str]]:
    """Import `modules` in a fresh interpreter run in `cwd`: the heavy packages then loaded, and
    the files (relative to `cwd`) of every module loaded from under `cwd`, installed packages aside
    (`make test` keeps its virtual environment in the checkout)."""
    code = (
        "import importlib, json, os, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "here = os.getcwd() + os.sep\n"
        "site = tuple(p + os.sep for p in sys.path if 'site-packages' in p)\n"
        "files = [m.__file__[len(here):] for m in list(sys.modules.values())\n"
        "         if (getattr(m, '__file__', None) or '').startswith(here)\n"
        "         and not (m.__file__ or '').startswith(site)]\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(json.dumps({'heavy': sorted(heavy), 'files': sorted(files)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_the_gateway_imports_only_the_wire_types_of_step_model() -> None:
    # the contract (with its config.pbtxt reader, for the KV capacity) and the step's row types
    # (pure numpy), one pair on both sides of gRPC
    assert _local_modules(_gateway_imports()) == {
        "step_model",
        "step_model.contract",
        "step_model.contract.model_config",
        "step_model.rows",
    }


def test_the_gateways_step_model_imports_pull_in_no_torch_or_onnxruntime() -> None:
    report = _import_report(sorted(_local_modules(_gateway_imports())), ROOT)
    assert report["heavy"] == []
    assert report["files"] and all(f.startswith("step_model/") for f in report["files"])


def test_the_gateway_image_copies_every_package_frontend_imports() -> None:
    copies = _dockerfile_copies()
    for src, dest in copies:  # each lands at the same place under the image's /app
        assert dest.rstrip("/") == f"/app/{src.rstrip('/')}", (src, dest)
    copied = {src.rstrip("/") for src, _ in copies}
    # frontend's own files, and every file its imports of this repository's other packages load
    needed = ["frontend/__init__.py", *_import_report(sorted(_local_modules(_gateway_imports())), ROOT)["files"]]
    for path in needed:
        parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
        assert any(p in copied for p in parents), f"{DOCKERFILE.name} does not COPY {path}"
    ignore = (DOCKERFILE.parent / f"{DOCKERFILE.name}.dockerignore").read_text().split()
    for src in copied:
        assert f"!{src}" in ignore, f"the .dockerignore keeps {src} out of the build context"


def test_the_gateway_image_layout_imports_the_contract(tmp_path: Path) -> None:
    """What the Dockerfile copies, alone, is enough for the gateway's imports of step_model."""
    for src, _ in _dockerfile_copies():
        if src == "frontend/":
            continue  # importing the gateway whole is the integration tier's work
        if src.endswith("/"):
            shutil.copytree(ROOT / src, tmp_path / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (tmp_path / src).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / src, tmp_path / src)
    assert _import_report(sorted(_local_modules(_gateway_imports())), tmp_path)["heavy"] == []


def test_every_contract_module_ships_in_a_model_version() -> None:
    contract_files = {f"contract/{p.name}" for p in (STEP_MODEL_DIR / "contract").glob("*.py")}
    assert contract_files <= set(STEP_MODEL_FILES)
    assert all((STEP_MODEL_DIR / f).is_file() for f in STEP_MODEL_FILES)


# ------------------------------------------------------------------------------ config.pbtxt
def test_config_parameters_read_back_as_the_exporter_writes_them() -> None:
    serving = ServingConfig(kv_capacity=7, idle_timeout_s=2.5, device="cpu", cuda_graphs=False, invariant_slots=2)
    params = model_config.parameters(config_pbtxt("m", serving))
    assert params == {
        contract.CONFIG_KV_CAPACITY: "7",
        contract.CONFIG_KV_PARTITIONS: "1",
        contract.CONFIG_IDLE_TIMEOUT_S: "2.5",
        contract.CONFIG_DEFAULT_WINDOW: "64",
        contract.CONFIG_DEVICE: "cpu",
        contract.CONFIG_STRICT_DEVICE: "0",
        contract.CONFIG_CUDA_GRAPHS: "0",
        contract.CONFIG_INVARIANT_SLOTS: "2",
    }


def test_config_parameters_whatever_the_layout() -> None:
    text = """# a comment with parameters { key: "kv_capacity" value: { string_value: "1" } }
name: "m"
input [ { name: "A" dims: [ 1 ] }, { name: "B" dims: [-1] } ]
parameters [
  { key: "kv_capacity"
    value { string_value: "16" } },
  { key: 'device' value: < string_value: "c" "pu" > }
]
parameters: { key: "odd" value: { string_value: "a \\"quoted\\" \\\\ value" } }
instance_group [ { count: 1, kind: KIND_MODEL } ]
"""
    params = model_config.parameters(text)
    assert params == {"kv_capacity": "16", "device": "cpu", "odd": 'a "quoted" \\ value'}
    written = model_config.format_parameters(params)
    assert model_config.parameters(written) == params


def test_config_syntax_errors_are_named() -> None:
    for bad in ('parameters { key: "a"', "parameters { key: }", 'name: "unterminated'):
        with pytest.raises(model_config.ConfigSyntaxError):
            model_config.parameters(bad)


def test_a_setting_comes_from_the_environment_then_the_config_then_the_default() -> None:
    key = contract.CONFIG_KV_CAPACITY
    assert model_config.env_name(key) == "GPT2_KV_CAPACITY"
    assert model_config.setting({key: "16"}, key, "64", environ={}) == "16"
    assert model_config.setting({}, key, "64", environ={}) == "64"
    assert model_config.setting({key: "16"}, key, "64", environ={"GPT2_KV_CAPACITY": "5"}) == "5"


# ------------------------------------------------------------------------------ graph names
def test_the_graphs_inputs_and_outputs_are_the_contracts_names() -> None:
    spec = GraphSpec(
        n_layer=2, n_head=2, n_embd=8, vocab_size=16, n_positions=8, layer_norm_epsilon=1e-5,
        activation="gelu_new", scale_by_inverse_layer_idx=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = {"wte.weight": (16, 8), "wpe.weight": (8, 8), "ln_f.weight": (8,), "ln_f.bias": (8,)}
    for i in range(2):
        p = f"h.{i}."
        shapes |= {p + "ln_1.weight": (8,), p + "ln_1.bias": (8,), p + "ln_2.weight": (8,), p + "ln_2.bias": (8,)}
        shapes |= {p + "attn.c_attn.weight": (8, 24), p + "attn.c_attn.bias": (24,)}
        shapes |= {p + "attn.c_proj.weight": (8, 8), p + "attn.c_proj.bias": (8,)}
        shapes |= {p + "mlp.c_fc.weight": (8, 32), p + "mlp.c_fc.bias": (32,)}
        shapes |= {p + "mlp.c_proj.weight": (32, 8), p + "mlp.c_proj.bias": (8,)}
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    graph = build_graph(spec, state, "fp32").graph
    kv = [name(kind, i) for i in range(2) for name in (graph_io.past,) for kind in graph_io.KV_KINDS]
    assert [i.name for i in graph.input] == [
        graph_io.INPUT_IDS,
        graph_io.POSITION_IDS,
        graph_io.SEQLENS_K,
        graph_io.TOTAL_SEQUENCE_LENGTH,
        graph_io.GATHER_INDEX,
        graph_io.TEMPERATURE,
        graph_io.WINDOW,
        *kv,
    ]
    present = [graph_io.present(kind, i) for i in range(2) for kind in graph_io.KV_KINDS]
    assert [o.name for o in graph.output] == [graph_io.LOGITS, *graph_io.TAIL_OUTPUTS, *present]
    assert all(graph_io.is_present(name) for name in present)
