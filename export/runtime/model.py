"""Triton Python-backend model: the glue between Triton requests and `engine.StepEngine`.

Copied by the exporter into every model version next to `engine.py`, `model.onnx`,
`metadata.json` and the tokenizer. The I/O contract is in docs/architecture.md.

Per request (N sequences, the batch dimension):
  SEQUENCE_ID uint64 [N,1], INPUT_IDS int64 [N,T] right-padded, LENGTH int32 [N,1],
  START bool [N,1], END bool [N,1], TEMPERATURE fp32 [N,1];
  request parameter "logits_window" (int): K of the top-K window (default from config).
Outputs: TOPK_LOGITS fp32 [N,K], TOPK_IDS int64 [N,K], LOGSUMEXP fp32 [N,1], and LOGITS fp32 [N,V]
only when the caller asks for that output.
"""

from __future__ import annotations

import json
import os
import sys
import threading
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
from engine import EngineError, ModelMeta, StepEngine, StepRequest  # noqa: E402

_ERROR_CODES = frozenset({"INVALID_ARG", "NOT_FOUND", "ALREADY_EXISTS", "UNAVAILABLE"})


def _to_numpy(tensor: Any) -> np.ndarray:
    """A request tensor as numpy, through DLPack: Triton 2.51's stub returns garbage through its
    own numpy bridge when the process has numpy 2.x; DLPack does not depend on numpy's ABI."""
    try:
        return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).numpy()
    except (RuntimeError, TypeError, ValueError, BufferError):
        return tensor.as_numpy()  # dtypes DLPack cannot carry here (e.g. BOOL on some versions)


def _output(name: str, array: np.ndarray) -> Any:
    """A response tensor built through DLPack (see _to_numpy)."""
    contiguous = torch.from_numpy(np.ascontiguousarray(array))
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(contiguous))


def _setting(params: dict[str, str], key: str, default: str) -> str:
    """Config parameter, overridable per deployment by the environment (GPT2_<KEY>)."""
    return os.environ.get(f"GPT2_{key.upper()}", params.get(key, default))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        meta = ModelMeta.load(version_dir)
        self.default_window = int(_setting(params, "default_window", "64"))
        self.engine = StepEngine(
            version_dir / "model.onnx",
            meta,
            capacity=int(_setting(params, "kv_capacity", "64")),
            idle_timeout_s=float(_setting(params, "idle_timeout_s", "60")),
            device=_setting(params, "device", "auto"),
            device_id=int(args.get("model_instance_device_id", "0") or 0),
            strict_device=_setting(params, "strict_device", "0") == "1",
        )
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
                ("steps_total", "Model executions"),
                ("rejected_full_total", "Requests refused because the KV cache was full"),
                ("idle_evicted_total", "Sequences freed after the idle timeout"),
                ("ended_total", "Sequences freed by an explicit end"),
            )
        }
        self._published: dict[str, int] = dict.fromkeys(self._counters, 0)
        self._metrics_lock = threading.Lock()
        self._publish()
        self._stop = threading.Event()
        period = max(0.05, min(1.0, self.engine.idle_timeout_s / 4))
        self._sweeper = threading.Thread(target=self._sweep, args=(period,), daemon=True)
        self._sweeper.start()
        pb_utils.Logger.log_info(
            f"gpt2 step model ready: device={self.engine.device_kind} dtype={meta.dtype} "
            f"capacity={self.engine.capacity} context={meta.max_context}"
        )

    def _sweep(self, period: float) -> None:
        while not self._stop.wait(period):
            self.engine.evict_idle()
            self._publish()

    def _publish(self) -> None:
        stats = self.engine.snapshot()
        with self._metrics_lock:
            for name, metric in self._gauges.items():
                metric.set(float(getattr(stats, name)))
            for name, metric in self._counters.items():
                value = getattr(stats, name)
                if value > self._published[name]:
                    metric.increment(float(value - self._published[name]))
                    self._published[name] = value

    def execute(self, requests: list) -> list:
        parsed: list[StepRequest | None] = []
        errors: dict[int, str] = {}
        for r, request in enumerate(requests):
            try:
                parsed.append(self._parse(request))
            except (ValueError, TypeError, KeyError) as err:
                parsed.append(None)
                errors[r] = f"malformed request: {err}"
        valid = [p for p in parsed if p is not None]
        results = iter(self.engine.step(valid)) if valid else iter(())
        responses = []
        for r, step in enumerate(parsed):
            if step is None:
                responses.append(self._error(errors[r], "INVALID_ARG"))
                continue
            result = next(results)
            if isinstance(result, EngineError):
                responses.append(self._error(str(result), result.code))
                continue
            tensors = [
                _output("TOPK_LOGITS", result.topk_logits),
                _output("TOPK_IDS", result.topk_ids),
                _output("LOGSUMEXP", result.logsumexp.reshape(-1, 1)),
            ]
            if result.logits is not None:
                tensors.append(_output("LOGITS", result.logits))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        self._publish()
        return responses

    def _parse(self, request: object) -> StepRequest:
        def tensor(name: str) -> np.ndarray:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                raise KeyError(f"input {name} is missing")
            return _to_numpy(t)

        def column(name: str, dtype: type) -> np.ndarray:
            value = tensor(name)
            if value.ndim != 2 or value.shape[1] != 1:
                raise ValueError(f"{name} must be [N, 1], got {list(value.shape)}")
            return value.reshape(-1).astype(dtype, copy=False)

        raw = request.parameters()  # type: ignore[attr-defined]
        params = json.loads(raw) if raw else {}
        window = int(params.get("logits_window", self.default_window))
        wanted = set(request.requested_output_names())  # type: ignore[attr-defined]
        input_ids = tensor("INPUT_IDS")
        if input_ids.ndim != 2:
            raise ValueError(f"INPUT_IDS must be [N, T], got {list(input_ids.shape)}")
        return StepRequest(
            sequence_ids=column("SEQUENCE_ID", np.uint64),
            input_ids=input_ids.astype(np.int64, copy=False),
            lengths=column("LENGTH", np.int32),
            start=column("START", np.bool_),
            end=column("END", np.bool_),
            temperature=column("TEMPERATURE", np.float32),
            window=window,
            want_logits="LOGITS" in wanted,
        )

    @staticmethod
    def _error(message: str, code: str) -> object:
        error_code = getattr(pb_utils.TritonError, code if code in _ERROR_CODES else "INVALID_ARG")
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, error_code))

    def finalize(self) -> None:
        self._stop.set()
        self._sweeper.join(timeout=2)
        self._gauges.clear()
        self._counters.clear()
        self._families.clear()
