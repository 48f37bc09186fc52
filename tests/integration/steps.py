"""A small synchronous Triton client for the step model, independent of the gateway's adapter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient

from step_model import contract


@dataclass
class Row:
    sequence_id: int
    tokens: list[int]
    start: bool = False
    end: bool = False
    temperature: float = 1.0


def step(
    client: grpcclient.InferenceServerClient,
    model: str,
    rows: list[Row],
    *,
    window: int = 8,
    logits: bool = False,
    version: str = "",
    extra_ids: np.ndarray | None = None,
    draw: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One step request; raises tritonclient's InferenceServerException when the model fails the
    request as a whole. Per-row refusals are in the returned STATUS column (contract.RowStatus).
    `extra_ids`: the optional EXTRA_IDS input, [N, E] padded with -1; `draw`: the optional DRAW
    input, [N, 4] (u, top_p, top_k, min_p), u < 0 for rows that do not ask."""
    n, width = len(rows), max(1, max(len(r.tokens) for r in rows))
    ids = np.zeros((n, width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r.tokens)] = r.tokens
    arrays = {
        "SEQUENCE_ID": np.array([[r.sequence_id] for r in rows], dtype=np.uint64),
        "INPUT_IDS": ids,
        "LENGTH": np.array([[len(r.tokens)] for r in rows], dtype=np.int32),
        "START": np.array([[r.start] for r in rows], dtype=bool),
        "END": np.array([[r.end] for r in rows], dtype=bool),
        "TEMPERATURE": np.array([[r.temperature] for r in rows], dtype=np.float32),
    }
    if extra_ids is not None:
        arrays[contract.EXTRA_IDS] = extra_ids.astype(np.int64)
    if draw is not None:
        arrays[contract.DRAW] = draw.astype(np.float64)
    return send(client, model, arrays, window=window, logits=logits, version=version)


def send(
    client: grpcclient.InferenceServerClient,
    model: str,
    arrays: dict[str, np.ndarray],
    *,
    window: int = 8,
    logits: bool = False,
    version: str = "",
) -> dict[str, np.ndarray]:
    dtypes = {
        np.dtype(np.uint64): "UINT64",
        np.dtype(np.int64): "INT64",
        np.dtype(np.int32): "INT32",
        np.dtype(bool): "BOOL",
        np.dtype(np.float32): "FP32",
        np.dtype(np.float64): "FP64",
    }
    inputs = []
    for name, value in arrays.items():
        tensor = grpcclient.InferInput(name, list(value.shape), dtypes[value.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    names = list(contract.STEP_OUTPUTS) + ([contract.LOGITS] if logits else [])
    names += list(contract.EXTRA_OUTPUTS) if contract.EXTRA_IDS in arrays else []
    names += list(contract.DRAW_OUTPUTS) if contract.DRAW in arrays else []
    outputs = [grpcclient.InferRequestedOutput(name) for name in names]
    result = client.infer(model, inputs, model_version=version, outputs=outputs, parameters={"logits_window": window})
    return {name: result.as_numpy(name) for name in names}


def statuses(out: dict[str, np.ndarray]) -> list[contract.RowStatus]:
    return [contract.RowStatus(int(s)) for s in out[contract.STATUS].reshape(-1)]
