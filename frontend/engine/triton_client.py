"""The gateway's adapter to the Triton step model (gRPC, asyncio).

It knows the wire contract (`step_model.contract`) and nothing about sampling: rows go in (a
`step_model.rows.StepRequest`, see `frontend.engine.step_rows`), per-row statuses and windows
(and full rows when asked) come out as a `step_model.rows.StepResult`. A row the model refuses comes back with
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
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

from frontend.engine.errors import (
    ConnectFailed,
    IncompleteAnswer,
    StepError,
    StepRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from frontend.engine.step_rows import Row, StepRequest, StepResult, from_rows
from step_model import contract

if TYPE_CHECKING:
    from frontend.settings import Settings

log = logging.getLogger(__name__)
MAX_GRPC_MESSAGE_SIZE = 2**31 - 1  # tritonclient's own channel default


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

    async def steps(self) -> bool:
        """The model runs a real step (a one-token sequence that starts and ends at once, as the
        warm-up) within `probe_timeout_s`. Triton reports a model ready while its Python-backend stub
        is dead or frozen; only a step shows it."""
        batch = from_rows([Row(secrets.randbits(63), [0], start=True, end=True)])
        inputs = []
        for name, value in (
            (contract.SEQUENCE_ID, batch.sequence_ids),
            (contract.INPUT_IDS, batch.input_ids),
            (contract.LENGTH, batch.lengths),
            (contract.START, batch.start),
            (contract.END, batch.end),
            (contract.TEMPERATURE, batch.temperature),
        ):
            column = value if value.ndim == 2 else value.reshape(1, 1)
            tensor = grpcclient.InferInput(name, list(column.shape), contract.INPUTS[name][0])
            tensor.set_data_from_numpy(column)
            inputs.append(tensor)
        try:
            result = await self._client.infer(
                self.model,
                inputs,
                model_version=self.version,
                outputs=[grpcclient.InferRequestedOutput(contract.STATUS)],
                parameters={contract.PARAM_LOGITS_WINDOW: 1},
                request_id="readiness",
                client_timeout=self.probe_timeout_s,
            )
        except InferenceServerException as err:
            log.info("readiness step failed: %s", _classify(err))
            return False
        return int(result.as_numpy(contract.STATUS).reshape(-1)[0]) in (
            contract.RowStatus.OK,
            contract.RowStatus.CACHE_FULL,
        )

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

    async def _infer(
        self, inputs: list[Any], outputs: list[Any], parameters: dict[str, int | str], request_id: str
    ) -> Any:
        """One Infer call; Triton's and the channel's errors classified (`_classify`)."""
        try:
            return await self._client.infer(
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

    async def step(self, rows: StepRequest | Sequence[Row], *, window: int, want_logits: bool = False) -> StepResult:
        """One step: `rows` (a composed request, or a few rows) go to Triton as the contract's
        input tensors, `window` as its `logits_window` parameter, `want_logits` as the request
        for the LOGITS output and the batch's `kv_partition`, `invariant` and `replay_from`, when
        set, as the parameters of those names (the model side decodes them into its StepRequest). Per-row refusals
        come back in `status`; a failed call raises a StepError."""
        batch = rows if isinstance(rows, StepRequest) else from_rows(rows)
        n = int(batch.sequence_ids.shape[0])
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
        if batch.draw is not None:
            arrays[contract.DRAW] = batch.draw
        if batch.ahead_u is not None:
            arrays[contract.AHEAD_U] = batch.ahead_u
        inputs = []
        for name, value in arrays.items():
            dtype, _ = contract.INPUTS[name]
            column = value if value.ndim == 2 else value.reshape(n, 1)
            tensor = grpcclient.InferInput(name, list(column.shape), dtype)
            tensor.set_data_from_numpy(column)
            inputs.append(tensor)
        echo = batch.prompt_logprobs is not None
        names = list(contract.STEP_OUTPUTS) + ([contract.LOGITS] if want_logits else [])
        names += list(contract.PROMPT_OUTPUTS) if echo else []
        extra = batch.extra_ids is not None
        names += list(contract.EXTRA_OUTPUTS) if extra else []
        draws = batch.draw is not None
        names += list(contract.DRAW_OUTPUTS) if draws else []
        ahead = batch.ahead is not None
        names += list(contract.AHEAD_OUTPUTS) if ahead else []
        outputs = [grpcclient.InferRequestedOutput(name) for name in names]
        parameters: dict[str, int | str] = {contract.PARAM_LOGITS_WINDOW: int(window)}
        named = [rid for rid in batch.request_ids if rid]
        if named:
            parameters[contract.PARAM_REQUEST_IDS] = ",".join(batch.request_ids)
        if batch.prompt_logprobs is not None:
            parameters[contract.PARAM_PROMPT_LOGPROBS] = ",".join(map(str, batch.prompt_logprobs.tolist()))
        if batch.kv_partition is not None:
            parameters[contract.PARAM_KV_PARTITION] = int(batch.kv_partition)
        # Batch invariance (contract.PARAM_INVARIANT_ROWS, PARAM_REPLAY_FROM): sent only when a row
        # asks, so the wire is unchanged otherwise. A model version exported before them ignores
        # both (its rows are then batched as any, and a resumed row's tokens prefilled).
        if batch.invariant is not None:
            parameters[contract.PARAM_INVARIANT_ROWS] = ",".join("1" if v else "0" for v in batch.invariant.tolist())
        if batch.replay_from is not None:
            parameters[contract.PARAM_REPLAY_FROM] = ",".join(map(str, batch.replay_from.tolist()))
        if batch.ahead is not None:
            parameters[contract.PARAM_AHEAD] = ",".join(map(str, batch.ahead.tolist()))
        if batch.rewind is not None:
            parameters[contract.PARAM_REWIND] = ",".join(map(str, batch.rewind.tolist()))
        # Triton's request id names the step: the generation's own id when it is the only one.
        request_id = named[0] if len(set(named)) == 1 else (f"step:{len(named)}-requests" if named else "")
        # Safe to send again only when no row has produced a token: start rows (a prefill that was
        # not served) and release rows (idempotent). A decode row never is.
        retryable = self.connect_retries > 0 and not bool((batch.lengths[~batch.start] > 0).any())
        if retryable:
            attempts = AsyncRetrying(
                retry=retry_if_exception_type(ConnectFailed),
                wait=wait_random_exponential(multiplier=0.05, max=0.5),
                stop=stop_after_attempt(1 + self.connect_retries),
                before_sleep=before_sleep_log(log, logging.INFO),
                reraise=True,
            )
            async for attempt in attempts:
                with attempt:
                    result = await self._infer(inputs, outputs, parameters, request_id)
        else:  # a step with decode rows: one attempt, without the retry machinery's cost per step
            result = await self._infer(inputs, outputs, parameters, request_id)
        got = {name: result.as_numpy(name) for name in names}
        missing = [name for name, value in got.items() if value is None]
        if missing:
            raise IncompleteAnswer(f"Triton answered the step without {', '.join(missing)}")

        def flat(name: str) -> np.ndarray:
            return got[name].reshape(-1)

        return StepResult(
            status=flat(contract.STATUS),
            topk_logits=got[contract.TOPK_LOGITS],
            topk_ids=got[contract.TOPK_IDS],
            logsumexp=flat(contract.LOGSUMEXP),
            logits=got.get(contract.LOGITS),
            prompt_logprobs=got.get(contract.PROMPT_LOGPROBS),
            prompt_top_ids=got.get(contract.PROMPT_TOP_IDS),
            prompt_top_logprobs=got.get(contract.PROMPT_TOP_LOGPROBS),
            extra_logits=got.get(contract.EXTRA_LOGITS),
            rest_logsumexp=flat(contract.REST_LOGSUMEXP) if extra else None,
            drawn_ids=flat(contract.DRAWN_IDS) if draws else None,
            drawn_logits=flat(contract.DRAWN_LOGITS) if draws else None,
            ahead_topk_logits=got.get(contract.AHEAD_TOPK_LOGITS),
            ahead_topk_ids=got.get(contract.AHEAD_TOPK_IDS),
            ahead_logsumexp=got.get(contract.AHEAD_LOGSUMEXP),
            ahead_ids=got.get(contract.AHEAD_IDS),
            ahead_logits=got.get(contract.AHEAD_LOGITS),
            ahead_drawn=got.get(contract.AHEAD_DRAWN),
        )
