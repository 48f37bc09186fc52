"""Row log-sum-exps: fused on the GPU, batch-invariant on the CPU.

`torch.logsumexp` over a [512, 50257] float32 logits block runs four kernels (max, subtract,
exp, sum), each a pass over 100 MB: 0.24 ms of a 3.4 ms step (H100 profile, 2026-12-07). One
Triton kernel with an online max reads the block once. Written here because neither torch nor
ONNX Runtime offers a single-pass row log-sum-exp; `row_logsumexp` falls back to torch wherever
Triton is missing or its first result disagrees with torch's (checked once per process).

A row's log-sum-exp must be a function of that row alone (a seeded request's tokens must not
depend on what shares its step): the Triton kernel reduces each row in one program, whatever the
row count. On the CPU, ONNX Runtime's Exp + ReduceSum tail did not (GPT-2 124M, fp32, 2026-12-07:
a row's log-sum-exp moved by up to 2e-6 between a run of 1 row and of 8, while its logits stayed
bitwise equal); there `row_logsumexp` is numpy's, whose exp and last-axis pairwise sum treat each
row alike at any row count or offset (tests/unit/test_batch_invariance.py), its rows cut into a
few groups on threads (numpy releases the GIL): which group a row is in changes nothing. Computed
after the graph's own tail, it adds about 2% to a 32-row GPT-2 step on 2 cores (one thread: 5%).
"""

from __future__ import annotations

import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

__all__ = ["row_logsumexp"]

log = logging.getLogger(__name__)

_BLOCK = 2048
_HOST_THREADS = max(1, min(4, os.cpu_count() or 1))
_HOST_ROWS_PER_THREAD = 4  # fewer rows than this per thread: one thread does them all
_host_pool: ThreadPoolExecutor | None = None
_kernel: Any = None
_checked: bool | None = None  # None: not tried yet; then whether the kernel is used
unavailable_reason = ""  # why the kernel is not used, once tried (the benchmarks print it)


def _build() -> Any:
    import triton
    import triton.language as tl

    # No annotations but constexpr's: Triton resolves a jit function's annotations as globals, and
    # under `from __future__ import annotations` "Any" is one it cannot access (H100, 2026-12-07).
    @triton.jit  # type: ignore[misc]
    def lse_kernel(x_ptr, out_ptr, stride, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        base = x_ptr + row.to(tl.int64) * stride
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(base + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, v)
            # Lanes that saw only -inf keep s = 0 (exp(-inf - -inf) would be nan).
            s = tl.where(new_m == float("-inf"), 0.0, s * tl.exp(m - new_m) + tl.exp(v - new_m))
            m = new_m
        row_max = tl.max(m, 0)
        total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - row_max)), 0)
        tl.store(out_ptr + row, row_max + tl.log(total))

    return lse_kernel


def _launch(x: torch.Tensor, out: torch.Tensor) -> None:
    _kernel[(x.shape[0],)](x, out, x.stride(0), x.shape[1], BLOCK=_BLOCK, num_warps=8)


def _usable(x: torch.Tensor) -> bool:
    global _kernel, _checked, unavailable_reason
    if _checked is None:
        _checked = False
        try:
            _kernel = _build()
            probe = torch.randn(3, 5000, device=x.device) * 4
            probe[1, :] = float("-inf")
            probe[1, 7] = 2.0
            got = torch.empty(3, device=x.device)
            _launch(probe, got)
            _checked = bool(torch.allclose(got, torch.logsumexp(probe, dim=-1), rtol=1e-5, atol=1e-5))
            if not _checked:
                unavailable_reason = "its probe disagrees with torch.logsumexp"
                log.warning("fused log-sum-exp disagrees with torch: using torch.logsumexp")
        except Exception as err:  # no Triton, no compiler, an old GPU: torch's kernels serve
            unavailable_reason = f"{type(err).__name__}: {err}"[:300]
            log.warning("fused log-sum-exp unavailable (%s): using torch.logsumexp", unavailable_reason)
    return _checked


def row_logsumexp(x: torch.Tensor, out: torch.Tensor, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """log(sum(exp(x), -1)) of a 2-D float32 tensor (unit stride along rows) into `out` [rows]:
    on the GPU fused, on the CPU per row alike whatever the number of rows (module docstring).
    `row_max` (CPU): each row's maximum when the caller has it (a window's first entry)."""
    if not x.is_cuda and x.dtype == torch.float32 and out.dtype == torch.float32:
        top = row_max.numpy() if row_max is not None else None
        out.copy_(torch.from_numpy(_host_logsumexp(x.numpy(), top)))
        return out
    if x.is_cuda and x.stride(-1) == 1 and out.dtype == torch.float32 and _usable(x):
        _launch(x, out)
        return out
    return torch.logsumexp(x, dim=-1, out=out)


def _host_logsumexp(x: np.ndarray, row_max: np.ndarray | None = None) -> np.ndarray:
    """Per row max + log(sum(exp(x - max))) in float32 with numpy's kernels, groups of rows on
    threads. A row of -inf only (every token banned) gives -inf, as torch.logsumexp does."""
    global _host_pool
    rows = x.shape[0]
    out = np.empty(rows, dtype=np.float32)
    parts = min(_HOST_THREADS, rows // _HOST_ROWS_PER_THREAD)
    if parts <= 1:
        _host_rows(x, row_max, out)
        return out
    if _host_pool is None:
        _host_pool = ThreadPoolExecutor(_HOST_THREADS, thread_name_prefix="row-lse")
    cuts = np.linspace(0, rows, parts + 1).astype(int).tolist()
    jobs = [
        _host_pool.submit(_host_rows, x[a:b], None if row_max is None else row_max[a:b], out[a:b])
        for a, b in itertools.pairwise(cuts)
    ]
    for job in jobs:
        job.result()
    return out


def _host_rows(x: np.ndarray, row_max: np.ndarray | None, out: np.ndarray) -> None:
    top = x.max(axis=1) if row_max is None else row_max.astype(np.float32, copy=False)
    finite = np.where(np.isfinite(top), top, np.float32(0))
    shifted = np.subtract(x, finite[:, None])
    np.exp(shifted, out=shifted)
    with np.errstate(divide="ignore"):
        out[:] = np.log(shifted.sum(axis=1)) + finite
