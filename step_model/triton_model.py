"""Triton Python-backend model: the glue between Triton requests and `step_model.engine`.

The exporter copies this file into every model version as `model.py`, with the `step_model`
package beside it (contract + engine), `model.onnx`, `metadata.json` and the tokenizer. The wire
contract (tensors, row statuses, parameters) is `step_model.contract`.

All requests Triton hands to one `execute` (the dynamic batcher may merge several callers') run
as ONE engine step: one prefill run for every new sequence and one decode run for every
stepping sequence. A row the engine refuses gets its STATUS; only a malformed request fails.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The stub may put an image's own site-packages ahead of PYTHONPATH; the deployment's PYTHONPATH
# (e.g. a GPU build of onnxruntime staged beside a CPU one) must win, then this version's code.
for _entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
    if _entry in sys.path:
        sys.path.remove(_entry)
    sys.path.insert(0, _entry)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton_python_backend_utils as pb_utils  # noqa: E402

from step_model import contract  # noqa: E402
from step_model.ahead import AHEAD_FIELDS  # noqa: E402
from step_model.contract.model_config import setting  # noqa: E402
from step_model.engine import EngineError, ModelMeta, StepEngine, StepRequest  # noqa: E402

_PUBLISH_PERIOD_S = 0.1
_ERROR_CODES = frozenset({contract.ErrorCode.INVALID_ARG, contract.ErrorCode.UNAVAILABLE, contract.ErrorCode.INTERNAL})


def _to_numpy(tensor: Any) -> np.ndarray:
    """A request tensor as numpy, through DLPack: Triton 2.51's stub returns garbage through its
    own numpy bridge when the process has numpy 2.x; DLPack does not depend on numpy's ABI."""
    try:
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).numpy()
    except (RuntimeError, TypeError, ValueError, BufferError):
        return tensor.as_numpy()  # dtypes DLPack cannot carry here (e.g. BOOL on some versions)


def _per_row_ints(value: object, n: int, name: str = contract.PARAM_PROMPT_LOGPROBS) -> np.ndarray:
    """A comma-separated per-row parameter ("-1,2,-1") as int32 [n]; absent: all -1."""
    if not value:
        return np.full(n, -1, dtype=np.int32)
    out = np.array([int(v) for v in str(value).split(",")], dtype=np.int32)
    if out.shape[0] != n:
        raise ValueError(f"{name} names {out.shape[0]} rows, the request has {n}")
    return out


def _output(name: str, array: np.ndarray) -> Any:
    """A response tensor built through DLPack (see _to_numpy); booleans as numpy arrays."""
    if array.dtype == np.bool_:
        return pb_utils.Tensor(name, np.ascontiguousarray(array))
    contiguous = torch.from_numpy(np.ascontiguousarray(array))
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(contiguous))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        meta = ModelMeta.load(version_dir)
        self.default_window = int(setting(params, contract.CONFIG_DEFAULT_WINDOW, "64"))
        self.engine = StepEngine(
            version_dir / contract.VERSION_ONNX,
            meta,
            capacity=int(setting(params, contract.CONFIG_KV_CAPACITY, "64")),
            partitions=int(setting(params, contract.CONFIG_KV_PARTITIONS, "1")),
            invariant_slots=int(setting(params, contract.CONFIG_INVARIANT_SLOTS, "0")),
            draw_method=setting(params, contract.CONFIG_DRAW_METHOD, "auto"),
            idle_timeout_s=float(setting(params, contract.CONFIG_IDLE_TIMEOUT_S, "60")),
            device=setting(params, contract.CONFIG_DEVICE, "auto"),
            device_id=int(args.get("model_instance_device_id", "0") or 0),
            strict_device=setting(params, contract.CONFIG_STRICT_DEVICE, "0") == "1",
            cuda_graphs=setting(params, contract.CONFIG_CUDA_GRAPHS, "1") == "1",
            graph_window=self.default_window,
        )
        self.engine.warm_up()
        labels = {"model": args["model_name"], "version": args["model_version"]}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        # Families must outlive their metrics (Triton deletes a metric's family first otherwise).
        self._families: list[Any] = []

        def metric(name: str, help_text: str, kind: object) -> Any:
            family = pb_utils.MetricFamily(name, help_text, kind)
            self._families.append(family)
            return family.Metric(labels=labels)

        self._gauges = {
            name: metric(f"gpt2_kv_{name}", help_text, gauge)
            for name, help_text in (
                ("live_sequences", "Sequences holding a KV-cache slot"),
                ("capacity", "KV-cache slots in the pool"),
                ("cached_tokens", "Tokens whose keys/values are cached"),
            )
        }
        self._counters = {
            name: metric(f"gpt2_{name}", help_text, counter)
            for name, help_text in (
                ("prefill_tokens_total", "Prompt tokens run through prefill"),
                ("decode_tokens_total", "Tokens run through decode steps"),
                ("steps_total", "Engine steps (one per Triton execution)"),
                ("rows_total", "Rows carried by engine steps (rows per execution = rows_total / steps_total)"),
                ("graph_replays_total", "Decode runs replayed from a captured CUDA graph"),
                (
                    "live_at_step_total",
                    "Live sequences at the start of each step, summed (share of live sequences that step "
                    "together = decode_tokens_total / live_at_step_total)",
                ),
                ("rejected_full_total", "Start rows refused because the KV cache was full"),
                ("idle_evicted_total", "Sequences freed after the idle timeout"),
                ("ended_total", "Sequences freed by an explicit end"),
                ("drawn_rows_total", "Rows drawn on the device because their top-K window could not hold their cut"),
                (
                    "replayed_tokens_total",
                    "Generated tokens replayed, one decode run each, into a rebuilt sequence's cache",
                ),
                ("prefill_runs_total", "Eager prefill passes (one per step with start rows, one per reserved row)"),
                ("prefill_graph_replays_total", "Prefill passes replayed from a captured CUDA graph"),
                ("prefill_us_total", "Microseconds of engine steps spent prefilling prompts"),
                ("decode_us_total", "Microseconds of engine steps spent in decode runs"),
                ("finish_us_total", "Microseconds of engine steps spent answering (fetches, draws, full rows)"),
                ("execute_us_total", "Microseconds inside the model's execute (Triton's compute minus this: IPC)"),
                ("parse_us_total", "Microseconds of execute spent reading the requests"),
                ("respond_us_total", "Microseconds of execute spent building the responses"),
            )
        }
        self._glue = {"execute_us_total": 0, "parse_us_total": 0, "respond_us_total": 0}  # the stub's own phases
        self._published: dict[str, int] = dict.fromkeys(self._counters, 0)
        self._gauge_values: dict[str, float] = {}
        self._metrics_lock = threading.Lock()
        self._publish()
        self._stop = threading.Event()
        self._sweep_period_s = max(0.05, min(1.0, self.engine.idle_timeout_s / 4))
        self._sweeper = threading.Thread(target=self._sweep, daemon=True)
        self._sweeper.start()
        pb_utils.Logger.log_info(
            f"gpt2 step model ready: device={self.engine.device_kind} dtype={meta.dtype} "
            f"capacity={self.engine.capacity} context={meta.max_context} cuda_graphs={self.engine.cuda_graphs} "
            f"invariant_slots={self.engine.invariant_slots} "
            f"prefill_graphs={self.engine.prefiller.graph_tokens > 0}{self._prefill_note()}"
        )

    def _prefill_note(self) -> str:
        reason = self.engine.prefiller.unavailable_reason
        return f" ({reason})" if reason and self.engine.device_kind == "cuda" else ""

    def _sweep(self) -> None:
        # Metrics are published from here, every _PUBLISH_PERIOD_S, never from `execute`: each
        # custom-metric update is a message to the Triton process, and a dozen of them per
        # execution cost about as much as a one-row step (H200, 2026-11-30).
        next_evict = time.monotonic() + self._sweep_period_s
        while not self._stop.wait(_PUBLISH_PERIOD_S):
            if time.monotonic() >= next_evict:
                self.engine.evict_idle()
                next_evict = time.monotonic() + self._sweep_period_s
            self._publish()

    def _publish(self) -> None:
        stats = self.engine.snapshot()
        glue = dict(self._glue)  # a copy: execute adds to it meanwhile
        with self._metrics_lock:
            for name, metric in self._gauges.items():
                value = float(getattr(stats, name))
                if value != self._gauge_values.get(name):  # unchanged gauges cost no message
                    metric.set(value)
                    self._gauge_values[name] = value
            for name, metric in self._counters.items():
                value = glue[name] if name in glue else getattr(stats, name)
                if value > self._published[name]:
                    metric.increment(float(value - self._published[name]))
                    self._published[name] = value

    def execute(self, requests: list) -> list:
        clock = time.perf_counter_ns
        t0 = clock()
        responses = self._execute(requests, clock)
        glue = self._glue
        glue["execute_us_total"] += (clock() - t0) // 1000
        return responses

    def _execute(self, requests: list, clock: Any) -> list:
        t0 = clock()
        parsed: list[StepRequest | None] = []
        errors: dict[int, str] = {}
        for r, request in enumerate(requests):
            try:
                parsed.append(self._parse(request))
            except (ValueError, TypeError, KeyError) as err:
                parsed.append(None)
                errors[r] = f"malformed request: {err}"
        valid = [p for p in parsed if p is not None]
        self._glue["parse_us_total"] += (clock() - t0) // 1000
        try:
            results = iter(self.engine.step(valid)) if valid else iter(())
        except Exception as err:  # a failed run must answer every caller, not hang them
            named = sorted({rid for step in valid for rid in step.request_ids if rid})
            pb_utils.Logger.log_error(f"engine step failed: {err!r}; gateway requests: {', '.join(named) or '-'}")
            message = f"step failed inside the model: {err}"
            return [self._error(message, contract.ErrorCode.INTERNAL) for _ in requests]
        t1 = clock()
        responses = []
        for r, step in enumerate(parsed):
            if step is None:
                responses.append(self._error(errors[r], contract.ErrorCode.INVALID_ARG))
                continue
            result = next(results)
            if isinstance(result, EngineError):
                responses.append(self._error(str(result), result.code))
                continue
            for row, message in result.messages.items():  # refused rows, by the request they serve
                if result.status[row] == contract.RowStatus.CACHE_FULL:
                    continue  # routine while the cache is full: the gateway retries the row
                rid = step.request_ids[row] if row < len(step.request_ids) else ""
                pb_utils.Logger.log_warn(f"request {rid or '-'}: {message}")
            tensors = [
                _output(contract.STATUS, result.status.reshape(-1, 1)),
                _output(contract.TOPK_LOGITS, result.topk_logits),
                _output(contract.TOPK_IDS, result.topk_ids),
                _output(contract.LOGSUMEXP, result.logsumexp.reshape(-1, 1)),
            ]
            if result.logits is not None:
                tensors.append(_output(contract.LOGITS, result.logits))
            if result.drawn_ids is not None and result.drawn_logits is not None:
                tensors.append(_output(contract.DRAWN_IDS, result.drawn_ids.reshape(-1, 1)))
                tensors.append(_output(contract.DRAWN_LOGITS, result.drawn_logits.reshape(-1, 1)))
            if result.extra_logits is not None and result.rest_logsumexp is not None:
                tensors.append(_output(contract.EXTRA_LOGITS, result.extra_logits))
                tensors.append(_output(contract.REST_LOGSUMEXP, result.rest_logsumexp.reshape(-1, 1)))
            if result.ahead_ids is not None:
                tensors.extend(
                    _output(name, getattr(result, field))
                    for name, field in zip(contract.AHEAD_OUTPUTS, AHEAD_FIELDS, strict=True)
                )
            if result.prompt_logprobs is not None:
                assert result.prompt_top_ids is not None and result.prompt_top_logprobs is not None
                tensors.append(_output(contract.PROMPT_LOGPROBS, result.prompt_logprobs))
                tensors.append(_output(contract.PROMPT_TOP_IDS, result.prompt_top_ids))
                tensors.append(_output(contract.PROMPT_TOP_LOGPROBS, result.prompt_top_logprobs))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        self._glue["respond_us_total"] += (clock() - t1) // 1000
        return responses

    def _parse(self, request: object) -> StepRequest:
        # One pass over the inputs (pb_utils.get_input_tensor_by_name lists them all per call).
        inputs = {t.name(): t for t in request.inputs()}  # type: ignore[attr-defined]

        def tensor(name: str) -> np.ndarray:
            t = inputs.get(name)
            if t is None:
                raise KeyError(f"input {name} is missing")
            return _to_numpy(t)

        def column(name: str, dtype: type) -> np.ndarray:
            value = tensor(name)
            if value.ndim != 2 or value.shape[1] != 1:
                raise ValueError(f"{name} must be [N, 1], got {list(value.shape)}")
            return value.reshape(-1).astype(dtype, copy=False)

        extra = inputs.get(contract.EXTRA_IDS)  # optional
        draw = inputs.get(contract.DRAW)  # optional
        ahead_u = inputs.get(contract.AHEAD_U)  # optional
        raw = request.parameters()  # type: ignore[attr-defined]
        params = json.loads(raw) if raw else {}
        window = int(params.get(contract.PARAM_LOGITS_WINDOW, self.default_window))
        wanted = set(request.requested_output_names())  # type: ignore[attr-defined]
        input_ids = tensor(contract.INPUT_IDS)
        if input_ids.ndim != 2:
            raise ValueError(f"{contract.INPUT_IDS} must be [N, T], got {list(input_ids.shape)}")
        n = input_ids.shape[0]
        return StepRequest(
            sequence_ids=column(contract.SEQUENCE_ID, np.uint64),
            input_ids=input_ids.astype(np.int64, copy=False),
            lengths=column(contract.LENGTH, np.int32),
            start=column(contract.START, np.bool_),
            end=column(contract.END, np.bool_),
            temperature=column(contract.TEMPERATURE, np.float32),
            window=window,
            want_logits=contract.LOGITS in wanted,
            request_ids=tuple(str(params.get(contract.PARAM_REQUEST_IDS, "")).split(","))
            if params.get(contract.PARAM_REQUEST_IDS)
            else (),
            prompt_logprobs=_per_row_ints(params.get(contract.PARAM_PROMPT_LOGPROBS), n)
            if contract.PROMPT_LOGPROBS in wanted
            else None,
            invariant=_per_row_ints(params.get(contract.PARAM_INVARIANT_ROWS), n, contract.PARAM_INVARIANT_ROWS) > 0
            if params.get(contract.PARAM_INVARIANT_ROWS)
            else None,
            replay_from=_per_row_ints(params.get(contract.PARAM_REPLAY_FROM), n, contract.PARAM_REPLAY_FROM)
            if params.get(contract.PARAM_REPLAY_FROM)
            else None,
            extra_ids=_to_numpy(extra).astype(np.int64, copy=False) if extra is not None else None,
            draw=_to_numpy(draw).astype(np.float64, copy=False) if draw is not None else None,
            ahead=_per_row_ints(params.get(contract.PARAM_AHEAD), n, contract.PARAM_AHEAD)
            if params.get(contract.PARAM_AHEAD)
            else None,
            ahead_u=_to_numpy(ahead_u).astype(np.float64, copy=False) if ahead_u is not None else None,
            rewind=_per_row_ints(params.get(contract.PARAM_REWIND), n, contract.PARAM_REWIND)
            if params.get(contract.PARAM_REWIND)
            else None,
            kv_partition=int(params[contract.PARAM_KV_PARTITION]) if contract.PARAM_KV_PARTITION in params else None,
        )

    @staticmethod
    def _error(message: str, code: str) -> object:
        error_code = getattr(pb_utils.TritonError, code if code in _ERROR_CODES else contract.ErrorCode.INVALID_ARG)
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, error_code))

    def finalize(self) -> None:
        self._stop.set()
        self._sweeper.join(timeout=2)
        self._gauges.clear()
        self._counters.clear()
        self._families.clear()
