"""A deterministic, in-process stand-in for the Triton engine (no servers, no GPU).

`FakeEngine` implements `frontend.engine.protocol.Engine`. Each `submit` starts a background task
that fills the handle's `events` queue (or the `events` sink given to `submit`) with `TokenEvent`s
and then one `FinishEvent` (or an `ErrorEvent` when a fault is injected):

* tokens are drawn from `token_pool` (ids whose text is printable ASCII, so every token is whole
  text and decodes on its own) with a numpy Generator seeded from:
    - greedy (temperature 0): the prompt only, so it is a fixed function of the prompt;
    - sampled with a seed: (seed, prompt);
    - sampled without a seed: fresh OS entropy, so two calls differ;
* a prompt whose text contains `EOS_TRIGGER` emits eos at step `EOS_STEP` (finish "stop");
  otherwise the generation ends with finish "length" after `max_new_tokens` tokens;
* `TokenEvent.top_logprobs` has exactly `params.logprobs` entries, the chosen token first;
* vLLM's stop controls, as `EngineRequest` says every engine honours them: `ignore_eos`
  (the eos is emitted and generation goes on), `stop_token_ids` (emitting one finishes with
  "stop"), `min_tokens` (eos and stop token ids are replaced by the next other pool token while
  fewer than `min_tokens` tokens were generated).

Pace knobs (set per test): `paced` makes each token wait until the gateway has read the one
before (a reader that keeps up: exactly one stream chunk per token), `burst` queues that many
tokens at once per step (a reader that many steps behind: they come as one merged chunk); by
default a token is queued per event-loop round, so a reader busy with other choices may merge.

Fault knobs (set per test): `delay_s` before every token, `fail_after` (an `ErrorEvent(error)`
after that many tokens; only for prompts containing `fail_only_if_prompt_contains` when that is
set), `submit_error` (an exception `submit` raises, e.g. `Overloaded`).
`live` counts handles submitted and not yet cancelled: the gateway cancels every handle when its
generation ends for whatever reason, so `live == 0` after a request means nothing leaked.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from frontend.engine.model import ServedModel
from frontend.engine.protocol import (
    EngineRequest,
    ErrorEvent,
    Event,
    EventSink,
    FinishEvent,
    GenerationHandle,
    PromptLogprobsEvent,
    TokenEvent,
    UpstreamUnavailable,
)
from frontend.sampling import SamplingParams

EOS_TRIGGER = "goodbye"
EOS_STEP = 2  # the eos is the third token (two text tokens before it)


@dataclass(eq=False)
class FakeHandle:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    seed: int | None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    prompt_logprobs: int = -1
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    sink: EventSink | None = None  # where events go instead of `events` (the engine core's batching sink)
    emitted: list[int] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    cancelled: bool = False


def _unread(handle: FakeHandle) -> bool:
    """Events queued for the gateway that it has not read yet (in its sink, or the handle's queue)."""
    out = handle.sink if handle.sink is not None else handle.events
    return hasattr(out, "empty") and not out.empty()


class FakeEngine:
    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.is_ready = True
        self.request_ids: list[str | None] = []  # the request id of every submission, in order
        # pace
        self.paced = False
        self.burst = 1
        # fault injection
        self.delay_s = 0.0
        self.fail_after: int | None = None
        self.fail_only_if_prompt_contains: str | None = None  # limit `fail_after` to some prompts
        self.error: Exception = UpstreamUnavailable("fake: the model server went away")
        self.submit_error: Exception | None = None
        # bookkeeping
        self.handles: set[FakeHandle] = set()
        self.submitted: list[FakeHandle] = []
        self.started = False
        self.closed = False
        tok = model.tokenizer
        self.token_pool = [
            i
            for i in range(model.vocab_size)
            if i != model.eos_token_id and (s := tok.decode([i])) and s.isascii() and s.isprintable()
        ]
        assert len(self.token_pool) > 50, "the test tokenizer has too few printable tokens"

    # ---------------------------------------------------------------- Engine protocol
    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        for handle in list(self.handles):
            self.cancel(handle)
        self.closed = True

    async def ready(self) -> bool:
        return self.is_ready

    def load(self) -> tuple[int, int]:
        return (self.live, 0)

    def submit(self, request: EngineRequest, events: EventSink | None = None) -> FakeHandle:
        self.request_ids.append(request.request_id)
        if self.submit_error is not None:
            raise self.submit_error
        handle = FakeHandle(
            list(request.prompt_ids),
            request.params,
            request.max_new_tokens,
            request.seed,
            ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens,
            stop_token_ids=tuple(request.stop_token_ids),
            prompt_logprobs=request.prompt_logprobs,
            sink=events,
        )
        self.handles.add(handle)
        self.submitted.append(handle)
        handle.task = asyncio.get_running_loop().create_task(self._run(handle), name="fake-generation")
        return handle

    def cancel(self, handle: GenerationHandle) -> None:
        if isinstance(handle, FakeHandle) and handle in self.handles:
            self.handles.discard(handle)
            handle.cancelled = True
            if handle.task is not None and not handle.task.done():
                handle.task.cancel()

    # ---------------------------------------------------------------- helpers for tests
    @property
    def live(self) -> int:
        return len(self.handles)

    async def drain(self, timeout_s: float = 1.0) -> None:
        """Let background work settle: every generation task finished, and every event it queued
        read by the gateway (which then cancels the handle). A handle the gateway abandoned keeps
        unread events or stays live; `live` shows it afterwards."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for _ in range(3):
            await asyncio.sleep(0)
        for t in [h.task for h in self.submitted if h.task is not None]:
            if not t.done():
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(t), timeout=max(0.0, deadline - loop.time()))
        while any(_unread(h) for h in self.handles) and loop.time() < deadline:
            await asyncio.sleep(0.001)
        for _ in range(3):
            await asyncio.sleep(0)

    @staticmethod
    def prompt_logprobs_event(prompt_ids: Sequence[int], k: int) -> PromptLogprobsEvent:
        """Deterministic prompt logprobs: position t gets -0.1 * t; its alternatives are the token
        itself and the next ids."""
        values = tuple(None if t == 0 else -0.1 * t for t in range(len(prompt_ids)))
        tops = tuple(
            () if t == 0 else tuple((int(prompt_ids[t]) + j, -0.1 * t - j) for j in range(k))
            for t in range(len(prompt_ids))
        )
        return PromptLogprobsEvent(values, tops)

    def rng_for(self, prompt_ids: Sequence[int], params: SamplingParams, seed: int | None) -> np.random.Generator:
        prompt_hash = zlib.crc32(np.asarray(prompt_ids, dtype=np.int64).tobytes())
        if params.temperature == 0:
            return np.random.default_rng([prompt_hash, 0])
        if seed is not None:
            return np.random.default_rng([prompt_hash, 1, seed])
        return np.random.default_rng()

    def expected_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        seed: int | None,
        *,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> list[int]:
        """What a (deterministic) generation emits, eos and a final stop token included."""
        rng = self.rng_for(prompt_ids, params, seed)
        eos_trigger = EOS_TRIGGER in self.model.tokenizer.decode(list(prompt_ids))
        out = []
        for step in range(max_new_tokens):
            token, _ = self._draw(rng, step, eos_trigger, min_tokens, stop_token_ids)
            out.append(token)
            if token in stop_token_ids or (token == self.model.eos_token_id and not ignore_eos):
                break
        return out

    def _draw(
        self,
        rng: np.random.Generator,
        step: int,
        eos_trigger: bool,
        min_tokens: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> tuple[int, int]:
        index = int(rng.integers(len(self.token_pool)))
        if eos_trigger and step == EOS_STEP and step >= min_tokens:
            return self.model.eos_token_id, index
        token = self.token_pool[index]
        while step < min_tokens and token in stop_token_ids:  # masked: the next pool token instead
            index = (index + 1) % len(self.token_pool)
            token = self.token_pool[index]
        return token, index

    async def _run(self, handle: FakeHandle) -> None:
        rng = self.rng_for(handle.prompt_ids, handle.params, handle.seed)
        prompt_text = self.model.tokenizer.decode(handle.prompt_ids)
        eos_trigger = EOS_TRIGGER in prompt_text
        fail_after = self.fail_after
        if self.fail_only_if_prompt_contains is not None and self.fail_only_if_prompt_contains not in prompt_text:
            fail_after = None
        k = handle.params.logprobs
        out = handle.sink if handle.sink is not None else handle.events
        if handle.prompt_logprobs >= 0:
            out.put_nowait(self.prompt_logprobs_event(handle.prompt_ids, handle.prompt_logprobs))
        for step in range(handle.max_new_tokens):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            elif step % self.burst == 0:
                await asyncio.sleep(0)
            while self.paced and hasattr(out, "empty") and not out.empty():
                await asyncio.sleep(0)  # the gateway has not read the last token yet
            if fail_after is not None and step == fail_after:
                out.put_nowait(ErrorEvent(self.error))
                return
            token, index = self._draw(rng, step, eos_trigger, handle.min_tokens, handle.stop_token_ids)
            logprob = -0.25 * (1 + step % 4)
            top = [(token, logprob)]
            for j in range(1, k):
                top.append((self.token_pool[(index + j) % len(self.token_pool)], logprob - j))
            handle.emitted.append(token)
            out.put_nowait(TokenEvent(token, logprob, tuple(top[:k])))
            if token in handle.stop_token_ids or (token == self.model.eos_token_id and not handle.ignore_eos):
                out.put_nowait(FinishEvent("stop"))
                return
        out.put_nowait(FinishEvent("length"))
