"""Exact next-token sampling for the gateway from the server's top-K window or full logits row.

Pure numpy, no I/O. Per request: ask the server for ``window_size(params, ...)`` entries (and
for full rows every step when ``needs_full_row(params)``); per step draw one ``u`` from the
request's generator and call ``sample``; on :class:`NeedFullRow`, fetch the full row and call
``sample`` again with the same ``u``. See :mod:`frontend.sampling.sampler` for the contract.
"""

from frontend.sampling.sampler import (
    NeedFullRow,
    Sampled,
    SamplingParams,
    StepLogits,
    needs_full_row,
    sample,
    window_size,
)

__all__ = [
    "NeedFullRow",
    "Sampled",
    "SamplingParams",
    "StepLogits",
    "needs_full_row",
    "sample",
    "window_size",
]
