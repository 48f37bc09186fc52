"""The scheduler's lanes: several steps in flight at once (vLLM's async scheduling).

With one step at a time the GPU idles while the gateway samples a step's rows and while the
request travels (at 512 streams on an H100 the stack reached 40k tokens/s, the engine alone
150k). So the running sequences are split into lanes, each with its own plan -> step -> sample
cycle (one asyncio task each): while Triton runs lane A's step, the gateway samples lane B's result
and sends B's next step, which Triton queues behind A's. A sequence belongs to one lane for its
whole life (the one with the fewest sequences when it is admitted), and each lane's start rows take
their KV slots from its own partition of the pool (`contract.PARAM_KV_PARTITION`), so each decode
can run over its own contiguous slot range.

Triton's dynamic batcher may run two lanes' requests in one execution, where a sequence named twice
fails the later request as a whole: no id may be named by two requests on the wire at once. Lanes'
decode and start rows never share an id; a release, which any lane may carry, waits while another
lane's request in flight names its id (`sendable`). A lane with nothing to step sends its releases in
a request apart (`Lane.releasing`), and its next step does not wait for that request's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from frontend.engine.scheduler import ActiveSequence


@dataclass(eq=False)
class Lane:
    """One step cycle: its sequences, and the ids its request on the wire names."""

    index: int
    kv_partition: int | None  # sent with each of its steps; None: not sent (the model's own choice)
    running: list[ActiveSequence] = field(default_factory=list)
    stepping: list[ActiveSequence] = field(default_factory=list)  # the sequences of its step under way
    in_flight: set[int] = field(default_factory=set)  # every id its request on the wire names
    # The ids of its request of releases alone on the wire, sent apart from its steps while it has no
    # sequence to step (Scheduler._release_apart), so a new sequence need not wait for it.
    releasing: set[int] = field(default_factory=set)
    prefilled: bool = False  # its last step started sequences (Scheduler.yield_between_steps)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def make_lanes(count: int, kv_partitions: int) -> list[Lane]:
    """`count` lanes, lane i on partition i (modulo the model's partitions). One lane, or a model of
    one partition, names no partition at all: the request is then byte for byte as before lanes."""
    count = max(1, count)
    named = count > 1 and kv_partitions > 1
    return [Lane(i, i % kv_partitions if named else None) for i in range(count)]


def fewest(lanes: Iterable[Lane]) -> Lane:
    """The lane a newly admitted sequence joins."""
    return min(lanes, key=lambda lane: len(lane.running))


def sendable(releases: set[int], lanes: Iterable[Lane], lane: Lane | None) -> list[int]:
    """The releases a request of `lane` (None: of no lane, a probe) may carry now, sorted: those
    that no other lane's request in flight names (nor any request of releases sent apart)."""
    busy = [other.in_flight for other in lanes if other is not lane and other.in_flight]
    busy += [other.releasing for other in lanes if other.releasing]
    if not busy:
        return sorted(releases)
    return sorted(r for r in releases if not any(r in ids for ids in busy))
