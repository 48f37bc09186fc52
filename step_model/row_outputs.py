"""Per-row outputs computed from a step's stored logits rows, beside the window every row gets:
the logits of the ids a caller adjusts itself (EXTRA_IDS), and draws on the device (DRAW).

Functions of the rows' logits (torch tensors on the engine's device) and the request, writing
into the `StepResult`; the engine finds the rows and their logits, these decide what to answer.
"""

from __future__ import annotations

import numpy as np
import torch

from step_model.draw import DrawFunction, draw_rows, needs_draw
from step_model.kernels import row_logsumexp
from step_model.rows import StepRequest, StepResult

__all__ = ["fill_draws", "fill_extra_logits", "fill_prompt_logprobs", "rows_to_draw"]


def fill_extra_logits(res: StepResult, rows: np.ndarray, extra: np.ndarray, stored: torch.Tensor) -> None:
    """The logits of each row's EXTRA_IDS, the log-sum-exp of the rest of its row, and the row's
    window taken over the rest (the caller adjusts those ids itself: penalties, logit_bias). The
    rest is summed with the ids masked to -inf, so it carries no cancellation however much mass
    the ids held; and the window keeps K entries however many of the ids would have filled it (a
    penalised favourite drops out of the adjusted row's top K).

    `rows`: the answered rows with at least one id; `extra`: int64 [N, E] (-1 padding);
    `stored`: those rows' logits [len(rows), V]. `res.extra_logits` / `rest_logsumexp` exist.
    """
    valid = extra[rows] >= 0
    mine = extra[rows]
    # Padding points at the row's first real id: a duplicate index writes the same -inf.
    first = mine[np.arange(rows.size), valid.argmax(axis=1)]
    index = torch.from_numpy(np.where(valid, mine, first[:, None])).to(stored.device)
    values = stored.gather(1, index).cpu().numpy()
    masked = stored.scatter(1, index, float("-inf"))
    rest = row_logsumexp(masked, torch.empty(masked.shape[0], dtype=torch.float32, device=masked.device)).cpu().numpy()
    top_values, top_ids = torch.topk(masked, res.topk_logits.shape[1], dim=-1)
    assert res.extra_logits is not None and res.rest_logsumexp is not None
    res.extra_logits[rows] = np.where(valid, values, 0.0)
    res.rest_logsumexp[rows] = rest
    res.topk_logits[rows] = top_values.cpu().numpy()
    res.topk_ids[rows] = top_ids.cpu().numpy()


def rows_to_draw(req: StepRequest, res: StepResult, answered: np.ndarray) -> np.ndarray:
    """Answered rows that asked for a draw and whose window cannot hold their cut (rows with
    EXTRA_IDS are never drawn: their window is over the rest of the row, their caller adjusts)."""
    assert req.draw is not None
    n = res.status.shape[0]
    adjusted = (req.extra_ids >= 0).any(axis=1) if req.extra_ids is not None else np.zeros(n, dtype=bool)
    wanted = answered & ~adjusted & needs_draw(req.draw, res.topk_logits, res.logsumexp)
    return np.flatnonzero(wanted)


def fill_draws(
    req: StepRequest, res: StepResult, rows: np.ndarray, stored: torch.Tensor, method: DrawFunction = draw_rows
) -> None:
    """Draw `rows` (from `rows_to_draw`) on the device from their logits `stored` [len(rows), V]
    with `method` (step_model.draw.draw_method)."""
    assert req.draw is not None and res.drawn_ids is not None and res.drawn_logits is not None
    device = stored.device
    lse = torch.from_numpy(res.logsumexp[rows]).to(device)
    ids, logits = method(stored, lse, torch.from_numpy(req.draw[rows]).to(device))
    res.drawn_ids[rows] = ids.cpu().numpy()
    res.drawn_logits[rows] = logits.cpu().numpy()


def fill_prompt_logprobs(
    res: StepResult,
    rows: np.ndarray,
    ids: np.ndarray,
    lengths: np.ndarray,
    logits: torch.Tensor,
    top_values: np.ndarray,
    top_ids: np.ndarray,
    lse: np.ndarray,
) -> None:
    """OpenAI's `echo` logprobs of `rows` from an eager pass over their prompts `ids` [b, s] that
    gathered every position (`logits` [b*s, V] at temperature 1, its top-k and log-sum-exp).
    Position t predicts token t + 1: log p(ids[t + 1] | ids[: t + 1]) = logit - logsumexp."""
    assert res.prompt_logprobs is not None and res.prompt_top_ids is not None and res.prompt_top_logprobs is not None
    b, s = ids.shape
    k = res.prompt_top_ids.shape[2]
    nxt = torch.from_numpy(np.concatenate([ids[:, 1:], np.zeros((b, 1), dtype=np.int64)], axis=1))
    picked = logits.view(b, s, -1).gather(2, nxt.to(logits.device).view(b, s, 1)).view(b, s).cpu().numpy()
    lse2 = lse.reshape(b, s)
    valid = np.arange(1, s)[None, :] < lengths[:, None]  # [b, s - 1]: positions 1..len-1
    res.prompt_logprobs[rows, 1:s] = np.where(valid, picked[:, :-1] - lse2[:, :-1], 0.0)
    tops = (top_values.reshape(b, s, k) - lse2[:, :, None])[:, :-1]
    res.prompt_top_logprobs[rows, 1:s] = np.where(valid[:, :, None], tops, 0.0)
    res.prompt_top_ids[rows, 1:s] = np.where(valid[:, :, None], top_ids.reshape(b, s, k)[:, :-1], 0)
