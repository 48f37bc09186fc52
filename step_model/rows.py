"""Step requests, their per-row outcome, and the checks that decide it (vectorized: array
operations over the rows, no Python loop but over refused rows). Pure numpy; `step_model.engine`
applies the outcome to its sequence table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from step_model import contract
from step_model.contract import RowStatus

__all__ = ["EngineError", "InvalidRequest", "StepRequest", "StepResult", "check_shapes", "row_status"]


class EngineError(Exception):
    """A request the engine refuses as a whole; `code` is the Triton error class it maps to."""

    code = contract.ErrorCode.INVALID_ARG


class InvalidRequest(EngineError):
    code = contract.ErrorCode.INVALID_ARG


@dataclass
class StepRequest:
    """One caller's rows. Row i: sequence_ids[i], its new tokens input_ids[i, :lengths[i]]."""

    sequence_ids: np.ndarray  # uint64 [N]
    input_ids: np.ndarray  # int64 [N, T], right-padded
    lengths: np.ndarray  # int32 [N]; 0 = no new token (fetch logits, or release with end)
    start: np.ndarray  # bool [N]; the row's tokens are a new sequence's prompt
    end: np.ndarray  # bool [N]; free the sequence after this step
    temperature: np.ndarray  # float32 [N]
    window: int = 1  # K of the top-K window returned
    want_logits: bool = False  # also return the full temperature-scaled row
    request_ids: tuple[str, ...] = ()  # the gateway's request id of each row ("" for none), or ()
    prompt_logprobs: np.ndarray | None = None  # int32 [N]: -1, or k alternatives of the prompt's logprobs
    extra_ids: np.ndarray | None = None  # int64 [N, E]: ids whose logits to return, -1 = padding
    draw: np.ndarray | None = None  # float64 [N, 4]: (u, top_p, top_k, min_p), u < 0 = not asked
    kv_partition: int | None = (
        None  # contract.PARAM_KV_PARTITION: its start rows' partition (step_model.slots); None: any
    )
    invariant: np.ndarray | None = None  # bool [N]: batch-invariant rows (contract.PARAM_INVARIANT_ROWS)
    replay_from: np.ndarray | None = None  # int32 [N]: -1, or a start row's prompt length (PARAM_REPLAY_FROM)
    ahead: np.ndarray | None = None  # int32 [N]: decodes run ahead of the row's answer (PARAM_AHEAD)
    ahead_u: np.ndarray | None = None  # float64 [N, A]: their uniforms (contract.AHEAD_U)
    rewind: np.ndarray | None = None  # int32 [N]: cached tokens to drop before the row's input (PARAM_REWIND)

    def ahead_of(self, rows: np.ndarray) -> np.ndarray:
        """The rows' ahead counts (0 where the request names none)."""
        return self.ahead[rows].astype(np.int64) if self.ahead is not None else np.zeros(rows.shape[0], np.int64)


@dataclass
class StepResult:
    status: np.ndarray  # int32 [N], RowStatus; rows not OK carry zeros below
    topk_logits: np.ndarray  # float32 [N, window]
    topk_ids: np.ndarray  # int64 [N, window]
    logsumexp: np.ndarray  # float32 [N]
    logits: np.ndarray | None = None  # float32 [N, V] when asked
    messages: dict[int, str] = field(default_factory=dict)  # row -> why it was refused
    # When the request asked for prompt logprobs (contract.PROMPT_OUTPUTS): [N, T], [N, T, K], [N, T, K]
    prompt_logprobs: np.ndarray | None = None
    prompt_top_ids: np.ndarray | None = None
    prompt_top_logprobs: np.ndarray | None = None
    # When the request carried EXTRA_IDS: float32 [N, E] (0 at padding and refused rows), float32 [N]
    extra_logits: np.ndarray | None = None
    rest_logsumexp: np.ndarray | None = None
    # When the request carried DRAW: int64 [N] (-1 where not drawn), float32 [N]
    drawn_ids: np.ndarray | None = None
    drawn_logits: np.ndarray | None = None
    # When rows ran ahead (contract.AHEAD_OUTPUTS): [N, A, K], [N, A, K], [N, A], [N, A], [N, A], [N, A]
    ahead_topk_logits: np.ndarray | None = None
    ahead_topk_ids: np.ndarray | None = None
    ahead_logsumexp: np.ndarray | None = None
    ahead_ids: np.ndarray | None = None
    ahead_logits: np.ndarray | None = None
    ahead_drawn: np.ndarray | None = None


def check_shapes(req: StepRequest, claimed: set[int], vocab_size: int) -> None:
    """Refuse a malformed request as a whole (nothing is changed); `claimed` collects the ids
    of the step so far, since a sequence may appear only once per step."""
    n = int(req.sequence_ids.shape[0])
    if n == 0:
        raise InvalidRequest("request carries no sequences")
    for name, arr in (
        (contract.LENGTH, req.lengths),
        (contract.START, req.start),
        (contract.END, req.end),
        (contract.TEMPERATURE, req.temperature),
    ):
        if arr.shape[0] != n:
            raise InvalidRequest(f"{name} has {arr.shape[0]} rows, {contract.SEQUENCE_ID} has {n}")
    if req.input_ids.ndim != 2 or req.input_ids.shape[0] != n:
        raise InvalidRequest(f"{contract.INPUT_IDS} must be [{n}, T], got {list(req.input_ids.shape)}")
    if req.extra_ids is not None and (req.extra_ids.ndim != 2 or req.extra_ids.shape[0] != n):
        raise InvalidRequest(f"{contract.EXTRA_IDS} must be [{n}, E], got {list(req.extra_ids.shape)}")
    for name, per_row in (
        (contract.PARAM_INVARIANT_ROWS, req.invariant),
        (contract.PARAM_REPLAY_FROM, req.replay_from),
        (contract.PARAM_AHEAD, req.ahead),
        (contract.PARAM_REWIND, req.rewind),
    ):
        if per_row is not None and per_row.shape != (n,):
            raise InvalidRequest(f"{name} names {per_row.shape[0] if per_row.ndim else 0} rows, the request has {n}")
    if req.draw is not None and req.draw.shape != (n, 4):
        raise InvalidRequest(f"{contract.DRAW} must be [{n}, 4], got {list(req.draw.shape)}")
    if req.ahead_u is not None and (req.ahead_u.ndim != 2 or req.ahead_u.shape[0] != n):
        raise InvalidRequest(f"{contract.AHEAD_U} must be [{n}, A], got {list(req.ahead_u.shape)}")
    if req.ahead is not None and req.ahead.size and int(req.ahead.max()) > 0:
        sampled = req.draw[:, 0] >= 0 if req.draw is not None else np.zeros(n, dtype=bool)
        wanted = int(req.ahead[sampled].max()) if sampled.any() else 0
        have = req.ahead_u.shape[1] if req.ahead_u is not None else 0
        if wanted > have:
            raise InvalidRequest(f"rows run {wanted} decodes ahead, {contract.AHEAD_U} holds {have} uniforms")
    if not 1 <= req.window <= vocab_size:
        raise InvalidRequest(f"logits_window must be in [1, {vocab_size}], got {req.window}")
    unique = set(req.sequence_ids.tolist())
    if len(unique) != n or not unique.isdisjoint(claimed):
        raise InvalidRequest("a sequence appears twice in one step")
    claimed |= unique


# Plain ints: an IntEnum member looked up on its class costs microseconds, per check per step.
_OK, _CACHE_FULL, _NOT_FOUND, _ALREADY_EXISTS, _INVALID = (
    int(RowStatus.OK),
    int(RowStatus.CACHE_FULL),
    int(RowStatus.NOT_FOUND),
    int(RowStatus.ALREADY_EXISTS),
    int(RowStatus.INVALID),
)


def row_status(
    req: StepRequest,
    known: np.ndarray,
    cached: np.ndarray,
    free_left: int,
    *,
    vocab_size: int,
    max_context: int,
    reserved: np.ndarray | None = None,
    reserved_left: int = 0,
) -> tuple[np.ndarray, dict[int, str], int]:
    """(RowStatus per row, a message per refused row, start rows refused for a full cache).

    `known[i]`: the row's sequence is live; `cached[i]`: its cached tokens (0 when unknown);
    `free_left`: free KV slots, taken by start rows in row order; `reserved[i]`: a start row i
    takes one of the `reserved_left` free reserved slots instead (step_model.slots).
    """
    n, width = req.input_ids.shape
    lengths = req.lengths.astype(np.int64)
    start = req.start.astype(bool)
    # Each check is a mask over the rows; a row gets the status of the FIRST check it fails. The
    # masks are combined once at the end (one pass per check, no per-row Python: host time per
    # step is a cost the GPU waits on), and messages are written for refused rows only.
    checks: list[tuple[np.ndarray, int, str]] = []

    def refuse(mask: np.ndarray, code: int, why: str) -> None:
        if mask.any():
            checks.append((mask, code, why))

    in_row = np.arange(width)[None, :] < lengths[:, None]
    bad_token = ((req.input_ids < 0) | (req.input_ids >= vocab_size)) & in_row
    temperature = req.temperature
    refuse((lengths < 0) | (lengths > width), _INVALID, f"LENGTH must be in [0, {width}]")
    refuse(bad_token.any(axis=1), _INVALID, f"token ids must be in [0, {vocab_size})")
    if req.extra_ids is not None:
        refuse((req.extra_ids >= vocab_size).any(axis=1), _INVALID, f"extra ids must be < {vocab_size}")
    refuse(~np.isfinite(temperature) | (temperature <= 0), _INVALID, "TEMPERATURE must be > 0")
    if req.draw is not None:
        u, top_p, top_k, min_p = req.draw.T
        asked = u >= 0
        bad = asked & ~((u < 1) & (top_p > 0) & (top_p <= 1) & (top_k >= 0) & (min_p >= 0) & (min_p <= 1))
        refuse(
            bad | np.isnan(req.draw).any(axis=1),
            _INVALID,
            "DRAW must be u in [0, 1), top_p in (0, 1], top_k >= 0, min_p in [0, 1]",
        )
    refuse(start & known, _ALREADY_EXISTS, "already exists")
    refuse(start & (lengths == 0), _INVALID, "a start row needs at least one token")
    refuse(start & (lengths > max_context), _INVALID, f"prompt exceeds the context of {max_context} tokens")
    release_unknown = ~start & ~known & (lengths == 0) & req.end.astype(bool)  # a no-op, not an error
    refuse(~start & ~known & ~release_unknown, _NOT_FOUND, "unknown (never started, ended, or evicted)")
    refuse(~start & (lengths > 1), _INVALID, "a decode row carries one token")
    if req.replay_from is not None:
        replay = req.replay_from.astype(np.int64)
        asked = replay >= 0
        refuse(asked & ~start, _INVALID, "only a start row replays tokens")
        refuse(asked & ((replay < 1) | (replay > lengths)), _INVALID, "replay_from must be in [1, LENGTH]")
    ahead = req.ahead.astype(np.int64) if req.ahead is not None else np.zeros(n, dtype=np.int64)
    rewind = req.rewind.astype(np.int64) if req.rewind is not None else np.zeros(n, dtype=np.int64)
    decode_row = ~start & (lengths == 1)
    refuse((ahead < 0) | (rewind < 0), _INVALID, f"{contract.PARAM_AHEAD} and {contract.PARAM_REWIND} must be >= 0")
    refuse(((ahead > 0) | (rewind > 0)) & ~decode_row, _INVALID, "only a decode row runs ahead or rewinds")
    refuse(known & (rewind >= cached), _INVALID, "rewind must leave at least one cached token")
    if req.ahead_u is not None and req.draw is not None and (ahead > 0).any():
        used = np.arange(req.ahead_u.shape[1])[None, :] < ahead[:, None]
        u = req.ahead_u
        bad_u = (used & (req.draw[:, :1] >= 0) & ~((u >= 0) & (u < 1))).any(axis=1)
        refuse(bad_u, _INVALID, f"{contract.AHEAD_U} must be in [0, 1)")
    refuse(
        ~start & known & (cached - rewind + lengths + ahead > max_context),
        _INVALID,
        f"would exceed the context of {max_context} tokens",
    )
    status = np.zeros(n, dtype=np.int32)
    for mask, code, _ in reversed(checks):  # the first failed check is written last
        status[mask] = code
    # Start rows take the free slots in row order (reserved rows the reserved ones); the rest wait
    # for a later step.
    in_reserved = reserved if reserved is not None else np.zeros(n, dtype=bool)
    refused_full = 0
    for mine, left in ((~in_reserved, free_left), (in_reserved, reserved_left)):
        starting = np.flatnonzero(start & mine & (status == _OK))
        if starting.size > left:
            over = np.zeros(n, dtype=bool)
            over[starting[max(left, 0) :]] = True
            refused_full += int(over.sum())
            status[over] = _CACHE_FULL
            checks.append((over, _CACHE_FULL, "KV cache full"))
    messages: dict[int, str] = {}
    for mask, _, why in checks:  # refused rows only, each with its first failed check's reason
        for i in np.flatnonzero(mask).tolist():
            messages.setdefault(i, f"sequence {int(req.sequence_ids[i])}: {why}")
    return status, messages, refused_full
