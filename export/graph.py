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

from export.activations import ACTIVATIONS, MS_DOMAIN
from step_model.contract import graph_io as io

OPSET = 17


class GraphError(ValueError):
    """The checkpoint cannot be expressed by this graph (unsupported config)."""


def check_config(config: object) -> None:
    """Refuse a config this graph cannot express, naming the setting and its value (GraphError).

    Cheap: called on the config alone, before any weights are loaded. Every other setting of
    transformers' GPT2Config is supported: `n_inner`, `layer_norm_epsilon`, `scale_attn_weights`,
    `scale_attn_by_inverse_layer_idx`, `reorder_and_upcast_attn` (the same attention in another
    order), `tie_word_embeddings`, `add_cross_attention` (unused by a language model without
    encoder states, as in transformers).
    """
    model_type = getattr(config, "model_type", None)
    if model_type != "gpt2":
        raise GraphError(f"not a GPT-2 config (model_type={model_type!r})")
    activation = getattr(config, "activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise GraphError(
            f"unsupported activation_function {activation!r} (supported: {', '.join(sorted(ACTIVATIONS))})"
        )
    n_embd, n_head = int(config.n_embd), int(config.n_head)  # type: ignore[attr-defined]
    if n_embd % n_head:
        raise GraphError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")


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
    scale_attn_weights: bool = True  # attention scores times 1/sqrt(head_dim) (else 1)
    tie_word_embeddings: bool = True  # the LM head is the token embedding (else lm_head.weight)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_config(cls, config: object) -> GraphSpec:
        check_config(config)
        c: Any = config
        return cls(
            n_layer=int(c.n_layer),
            n_head=int(c.n_head),
            n_embd=int(c.n_embd),
            vocab_size=int(c.vocab_size),
            n_positions=int(c.n_positions),
            layer_norm_epsilon=float(c.layer_norm_epsilon),
            activation=str(getattr(c, "activation_function", "gelu_new")),
            scale_by_inverse_layer_idx=bool(getattr(c, "scale_attn_by_inverse_layer_idx", False)),
            scale_attn_weights=bool(getattr(c, "scale_attn_weights", True)),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        )


def _onnx_dtype(dtype: str) -> int:
    return {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}[dtype]


def _np_dtype(dtype: str) -> type:
    return {"fp32": np.float32, "fp16": np.float16}[dtype]


class _Builder:
    """Accumulates nodes and initializers; every helper returns its output's name.

    The helpers below `op1` are GPT-2's layers (weights looked up by transformers' parameter
    names, with or without the `transformer.` prefix); the blocks are the functions after it.
    """

    def __init__(self, spec: GraphSpec, state: dict[str, np.ndarray], dtype: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.past_inputs: list[onnx.ValueInfoProto] = []  # per layer, filled by _attention
        self.present_outputs: list[onnx.ValueInfoProto] = []
        self.spec = spec
        self.state = state
        self.dtype = dtype
        self.np_dtype = _np_dtype(dtype)
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

    def const(self, value: float) -> str:
        """A scalar initializer of the compute dtype, named uniquely."""
        return self.weight(self._name("const"), np.array(value, dtype=np.float32))

    def w(self, key: str) -> np.ndarray:
        """The checkpoint's parameter `key` (transformers' name), as float32."""
        for candidate in (key, f"transformer.{key}"):
            if candidate in self.state:
                return self.state[candidate]
        raise GraphError(f"checkpoint has no parameter {key!r}")

    def param(self, key: str) -> str:
        """The checkpoint's parameter `key` as an initializer of the same name."""
        return self.weight(key, self.w(key))

    def layer_norm(self, inp: str, prefix: str) -> str:
        gamma, beta = self.param(f"{prefix}.weight"), self.param(f"{prefix}.bias")
        return self.op1("LayerNormalization", [inp, gamma, beta], axis=-1, epsilon=self.spec.layer_norm_epsilon)

    def matmul(self, inp: str, prefix: str) -> str:
        # GPT-2's Conv1D stores weights as [in, out], which is MatMul's layout already.
        return self.op1("MatMul", [inp, self.param(f"{prefix}.weight")])

    def linear(self, inp: str, prefix: str) -> str:
        return self.op1("Add", [self.matmul(inp, prefix), self.param(f"{prefix}.bias")])

    def add_and_norm(
        self, inp: str, residual: str, bias_prefix: str, ln_prefix: str, *, keep_sum: bool = True
    ) -> tuple[str, str]:
        """(LayerNorm(residual + inp + bias), residual + inp + bias) in one fused kernel."""
        gamma, beta = self.param(f"{ln_prefix}.weight"), self.param(f"{ln_prefix}.bias")
        bias = self.param(f"{bias_prefix}.bias")
        normed, summed = self._name("skip_ln"), self._name("residual") if keep_sum else ""
        self.nodes.append(
            helper.make_node(
                "SkipLayerNormalization",
                [inp, residual, gamma, beta, bias],
                [normed, "", "", summed],
                domain=MS_DOMAIN,
                epsilon=self.spec.layer_norm_epsilon,
            )
        )
        return normed, summed


# Constant initializers the blocks share (created once, before the first block).
_AXIS1, _FLAT_SHAPE, _QKV_SPLIT = "axes_1", "flat_shape", "qkv_split"


def _attention(b: _Builder, layer: int, hidden: str) -> str:
    """Causal self-attention of layer `layer` over `hidden` (ln_1's output), before c_proj.

    ONNX Runtime's GroupQueryAttention reads this layer's past keys/values and writes the
    present ones: graph inputs and outputs bound by the engine to the same KV buffer.
    """
    spec, p = b.spec, f"h.{layer}"
    q, k, v = b.op("Split", [b.linear(hidden, f"{p}.attn.c_attn"), _QKV_SPLIT], 3, axis=2)
    scale = 1.0 / math.sqrt(spec.head_dim) if spec.scale_attn_weights else 1.0  # as transformers' GPT2Attention
    if spec.scale_by_inverse_layer_idx:
        scale /= layer + 1
    past_k, past_v = (io.past(kind, layer) for kind in io.KV_KINDS)
    present_k, present_v = (io.present(kind, layer) for kind in io.KV_KINDS)
    t = _onnx_dtype(b.dtype)
    kv_shape: list[str | int] = ["batch", spec.n_head, "max_sequence_length", spec.head_dim]
    b.past_inputs += [helper.make_tensor_value_info(n, t, kv_shape) for n in (past_k, past_v)]
    b.present_outputs += [helper.make_tensor_value_info(n, t, kv_shape) for n in (present_k, present_v)]
    attn = b._name("attn")
    b.nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, io.SEQLENS_K, io.TOTAL_SEQUENCE_LENGTH],
            [attn, present_k, present_v],
            domain=MS_DOMAIN,
            num_heads=spec.n_head,
            kv_num_heads=spec.n_head,
            scale=scale,
        )
    )
    return attn


def _mlp(b: _Builder, layer: int, hidden: str) -> str:
    """The MLP of layer `layer` over `hidden` (ln_2's output): c_fc, activation, c_proj without
    its bias (which joins the residual stream in the next fused add-and-norm)."""
    p = f"h.{layer}"
    fc_w, fc_b = b.param(f"{p}.mlp.c_fc.weight"), b.param(f"{p}.mlp.c_fc.bias")
    act = ACTIVATIONS[b.spec.activation](b, b.op1("MatMul", [hidden, fc_w]), fc_b, layer)
    return b.matmul(act, f"{p}.mlp.c_proj")


def _block(b: _Builder, layer: int, x: str, pending: str | None) -> tuple[str, str]:
    """Transformer block `layer` over the residual stream `x`, nanoGPT's
    `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`, with each residual add fused into the next
    layer norm: `pending` is the previous block's MLP output still to join `x` (None for the
    first block). Returns (x, pending): the residual stream after attention, and this block's
    MLP output still to join it."""
    p = f"h.{layer}"
    if pending is None:
        hidden = b.layer_norm(x, f"{p}.ln_1")
    else:
        hidden, x = b.add_and_norm(pending, x, f"h.{layer - 1}.mlp.c_proj", f"{p}.ln_1")
    attn = _attention(b, layer, hidden)
    hidden, x = b.add_and_norm(b.matmul(attn, f"{p}.attn.c_proj"), x, f"{p}.attn.c_proj", f"{p}.ln_2")
    return x, _mlp(b, layer, hidden)


_HEAD_ALIGN = 64  # vocabulary columns of the fp16 LM head are padded to a multiple of this


def _head(b: _Builder, x: str, pending: str) -> None:
    """ln_f, the tied LM head over each row's last real token, temperature, and the outputs
    logits, top-K window and log-sum-exp."""
    x, _ = b.add_and_norm(pending, x, f"h.{b.spec.n_layer - 1}.mlp.c_proj", "ln_f", keep_sum=False)
    # Only each row's last real token needs logits: gather it before the vocabulary projection.
    last = b.op1("Gather", [b.op1("Reshape", [x, _FLAT_SHAPE]), io.GATHER_INDEX], axis=0)
    head_key = "wte.weight" if b.spec.tie_word_embeddings else "lm_head.weight"  # [V, E] either way
    if b.dtype == "fp16":
        # On the GPU a MatMul against a [E, V] copy of the head runs cuBLAS's current kernels;
        # Gemm(transB) over [V, E] ran an older, slower one (H200 profile, 2026-11-30). The copy's
        # columns are padded to a multiple of 64 (zeros, sliced off): with GPT-2's odd 50,257
        # cuBLAS falls back to unaligned sm75-era kernels (H100 profile, 2026-12-07: 0.31 ms of a
        # 3.4 ms 512-row step).
        head = b.w(head_key).T
        padded = -(-head.shape[1] // _HEAD_ALIGN) * _HEAD_ALIGN
        if padded != head.shape[1]:
            head = np.pad(head, ((0, 0), (0, padded - head.shape[1])))
        logits = b.op1("MatMul", [last, b.weight("lm_head", np.ascontiguousarray(head))])
        if padded != b.spec.vocab_size:
            vocab_end = b.weight("vocab_end", np.array([b.spec.vocab_size], dtype=np.int64), cast=False)
            logits = b.op1(
                "Slice", [logits, b.weight("vocab_start", np.array([0], dtype=np.int64), cast=False), vocab_end, _AXIS1]
            )
    elif b.spec.tie_word_embeddings:
        logits = b.op1("Gemm", [last, "wte"], transB=1)  # tied LM head shares the embedding table
    else:
        logits = b.op1("Gemm", [last, b.weight("lm_head", b.w(head_key))], transB=1)
    if b.dtype != "fp32":
        logits = b.op1("Cast", [logits], to=TensorProto.FLOAT)
    b.nodes.append(helper.make_node("Div", [logits, b.op1("Unsqueeze", [io.TEMPERATURE, _AXIS1])], [io.LOGITS]))
    b.nodes.append(
        helper.make_node("TopK", [io.LOGITS, io.WINDOW], [io.TOPK_LOGITS, io.TOPK_IDS], axis=-1, largest=1, sorted=1)
    )
    # Stable log-sum-exp: max + log(sum(exp(x - max))). The row's max is the window's first
    # entry: a ReduceMax over the vocabulary took 40% of a 512-row step on the H200.
    starts = b.weight("slice_start", np.array([0], dtype=np.int64), cast=False)
    ends = b.weight("slice_end", np.array([1], dtype=np.int64), cast=False)
    row_max = b.op1("Slice", [io.TOPK_LOGITS, starts, ends, _AXIS1])
    sum_exp = b.op1("ReduceSum", [b.op1("Exp", [b.op1("Sub", [io.LOGITS, row_max])]), _AXIS1], keepdims=1)
    lse = b.op1("Add", [b.op1("Log", [sum_exp]), row_max])
    b.nodes.append(helper.make_node("Squeeze", [lse, _AXIS1], [io.LOGSUMEXP]))


def build_graph(spec: GraphSpec, state: dict[str, np.ndarray], dtype: str) -> onnx.ModelProto:
    """Return the ONNX model for `spec` with weights from a GPT2LMHeadModel state dict.

    `state` maps transformers' parameter names (with or without the `transformer.` prefix) to
    float32 numpy arrays. `dtype` is the compute and KV-cache type: "fp32" or "fp16".
    """
    b = _Builder(spec, state, dtype)
    wte = b.weight("wte", b.w("wte.weight"))
    wpe = b.weight("wpe", b.w("wpe.weight"))
    b.weight(_AXIS1, np.array([1], dtype=np.int64), cast=False)
    b.weight(_FLAT_SHAPE, np.array([-1, spec.n_embd], dtype=np.int64), cast=False)
    b.weight(_QKV_SPLIT, np.array([spec.n_embd] * 3, dtype=np.int64), cast=False)

    # Embeddings: token + learned absolute position.
    x = b.op1("Add", [b.op1("Gather", [wte, io.INPUT_IDS]), b.op1("Gather", [wpe, io.POSITION_IDS])])
    pending: str | None = None
    for layer in range(spec.n_layer):
        x, pending = _block(b, layer, x, pending)
    assert pending is not None  # n_layer >= 1
    _head(b, x, pending)

    inputs = [
        helper.make_tensor_value_info(io.INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(io.POSITION_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(io.SEQLENS_K, TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(io.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
        helper.make_tensor_value_info(io.GATHER_INDEX, TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info(io.TEMPERATURE, TensorProto.FLOAT, ["batch"]),
        helper.make_tensor_value_info(io.WINDOW, TensorProto.INT64, [1]),
        *b.past_inputs,
    ]
    outputs = [
        helper.make_tensor_value_info(io.LOGITS, TensorProto.FLOAT, ["batch", spec.vocab_size]),
        helper.make_tensor_value_info(io.TOPK_LOGITS, TensorProto.FLOAT, ["batch", "window_size"]),
        helper.make_tensor_value_info(io.TOPK_IDS, TensorProto.INT64, ["batch", "window_size"]),
        helper.make_tensor_value_info(io.LOGSUMEXP, TensorProto.FLOAT, ["batch"]),
        *b.present_outputs,
    ]
    graph = helper.make_graph(b.nodes, "gpt2_step", inputs, outputs, b.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="gpt2-serving-export",
    )
    model.ir_version = 9
    return model
