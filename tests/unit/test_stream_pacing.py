"""The streaming hot path without HTTP: the pacer that wakes streams a slice per event-loop round
(a process that falls behind coalesces), the sink that keeps a generation's events in order, the
decoder's and the assembler's tokens-read-together paths, and the bulk zero-gap observation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram
from transformers import PreTrainedTokenizerFast

from export.tokenizer_builder import build_tokenizer
from frontend.engine.events import ErrorEvent, FinishEvent, TokenEvent
from frontend.generation.assembler import TextAssembler
from frontend.generation.pacing import StreamPacer, StreamSink
from frontend.generation.types import GenerationRequest, MergedChunk
from frontend.observability.metrics import observe_repeated
from frontend.sampling import SamplingParams
from frontend.text import IncrementalDecoder

pytestmark = pytest.mark.unit

VOCAB_SIZE = 1000
EOS = VOCAB_SIZE - 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return build_tokenizer(Path(tmp_path_factory.mktemp("tok")), VOCAB_SIZE)


def token(i: int) -> TokenEvent:
    return TokenEvent(i, -0.1 * i, ((i, -0.1 * i),))


async def _consume(sink: StreamSink, until: int) -> list[list[int]]:
    """What one stream reads: the token ids of each wake, until `until` tokens were read."""
    reads: list[list[int]] = []
    while sum(map(len, reads)) < until:
        events = sink.take() or await sink.wait()
        reads.append([e.token_id for e in events if isinstance(e, TokenEvent)])
    return reads


async def _steps(sinks: list[StreamSink], steps: int, rounds_between: int) -> None:
    """A batch engine: one token for every stream per step, the whole step in one synchronous pass,
    `rounds_between` event-loop rounds apart (the GPU's time, as the loop sees it)."""
    for step in range(steps):
        for sink in sinks:
            sink.put_nowait(token(step))
        for _ in range(rounds_between):
            await asyncio.sleep(0)


# ------------------------------------------------------------------------------------- pacer
@pytest.mark.asyncio
async def test_a_process_that_keeps_up_gives_every_stream_each_token_alone() -> None:
    pacer = StreamPacer(per_round=8)
    sinks = [StreamSink(pacer) for _ in range(8)]
    readers = [asyncio.create_task(_consume(s, 10)) for s in sinks]
    await asyncio.sleep(0)  # every reader waits
    await _steps(sinks, 10, rounds_between=3)
    for reads in await asyncio.gather(*readers):
        assert reads == [[step] for step in range(10)]  # one wake, one chunk, per token
    assert pacer.backlog == 0


@pytest.mark.asyncio
async def test_a_process_that_falls_behind_coalesces_without_dropping_or_reordering() -> None:
    """8 streams, 2 woken per round, a step every round: most streams are served after the next
    step came, and read the tokens of several steps at once, in order, none missing."""
    pacer = StreamPacer(per_round=2)
    sinks = [StreamSink(pacer) for _ in range(8)]
    readers = [asyncio.create_task(_consume(s, 12)) for s in sinks]
    await asyncio.sleep(0)
    await _steps(sinks, 12, rounds_between=1)
    all_reads = await asyncio.gather(*readers)
    for reads in all_reads:
        assert [t for read in reads for t in read] == list(range(12))
    assert any(len(read) > 1 for reads in all_reads for read in reads)
    assert sum(len(reads) for reads in all_reads) < 8 * 12  # fewer wakes (chunks) than tokens


@pytest.mark.asyncio
async def test_the_pacer_wakes_at_most_per_round_streams_a_round_oldest_first() -> None:
    pacer = StreamPacer(per_round=2)
    sinks = [StreamSink(pacer) for _ in range(5)]
    order: list[int] = []

    async def reader(i: int) -> None:
        await sinks[i].wait()
        order.append(i)

    tasks = [asyncio.create_task(reader(i)) for i in range(5)]
    await asyncio.sleep(0)
    for sink in sinks:  # one step: every stream has an event
        sink.put_nowait(token(0))
    assert pacer.backlog == 3
    rounds = 0
    while len(order) < 5:
        await asyncio.sleep(0)
        rounds += 1
    assert order == [0, 1, 2, 3, 4] and rounds >= 3  # 2, 2, 1: three rounds at the least
    await asyncio.gather(*tasks)


@pytest.mark.asyncio
async def test_a_sink_keeps_events_in_order_and_a_stream_reading_late_takes_them_all() -> None:
    sink = StreamSink(StreamPacer())
    for i in range(5):
        sink.put_nowait(token(i))
    sink.put_nowait(FinishEvent("length"))
    assert sink.qsize() == 6 and not sink.empty()
    events = await sink.wait()  # nothing to wait for: all of them at once
    assert [type(e) for e in events] == [TokenEvent] * 5 + [FinishEvent]
    assert [e.token_id for e in events[:5]] == list(range(5))  # type: ignore[union-attr]
    assert sink.empty() and sink.take() == []


@pytest.mark.asyncio
async def test_the_deadline_ends_a_wait_with_nothing_to_read_only() -> None:
    sink = StreamSink(StreamPacer())
    asyncio.get_running_loop().call_later(0.01, sink.expire)
    with pytest.raises(TimeoutError):
        await sink.wait()
    sink.put_nowait(token(1))  # past the deadline, events already there are still read
    assert [e.token_id for e in await sink.wait()] == [1]  # type: ignore[union-attr]
    with pytest.raises(TimeoutError):
        await sink.wait()


@pytest.mark.asyncio
async def test_a_cancelled_reader_leaves_nothing_behind() -> None:
    pacer = StreamPacer(per_round=1)
    busy, gone = StreamSink(pacer), StreamSink(pacer)
    waiting = [asyncio.create_task(busy.wait()), asyncio.create_task(gone.wait())]
    await asyncio.sleep(0)
    busy.put_nowait(token(0))
    gone.put_nowait(token(0))  # in the backlog: the budget of this round went to `busy`
    waiting[1].cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert (await waiting[0])[0].token_id == 0  # type: ignore[union-attr]
    assert waiting[1].cancelled() and pacer.backlog == 0
    assert gone.qsize() == 1  # its event stays for nobody; the generation is cancelled by its owner


def test_a_pacer_needs_a_positive_slice() -> None:
    with pytest.raises(ValueError):
        StreamPacer(per_round=0)


# ------------------------------------------------------------------------------- detokenizing
def test_push_many_is_the_pushes_of_each_joined(tokenizer: PreTrainedTokenizerFast) -> None:
    """Any split of any ids (partial UTF-8 characters included) gives the same text, read one by
    one or several at once, and the whole is the tokenizer's decode."""
    rng = random.Random(0)
    byte_ids = list(tokenizer("héllo wörld ✓ 日本語テキスト 🙂 done")["input_ids"])
    for _ in range(200):
        generated = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(VOCAB_SIZE - 1) for _ in range(30)]
        one = IncrementalDecoder(tokenizer, [5, 6])
        per_token = "".join(one.push(t) for t in generated) + one.flush()
        many = IncrementalDecoder(tokenizer, [5, 6])
        out, i = [], 0
        while i < len(generated):
            k = rng.randint(1, 6)
            out.append(many.push_many(generated[i : i + k]))
            i += k
        together = "".join(out) + many.flush()
        assert together == per_token == tokenizer.decode(generated)
    with pytest.raises(RuntimeError):
        many.push_many([1])


def _request(tokenizer: PreTrainedTokenizerFast, **options: object) -> GenerationRequest:
    prompt = tuple(tokenizer("Once")["input_ids"])
    return GenerationRequest(prompt, 50, SamplingParams(), request_id=None, **options)  # type: ignore[arg-type]


def _taken(text: TextAssembler, events: Sequence[Any]) -> tuple[list[Any], str]:
    items = text.take(events)
    done = text.completion(time_to_first_token_s=None, total_s=0.0)
    return items, done.text


@pytest.mark.parametrize("options", [{}, {"ignore_eos": True}, {"min_tokens": 3}])
def test_tokens_read_together_share_one_decode_and_give_the_same_item(
    tokenizer: PreTrainedTokenizerFast, options: dict[str, object]
) -> None:
    generated = list(tokenizer(" upon a time, 日本 ✓")["input_ids"])
    events: list[Any] = [TokenEvent(t, -0.5 - i, ((t, -0.5 - i),)) for i, t in enumerate(generated)]
    if options.get("ignore_eos"):
        events.insert(3, TokenEvent(EOS, -1.0, ()))  # shown as text, counted
    events.append(FinishEvent("length"))
    exact = TextAssembler(tokenizer, EOS, _request(tokenizer, **options))
    together = TextAssembler(tokenizer, EOS, _request(tokenizer, **options), per_token_text=False)
    (a,), text_a = _taken(exact, events)
    (b,), text_b = _taken(together, events)
    assert isinstance(a, MergedChunk) and isinstance(b, MergedChunk)
    assert a.text == b.text == text_a == text_b
    assert [(c.token_id, c.position, c.logprob, c.top_logprobs) for c in a.chunks] == [
        (c.token_id, c.position, c.logprob, c.top_logprobs) for c in b.chunks
    ]
    assert b.token_count == a.token_count == len(events) - 1
    assert exact.token_ids == together.token_ids and exact.generated == together.generated


def test_a_hidden_end_of_text_splits_the_tokens_read_together(tokenizer: PreTrainedTokenizerFast) -> None:
    generated = list(tokenizer(" upon a")["input_ids"])
    events = [*(TokenEvent(t, -0.5, ()) for t in generated), TokenEvent(EOS, -1.0, ()), FinishEvent("stop")]
    text = TextAssembler(tokenizer, EOS, _request(tokenizer), per_token_text=False)
    (item,), whole = _taken(text, events)  # type: ignore[list-item]
    assert item.text == whole == " upon a"  # type: ignore[attr-defined]
    assert text.generated == len(generated) + 1 and EOS not in text.token_ids


def test_a_stop_string_across_tokens_read_together_cuts_exactly(tokenizer: PreTrainedTokenizerFast) -> None:
    """With stop strings every token is checked on its own, read together or not: the text ends
    right before the stop, and tokens after the one that completed it are not counted."""
    generated = list(tokenizer(" upon a time there was")["input_ids"])
    pieces = [str(tokenizer.decode([t])) for t in generated]
    stop = pieces[1][-1] + pieces[2][:1]  # the end of one token and the start of the next
    full = "".join(pieces)
    for per_token_text in (True, False):
        text = TextAssembler(tokenizer, EOS, _request(tokenizer, stop=(stop,)), per_token_text=per_token_text)
        items, whole = _taken(text, [*(TokenEvent(t, -0.5, ()) for t in generated), FinishEvent("length")])
        assert whole == full[: full.index(stop)] == "".join(i.text for i in items)  # type: ignore[attr-defined]
        assert text.finish_reason == "stop" and text.generated == 3


def test_an_error_ends_what_a_stream_reads() -> None:
    from frontend.generation.stream import _failure

    error = ErrorEvent(RuntimeError("gone"))
    events: list[object] = [token(1), error, token(2)]
    assert _failure(events) is error and events == [token(1)]  # type: ignore[arg-type]
    events = [token(1), error]
    assert _failure(events) is error and events == [token(1)]  # type: ignore[arg-type]
    events = [token(1)]
    assert _failure(events) is None and events == [token(1)]  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- metrics
def test_observe_repeated_is_the_same_as_observing_each() -> None:
    buckets = (0.0, 0.001, 0.01, 0.1, 1.0)
    one, bulk = CollectorRegistry(), CollectorRegistry()
    a = Histogram("gap", "gap", ["m"], buckets=buckets, registry=one).labels("x")
    b = Histogram("gap", "gap", ["m"], buckets=buckets, registry=bulk).labels("x")
    for value, count in ((0.0, 5), (0.004, 3), (2.0, 2)):
        for _ in range(count):
            a.observe(value)
        observe_repeated(b, value, count)  # type: ignore[arg-type]

    def samples(r: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, s.value) for m in r.collect() for s in m.samples if not s.name.endswith("_created")]

    each, together = samples(one), samples(bulk)
    assert [s for s in each if s[0] != "gap_sum"] == [s for s in together if s[0] != "gap_sum"]  # buckets, count
    assert [s[2] for s in each if s[0] == "gap_sum"] == pytest.approx([s[2] for s in together if s[0] == "gap_sum"])
