"""The gateway's adapter to the Triton step model (gRPC, asyncio).

It knows the wire contract (docs/architecture.md) and nothing about sampling: rows go in, per-row
windows (and full rows when asked) come out. Triton's errors are mapped to a small tree:

    StepError                      any failed step call
    ├── StepRejected               the model refused the request (bad row, unknown sequence)
    │   └── CacheFull              no KV slot free for a new sequence: retry later
    ├── UpstreamUnavailable        Triton unreachable or the model not ready
    └── UpstreamTimeout            the call outlived its deadline
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException


class StepError(Exception):
    """A step call failed."""


class StepRejected(StepError):
    """The model refused the request; no sequence state changed on the server."""


class CacheFull(StepRejected):
    """The server's KV cache has no free slot for a new sequence."""


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
    topk_logits: np.ndarray  # float32 [N, K]
    topk_ids: np.ndarray  # int64 [N, K]
    logsumexp: np.ndarray  # float32 [N]
    logits: np.ndarray | None  # float32 [N, V] when asked


def _classify(err: InferenceServerException) -> StepError:
    status = str(err.status() or "")
    message = err.message() or str(err)
    if "DEADLINE_EXCEEDED" in status or "Deadline" in message:
        return UpstreamTimeout(message)
    if "KV cache full" in message:
        return CacheFull(message)
    if "INVALID_ARGUMENT" in status or "NOT_FOUND" in status or "ALREADY_EXISTS" in status:
        if "Request for unknown model" in message or "is not ready" in message:
            return UpstreamUnavailable(message)
        return StepRejected(message)
    return UpstreamUnavailable(message)


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
        width = max(1, max(len(r.tokens) for r in rows))
        ids = np.zeros((n, width), dtype=np.int64)
        for i, r in enumerate(rows):
            if r.tokens:
                ids[i, : len(r.tokens)] = r.tokens
        arrays: list[tuple[str, np.ndarray, str]] = [
            ("SEQUENCE_ID", np.array([r.sequence_id for r in rows], dtype=np.uint64).reshape(n, 1), "UINT64"),
            ("INPUT_IDS", ids, "INT64"),
            ("LENGTH", np.array([len(r.tokens) for r in rows], dtype=np.int32).reshape(n, 1), "INT32"),
            ("START", np.array([r.start for r in rows], dtype=bool).reshape(n, 1), "BOOL"),
            ("END", np.array([r.end for r in rows], dtype=bool).reshape(n, 1), "BOOL"),
            ("TEMPERATURE", np.array([r.temperature for r in rows], dtype=np.float32).reshape(n, 1), "FP32"),
        ]
        inputs = []
        for name, value, dtype in arrays:
            tensor = grpcclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        names = ["TOPK_LOGITS", "TOPK_IDS", "LOGSUMEXP"] + (["LOGITS"] if want_logits else [])
        outputs = [grpcclient.InferRequestedOutput(name) for name in names]
        try:
            result = await self._client.infer(
                self.model,
                inputs,
                model_version=self.version,
                outputs=outputs,
                parameters={"logits_window": int(window)},
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as err:
            raise _classify(err) from err
        return StepOutput(
            topk_logits=result.as_numpy("TOPK_LOGITS"),
            topk_ids=result.as_numpy("TOPK_IDS"),
            logsumexp=result.as_numpy("LOGSUMEXP").reshape(-1),
            logits=result.as_numpy("LOGITS") if want_logits else None,
        )
