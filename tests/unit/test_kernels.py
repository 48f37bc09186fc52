"""The fused row log-sum-exp of the decode tail equals torch.logsumexp (on CUDA: the Triton
kernel, run by the GPU suite; here: the fallback)."""

from __future__ import annotations

import pytest
import torch

from step_model import kernels

pytestmark = pytest.mark.unit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1, 50257), (7, 1000), (512, 50257), (3, 1)])
def test_row_logsumexp_equals_torch(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE) * 6
    if shape[0] > 2:
        x[1] = float("-inf")  # a row with a single finite value
        x[1, -1] = 3.0
        x[2] = float("-inf")  # no finite value at all: -inf, as torch
    out = torch.empty(shape[0], device=DEVICE)
    got = kernels.row_logsumexp(x, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, torch.logsumexp(x, dim=-1), rtol=2e-6, atol=2e-5)


def test_the_kernel_is_used_on_cuda_when_it_agrees_with_torch() -> None:
    x = torch.randn(4, 300, device=DEVICE)
    kernels.row_logsumexp(x, torch.empty(4, device=DEVICE))
    if DEVICE == "cpu":
        assert kernels._checked is None  # never tried off the GPU
    else:
        assert kernels._checked is not None  # tried; the log says which one serves


def test_a_rows_log_sum_exp_on_the_cpu_is_the_same_at_any_row_count_offset_or_grouping() -> None:
    """Batch invariance (issue 15): a row's value does not depend on the other rows of the call,
    nor on which group of rows a thread took, nor on whether its maximum was given."""
    torch.manual_seed(1)
    x = torch.randn(40, 50257) * 3
    x[5] = float("-inf")
    x[5, 7] = 1.0
    alone = torch.stack([kernels.row_logsumexp(x[i : i + 1], torch.empty(1))[0] for i in range(40)])
    for lo, hi in ((0, 40), (3, 40), (0, 9), (11, 29)):
        rows = x[lo:hi]
        torch.testing.assert_close(kernels.row_logsumexp(rows, torch.empty(hi - lo)), alone[lo:hi], rtol=0, atol=0)
        top = rows.max(dim=1).values
        given = kernels.row_logsumexp(rows, torch.empty(hi - lo), top)
        torch.testing.assert_close(given, alone[lo:hi], rtol=0, atol=0)
    torch.testing.assert_close(alone, torch.logsumexp(x, dim=-1), rtol=2e-6, atol=2e-5)
