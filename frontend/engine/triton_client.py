"""The gateway's adapter to the Triton step model (gRPC, asyncio).

It knows the wire contract (`step_model.contract`) and nothing about sampling: rows go in, per-row
statuses and windows (and full rows when asked) come out. A row the model refuses comes back with
its `RowStatus` (the other rows ran); a request that fails as a whole raises from this tree:

    StepError                      any failed step call
    ├── StepRejected               the model refused the request as a whole (a gateway bug)
    ├── UpstreamUnavailable        Triton unreachable, the model not ready, or it failed inside
    └── UpstreamTimeout            the call outlived its deadline
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from step_model import contract
from step_model.contract import RowStatus


class StepError(Exception):
    """A step call failed."""


class StepRejected(StepError):
    """The model refused a request or a row; no sequence state changed on the server."""


class UpstreamUnavailable(StepError):
    """Triton cannot be reached or the model is not ready."""


class UpstreamTimeout(StepError):
    """The step call did not finish within its deadline."""


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's part of a step: its new tokens (the prompt when start), or none."""

    sequence_id: int
    tokens: Sequence[int]
    start: bool = False
    end: bool = False
    temperature: float = 1.0


@dataclass(frozen=True, slots=True)
class StepOutput:
    status: np.ndarray  # int32 [N], RowStatus per row
    topk_logits: np.ndarray  # float32 [N, K]
    topk_ids: np.ndarray  # int64 [N, K]
    logsumexp: np.ndarray  # float32 [N]
    logits: np.ndarray | None  # float32 [N, V] when asked


def _classify(err: InferenceServerException) -> StepError:
    status = str(err.status() or "")
    message = err.message() or str(err)
    if "DEADLINE_EXCEEDED" in status or "Deadline" in message:
        return UpstreamTimeout(message)
    if "INVALID_ARGUMENT" in status or "NOT_FOUND" in status or "ALREADY_EXISTS" in status:
        if "Request for unknown model" in message or "is not ready" in message:
            return UpstreamUnavailable(message)
        return StepRejected(message)
    return UpstreamUnavailable(message)


ROW_REFUSALS: dict[int, str] = {
    RowStatus.NOT_FOUND: "the model server no longer knows this sequence (ended, or evicted as idle)",
    RowStatus.ALREADY_EXISTS: "the model server already holds a sequence with this id",
    RowStatus.INVALID: "the model server refused this sequence's step as malformed",
}


class StepClient:
    """Sends step requests for one model (and optionally a pinned version) to Triton."""

    def __init__(self, url: str, model: str, version: str = "", *, timeout_s: float = 30.0) -> None:
        self.url = url
        self.model = model
        self.version = version
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def model_ready(self) -> bool:
        try:
            return bool(await self._client.is_model_ready(self.model, self.version))
        except InferenceServerException:
            return False

    async def ready_versions(self) -> list[str]:
        """Versions of the model Triton reports READY, newest first."""
        try:
            index = await self._client.get_model_repository_index(as_json=True)
        except InferenceServerException as err:
            raise UpstreamUnavailable(err.message() or str(err)) from err
        versions = [
            m.get("version", "")
            for m in index.get("models", [])
            if m.get("name") == self.model and m.get("state") == "READY"
        ]
        return sorted((v for v in versions if v), key=int, reverse=True)

    async def step(self, rows: Sequence[Row], *, window: int, want_logits: bool = False) -> StepOutput:
        n = len(rows)
        lengths = np.fromiter((len(r.tokens) for r in rows), dtype=np.int32, count=n)
        ids = np.zeros((n, max(1, int(lengths.max()))), dtype=np.int64)
        for i in np.flatnonzero(lengths > 1).tolist():  # prompts; decode rows are filled below
            ids[i, : lengths[i]] = rows[i].tokens
        single = np.flatnonzero(lengths == 1)
        ids[single, 0] = [rows[i].tokens[0] for i in single.tolist()]
        arrays: dict[str, np.ndarray] = {
            contract.SEQUENCE_ID: np.fromiter((r.sequence_id for r in rows), dtype=np.uint64, count=n),
            contract.INPUT_IDS: ids,
            contract.LENGTH: lengths,
            contract.START: np.fromiter((r.start for r in rows), dtype=bool, count=n),
            contract.END: np.fromiter((r.end for r in rows), dtype=bool, count=n),
            contract.TEMPERATURE: np.fromiter((r.temperature for r in rows), dtype=np.float32, count=n),
        }
        inputs = []
        for name, value in arrays.items():
            dtype, _ = contract.INPUTS[name]
            column = value if value.ndim == 2 else value.reshape(n, 1)
            tensor = grpcclient.InferInput(name, list(column.shape), dtype)
            tensor.set_data_from_numpy(column)
            inputs.append(tensor)
        names = list(contract.STEP_OUTPUTS) + ([contract.LOGITS] if want_logits else [])
        outputs = [grpcclient.InferRequestedOutput(name) for name in names]
        try:
            result = await self._client.infer(
                self.model,
                inputs,
                model_version=self.version,
                outputs=outputs,
                parameters={contract.PARAM_LOGITS_WINDOW: int(window)},
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
        )
