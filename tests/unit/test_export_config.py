"""GPT-2 checkpoints of every setting transformers' GPT2Config accepts: each supported activation
computes transformers' own formula, a tiny checkpoint of each supported setting exports and passes
the exporter's parity check against transformers, and anything else is refused (exit 2, naming
the setting and its value) before the weights are loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

from export import checkpoint, cli
from export.activations import ACTIVATIONS
from export.graph import GraphSpec, _Builder

pytestmark = pytest.mark.unit

# Settings besides the activation that change the graph, or that it must leave alone.
SETTINGS: list[dict[str, Any]] = [
    {"scale_attn_weights": False},
    {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True},
    {"tie_word_embeddings": False},
    {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
    {"n_inner": 48, "layer_norm_epsilon": 1e-3},
    {"add_cross_attention": True},
]


def _activation_graph(name: str, slope: float) -> bytes:
    """A graph of just activation `name` over x [N, 1] (zero bias; PReLU's slope `slope`)."""
    spec = GraphSpec(1, 1, 1, 1, 1, 1e-5, name, False)
    b = _Builder(spec, {"h.0.mlp.act.weight": np.array([slope], dtype=np.float32)}, "fp32")
    bias = b.weight("bias", np.zeros(1, dtype=np.float32))
    y = ACTIVATIONS[name](b, "x", bias, 0)
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(
        b.nodes,
        "activation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        b.initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return bytes(model.SerializeToString())


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_computes_transformers_formula(name: str) -> None:
    """Over [-30, 30] (clipping and saturation included), float32 rounding apart."""
    x = np.concatenate([np.linspace(-30, 30, 6001), [0.0, -1e-3, 1e-3, 6.0, -3.0, 3.0, 10.0, -10.0]]).astype(np.float32)
    module = ACT2FN[name]
    if name == "prelu":
        torch.nn.init.constant_(module.weight, 0.3)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(_activation_graph(name, 0.3), providers=["CPUExecutionProvider"])
    got = session.run(["y"], {"x": x.reshape(-1, 1)})[0].reshape(-1)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's tokenizer files alone."""
    out = tmp_path_factory.mktemp("tokenizer")
    for path in tiny_checkpoint.iterdir():
        if path.name not in ("config.json", "generation_config.json") and not path.name.startswith("model"):
            shutil.copy2(path, out / path.name)
    return out


def _checkpoint(tokenizer_dir: Path, out: Path, **settings: Any) -> Path:
    """A random 2-layer GPT-2 with `settings`, saved with the tiny tokenizer. The weights are 10x
    GPT-2's initial scale, so the activations see inputs of order 1, not of order 0.1."""
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=1024, bos_token_id=1023, eos_token_id=1023,
        initializer_range=0.2, **settings,
    )  # fmt: skip
    torch.manual_seed(0)
    shutil.copytree(tokenizer_dir, out)
    GPT2LMHeadModel(config).eval().save_pretrained(str(out))
    return out


def _export(capsys: pytest.CaptureFixture[str], ckpt: Path, repo: Path) -> tuple[int, list[str]]:
    code = cli.main(["--model", str(ckpt), "--repository", str(repo), "--name", "m", "--device", "cpu"])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "settings",
    [{"activation_function": name} for name in sorted(ACTIVATIONS)] + SETTINGS,
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_a_checkpoint_of_each_supported_setting_exports_and_passes_parity(
    settings: dict[str, Any], tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _export(capsys, _checkpoint(tokenizer_dir, tmp_path / "ckpt", **settings), tmp_path / "repo")
    assert code == 0, err[-1:]
    meta = json.loads((tmp_path / "repo" / "m" / "1" / "metadata.json").read_text())
    assert meta["parity"]["compared_rows"] > 0 and meta["parity"]["max_abs_error"] <= 1e-4


@pytest.mark.parametrize("activation", ["xielu", "no_such_activation"])
def test_an_unsupported_activation_is_refused_before_the_weights_load(
    activation: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the exporter went on past an unsupported config")

    monkeypatch.setattr(checkpoint.GPT2LMHeadModel, "from_pretrained", no_work)
    monkeypatch.setattr(cli, "build_graph", no_work)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()  # a config alone: no weights to load, no tokenizer
    (ckpt / "config.json").write_text(json.dumps({**GPT2Config(activation_function=activation).to_dict()}))
    code, err = _export(capsys, ckpt, tmp_path / "repo")
    assert code == 2 and len(err) >= 1
    assert "activation_function" in err[-1] and repr(activation) in err[-1] and "Traceback" not in err[-1]
    assert not (tmp_path / "repo" / "m").exists()


@pytest.mark.parametrize("vocab_size", [1000, 1024])
def test_the_fp16_head_is_padded_to_aligned_columns_and_keeps_parity(vocab_size: int, tmp_path: Path) -> None:
    """GPT-2's odd vocabulary (50,257) sends cuBLAS to unaligned kernels: the fp16 head's columns
    are padded to a multiple of 64 and the logits sliced back, with unchanged results."""
    from export.checkpoint import state_dict_numpy
    from export.graph import build_graph
    from export.parity import check_parity
    from step_model.engine import ModelMeta

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=vocab_size)
    model = GPT2LMHeadModel(config).eval()
    proto = build_graph(GraphSpec.from_config(config), state_dict_numpy(model), "fp16")
    head = next(t for t in proto.graph.initializer if t.name == "lm_head")
    assert list(head.dims) == [64, -(-vocab_size // 64) * 64]
    assert any(n.op_type == "Slice" and "vocab_end" in n.input for n in proto.graph.node) == (vocab_size % 64 != 0)
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    meta = ModelMeta(2, 4, 16, vocab_size, 64, "fp16", vocab_size - 1)
    report = check_parity(model, path, meta, seed=0, device="cpu", strict_device=False, cuda_graphs=False)
    assert report.compared_rows > 0 and report.max_abs_error < 5e-3
