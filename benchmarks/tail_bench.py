"""The decode tail's kernels alone, on the GPU: top-K windows, row log-sum-exp and the device draw
at the suite's row counts, each against its alternatives (report only; the GPU suite keeps the
log beside the engine's figures, to choose among them with numbers from the same card).

    python -m benchmarks.tail_bench [--rows 1,64,256,512]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from step_model import kernels
from step_model.draw import draw_rows, draw_rows_searched, draw_rows_sorted
from step_model.draw_graphs import GraphedDraw, never_flagged

VOCAB = 50257  # GPT-2's


def _ms(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / iters * 1e3


def _topk_two_stage(x: torch.Tensor, k: int = 64, chunks: int = 29) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each chunk (50,257 = 29 x 1,733), then of the chunks' winners."""
    rows, n = x.shape
    width = n // chunks
    values, index = torch.topk(x.view(rows, chunks, width), k, dim=2)
    index = index + (torch.arange(chunks, device=x.device) * width)[None, :, None]
    best, pick = torch.topk(values.reshape(rows, -1), k, dim=1)
    return best, index.reshape(rows, -1).gather(1, pick)


def _row_count(m: int) -> dict[str, float]:
    z = torch.randn(m, VOCAB, device="cuda").half().float()
    lse = torch.logsumexp(z, 1)
    out = torch.empty(m, device="cuda")
    asks = torch.tensor([[0.5, 0.9, 0.0, 0.0]] * m, dtype=torch.float64, device="cuda")
    dev = torch.device("cuda")
    graphed = GraphedDraw(never_flagged(draw_rows_searched), draw_rows_searched, VOCAB, dev, max_rows=m)
    r = {
        "topk64_f32": _ms(lambda: torch.topk(z, 64, 1), 30),
        "topk64_f16": _ms(lambda: torch.topk(z.half(), 64, 1), 30),
        "topk64_two_stage": _ms(lambda: _topk_two_stage(z), 30),
        "lse_torch": _ms(lambda: torch.logsumexp(z, 1), 30),
        "lse_fused": _ms(lambda: kernels.row_logsumexp(z, out), 30),
        "draw_bins": _ms(lambda: draw_rows(z, lse, asks), 10),
        "draw_sort": _ms(lambda: draw_rows_sorted(z, lse, asks), 10),
        "draw_searched": _ms(lambda: draw_rows_searched(z, lse, asks), 10),
        "draw_graphed": _ms(lambda: graphed(z, lse, asks), 10),
        "sort_stable": _ms(lambda: torch.sort(z, dim=1, descending=True, stable=True), 10),
    }
    r["lse_fused_used"] = float(bool(kernels._checked))
    r["lse_fused_max_err"] = float((kernels.row_logsumexp(z, out) - lse).abs().max())
    r["two_stage_equal"] = float(torch.equal(torch.topk(z, 64, 1).values, _topk_two_stage(z)[0]))
    reference = draw_rows_sorted(z, lse, asks)[0]
    r["draws_agree"] = float((draw_rows(z, lse, asks)[0] == reference).float().mean())
    r["graphed_agree"] = float((graphed(z, lse, asks)[0] == reference).float().mean())
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,64,256,512")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("[tail] no CUDA device: nothing to measure")
        return
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for m in (int(r) for r in args.rows.split(",")):
        r = _row_count(m)
        print(f"[tail] rows={m} " + " ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
    if not kernels._checked:
        print(f"[tail] the fused log-sum-exp is not used: {kernels.unavailable_reason}", flush=True)


if __name__ == "__main__":
    main()
