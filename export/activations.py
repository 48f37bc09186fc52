"""GPT-2's MLP activations (config `activation_function`, transformers' `ACT2FN`) as ONNX ops.

Every entry writes the formula transformers' own module computes, op for op; ONNX Runtime's
fused FastGelu stands only for the tanh-approximated GELUs, whose formula it is:
0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (`gelu_fast` writes sqrt(2/pi) as 0.7978845608,
the same float32). An activation this module does not list is refused before any work
(`export.graph.check_config`): `xielu` (learned bf16 parameters behind a CUDA kernel) and any
name transformers does not know.

Each function takes the c_fc MatMul output without its bias and the bias (FastGelu fuses it;
the others add it first) and the layer index (PReLU's learned slope is per layer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export.graph import _Builder

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (FastGelu, Gelu, GroupQueryAttention, ...)

Activation = Callable[["_Builder", str, str, int], str]


def _fast_gelu(b: _Builder, pre: str, bias: str, _layer: int) -> str:
    return b.op1("FastGelu", [pre, bias], domain=MS_DOMAIN)  # tanh approximation, bias fused


def _biased(fn: Callable[[_Builder, str], str]) -> Activation:
    """An activation of x = pre + bias."""
    return lambda b, pre, bias, _layer: fn(b, b.op1("Add", [pre, bias]))


def _gelu(b: _Builder, x: str) -> str:
    return b.op1("Gelu", [x], domain=MS_DOMAIN)  # exact erf gelu


def _gelu_10(b: _Builder, x: str) -> str:
    return b.op1("Clip", [_gelu(b, x), b.const(-10.0), b.const(10.0)])


def _relu2(b: _Builder, x: str) -> str:
    relu = b.op1("Relu", [x])
    return b.op1("Mul", [relu, relu])


def _silu(b: _Builder, x: str) -> str:
    return b.op1("Mul", [x, b.op1("Sigmoid", [x])])


def _quick_gelu(b: _Builder, x: str) -> str:
    return b.op1("Mul", [x, b.op1("Sigmoid", [b.op1("Mul", [x, b.const(1.702)])])])


def _mish(b: _Builder, x: str) -> str:
    return b.op1("Mul", [x, b.op1("Tanh", [b.op1("Softplus", [x])])])


def _laplace(b: _Builder, x: str) -> str:
    # transformers' LaplaceActivation with its defaults mu=0.707107, sigma=0.282095
    scaled = b.op1("Div", [b.op1("Sub", [x, b.const(0.707107)]), b.const(0.282095 * math.sqrt(2.0))])
    return b.op1("Mul", [b.const(0.5), b.op1("Add", [b.const(1.0), b.op1("Erf", [scaled])])])


def _prelu(b: _Builder, pre: str, bias: str, layer: int) -> str:
    slope = b.param(f"h.{layer}.mlp.act.weight")  # nn.PReLU's learned slope, one per layer
    return b.op1("PRelu", [b.op1("Add", [pre, bias]), slope])


def _op(op_type: str, **attrs: float) -> Activation:
    """One standard ONNX op of x = pre + bias."""
    return _biased(lambda b, x: b.op1(op_type, [x], "", **attrs))


ACTIVATIONS: dict[str, Activation] = {
    "gelu_new": _fast_gelu,
    "gelu_pytorch_tanh": _fast_gelu,
    "gelu_python_tanh": _fast_gelu,
    "gelu_accurate": _fast_gelu,
    "gelu_fast": _fast_gelu,
    "gelu": _biased(_gelu),
    "gelu_python": _biased(_gelu),
    "gelu_10": _biased(_gelu_10),
    "quick_gelu": _biased(_quick_gelu),
    "relu": _op("Relu"),
    "relu2": _biased(_relu2),
    "relu6": _biased(lambda b, x: b.op1("Clip", [x, b.const(0.0), b.const(6.0)])),
    "leaky_relu": _op("LeakyRelu", alpha=0.01),  # nn.LeakyReLU's default slope
    "prelu": _prelu,
    "silu": _biased(_silu),
    "swish": _biased(_silu),
    "hardswish": _op("HardSwish"),  # x * relu6(x + 3) / 6, torch's and ONNX's definition alike
    "mish": _biased(_mish),
    "sigmoid": _op("Sigmoid"),
    "tanh": _op("Tanh"),
    "laplace": _biased(_laplace),
    "sqrtsoftplus": _biased(lambda b, x: b.op1("Sqrt", [b.op1("Softplus", [x])])),
    "linear": _biased(lambda _b, x: x),
}
