"""Build the GPT-2 decoding-step graph directly from a checkpoint's state dict.

Why `onnx.helper` and not `torch.onnx.export`: transformers 5.x cache objects and torch's
exporters disagree, and building the graph ourselves lets every attention layer use ONNX
Runtime's fused `GroupQueryAttention` with past and present sharing ONE static KV buffer, so the
KV cache never moves between steps (docs/architecture.md).

One graph serves prefill and decode. Its contract (B rows, S new tokens per row, right-padded; the
names are `step_model.contract.graph_io`'s):

inputs
  input_ids            int64   [B, S]   new tokens (padding past a row's length is ignored)
  position_ids         int64   [B, S]   absolute positions of those tokens
  seqlens_k            int32   [B]      per row: (tokens cached after this step) - 1
  total_sequence_length int32  []       max over rows of seqlens_k + 1
  gather_index         int64   [B]      flat index (row * S + column) of each row's last real token
  temperature          float32 [B]      logits are divided by it (send 1.0 for greedy)
  window               int64   [1]      K of the top-K window
  past_key_<i>, past_value_<i>   T  [B, H, MAX, D]   bound to the same buffer as present_*
outputs
  logits               float32 [B, V]   temperature-scaled logits of each row's last token
  topk_logits          float32 [B, K]   the K largest of them, descending
  topk_ids             int64   [B, K]
  logsumexp            float32 [B]      log-sum-exp over the whole vocabulary of `logits`
  present_key_<i>, present_value_<i>  T  [B, H, MAX, D]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from step_model.contract import graph_io as io

OPSET = 17
MS_DOMAIN = "com.microsoft"

SUPPORTED_ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu": "Gelu"}


class GraphError(ValueError):
    """The checkpoint cannot be expressed by this graph (unsupported config)."""


@dataclass(frozen=True)
class GraphSpec:
    """The shape facts of a GPT-2 checkpoint that the graph and the runtime share."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    layer_norm_epsilon: float
    activation: str
    scale_by_inverse_layer_idx: bool

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_config(cls, config: object) -> GraphSpec:
        model_type = getattr(config, "model_type", None)
        if model_type != "gpt2":
            raise GraphError(f"not a GPT-2 config (model_type={model_type!r})")
        activation = str(getattr(config, "activation_function", "gelu_new"))
        if activation not in SUPPORTED_ACTIVATIONS:
            raise GraphError(f"unsupported activation_function {activation!r}")
        n_embd = int(config.n_embd)  # type: ignore[attr-defined]
        n_head = int(config.n_head)  # type: ignore[attr-defined]
        if n_embd % n_head:
            raise GraphError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
        return cls(
            n_layer=int(config.n_layer),  # type: ignore[attr-defined]
            n_head=n_head,
            n_embd=n_embd,
            vocab_size=int(config.vocab_size),  # type: ignore[attr-defined]
            n_positions=int(config.n_positions),  # type: ignore[attr-defined]
            layer_norm_epsilon=float(config.layer_norm_epsilon),  # type: ignore[attr-defined]
            activation=activation,
            scale_by_inverse_layer_idx=bool(getattr(config, "scale_attn_by_inverse_layer_idx", False)),
        )


def _onnx_dtype(dtype: str) -> int:
    return {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}[dtype]


def _np_dtype(dtype: str) -> type:
    return {"fp32": np.float32, "fp16": np.float16}[dtype]


class _Builder:
    """Accumulates nodes and initializers; every helper returns its output's name."""

    def __init__(self, np_dtype: type) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.np_dtype = np_dtype
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def weight(self, name: str, value: np.ndarray, *, cast: bool = True) -> str:
        array = value.astype(self.np_dtype) if cast else value
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        outputs = [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain or None, **attrs))
        return outputs

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


def build_graph(spec: GraphSpec, state: dict[str, np.ndarray], dtype: str) -> onnx.ModelProto:
    """Return the ONNX model for `spec` with weights from a GPT2LMHeadModel state dict.

    `state` maps transformers' parameter names (with or without the `transformer.` prefix) to
    float32 numpy arrays. `dtype` is the compute and KV-cache type: "fp32" or "fp16".
    """
    np_dtype = _np_dtype(dtype)
    t = _onnx_dtype(dtype)
    b = _Builder(np_dtype)

    def w(key: str) -> np.ndarray:
        for candidate in (key, f"transformer.{key}"):
            if candidate in state:
                return state[candidate]
        raise GraphError(f"checkpoint has no parameter {key!r}")

    e, h, d = spec.n_embd, spec.n_head, spec.head_dim
    wte = b.weight("wte", w("wte.weight"))
    wpe = b.weight("wpe", w("wpe.weight"))
    axis1 = b.weight("axes_1", np.array([1], dtype=np.int64), cast=False)
    flat_shape = b.weight("flat_shape", np.array([-1, e], dtype=np.int64), cast=False)
    split_sizes = b.weight("qkv_split", np.array([e, e, e], dtype=np.int64), cast=False)

    # Embeddings: token + learned absolute position.
    x = b.op1("Add", [b.op1("Gather", [wte, io.INPUT_IDS]), b.op1("Gather", [wpe, io.POSITION_IDS])])

    def layer_norm(inp: str, prefix: str) -> str:
        gamma = b.weight(f"{prefix}.weight", w(f"{prefix}.weight"))
        beta = b.weight(f"{prefix}.bias", w(f"{prefix}.bias"))
        return b.op1("LayerNormalization", [inp, gamma, beta], axis=-1, epsilon=spec.layer_norm_epsilon)

    def matmul(inp: str, prefix: str) -> str:
        # GPT-2's Conv1D stores weights as [in, out], which is MatMul's layout already.
        return b.op1("MatMul", [inp, b.weight(f"{prefix}.weight", w(f"{prefix}.weight"))])

    def linear(inp: str, prefix: str) -> str:
        return b.op1("Add", [matmul(inp, prefix), b.weight(f"{prefix}.bias", w(f"{prefix}.bias"))])

    def add_and_norm(
        inp: str, residual: str, bias_prefix: str, ln_prefix: str, *, keep_sum: bool = True
    ) -> tuple[str, str]:
        """(LayerNorm(residual + inp + bias), residual + inp + bias) in one fused kernel."""
        gamma = b.weight(f"{ln_prefix}.weight", w(f"{ln_prefix}.weight"))
        beta = b.weight(f"{ln_prefix}.bias", w(f"{ln_prefix}.bias"))
        bias = b.weight(f"{bias_prefix}.bias", w(f"{bias_prefix}.bias"))
        normed, summed = b._name("skip_ln"), b._name("residual") if keep_sum else ""
        b.nodes.append(
            helper.make_node(
                "SkipLayerNormalization",
                [inp, residual, gamma, beta, bias],
                [normed, "", "", summed],
                domain=MS_DOMAIN,
                epsilon=spec.layer_norm_epsilon,
            )
        )
        return normed, summed

    present_outputs: list[onnx.ValueInfoProto] = []
    past_inputs: list[onnx.ValueInfoProto] = []
    kv_shape: list[str | int] = ["batch", h, "max_sequence_length", d]
    hidden = layer_norm(x, "h.0.ln_1")
    mlp_out = ""
    for i in range(spec.n_layer):
        p = f"h.{i}"
        if i:  # the previous block's MLP output joins the residual stream here, fused with ln_1
            hidden, x = add_and_norm(mlp_out, x, f"h.{i - 1}.mlp.c_proj", f"{p}.ln_1")
        q, k, v = b.op("Split", [linear(hidden, f"{p}.attn.c_attn"), split_sizes], 3, axis=2)
        scale = 1.0 / math.sqrt(d)
        if spec.scale_by_inverse_layer_idx:
            scale /= i + 1
        past_k, past_v = (io.past(kind, i) for kind in io.KV_KINDS)
        present_k, present_v = (io.present(kind, i) for kind in io.KV_KINDS)
        past_inputs += [helper.make_tensor_value_info(n, t, kv_shape) for n in (past_k, past_v)]
        present_outputs += [helper.make_tensor_value_info(n, t, kv_shape) for n in (present_k, present_v)]
        attn = b._name("attn")
        b.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [q, k, v, past_k, past_v, io.SEQLENS_K, io.TOTAL_SEQUENCE_LENGTH],
                [attn, present_k, present_v],
                domain=MS_DOMAIN,
                num_heads=h,
                kv_num_heads=h,
                scale=scale,
            )
        )
        hidden, x = add_and_norm(matmul(attn, f"{p}.attn.c_proj"), x, f"{p}.attn.c_proj", f"{p}.ln_2")
        fc_w = b.weight(f"{p}.mlp.c_fc.weight", w(f"{p}.mlp.c_fc.weight"))
        fc_b = b.weight(f"{p}.mlp.c_fc.bias", w(f"{p}.mlp.c_fc.bias"))
        pre = b.op1("MatMul", [hidden, fc_w])
        if SUPPORTED_ACTIVATIONS[spec.activation] == "FastGelu":
            act = b.op1("FastGelu", [pre, fc_b], domain=MS_DOMAIN)  # tanh approximation, bias fused
        else:
            act = b.op1("Gelu", [b.op1("Add", [pre, fc_b])], domain=MS_DOMAIN)  # exact erf gelu
        mlp_out = matmul(act, f"{p}.mlp.c_proj")
    x, _ = add_and_norm(mlp_out, x, f"h.{spec.n_layer - 1}.mlp.c_proj", "ln_f", keep_sum=False)

    # Only each row's last real token needs logits: gather it before the vocabulary projection.
    last = b.op1("Gather", [b.op1("Reshape", [x, flat_shape]), io.GATHER_INDEX], axis=0)
    if dtype == "fp16":
        # On the GPU a MatMul against a [E, V] copy of the tied embedding runs cuBLAS's current
        # kernels; Gemm(transB) over [V, E] ran an older, slower one (H200 profile, 2026-11-30).
        lm_head = b.weight("lm_head", np.ascontiguousarray(w("wte.weight").T))
        logits = b.op1("MatMul", [last, lm_head])
    else:
        logits = b.op1("Gemm", [last, wte], transB=1)  # tied LM head shares the embedding table
    if dtype != "fp32":
        logits = b.op1("Cast", [logits], to=TensorProto.FLOAT)
    b.nodes.append(helper.make_node("Div", [logits, b.op1("Unsqueeze", [io.TEMPERATURE, axis1])], [io.LOGITS]))
    b.nodes.append(
        helper.make_node("TopK", [io.LOGITS, io.WINDOW], [io.TOPK_LOGITS, io.TOPK_IDS], axis=-1, largest=1, sorted=1)
    )
    # Stable log-sum-exp: max + log(sum(exp(x - max))). The row's max is the window's first
    # entry: a ReduceMax over the vocabulary took 40% of a 512-row step on the H200.
    starts = b.weight("slice_start", np.array([0], dtype=np.int64), cast=False)
    ends = b.weight("slice_end", np.array([1], dtype=np.int64), cast=False)
    row_max = b.op1("Slice", [io.TOPK_LOGITS, starts, ends, axis1])
    sum_exp = b.op1("ReduceSum", [b.op1("Exp", [b.op1("Sub", [io.LOGITS, row_max])]), axis1], keepdims=1)
    lse = b.op1("Add", [b.op1("Log", [sum_exp]), row_max])
    b.nodes.append(helper.make_node("Squeeze", [lse, axis1], [io.LOGSUMEXP]))

    inputs = [
        helper.make_tensor_value_info(io.INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(io.POSITION_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(io.SEQLENS_K, TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(io.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
        helper.make_tensor_value_info(io.GATHER_INDEX, TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(io.TEMPERATURE, TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(io.WINDOW, TensorProto.INT64, [1]),
        *past_inputs,
    ]
    outputs = [
        helper.make_tensor_value_info(io.LOGITS, TensorProto.FLOAT, ["batch", spec.vocab_size]),
        helper.make_tensor_value_info(io.TOPK_LOGITS, TensorProto.FLOAT, ["batch", "window_size"]),
        helper.make_tensor_value_info(io.TOPK_IDS, TensorProto.INT64, ["batch", "window_size"]),
        helper.make_tensor_value_info(io.LOGSUMEXP, TensorProto.FLOAT, ["batch"]),
        *present_outputs,
    ]
    graph = helper.make_graph(b.nodes, "gpt2_step", inputs, outputs, b.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="gpt2-serving-export",
    )
    model.ir_version = 9
    return model
