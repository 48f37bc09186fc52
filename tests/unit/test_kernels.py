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
