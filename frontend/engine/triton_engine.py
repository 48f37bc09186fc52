"""The production engine: Triton step model + the continuous-batching scheduler."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import replace
from pathlib import Path

from frontend.engine.breaker import BreakerState, CircuitBreaker
from frontend.engine.model import ServedModel
from frontend.engine.protocol import (
    EngineRequest,
    EventSink,
    GenerationHandle,
    StepError,
    StepRejected,
    UpstreamUnavailable,
)
from frontend.engine.scheduler import ActiveSequence, Scheduler, SchedulerConfig, StepObserver
from frontend.engine.triton_client import Row, StepClient, StepClientConfig
from frontend.settings import Settings
from step_model import contract
from step_model.contract import model_config

log = logging.getLogger(__name__)
READY_STEP_TTL_S = 1.5  # how long a readiness step's success stands for the probes after it


def model_kv_capacity(repository: Path, model: str) -> int | None:
    """The KV slots the model holds: GPT2_KV_CAPACITY when set in this environment, else the
    `kv_capacity` parameter of <repository>/<model>/config.pbtxt (read as the model reads it,
    `step_model.contract.model_config`); None when neither says or the file cannot be read."""
    return _model_parameter(repository, model, contract.CONFIG_KV_CAPACITY)


def model_kv_partitions(repository: Path, model: str) -> int:
    """The partitions of the model's KV pool (`kv_partitions`, read as `model_kv_capacity` reads
    its parameter): the gateway's lanes by default. 1 when neither says (a model exported before)."""
    return max(1, _model_parameter(repository, model, contract.CONFIG_KV_PARTITIONS) or 1)


def _model_parameter(repository: Path, model: str, key: str) -> int | None:
    """Integer parameter `key` of the model: GPT2_<KEY> when set here, else its config.pbtxt's."""
    override = os.environ.get(model_config.env_name(key), "").strip()
    if override:
        try:
            return int(override)
        except ValueError:
            log.warning("ignoring %s=%r: not an integer", model_config.env_name(key), override)
    try:
        value = model_config.read_parameters(repository / model / "config.pbtxt").get(key)
    except (OSError, model_config.ConfigSyntaxError) as err:
        log.debug("no %s from %s's config.pbtxt: %s", key, model, err)
        return None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class TritonEngine:
    """Connects to Triton, resolves the model version, loads its tokenizer, runs the scheduler.

    Ready once Triton reports the model ready AND a real step (a one-token prefill that ends at
    once) has succeeded: readiness means a request would be served, not merely that a port is open.

    `triton_model` is the Triton model it steps when that is not `model` itself: one instance of
    several (`model_1`, ...; `frontend.engine.placement`), which serves `model`'s versions (the
    tokenizer and metadata are read from `model`'s directory either way).
    """

    def __init__(
        self,
        *,
        triton_url: str,
        model: str,
        version: str,
        repository: Path,
        client: StepClientConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        breaker: CircuitBreaker | None = None,
        startup_timeout_s: float = 120.0,
        observer: StepObserver | None = None,
        triton_model: str | None = None,
    ) -> None:
        self._startup_timeout_s = startup_timeout_s
        self._triton_url = triton_url
        self._model_name = model
        self.name = triton_model or model  # the Triton model stepped
        self._pinned_version = version
        self._repository = repository
        self._client_config = client or StepClientConfig()
        self._scheduler_config = scheduler or SchedulerConfig()
        self._observer = observer
        self.breaker = breaker or CircuitBreaker()
        self._client: StepClient | None = None
        self._scheduler: Scheduler | None = None
        self._model: ServedModel | None = None
        self._warm = False
        self._stepped_at = -READY_STEP_TTL_S  # when a readiness step last succeeded (monotonic)
        self._ready_step: asyncio.Future[bool] | None = None
        self._prompt_outputs = False  # the served version declares contract.PROMPT_OUTPUTS

    @classmethod
    def from_settings(
        cls, settings: Settings, observer: StepObserver | None = None, *, triton_model: str | None = None
    ) -> TritonEngine:
        """The engine GATEWAY_* settings describe (on Triton model `triton_model`, an instance of
        the served model, when given); `observer` (the gateway's metrics) also hears the breaker's
        state changes when it has `breaker_changed`."""
        breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failures,
            reset_timeout_s=settings.breaker_reset_s,
            on_change=getattr(observer, "breaker_changed", None),
        )
        return cls(
            triton_url=settings.triton_url,
            model=settings.model,
            version=settings.model_version,
            repository=settings.repository,
            client=StepClientConfig.from_settings(settings),
            scheduler=SchedulerConfig.from_settings(settings),
            breaker=breaker,
            startup_timeout_s=settings.startup_timeout_s,
            observer=observer,
            triton_model=triton_model,
        )

    @property
    def model(self) -> ServedModel:
        if self._model is None:
            raise UpstreamUnavailable("the engine has not connected to Triton yet")
        return self._model

    async def start(self) -> None:
        """Wait for Triton's model, load its tokenizer and run a warm-up step."""
        timeout_s = self._startup_timeout_s
        probe = StepClient(self._triton_url, self.name, self._pinned_version, self._client_config)
        deadline = time.monotonic() + timeout_s
        version = self._pinned_version
        while True:
            try:
                versions = await probe.ready_versions()
                if (self._pinned_version and self._pinned_version in versions) or (
                    not self._pinned_version and versions
                ):
                    version = self._pinned_version or versions[0]
                    break
            except StepError as err:
                log.info("waiting for Triton at %s: %s", self._triton_url, err)
            if time.monotonic() > deadline:
                await probe.close()
                raise UpstreamUnavailable(f"model {self.name!r} not ready on Triton at {self._triton_url}")
            await asyncio.sleep(0.5)
        await probe.close()
        self._model = ServedModel.load(self._repository, self._model_name, version)
        # Pin the resolved version so the tokenizer and the weights always match.
        self._client = StepClient(self._triton_url, self.name, version, self._client_config)
        # Versions exported before prompt logprobs existed lack those outputs: asking for them would
        # fail the whole step (every sequence in it), so such requests are refused alone.
        outputs = await self._client.output_names()
        self._prompt_outputs = set(contract.PROMPT_OUTPUTS) <= outputs
        capacity = model_kv_capacity(self._repository, self._model_name)
        partitions = model_kv_partitions(self._repository, self._model_name)
        setting = self._scheduler_config.max_running
        max_running = setting if capacity is None else max(1, min(setting, capacity))
        self._scheduler = Scheduler(
            self._client,
            replace(
                self._scheduler_config,
                max_running=max_running,
                lanes=self._scheduler_config.lanes or partitions,  # 0: one lane per KV partition
                kv_partitions=partitions,
            ),
            eos_token_id=self._model.eos_token_id,
            vocab_size=self._model.vocab_size,
            observer=self._observer,
            breaker=self.breaker,
        )
        # ... and those exported before EXTRA_IDS get full rows for adjusted sequences instead.
        self._scheduler.extra_logits = set(contract.EXTRA_OUTPUTS) <= outputs
        # ... and those exported before DRAW send rows whose window falls short for their full row.
        self._scheduler.device_draws = set(contract.DRAW_OUTPUTS) <= outputs
        # ... and those exported before AHEAD_OUTPUTS step one token per row per step.
        if not set(contract.AHEAD_OUTPUTS) <= outputs:
            self._scheduler.decode_ahead = 0
        log.info(
            "max_running %d (setting %d, model KV capacity %s), %d lanes (model KV partitions %d)",
            max_running,
            setting,
            "unknown" if capacity is None else capacity,
            self._scheduler.lanes,
            partitions,
        )
        self._scheduler.start()
        await self._warm_up()
        log.info(
            "serving %s version %s%s (%s, context %d)",
            self._model.name,
            version,
            f" on Triton model {self.name}" if self.name != self._model_name else "",
            self._model.dtype,
            self._model.max_context,
        )

    async def _warm_up(self) -> None:
        assert self._client is not None
        await self._client.step([Row(secrets.randbits(63), [0], start=True, end=True)], window=1)
        self._stepped_at = time.monotonic()
        self._warm = True

    @property
    def scheduler(self) -> Scheduler | None:
        """The step loop, once started (None before `start` and after `close`)."""
        return self._scheduler

    @property
    def max_running(self) -> int | None:
        """The effective cap on running sequences (min of the setting and the model's KV slots)."""
        return self._scheduler.max_running if self._scheduler is not None else None

    async def ready(self) -> bool:
        """Warm, breaker closed, and the model runs a real step (`StepClient.steps`: Triton reports
        a model ready while its Python stub is dead), within the probe deadline. The step's answer
        is kept for `READY_STEP_TTL_S` (probes come every few seconds from each balancer; one step
        serves them all, and concurrent probes share the one in flight); in between, Triton's own
        readiness (a cheap call) still notices a frozen or stopped server at once."""
        client = self._client
        if not self._warm or client is None or self.breaker.state is not BreakerState.CLOSED:
            return False
        if time.monotonic() - self._stepped_at < READY_STEP_TTL_S:
            return await client.model_ready()
        if self._ready_step is None or self._ready_step.done():
            self._ready_step = asyncio.ensure_future(client.steps())
        try:
            ok = await asyncio.shield(self._ready_step)
        except Exception:  # the client closed under it, say
            return False
        if ok:
            self._stepped_at = time.monotonic()
        return ok

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> GenerationHandle:
        if self._scheduler is None:
            raise UpstreamUnavailable("the engine is not started")
        if request.prompt_logprobs >= 0 and not self._prompt_outputs:
            raise StepRejected(
                f"model {self._model_name!r} was exported before prompt logprobs (echo with logprobs) existed: "
                "export it again"
            )
        return self._scheduler.submit(request, events)

    def cancel(self, handle: GenerationHandle) -> None:
        if self._scheduler is not None and isinstance(handle, ActiveSequence):
            self._scheduler.cancel(handle)

    def load(self) -> tuple[int, int]:
        return (self._scheduler.running, self._scheduler.waiting) if self._scheduler else (0, 0)

    async def close(self) -> None:
        """Stop the scheduler (live generations end with an error, their slots are released) and
        the client. Idempotent: the drain on SIGTERM and the lifespan both call it."""
        scheduler, self._scheduler = self._scheduler, None
        client, self._client = self._client, None
        self._warm = False
        if scheduler is not None:
            await scheduler.close()
        if client is not None:
            await client.close()
