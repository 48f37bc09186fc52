"""The scheduler's sampling of a step's rows: the tokens of every row the step answered.

Batched: one uniform per row per step from the sequence's own generator, then the vectorized
sampler over every row's window (`frontend.sampling.sample_window_batch`), adjusted rows through
their own vectorized pass; the rows it leaves undecided go through the per-row reference sampler
(a step of at most PER_ROW_MAX rows goes through it whole: the same tokens, for less), and rows
whose window does not decide the step are sampled again from their full row (one extra
request for all of them) with the same draw, so a seeded sequence gets the same tokens whatever
shares its batch (`_sample_rows`, `_fetch_full_rows`). A started sequence that asked for its
prompt's logprobs gets them first (`_emit_prompt_logprobs`). Tokens leave as events on the
sequence's sink (`_emit_token`), which also ends it at end-of-text, a stop id or its length.

A mixin of `frontend.engine.scheduler.Scheduler`, not an object of its own: these methods emit
into and finish the scheduler's sequences in the same synchronous pass as its step, and keeping
them methods keeps their bodies as they were in the scheduler.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from frontend.engine.errors import SamplingFailed, StepError, StepRejected
from frontend.engine.events import ErrorEvent, Event, FinishEvent, PromptLogprobsEvent, TokenEvent
from frontend.engine.step_rows import ROW_REFUSALS, Row, StepRequest, StepResult, from_rows
from frontend.sampling import (
    BatchParams,
    LogitAdjustment,
    NeedFullRow,
    Sampled,
    StepLogits,
    drawn,
    sample,
    sample_adjusted_batch,
    sample_window_batch,
)
from step_model.contract import RowStatus

if TYPE_CHECKING:
    from frontend.engine.scheduler import ActiveSequence, StepBackend, StepObserver


log = logging.getLogger(__name__)

# Up to this many rows a step is sampled row by row with the reference sampler: ~20-40 us a row
# against ~0.3 ms for the vectorized passes whatever the row count (2-core VM, window 64; the two
# cross near 8 rows). The tokens are the same either way (tests/unit/test_sampling_batched.py).
PER_ROW_MAX = 4


class StepSampling:
    """Sampling and emitting a step's tokens (mixed into `Scheduler`)."""

    client: StepBackend
    observer: StepObserver
    eos_token_id: int

    def _finish(self, seq: ActiveSequence, event: Event) -> None:
        raise NotImplementedError  # the scheduler's

    def _fail(self, seqs: list[ActiveSequence], error: BaseException) -> None:
        raise NotImplementedError  # the scheduler's

    def _step_failed(self, seqs: list[ActiveSequence], rows: StepRequest, err: StepError) -> bool:
        raise NotImplementedError  # the scheduler's

    def _emit_prompt_logprobs(self, seqs: list[ActiveSequence], sampling: list[int], out: StepResult) -> list[int]:
        """Send each started sequence that asked its prompt's logprobs (before its first token);
        one with max_new_tokens 0 (OpenAI `echo` with `max_tokens: 0`) ends there. Returns the rows
        still to sample."""
        assert out.prompt_logprobs is not None and out.prompt_top_ids is not None
        assert out.prompt_top_logprobs is not None
        keep = []
        for i in sampling:
            seq = seqs[i]
            k = seq.prompt_logprobs
            if k < 0 or seq.generated:
                keep.append(i)
                continue
            seq.prompt_logprobs = -1  # once: a sequence started again does not send them again
            n = len(seq.prompt_ids)
            values = out.prompt_logprobs[i, :n].tolist()
            ids, lps = out.prompt_top_ids[i, :n, :k].tolist(), out.prompt_top_logprobs[i, :n, :k].tolist()
            seq.sink.put_nowait(
                PromptLogprobsEvent(
                    (None, *values[1:]),
                    ((), *(tuple(zip(ids[t], lps[t], strict=True)) for t in range(1, n))),
                )
            )
            if seq.max_new_tokens <= 0:
                self._finish(seq, FinishEvent("length"))
            else:
                keep.append(i)
        return keep

    def _sample_rows(
        self,
        seqs: list[ActiveSequence],
        rows: list[int],
        out: StepResult,
        adjustments: list[LogitAdjustment | None],
        uniforms: np.ndarray,
    ) -> list[tuple[ActiveSequence, float, StepLogits, LogitAdjustment | None]]:
        """Sample the given rows of a step with the step's uniforms (one per sequence, from the
        plan); returns the rows that need their full logits row.

        A row whose numbers cannot be sampled fails alone: when a vectorized pass raises, the rows
        are sampled one by one and only the one that raises again fails."""
        if not rows:
            return []
        try:
            return self._sample_batch(seqs, rows, out, adjustments, uniforms)
        except Exception as err:
            if len(rows) > 1:
                return [f for i in rows for f in self._sample_rows(seqs, [i], out, adjustments, uniforms)]
            self._fail_row(seqs[rows[0]], err)
            return []

    def _accept_ahead(
        self, seqs: list[ActiveSequence], sampling: list[int], out: StepResult, ahead: np.ndarray, ahead_u: np.ndarray
    ) -> list[int]:
        """Judge the decodes rows ran ahead (contract.PARAM_AHEAD), in order: each ahead decode's
        token is the sequence's own sampler's for that decode's window and uniform (a proposal the
        model drew from the whole row is taken as drawn, as DRAWN_IDS); it is emitted, and while it
        equals the model's proposal (the token the model fed to the next decode) the next decode
        is valid too. At the first that differs (or a window that cannot decide: the full row of
        an ahead decode is gone) the row stops there and its next decode row drops the cached
        tokens fed after it (`rewind`). Returns the rows whose answer (their last decode) is still
        to be sampled: every proposal accepted and the sequence not finished."""
        rows = np.asarray(sampling, dtype=np.int64)
        going = rows[ahead[rows] > 0] if rows.size else rows
        if not going.size:
            return sampling
        assert out.ahead_topk_logits is not None and out.ahead_topk_ids is not None and out.ahead_ids is not None
        assert out.ahead_logsumexp is not None and out.ahead_logits is not None and out.ahead_drawn is not None
        depth = ahead[going]  # ahead decodes each going row ran
        live = np.ones(going.size, dtype=bool)  # not stopped yet
        params = BatchParams.from_params([seqs[i].params for i in going.tolist()])
        accepted = refused = 0
        for s in range(int(depth.max())):
            at = np.flatnonzero(live & (depth > s))  # positions in `going`
            if not at.size:
                break
            index = going[at]
            z, ids, lse = out.ahead_topk_logits[index, s], out.ahead_topk_ids[index, s], out.ahead_logsumexp[index, s]
            u, proposed, drawn_whole = ahead_u[index, s], out.ahead_ids[index, s], out.ahead_drawn[index, s]
            decided = np.zeros(at.size, dtype=bool)  # undecided rows: each through the reference sampler
            tokens, logprobs = np.zeros(at.size, np.int64), np.zeros(at.size)
            tops: list[tuple[tuple[int, float], ...]] = [()] * at.size
            if at.size > PER_ROW_MAX:
                with contextlib.suppress(Exception):  # a row the vectorized pass cannot take: all per row
                    batch = sample_window_batch(z, ids, lse, params.subset(at), u)
                    decided, tokens, logprobs, tops = batch.decided, batch.token_ids, batch.logprobs, batch.top_logprobs
            fast = (decided & ~drawn_whole).tolist()  # the common case: the window decided, emit as is
            token_list, logprob_list, proposed_list = tokens.tolist(), logprobs.tolist(), proposed.tolist()
            for j, (k, i) in enumerate(zip(at.tolist(), index.tolist(), strict=True)):
                seq = seqs[i]
                if fast[j]:
                    token = token_list[j]
                    self._emit_token(seq, token, logprob_list[j], tops[j])
                else:
                    window = StepLogits(z[j], ids[j], float(lse[j]))
                    try:
                        if drawn_whole[j]:
                            picked = drawn(window, seq.params, proposed_list[j], float(out.ahead_logits[i, s]))
                        else:
                            picked = sample(window, seq.params, float(u[j]))
                    except NeedFullRow as why:  # this decode's full row is gone: step again from it
                        self.observer.full_row_fetched(why.reason)
                        seq.needed_full_row = True
                        seq.rewind = int(depth[k]) + 1 - s
                        live[k] = False
                        continue
                    except Exception as err:
                        self._fail_row(seq, err)
                        live[k] = False
                        continue
                    token = picked.token_id
                    self._emit(seq, picked)
                if token != proposed_list[j]:
                    refused += 1
                    seq.rewind = int(depth[k]) - s
                    live[k] = False
                else:
                    accepted += 1
                    if seq.done:
                        live[k] = False
        self.observer.ahead_judged(accepted, refused)
        stopped = set(going[~live].tolist())
        return [i for i in sampling if i not in stopped and not seqs[i].done]

    def _fail_row(self, seq: ActiveSequence, err: Exception) -> None:
        log.warning("generation %s failed in sampling: %s: %s", seq.request_id or "-", type(err).__name__, err)
        self._finish(seq, ErrorEvent(SamplingFailed(f"this generation's logits could not be sampled ({err})")))

    def _sample_batch(
        self,
        seqs: list[ActiveSequence],
        rows: list[int],
        out: StepResult,
        adjustments: list[LogitAdjustment | None],
        uniforms: np.ndarray,
    ) -> list[tuple[ActiveSequence, float, StepLogits, LogitAdjustment | None]]:
        """`_sample_rows` without the isolation: the vectorized passes may raise (before any row
        is emitted); a row that fails after them fails alone."""
        index = np.asarray(rows, dtype=np.int64)
        chosen = [seqs[i] for i in rows]
        u = uniforms[index]  # one draw per row per step, the same the model's device draw used
        topk_logits, topk_ids, lse = out.topk_logits[index], out.topk_ids[index], out.logsumexp[index]
        fetch: list[tuple[ActiveSequence, float, StepLogits, LogitAdjustment | None]] = []
        unadjusted = np.fromiter((adjustments[i] is None for i in rows), dtype=bool, count=len(rows))
        vectorized = len(rows) > PER_ROW_MAX
        if vectorized:
            params = BatchParams.from_params([s.params for s in chosen])
            batch = sample_window_batch(topk_logits, topk_ids, lse, params, u)
            token_ids, row_logprobs, tops = batch.token_ids, batch.logprobs, batch.top_logprobs
            # The batch knows no adjustment: adjusted rows are decided by their own vectorized pass.
            decided_rows = batch.decided & unadjusted
        else:  # each row through the reference sampler below
            token_ids, row_logprobs = np.zeros(len(rows), dtype=np.int64), np.zeros(len(rows))
            tops, decided_rows = [()] * len(rows), np.zeros(len(rows), dtype=bool)
        if out.drawn_ids is not None and out.drawn_logits is not None:
            # Rows the model drew on the device (their window could not hold the cut): the token the
            # full row gives for this u, so they are decided whatever the window said.
            token_ids, row_logprobs, decided_rows = _take_draws(
                chosen, index, out, lse, token_ids, row_logprobs, decided_rows, unadjusted, tops
            )
        tokens, logprobs, decided = token_ids.tolist(), row_logprobs.tolist(), decided_rows.tolist()
        adjusted = [j for j, i in enumerate(rows) if adjustments[i] is not None] if vectorized else []
        if adjusted and out.extra_logits is not None and out.rest_logsumexp is not None:
            at = index[adjusted]
            rows_adjustments = [a for a in (adjustments[rows[j]] for j in adjusted) if a is not None]
            ab = sample_adjusted_batch(
                topk_logits[adjusted],
                topk_ids[adjusted],
                out.extra_logits[at],
                out.rest_logsumexp[at],
                lse[adjusted],
                rows_adjustments,
                [chosen[j].params for j in adjusted],
                u[adjusted],
            )
            for m, j in enumerate(adjusted):
                if ab.decided[m]:
                    decided[j] = True
                    tokens[j], logprobs[j], tops[j] = int(ab.token_ids[m]), float(ab.logprobs[m]), ()
        for j, seq in enumerate(chosen):
            adjustment = adjustments[rows[j]]
            if decided[j]:  # the common case
                seq.needed_full_row = False
                self._emit_token(seq, tokens[j], logprobs[j], tops[j])
                continue
            step = StepLogits(topk_logits[j], topk_ids[j], float(lse[j]))
            if adjustment is not None and out.extra_logits is not None and out.rest_logsumexp is not None:
                at = index[j]
                step = replace(step, extra_logits=out.extra_logits[at], rest_logsumexp=float(out.rest_logsumexp[at]))
            try:  # the reference sampler decides what the batch declined, or asks for the row
                picked = sample(step, seq.params, float(u[j]), adjustment)
                seq.needed_full_row = False
            except NeedFullRow as why:
                self.observer.full_row_fetched(why.reason)
                seq.needed_full_row = True
                if out.logits is None:
                    fetch.append((seq, float(u[j]), step, adjustment))
                    continue
                try:
                    full = replace(step, full_logits=out.logits[index[j]])
                    picked = sample(full, seq.params, float(u[j]), adjustment)  # the same draw
                except Exception as err:
                    self._fail_row(seq, err)
                    continue
            except Exception as err:  # this row alone: rows before it were emitted already
                self._fail_row(seq, err)
                continue
            self._emit(seq, picked)
        return fetch

    async def _fetch_full_rows(
        self, fetch: list[tuple[ActiveSequence, float, StepLogits, LogitAdjustment | None]], kv_partition: int | None
    ) -> None:
        """The full rows of a step's undecided rows, in one request of the step's lane (`kv_partition`)."""
        rows = from_rows(
            [Row(seq.sequence_id, [], temperature=seq.temperature) for seq, _, _, _ in fetch], kv_partition=kv_partition
        )
        try:
            out = await self.client.step(rows, window=1, want_logits=True)
        except StepError as err:  # as a failed step: the server away or in doubt, they start again
            self._step_failed([seq for seq, _, _, _ in fetch], rows, err)
            return
        assert out.logits is not None
        for i, (seq, u, step, adjustment) in enumerate(fetch):
            if seq.done:
                continue
            if int(out.status[i]) != RowStatus.OK:
                code = int(out.status[i])
                self._finish(seq, ErrorEvent(StepRejected(ROW_REFUSALS.get(code, f"row status {code}"))))
                continue
            # The same numbers for the adjusted ids as the window had (the step's extra logits).
            try:
                picked = sample(replace(step, full_logits=out.logits[i]), seq.params, u, adjustment)
            except Exception as err:
                self._fail_row(seq, err)
                continue
            self._emit(seq, picked)

    def _emit(self, seq: ActiveSequence, chosen: Sampled) -> None:
        self._emit_token(seq, chosen.token_id, chosen.logprob, chosen.top_logprobs)

    def _emit_token(
        self, seq: ActiveSequence, token_id: int, logprob: float, top_logprobs: tuple[tuple[int, float], ...]
    ) -> None:
        if seq.max_new_tokens <= 0:  # a prefill only (no prompt logprobs asked): no token, ever
            return self._finish(seq, FinishEvent("length"))
        seq.generated.append(token_id)
        if seq.adjuster is not None:
            seq.adjuster.append(token_id)
        seq.sink.put_nowait(TokenEvent(token_id, logprob, top_logprobs))
        if (token_id == self.eos_token_id and not seq.ignore_eos) or token_id in seq.stop_ids:
            self._finish(seq, FinishEvent("stop"))
        elif len(seq.generated) >= seq.max_new_tokens:
            self._finish(seq, FinishEvent("length"))


def _take_draws(
    chosen: list[ActiveSequence],
    index: np.ndarray,
    out: StepResult,
    lse: np.ndarray,
    token_ids: np.ndarray,
    logprobs: np.ndarray,
    decided: np.ndarray,
    unadjusted: np.ndarray,
    tops: list[tuple[tuple[int, float], ...]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The step's device draws merged into the window's results: (token ids, logprobs, decided),
    `tops` updated in place. A drawn row's logprob is its logit minus the row's log-sum-exp (as on
    every path); one that reports alternatives takes them from its window (`drawn`), and stays
    undecided when the window cannot vouch for them (it then takes the full-row path)."""
    assert out.drawn_ids is not None and out.drawn_logits is not None
    ids = out.drawn_ids[index]
    took = (ids >= 0) & unadjusted
    if not took.any():
        return token_ids, logprobs, decided
    logits = out.drawn_logits[index]
    token_ids = np.where(took, ids, token_ids)
    logprobs = np.where(took, logits.astype(np.float64) - lse.astype(np.float64), logprobs)
    decided = decided | took
    for j in np.flatnonzero(took).tolist():
        seq = chosen[j]
        if seq.params.logprobs:
            window = StepLogits(out.topk_logits[index[j]], out.topk_ids[index[j]], float(lse[j]))
            try:
                tops[j] = drawn(window, seq.params, int(ids[j]), float(logits[j])).top_logprobs
            except NeedFullRow:
                decided[j] = False
        else:
            tops[j] = ()
    return token_ids, logprobs, decided
