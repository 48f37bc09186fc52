"""Check an exported graph against transformers, through the serving engine itself.

Sequences with different prompt lengths start at different steps and end at different steps, so
the check covers right-padded prefill, cached decode steps, bystander rows in a decode run and
slot reuse. Every step's logits are compared with a full (uncached) transformers forward of the
same tokens: an independent reference that shares no cache logic with the engine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from step_model.contract import RowStatus
from step_model.engine import ModelMeta, StepEngine, StepRequest

# |err| <= atol + rtol * max|reference| per compared row.
TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (5e-2, 5e-3)}


class ParityError(AssertionError):
    """The graph disagrees with transformers beyond the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    max_abs_error: float
    max_rel_error: float  # max over rows of abs error / max |reference logit|
    compared_rows: int
    device: str
    dtype: str
    atol: float
    rtol: float

    def as_dict(self) -> dict[str, object]:
        return dict(vars(self))


def check_parity(
    model: GPT2LMHeadModel,
    onnx_path: Path,
    meta: ModelMeta,
    *,
    seed: int = 0,
    n_sequences: int = 4,
    decode_steps: int = 6,
    device: str = "auto",
    strict_device: bool = False,
    cuda_graphs: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> ParityReport:
    """Drive the engine through staggered sequences and compare every step with transformers."""
    atol, rtol = TOLERANCES[meta.dtype]
    engine = StepEngine(
        onnx_path,
        meta,
        capacity=n_sequences + 1,
        device=device,
        strict_device=strict_device,
        cuda_graphs=cuda_graphs,
        graph_window=8,
    )
    engine.warm_up()  # with CUDA graphs, the decode steps below are graph replays
    rng = np.random.default_rng(seed)
    max_prompt = max(2, min(24, meta.max_context // 4))
    prompts = {
        sid: rng.integers(0, meta.vocab_size, int(rng.integers(1, max_prompt + 1))).tolist()
        for sid in range(n_sequences)
    }
    # Sequence s starts at step s // 2 and ends after its own quota of steps.
    start_step = {sid: sid // 2 for sid in prompts}
    quota = {sid: decode_steps - (sid % 3) for sid in prompts}
    tokens = {sid: list(p) for sid, p in prompts.items()}
    done: dict[int, int] = dict.fromkeys(prompts, 0)
    live: set[int] = set()
    worst_abs = worst_rel = 0.0
    compared = 0
    step = 0
    while any(done[s] < quota[s] for s in prompts):
        rows: list[tuple[int, list[int], bool, bool]] = []
        for sid in prompts:
            if sid not in live and done[sid] == 0 and start_step[sid] <= step:
                rows.append((sid, tokens[sid], True, False))
            elif sid in live and done[sid] < quota[sid]:
                token = int(rng.integers(0, meta.vocab_size))
                tokens[sid].append(token)
                done[sid] += 1
                rows.append((sid, [token], False, done[sid] == quota[sid]))
        step += 1
        if not rows:
            continue
        result = engine.step([_request(rows, meta.vocab_size)])[0]
        if isinstance(result, Exception):
            raise ParityError(f"engine refused a parity step: {result}")
        if (result.status != RowStatus.OK).any():
            raise ParityError(f"engine refused parity rows: {result.messages}")
        assert result.logits is not None
        for j, (sid, _, is_start, is_end) in enumerate(rows):
            if is_start:
                live.add(sid)
            if is_end:
                live.discard(sid)
            with torch.no_grad():
                ref = model(torch.tensor([tokens[sid]])).logits[0, -1].float().numpy()
            err = float(np.abs(result.logits[j] - ref).max())
            scale = float(np.abs(ref).max()) or 1.0
            worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, err / scale)
            compared += 1
            if err > atol + rtol * scale:
                raise ParityError(
                    f"logits differ from transformers by {err:.3g} (tolerance {atol + rtol * scale:.3g}) "
                    f"for sequence {sid} at length {len(tokens[sid])}"
                )
        progress(f"parity step {step}: {compared} rows compared, max abs error {worst_abs:.3g}")
    if engine.live_sequences():
        raise ParityError(f"{engine.live_sequences()} sequences still live after all ended")
    return ParityReport(worst_abs, worst_rel, compared, engine.device_kind, meta.dtype, atol, rtol)


def _request(rows: list[tuple[int, list[int], bool, bool]], vocab_size: int) -> StepRequest:
    width = max(len(t) for _, t, _, _ in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for j, (_, t, _, _) in enumerate(rows):
        ids[j, : len(t)] = t
    return StepRequest(
        sequence_ids=np.array([sid for sid, *_ in rows], dtype=np.uint64),
        input_ids=ids,
        lengths=np.array([len(t) for _, t, _, _ in rows], dtype=np.int32),
        start=np.array([s for *_, s, _ in rows]),
        end=np.array([e for *_, e in rows]),
        temperature=np.ones(len(rows), dtype=np.float32),
        window=min(8, vocab_size),
        want_logits=True,
    )


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="gpt2-export-")
