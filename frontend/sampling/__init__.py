"""Exact next-token sampling for the gateway from the server's top-K window or full logits row.

Pure numpy, no I/O. Per request: ask the server for ``window_size(params, ...)`` entries; per
step build the step's ``logit_adjustment`` (penalties, logit_bias, banned ids: None for most
requests), ask the server for the logits of its ids, draw one ``u`` from the request's generator
and call ``sample``; on :class:`NeedFullRow`, fetch the full row and call ``sample`` again with
the same ``u``. See :mod:`frontend.sampling.sampler` for the contract.
:func:`sample_window_batch` does the window step for a whole batch at once (rows it leaves
undecided go through ``sample``); see :mod:`frontend.sampling.batched`.
"""

from frontend.sampling.adjust import AdjustmentTracker, LogitAdjustment, logit_adjustment
from frontend.sampling.adjusted import sample_adjusted_batch
from frontend.sampling.batched import BatchParams, BatchSampled, sample_window_batch
from frontend.sampling.sampler import (
    NeedFullRow,
    Sampled,
    SamplingParams,
    StepLogits,
    drawn,
    sample,
    window_size,
)

__all__ = [
    "AdjustmentTracker",
    "BatchParams",
    "BatchSampled",
    "LogitAdjustment",
    "NeedFullRow",
    "Sampled",
    "SamplingParams",
    "StepLogits",
    "drawn",
    "logit_adjustment",
    "sample",
    "sample_adjusted_batch",
    "sample_window_batch",
    "window_size",
]
