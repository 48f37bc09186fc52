"""Decodes run ahead: a row runs 1 + a decodes in one execution, each fed the token the model
proposes for the one before, with no host round trip between them (contract.PARAM_AHEAD).

Why: per token, the stack pays the gRPC round trip, Triton's Python-backend glue and the gateway's
step loop once per execution, and on the GPU that is most of a token's time (a one-row step: 0.9 ms
of engine against 2.8 ms of inter-token latency; 512 streams: a third of the engine's pace,
docs/benchmarks.md). Running a decodes ahead pays it once per 1 + a tokens.

The gateway stays the judge of every token (vLLM's and TensorRT-LLM's speculative decoding verify
a draft with the target model's own sampler in the same way; here the draft comes from the target
model itself, so it is only wrong by a rounding): it samples each ahead decode's window with its own
sampler and uniform and accepts the proposals up to the first it would not have drawn; the tokens
fed after that are dropped with PARAM_REWIND on the row's next step. So the proposal only has to
be right almost always; it is exactly the gateway's selection for the row's cuts:

* rows whose cuts lie inside the decode's window (greedy, top-k <= the window): the window sorted
  by (logit descending, token id ascending), as the gateway's sampler orders it, then
  `step_model.draw.draw_rows_sorted`'s selection over it with the row's log-sum-exp (masses in
  float64); greedy (u < 0) is the first entry;
* the other rows (top-p or min-p without a top-k inside the window): the device draw of the whole
  row (the engine's `DrawFunction`), whose token the gateway takes as drawn, as it takes DRAWN_IDS.

Each decode of a run is the run's bucket and graph, so a row's numbers are those it would get
stepping one token per execution (batch invariance holds through it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from step_model.draw import DrawFunction, draw_rows_sorted
from step_model.ort_runtime import DecodeBuffers

__all__ = ["AHEAD_FIELDS", "GREEDY", "AheadAnswers", "propose_from_window", "run_ahead"]

GREEDY = (-1.0, 1.0, 0.0, 0.0)  # the DRAW columns of an argmax: u < 0 (no mass is <= it), no cut


def propose_from_window(
    z: torch.Tensor, ids: torch.Tensor, logsumexp: torch.Tensor, draw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gateway's selection over each row's window: (token ids [M], their logits [M]).

    Args:
        z: float32 [M, W], the window's scaled logits (descending; ties in any order).
        ids: int64 [M, W], their token ids.
        logsumexp: float32 [M], the whole row's log-sum-exp.
        draw: float64 [M, 4], DRAW columns (u, top_p, top_k, min_p); the argmax for a row
            (-1, 1, 0, 0) (`GREEDY`: the first entry, no cut).
    """
    by_id = torch.argsort(ids, dim=1)  # then draw_rows_sorted's stable sort keeps ties by id
    picked, logit = draw_rows_sorted(z.gather(1, by_id), logsumexp, draw)
    return ids.gather(1, by_id.gather(1, picked[:, None])).squeeze(1), logit


# StepResult's and AheadAnswers' fields of the ahead decodes, in contract.AHEAD_OUTPUTS' order.
AHEAD_FIELDS = ("ahead_topk_logits", "ahead_topk_ids", "ahead_logsumexp", "ahead_ids", "ahead_logits", "ahead_drawn")


@dataclass
class AheadAnswers:
    """A run's answers per row (host arrays): the last decode's window and the ahead ones'."""

    topk_logits: np.ndarray  # float32 [n, window]: each row's last decode
    topk_ids: np.ndarray  # int64 [n, window]
    logsumexp: np.ndarray  # float32 [n]
    ahead_topk_logits: np.ndarray  # float32 [n, A, window]
    ahead_topk_ids: np.ndarray  # int64 [n, A, window]
    ahead_logsumexp: np.ndarray  # float32 [n, A]
    ahead_ids: np.ndarray  # int64 [n, A]: -1 past a row's count
    ahead_logits: np.ndarray  # float32 [n, A]
    ahead_drawn: np.ndarray  # bool [n, A]

    @classmethod
    def empty(cls, n: int, depth: int, window: int) -> AheadAnswers:
        return cls(
            np.zeros((n, window), dtype=np.float32),
            np.zeros((n, window), dtype=np.int64),
            np.zeros(n, dtype=np.float32),
            np.zeros((n, depth, window), dtype=np.float32),
            np.zeros((n, depth, window), dtype=np.int64),
            np.zeros((n, depth), dtype=np.float32),
            np.full((n, depth), -1, dtype=np.int64),
            np.zeros((n, depth), dtype=np.float32),
            np.zeros((n, depth), dtype=bool),
        )

    def put(self, rows: np.ndarray, other: AheadAnswers) -> None:
        """`other`'s rows into `rows` of these (`other` may run fewer decodes ahead)."""
        depth = other.ahead_ids.shape[1]
        self.topk_logits[rows], self.topk_ids[rows], self.logsumexp[rows] = (
            other.topk_logits,
            other.topk_ids,
            other.logsumexp,
        )
        for name in AHEAD_FIELDS:
            getattr(self, name)[rows, :depth] = getattr(other, name)


def run_ahead(
    decode: DecodeBuffers,
    run: Callable[[], None],
    rows: np.ndarray,
    ahead: np.ndarray,
    draw: np.ndarray | None,
    ahead_u: np.ndarray | None,
    window: int,
    full_draw: DrawFunction,
    save_rows: Callable[[np.ndarray, torch.Tensor], None],
    total_length: Callable[[int], None] | None,
) -> AheadAnswers:
    """Run 1 + max(ahead) decodes of `decode` (its first one staged by the caller) and answer.

    Args:
        decode: the run's buffers; its inputs hold the first decode's.
        run: runs the decode once, leaving its outputs on the device (no host copy, no sync).
        rows: int64 [n], the stepping rows of the buffer (slot - decode.first).
        ahead: int64 [n] >= 0, each row's decodes after its first.
        draw: float64 [n, 4] or None, each row's DRAW columns (the last decode's u; its cuts).
        ahead_u: float64 [n, >= max(ahead)] or None: the uniforms of each row's ahead decodes.
        window: K of the answers.
        full_draw: the engine's draw of whole rows (rows whose cut the window may not hold).
        save_rows: keeps rows (buffer indices, and the same on the device) whose last decode is
            done before the run's last one, before the next decode overwrites their logits.
        total_length: for an eager run, sets its attention length before decode s (its argument).
    """
    device = decode.logits.device
    n, depth = int(rows.shape[0]), int(ahead.max())
    assert decode.topk_logits is not None and decode.topk_ids is not None
    width = decode.topk_logits.shape[1]

    cuts = np.array(draw, dtype=np.float64) if draw is not None else np.tile(GREEDY, (n, 1))
    sampled = cuts[:, 0] >= 0
    cuts[~sampled] = GREEDY
    uniforms = np.zeros((n, depth), dtype=np.float64)
    if ahead_u is not None and sampled.any():
        uniforms[sampled] = ahead_u[sampled, :depth]
    top_k = cuts[:, 2]
    in_window = ~sampled | ((top_k > 0) & (top_k <= max(width, window)))  # the proposals' window
    # Per decode s: the rows that decode a proposal (ahead >= s), those just done (ahead == s - 1),
    # the rows drawn whole at s (ahead > s, cut outside the window).
    going = [np.flatnonzero(ahead >= s) for s in range(depth + 1)]
    done = [np.flatnonzero(ahead == s - 1) for s in range(depth + 1)]
    whole = [np.flatnonzero((ahead > s) & ~in_window) for s in range(depth)]
    # Everything the loop indexes with goes to the device in two copies, before the first decode
    # (a copy from pageable memory waits for the stream: none may come between the decodes).
    ints = [rows.astype(np.int64), ahead.astype(np.int64), *going, *done, *whole]
    ints_t = torch.from_numpy(np.concatenate(ints)).to(device)
    bounds = np.cumsum([0, *(a.size for a in ints)]).tolist()
    rows_t, last, *lists = (ints_t[a:b] for a, b in pairwise(bounds))
    going_t, done_t, whole_t = lists[: depth + 1], lists[depth + 1 : 2 * depth + 2], lists[2 * depth + 2 :]
    floats_t = torch.from_numpy(np.concatenate((cuts, uniforms), axis=1)).to(device)
    cuts_t, uniforms_t = floats_t[:, :4], floats_t[:, 4:]
    acc_logits = torch.empty((depth + 1, n, window), dtype=torch.float32, device=device)
    acc_ids = torch.empty((depth + 1, n, window), dtype=torch.int64, device=device)
    acc_lse = torch.empty((depth + 1, n), dtype=torch.float32, device=device)
    prop_ids = torch.full((depth, n), -1, dtype=torch.int64, device=device)
    prop_logits = torch.zeros((depth, n), dtype=torch.float32, device=device)
    prop_drawn = torch.zeros((depth, n), dtype=torch.bool, device=device)
    proposal = torch.zeros(n, dtype=torch.int64, device=device)
    for s in range(depth + 1):
        if s:
            if done[s].size:  # their last decode was s - 1: keep it, then they step as bystanders
                save_rows(rows[done[s]], rows_t[done_t[s]])
            at = rows_t[torch.cat((going_t[s], done_t[s]))]
            decode.positions[at] += 1
            decode.seqlens_k[at] += 1
            decode.input_ids[rows_t[done_t[s]], 0] = 0  # a dummy at its next position (engine.py)
            decode.input_ids[rows_t[going_t[s]], 0] = proposal[going_t[s]]
            if total_length is not None:
                total_length(s)
        run()
        if width >= window:
            acc_logits[s] = decode.topk_logits.index_select(0, rows_t)[:, :window]
            acc_ids[s] = decode.topk_ids.index_select(0, rows_t)[:, :window]
        else:  # a graph narrower than the step's window: its top-K from the logits
            torch.topk(decode.logits.index_select(0, rows_t), window, dim=-1, out=(acc_logits[s], acc_ids[s]))
        acc_lse[s] = decode.lse.index_select(0, rows_t)
        if s == depth:
            break
        wz = decode.topk_logits.index_select(0, rows_t) if width >= window else acc_logits[s]
        wi = decode.topk_ids.index_select(0, rows_t) if width >= window else acc_ids[s]
        row_cuts = cuts_t.clone()
        row_cuts[:, 0] = torch.where(cuts_t[:, 0] >= 0, uniforms_t[:, s], cuts_t[:, 0])
        token, logit = propose_from_window(wz, wi, acc_lse[s], row_cuts)
        if whole[s].size:
            w = whole_t[s]
            drawn_ids, drawn_logits = full_draw(decode.logits.index_select(0, rows_t[w]), acc_lse[s][w], row_cuts[w])
            token[w] = drawn_ids
            logit[w] = drawn_logits
            prop_drawn[s, w] = True
        asking = going_t[s + 1]
        prop_ids[s, asking] = token[asking]
        prop_logits[s, asking] = logit[asking]
        proposal = token
    pick = torch.arange(n, device=device)
    answers = AheadAnswers(
        topk_logits=acc_logits[last, pick].cpu().numpy(),
        topk_ids=acc_ids[last, pick].cpu().numpy(),
        logsumexp=acc_lse[last, pick].cpu().numpy(),
        ahead_topk_logits=acc_logits[:depth].transpose(0, 1).cpu().numpy(),
        ahead_topk_ids=acc_ids[:depth].transpose(0, 1).cpu().numpy(),
        ahead_logsumexp=acc_lse[:depth].transpose(0, 1).cpu().numpy(),
        ahead_ids=prop_ids.transpose(0, 1).cpu().numpy(),
        ahead_logits=prop_logits.transpose(0, 1).cpu().numpy(),
        ahead_drawn=prop_drawn.transpose(0, 1).cpu().numpy(),
    )
    past = np.arange(depth)[None, :] >= ahead[:, None]  # entries past a row's own count
    for name in ("ahead_topk_logits", "ahead_topk_ids", "ahead_logsumexp", "ahead_logits"):
        getattr(answers, name)[past] = 0
    return answers
