"""The gateway's adapter to the Triton step model (gRPC, asyncio).

It knows the wire contract (`step_model.contract`) and nothing about sampling: rows go in, per-row
statuses and windows (and full rows when asked) come out. A row the model refuses comes back with
its `RowStatus` (the other rows ran); a request that fails as a whole raises the engine's
`StepError` (`frontend.engine.errors`) that its gRPC status maps to:

    StepRejected               the model refused the request as a whole (a gateway bug)
    UpstreamUnavailable        Triton unreachable, the model not ready, or it failed inside
    ConnectFailed              gRPC UNAVAILABLE: no connection, the request was not served
    UpstreamTimeout            the call outlived its deadline

Every call has a deadline (`timeout_s` for steps, `probe_timeout_s` for readiness and the
repository index), the channel reconnects with a bounded backoff (`reconnect_backoff_ms`, gRPC's
default grows to 120 s), and a step whose rows are all start or release rows (nothing that has
produced a token: its prefills can be sent again) is retried with jittered backoff on
ConnectFailed only. A step with a decode row is never re-sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)
from tritonclient.grpc import KeepAliveOptions
from tritonclient.utils import InferenceServerException

from frontend.engine.errors import ConnectFailed, StepError, StepRejected, UpstreamTimeout, UpstreamUnavailable
from step_model import contract
from step_model.contract import RowStatus

if TYPE_CHECKING:
    from frontend.settings import Settings

log = logging.getLogger(__name__)
MAX_GRPC_MESSAGE_SIZE = 2**31 - 1  # tritonclient's own channel default


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's part of a step: its new tokens (the prompt when start), or none."""

    sequence_id: int
    tokens: Sequence[int]
    start: bool = False
    end: bool = False
    temperature: float = 1.0


@dataclass(frozen=True, slots=True)
class StepBatch:
    """The rows of one step as columns (what goes on the wire); see `step_model.contract`."""

    sequence_ids: np.ndarray  # uint64 [N]
    input_ids: np.ndarray  # int64 [N, T], right-padded
    lengths: np.ndarray  # int32 [N]
    start: np.ndarray  # bool [N]
    end: np.ndarray  # bool [N]
    temperature: np.ndarray  # float32 [N]
    request_ids: tuple[str, ...] = ()  # the gateway's request id of each row ("" for none), or ()
    prompt_logprobs: tuple[int, ...] = ()  # per row: -1, or k alternatives of its prompt's logprobs; or ()
    extra_ids: np.ndarray | None = None  # int64 [N, E]: ids whose own logits each row needs, -1 = none

    def __len__(self) -> int:
        return int(self.sequence_ids.shape[0])

    @classmethod
    def from_rows(cls, rows: Sequence[Row]) -> StepBatch:
        n = len(rows)
        lengths = np.fromiter((len(r.tokens) for r in rows), dtype=np.int32, count=n)
        ids = np.zeros((n, max(1, int(lengths.max(initial=0)))), dtype=np.int64)
        for i in np.flatnonzero(lengths).tolist():
            ids[i, : lengths[i]] = rows[i].tokens
        return cls(
            np.fromiter((r.sequence_id for r in rows), dtype=np.uint64, count=n),
            ids,
            lengths,
            np.fromiter((r.start for r in rows), dtype=bool, count=n),
            np.fromiter((r.end for r in rows), dtype=bool, count=n),
            np.fromiter((r.temperature for r in rows), dtype=np.float32, count=n),
        )

    @classmethod
    def compose(
        cls,
        decode_ids: np.ndarray,
        decode_tokens: np.ndarray,
        decode_temperature: np.ndarray,
        starts: Sequence[tuple[int, Sequence[int], float]],
        releases: Sequence[int],
        request_ids: Sequence[str] = (),
        start_prompt_logprobs: Sequence[int] = (),
        extra_ids: Sequence[np.ndarray | None] = (),
    ) -> StepBatch:
        """Decode rows (one token each, given as arrays), then start rows (id, prompt,
        temperature), then release rows (ids): the layout of a scheduler step. `request_ids` are
        the decode and start rows' (in that order); `start_prompt_logprobs` the start rows';
        `extra_ids` the decode and start rows' ids whose logits they need (None: none). Each is
        kept only when some row has one (an id, a k >= 0, an extra id)."""
        d, s, r = int(decode_ids.shape[0]), len(starts), len(releases)
        n = d + s + r
        width = max([1, *(len(p) for _, p, _ in starts)])
        ids = np.zeros((n, width), dtype=np.int64)
        ids[:d, 0] = decode_tokens
        lengths = np.zeros(n, dtype=np.int32)
        lengths[:d] = 1
        for j, (_, prompt, _) in enumerate(starts):
            ids[d + j, : len(prompt)] = prompt
            lengths[d + j] = len(prompt)
        sequence_ids = np.empty(n, dtype=np.uint64)
        sequence_ids[:d] = decode_ids
        sequence_ids[d : d + s] = [sid for sid, _, _ in starts]
        sequence_ids[d + s :] = releases
        start = np.zeros(n, dtype=bool)
        start[d : d + s] = True
        end = np.zeros(n, dtype=bool)
        end[d + s :] = True
        temperature = np.ones(n, dtype=np.float32)
        temperature[:d] = decode_temperature
        temperature[d : d + s] = [t for _, _, t in starts]
        row_ids = (*request_ids, *([""] * (n - len(request_ids)))) if any(request_ids) else ()
        echo = (
            (*([-1] * d), *start_prompt_logprobs, *([-1] * (s + r - len(start_prompt_logprobs))))
            if any(k >= 0 for k in start_prompt_logprobs)
            else ()
        )
        return cls(sequence_ids, ids, lengths, start, end, temperature, row_ids, echo, _pad_rows(extra_ids, n))


def _pad_rows(rows: Sequence[np.ndarray | None], n: int) -> np.ndarray | None:
    """Per-row id lists as one int64 [n, E] array padded with -1; None when every row has none."""
    width = max((r.shape[0] for r in rows if r is not None), default=0)
    if width == 0:
        return None
    out = np.full((n, width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        if r is not None and r.shape[0]:
            out[i, : r.shape[0]] = r
    return out


@dataclass(frozen=True, slots=True)
class StepOutput:
    status: np.ndarray  # int32 [N], RowStatus per row
    topk_logits: np.ndarray  # float32 [N, K]
    topk_ids: np.ndarray  # int64 [N, K]
    logsumexp: np.ndarray  # float32 [N]
    logits: np.ndarray | None  # float32 [N, V] when asked
    # When some row asked for its prompt's logprobs: [N, T], [N, T, K], [N, T, K] (contract.PROMPT_OUTPUTS)
    prompt_logprobs: np.ndarray | None = None
    prompt_top_ids: np.ndarray | None = None
    prompt_top_logprobs: np.ndarray | None = None
    # When the step carried extra ids: float32 [N, E] and [N] (contract.EXTRA_OUTPUTS)
    extra_logits: np.ndarray | None = None
    rest_logsumexp: np.ndarray | None = None


def _classify(err: InferenceServerException) -> StepError:
    status = str(err.status() or "")
    message = err.message() or str(err)
    if "DEADLINE_EXCEEDED" in status or "Deadline" in message:
        return UpstreamTimeout(message)
    if "UNAVAILABLE" in status:
        return ConnectFailed(message)
    if "INVALID_ARGUMENT" in status or "NOT_FOUND" in status or "ALREADY_EXISTS" in status:
        if "Request for unknown model" in message or "is not ready" in message:
            return UpstreamUnavailable(message)
        return StepRejected(message)
    return UpstreamUnavailable(message)


def channel_args(reconnect_backoff_ms: int) -> list[tuple[str, int]]:
    """tritonclient's default channel options plus a bounded reconnect backoff, so the channel
    notices Triton's return within `reconnect_backoff_ms` (gRPC's default backoff grows to 120 s)."""
    keepalive = KeepAliveOptions()
    backoff = max(50, int(reconnect_backoff_ms))
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", min(100, backoff)),
        ("grpc.min_reconnect_backoff_ms", min(100, backoff)),
        ("grpc.max_reconnect_backoff_ms", backoff),
    ]


ROW_REFUSALS: dict[int, str] = {
    RowStatus.NOT_FOUND: "the model server no longer knows this sequence (ended, or evicted as idle)",
    RowStatus.ALREADY_EXISTS: "the model server already holds a sequence with this id",
    RowStatus.INVALID: "the model server refused this sequence's step as malformed",
}


@dataclass(frozen=True, slots=True)
class StepClientConfig:
    """Deadlines and reconnection of the gRPC calls (GATEWAY_* settings, `from_settings`)."""

    timeout_s: float = 30.0  # one step call (GATEWAY_STEP_TIMEOUT_S)
    probe_timeout_s: float = 0.5  # readiness, metadata and repository-index calls
    reconnect_backoff_ms: int = 500  # the longest wait between reconnect attempts
    connect_retries: int = 2  # re-sends of a token-less step refused as UNAVAILABLE

    @classmethod
    def from_settings(cls, settings: Settings) -> StepClientConfig:
        return cls(
            timeout_s=settings.step_timeout_s,
            probe_timeout_s=settings.probe_timeout_s,
            reconnect_backoff_ms=settings.reconnect_backoff_ms,
            connect_retries=settings.connect_retries,
        )


class StepClient:
    """Sends step requests for one model (and optionally a pinned version) to Triton."""

    def __init__(self, url: str, model: str, version: str = "", config: StepClientConfig | None = None) -> None:
        config = config or StepClientConfig()
        self.url = url
        self.model = model
        self.version = version
        self.timeout_s = config.timeout_s
        self.probe_timeout_s = config.probe_timeout_s
        self.connect_retries = config.connect_retries
        self._client = grpcclient.InferenceServerClient(url, channel_args=channel_args(config.reconnect_backoff_ms))

    async def close(self) -> None:
        await self._client.close()

    async def model_ready(self) -> bool:
        """Triton says the model is ready, within `probe_timeout_s` (a frozen Triton is not ready)."""
        try:
            return bool(
                await self._client.is_model_ready(self.model, self.version, client_timeout=self.probe_timeout_s)
            )
        except InferenceServerException:
            return False

    async def output_names(self) -> set[str]:
        """The outputs the served model version declares (a version exported before an output
        existed does not have it)."""
        try:
            meta = await self._client.get_model_metadata(
                self.model, self.version, as_json=True, client_timeout=self.probe_timeout_s
            )
        except InferenceServerException as err:
            raise UpstreamUnavailable(err.message() or str(err)) from err
        return {str(o.get("name")) for o in meta.get("outputs", [])}

    async def ready_versions(self) -> list[str]:
        """Versions of the model Triton reports READY, newest first."""
        try:
            index = await self._client.get_model_repository_index(as_json=True, client_timeout=self.probe_timeout_s)
        except InferenceServerException as err:
            raise UpstreamUnavailable(err.message() or str(err)) from err
        versions = [
            m.get("version", "")
            for m in index.get("models", [])
            if m.get("name") == self.model and m.get("state") == "READY"
        ]
        return sorted((v for v in versions if v), key=int, reverse=True)

    async def step(self, rows: StepBatch | Sequence[Row], *, window: int, want_logits: bool = False) -> StepOutput:
        batch = rows if isinstance(rows, StepBatch) else StepBatch.from_rows(rows)
        n = len(batch)
        arrays: dict[str, np.ndarray] = {
            contract.SEQUENCE_ID: batch.sequence_ids,
            contract.INPUT_IDS: batch.input_ids,
            contract.LENGTH: batch.lengths,
            contract.START: batch.start,
            contract.END: batch.end,
            contract.TEMPERATURE: batch.temperature,
        }
        if batch.extra_ids is not None:
            arrays[contract.EXTRA_IDS] = batch.extra_ids
        inputs = []
        for name, value in arrays.items():
            dtype, _ = contract.INPUTS[name]
            column = value if value.ndim == 2 else value.reshape(n, 1)
            tensor = grpcclient.InferInput(name, list(column.shape), dtype)
            tensor.set_data_from_numpy(column)
            inputs.append(tensor)
        echo = bool(batch.prompt_logprobs)
        names = list(contract.STEP_OUTPUTS) + ([contract.LOGITS] if want_logits else [])
        names += list(contract.PROMPT_OUTPUTS) if echo else []
        extra = batch.extra_ids is not None
        names += list(contract.EXTRA_OUTPUTS) if extra else []
        outputs = [grpcclient.InferRequestedOutput(name) for name in names]
        parameters: dict[str, int | str] = {contract.PARAM_LOGITS_WINDOW: int(window)}
        named = [rid for rid in batch.request_ids if rid]
        if named:
            parameters[contract.PARAM_REQUEST_IDS] = ",".join(batch.request_ids)
        if echo:
            parameters[contract.PARAM_PROMPT_LOGPROBS] = ",".join(map(str, batch.prompt_logprobs))
        # Triton's request id names the step: the generation's own id when it is the only one.
        request_id = named[0] if len(set(named)) == 1 else (f"step:{len(named)}-requests" if named else "")
        # Safe to send again only when no row has produced a token: start rows (a prefill that was
        # not served) and release rows (idempotent). A decode row never is.
        retryable = self.connect_retries > 0 and not bool((batch.lengths[~batch.start] > 0).any())
        attempts = AsyncRetrying(
            retry=retry_if_exception_type(ConnectFailed),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            stop=stop_after_attempt(1 + (self.connect_retries if retryable else 0)),
            before_sleep=before_sleep_log(log, logging.INFO),
            reraise=True,
        )
        async for attempt in attempts:
            with attempt:
                try:
                    result = await self._client.infer(
                        self.model,
                        inputs,
                        model_version=self.version,
                        outputs=outputs,
                        parameters=parameters,
                        request_id=request_id,
                        client_timeout=self.timeout_s,
                    )
                except InferenceServerException as err:
                    raise _classify(err) from err
        return StepOutput(
            status=result.as_numpy(contract.STATUS).reshape(-1),
            topk_logits=result.as_numpy(contract.TOPK_LOGITS),
            topk_ids=result.as_numpy(contract.TOPK_IDS),
            logsumexp=result.as_numpy(contract.LOGSUMEXP).reshape(-1),
            logits=result.as_numpy(contract.LOGITS) if want_logits else None,
            prompt_logprobs=result.as_numpy(contract.PROMPT_LOGPROBS) if echo else None,
            prompt_top_ids=result.as_numpy(contract.PROMPT_TOP_IDS) if echo else None,
            prompt_top_logprobs=result.as_numpy(contract.PROMPT_TOP_LOGPROBS) if echo else None,
            extra_logits=result.as_numpy(contract.EXTRA_LOGITS) if extra else None,
            rest_logsumexp=result.as_numpy(contract.REST_LOGSUMEXP).reshape(-1) if extra else None,
        )
