"""Exact next-token sampling for the gateway from the server's top-K window or full logits row.

Pure numpy, no I/O. Per request: ask the server for ``window_size(params, ...)`` entries (and
for full rows every step when ``needs_full_row(params)``); per step draw one ``u`` from the
request's generator and call ``sample``; on :class:`NeedFullRow`, fetch the full row and call
``sample`` again with the same ``u``. See :mod:`frontend.sampling.sampler` for the contract.
:func:`sample_window_batch` does the window step for a whole batch at once (rows it leaves
undecided go through ``sample``); see :mod:`frontend.sampling.batched`.
"""

from frontend.sampling.batched import BatchParams, BatchSampled, sample_window_batch
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
    "BatchParams",
    "BatchSampled",
    "NeedFullRow",
    "Sampled",
    "SamplingParams",
    "StepLogits",
    "needs_full_row",
    "sample",
    "sample_window_batch",
    "window_size",
]
