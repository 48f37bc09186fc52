"""The ONNX step graph's own input and output names: written by the exporter (`export/graph.py`),
bound by the engine inside Triton (`step_model.engine`, `step_model.ort_runtime`).

These are the graph's names, not the wire's: Triton's tensors (`step_model.contract.INPUT_IDS`,
...) never reach ONNX Runtime as such. Shapes and meanings are in `export/graph.py`'s docstring.
"""

from __future__ import annotations

from typing import Final

# ------------------------------------------------------------------------ inputs
INPUT_IDS: Final = "input_ids"
POSITION_IDS: Final = "position_ids"
SEQLENS_K: Final = "seqlens_k"
TOTAL_SEQUENCE_LENGTH: Final = "total_sequence_length"
GATHER_INDEX: Final = "gather_index"
TEMPERATURE: Final = "temperature"
WINDOW: Final = "window"

# ------------------------------------------------------------------------ outputs
LOGITS: Final = "logits"
TOPK_LOGITS: Final = "topk_logits"
TOPK_IDS: Final = "topk_ids"
LOGSUMEXP: Final = "logsumexp"
# The top-K / log-sum-exp tail of the graph: the engine may compute these itself from LOGITS.
TAIL_OUTPUTS: Final = (TOPK_LOGITS, TOPK_IDS, LOGSUMEXP)

# ------------------------------------------------------------------------ KV cache
# Per layer, past (input) and present (output) of each kind name the same buffer: the KV pool's
# axis 1 holds the kinds in this order.
KV_KINDS: Final = ("key", "value")
_PAST: Final = "past_"
_PRESENT: Final = "present_"


def past(kind: str, layer: int) -> str:
    """The input name of layer `layer`'s cached keys or values (`kind` in KV_KINDS)."""
    return f"{_PAST}{kind}_{layer}"


def present(kind: str, layer: int) -> str:
    """The output name of layer `layer`'s keys or values after the step (`kind` in KV_KINDS)."""
    return f"{_PRESENT}{kind}_{layer}"


def is_present(name: str) -> bool:
    """Whether `name` is one of the graph's KV outputs."""
    return name.startswith(_PRESENT)
