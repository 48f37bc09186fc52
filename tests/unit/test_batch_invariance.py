"""Batch invariance on the GPT-2 124M shape (random weights): a row's outputs are a function of its
own tokens, whatever else its steps carry, and a cache rebuilt by replaying the generated tokens
equals the lost one bit for bit (issue 15). Bitwise comparisons throughout: a 1e-6 difference in a
logit or a log-sum-exp moves a top-p draw over GPT-2's flat random-weight distribution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from step_model.contract import RowStatus
from step_model.engine import ModelMeta, StepEngine, StepRequest, StepResult
from step_model.slots import SlotPool
from tests.conftest import DEVICE, GPT2_CAPACITY, GPT2_SHAPE, STRICT, TINY

pytestmark = pytest.mark.unit

RESERVED = 4  # invariant slots of the engine that keeps flagged rows apart
# A reserved range wider than the decode's XQA session (xqa_max_rows, 64): its run is the large
# session's (the pruned graph, flash attention, torch's tail). GPU only: on the CPU its fp32 cache
# for the 124M shape would take most of the machine's memory.
RESERVED_LARGE = 72
WINDOW = 16


@dataclass
class Row:
    sequence_id: int
    tokens: list[int]
    start: bool = False
    end: bool = False
    temperature: float = 1.0
    draw: tuple[float, float, float, float] = (-1.0, 1.0, 0.0, 0.0)  # u, top_p, top_k, min_p
    invariant: bool = False
    replay_from: int = -1


def request(rows: list[Row], *, kv_partition: int | None = None, window: int = WINDOW) -> StepRequest:
    width = max(1, max(len(r.tokens) for r in rows))
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r.tokens)] = r.tokens
    return StepRequest(
        sequence_ids=np.array([r.sequence_id for r in rows], dtype=np.uint64),
        input_ids=ids,
        lengths=np.array([len(r.tokens) for r in rows], dtype=np.int32),
        start=np.array([r.start for r in rows]),
        end=np.array([r.end for r in rows]),
        temperature=np.array([r.temperature for r in rows], dtype=np.float32),
        window=window,
        want_logits=True,
        draw=np.array([r.draw for r in rows], dtype=np.float64),
        invariant=np.array([r.invariant for r in rows]),
        replay_from=np.array([r.replay_from for r in rows], dtype=np.int32),
        kv_partition=kv_partition,
    )


def step(eng: StepEngine, rows: list[Row], *, check: bool = True, kv_partition: int | None = None) -> StepResult:
    req = request(rows, kv_partition=kv_partition)
    res = eng.step([req])[0]
    assert isinstance(res, StepResult)
    assert not check or (res.status == RowStatus.OK).all(), res.messages
    return res


@pytest.fixture(scope="module")
def gpt2_dir(gpt2_repository: Path) -> Path:
    return gpt2_repository / GPT2_SHAPE / "1"


def make_engine(version_dir: Path, reserved: int, capacity: int = GPT2_CAPACITY, partitions: int = 1) -> StepEngine:
    """As the Triton model builds it (on the GPU suite's machine: CUDA, fp16, CUDA graphs)."""
    meta = ModelMeta.load(version_dir)
    eng = StepEngine(
        version_dir / "model.onnx",
        meta,
        capacity=capacity,
        partitions=partitions,
        invariant_slots=reserved,
        device=DEVICE,
        strict_device=STRICT,
        cuda_graphs=True,
    )
    eng.warm_up()
    return eng


def needs_reserved_range(reserved: int, eng: StepEngine) -> None:
    """On the GPU the kernels (cuBLAS, attention) are chosen by shape: without the reserved range a
    row's numbers move with its batch there, and nothing claims otherwise."""
    if not reserved and eng.device_kind == "cuda":
        pytest.skip("batch-invariant on the GPU only in the reserved range (invariant_slots > 0)")


@pytest.fixture(scope="module")
def engines(gpt2_dir: Path) -> dict[int, StepEngine]:
    """One engine without a reserved range (the CPU's default) and one with RESERVED slots."""
    return {0: make_engine(gpt2_dir, 0), RESERVED: make_engine(gpt2_dir, RESERVED)}


rng = np.random.default_rng(15)
VOCAB = 50257
PROMPT = rng.integers(0, VOCAB, 11).tolist()
CONTINUATION = rng.integers(0, VOCAB, 7).tolist()  # the tokens fed back, step after step
UNIFORMS = rng.random(len(CONTINUATION) + 1).tolist()
OTHER_PROMPTS = [rng.integers(0, VOCAB, int(n)).tolist() for n in rng.integers(1, 60, 31)]

Answer = tuple[np.ndarray, float, np.ndarray, np.ndarray, int, float]


def answer(res: StepResult, row: int) -> Answer:
    assert res.logits is not None and res.drawn_ids is not None and res.drawn_logits is not None
    return (
        res.logits[row].copy(),
        float(res.logsumexp[row]),
        res.topk_ids[row].copy(),
        res.topk_logits[row].copy(),
        int(res.drawn_ids[row]),
        float(res.drawn_logits[row]),
    )


def assert_same(got: list[Answer], expected: list[Answer], what: str) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_array_equal(g[0], e[0], err_msg=f"{what}: logits of step {i}")
        assert g[1] == e[1], f"{what}: log-sum-exp of step {i}: {g[1]!r} != {e[1]!r}"
        np.testing.assert_array_equal(g[2], e[2], err_msg=f"{what}: window ids of step {i}")
        np.testing.assert_array_equal(g[3], e[3], err_msg=f"{what}: window logits of step {i}")
        assert g[4:] == e[4:], f"{what}: device draw of step {i}"


_ids = iter(range(1, 1 << 30))


def target(tokens: list[int], k: int, reserved: int, **kw: object) -> Row:
    """The seeded row: temperature 0.7, top_p 0.9, the k-th uniform of its stream (drawn on the
    device: the nucleus of random weights is far wider than the window)."""
    return Row(0, tokens, temperature=0.7, draw=(UNIFORMS[k], 0.9, 0.0, 0.0), invariant=reserved > 0, **kw)  # type: ignore[arg-type]


def generate(eng: StepEngine, reserved: int, others: int, *, replay: int = -1) -> list[Answer]:
    """The target's answers: started beside `others` other rows of other lengths (a third of them
    flagged too), then decoded with CONTINUATION beside them (each other row with tokens of its own,
    some sitting steps out). `replay` >= 0: the target starts with PROMPT + the first `replay`
    continuation tokens to replay (a resumed sequence), and its first answer is the step after them."""
    me = next(_ids)
    ids = [next(_ids) for _ in range(others)]
    flagged = [reserved > 0 and i % 3 == 0 and i // 3 < reserved - 1 for i in range(others)]
    start_tokens = PROMPT + CONTINUATION[:replay] if replay >= 0 else PROMPT
    first = target(start_tokens, max(replay, 0), reserved, start=True, replay_from=len(PROMPT) if replay >= 0 else -1)
    first.sequence_id = me
    rows = [first] + [
        Row(ids[i], OTHER_PROMPTS[i], start=True, temperature=0.9, draw=(0.5, 0.95, 0, 0), invariant=flagged[i])
        for i in range(others)
    ]
    answers = [answer(step(eng, rows), 0)]
    for k in range(max(replay, 0), len(CONTINUATION)):
        row = target([CONTINUATION[k]], k + 1, reserved)
        row.sequence_id = me
        rows = [row] + [Row(ids[i], [(k * 31 + i) % VOCAB], invariant=flagged[i]) for i in range(others) if (i + k) % 5]
        answers.append(answer(step(eng, rows), 0))
    step(eng, [Row(s, [], end=True) for s in [me, *ids]])
    assert eng.live_sequences() == 0
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("reserved", [0, RESERVED])
def test_a_rows_outputs_do_not_depend_on_what_shares_its_steps(engines: dict[int, StepEngine], reserved: int) -> None:
    """Logits, log-sum-exp, window and device draw of a seeded top-p row, alone and beside 1, 7 and
    31 other rows (other prompt lengths in its prefill, other slots, other row counts in every
    decode): bitwise equal. Without a reserved range (the CPU's kernels are row-invariant, the
    log-sum-exp made so: step_model.kernels) and with one (the flagged row prefilled alone and
    decoded in the reserved range's fixed-size run)."""
    eng = engines[reserved]
    needs_reserved_range(reserved, eng)
    alone = generate(eng, reserved, 0)
    for others in (1, 7, 31):
        assert_same(generate(eng, reserved, others), alone, f"beside {others} rows, {reserved} reserved slots")
    if reserved:  # the reserved range's run ran over all of it, whatever the number of live rows
        runs = {(d.first, d.rows) for d in eng.decoder.buffers.values() if d.first + d.rows > GPT2_CAPACITY - reserved}
        assert runs == {(GPT2_CAPACITY - reserved, reserved)}


@pytest.mark.slow
@pytest.mark.parametrize("reserved", [0, RESERVED])
def test_a_cache_rebuilt_by_replay_equals_the_lost_one(engines: dict[int, StepEngine], reserved: int) -> None:
    """A resumed sequence starts with its prompt plus the tokens generated so far, the prompt
    prefilled and the rest replayed one decode run each (PARAM_REPLAY_FROM): its answer, and every
    later one, equals the undisturbed sequence's bit for bit, beside other traffic. (Prefilling
    prompt + generated tokens as one prompt does not: other shapes, another cache, 1.8e-6 apart on
    the next logits here, which moved seeded top-p streams within ~70 tokens.)"""
    eng = engines[reserved]
    needs_reserved_range(reserved, eng)
    undisturbed = generate(eng, reserved, 7)
    for replay in (1, 4):
        resumed = generate(eng, reserved, 5, replay=replay)
        assert_same(resumed, undisturbed[replay:], f"replaying {replay} tokens, {reserved} reserved slots")
    assert eng.stats.replayed_tokens_total == 1 + 4


LONG = rng.integers(0, VOCAB, 32).tolist()  # a longer continuation, as a stack's stream runs
LONG_UNIFORMS = rng.random(len(LONG) + 1).tolist()


def generate_in_slot(eng: StepEngine, below: int, neighbours: int) -> list[Answer]:
    """The seeded row's answers over 33 steps when `below` flagged rows started before it hold the
    reserved slots under its own, and `neighbours` more flagged rows (other prompt lengths) start
    with it; flagged rows step out now and then and end before it, as a stack's streams do."""
    me = next(_ids)
    held = [next(_ids) for _ in range(below)]
    beside = [next(_ids) for _ in range(neighbours)]
    if held:
        step(
            eng, [Row(s, OTHER_PROMPTS[i % len(OTHER_PROMPTS)], start=True, invariant=True) for i, s in enumerate(held)]
        )
    first = Row(me, PROMPT, start=True, temperature=0.7, draw=(LONG_UNIFORMS[0], 0.9, 0.0, 0.0), invariant=True)
    rows = [first] + [
        Row(s, OTHER_PROMPTS[-1 - i % len(OTHER_PROMPTS)], start=True, invariant=True) for i, s in enumerate(beside)
    ]
    answers = [answer(step(eng, rows), 0)]
    others = held + beside
    for k, token in enumerate(LONG):
        row = Row(me, [token], temperature=0.7, draw=(LONG_UNIFORMS[k + 1], 0.9, 0.0, 0.0))
        live = others[: max(0, len(others) - k // 8)]  # one by one they end
        rows = [row] + [Row(s, [(k * 17 + i) % VOCAB]) for i, s in enumerate(live) if (i + k) % 4]
        answers.append(answer(step(eng, rows), 0))
        ended = others[len(live) :]
        if ended:
            step(eng, [Row(s, [], end=True) for s in ended])
            others = live
    step(eng, [Row(s, [], end=True) for s in [me, *others]])
    assert eng.live_sequences() == 0
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("reserved", [RESERVED, RESERVED_LARGE])
def test_a_flagged_rows_outputs_do_not_depend_on_its_slot_or_its_neighbours(
    gpt2_dir: Path, engines: dict[int, StepEngine], reserved: int
) -> None:
    """As a stack meets it (the GPU's whole-stack check of 2026-12-07 saw seeded streams part after
    6-79 tokens, 1e-6 apart in their logprobs, with a reserved range of 128): the flagged row lands
    in another reserved slot each time, beside flagged neighbours of other lengths that step out
    and end, for 33 steps; every answer bitwise equal to the run alone in the lowest slot."""
    if reserved == RESERVED_LARGE:
        if engines[RESERVED].device_kind != "cuda":
            pytest.skip("the large session's reserved run: GPU only (module constant RESERVED_LARGE)")
        eng = make_engine(gpt2_dir, reserved, capacity=reserved + 8)
    else:
        eng = engines[reserved]
    alone = generate_in_slot(eng, 0, 0)
    placements = [(1, 0), (reserved - 2, 1)]
    if reserved > RESERVED:  # the GPU's wide range: also a slot in its middle beside many neighbours
        placements.append((reserved // 2, reserved // 2 - 1))
    for below, neighbours in placements:
        got = generate_in_slot(eng, below, neighbours)
        assert_same(got, alone, f"{below} flagged rows below it, {neighbours} beside it, {reserved} reserved slots")


STACK_RESERVED, STACK_WINDOW = 128, 64  # the GPU check's export (--invariant-slots 128), the gateway's window
STACK_WIDE = 104  # a step's window when a top_k 100 request shares it (the check's mix has them)


def _stack_run(eng: StepEngine, others: int, wide: bool = False) -> list[Answer]:
    """The seeded flagged row's answers over 33 steps as the stack steps it: each execution carries
    two lanes' requests (Triton batches them; kv_partition 0 and 1), window 64, the flagged row in
    lane 0 beside `others` unflagged rows of both lanes that decode with device draws of their own
    (top-p 0.9 over a wide nucleus, their own uniforms) and come and go. `wide`: every other
    execution (its first, the flagged row's prefill, among them) is 104 wide, as when a top_k 100
    request shares the step."""
    me, rng_others = next(_ids), np.random.default_rng(5)
    lanes = [[next(_ids) for _ in range(others // 2)], [next(_ids) for _ in range(others - others // 2)]]

    def execute(rows_by_lane: list[list[Row]], window: int = STACK_WINDOW) -> StepResult:
        reqs = [request(rows, kv_partition=p, window=window) for p, rows in enumerate(rows_by_lane) if rows]
        out = eng.step(reqs)
        assert all(isinstance(r, StepResult) and (r.status == RowStatus.OK).all() for r in out), out
        return out[0]  # type: ignore[return-value]

    def other(sid: int, tokens: list[int], start: bool = False) -> Row:
        return Row(sid, tokens, start=start, temperature=0.9, draw=(float(rng_others.random()), 0.9, 0.0, 0.0))

    first = Row(me, PROMPT, start=True, temperature=0.7, draw=(LONG_UNIFORMS[0], 0.9, 0.0, 0.0), invariant=True)
    starts = [[first] + [other(s, OTHER_PROMPTS[i % len(OTHER_PROMPTS)], True) for i, s in enumerate(lanes[0])]]
    starts.append([other(s, OTHER_PROMPTS[-1 - i % len(OTHER_PROMPTS)], True) for i, s in enumerate(lanes[1])])
    answers = [answer(execute(starts, STACK_WIDE if wide else STACK_WINDOW), 0)]
    for k, token in enumerate(LONG):
        mine = Row(me, [token], temperature=0.7, draw=(LONG_UNIFORMS[k + 1], 0.9, 0.0, 0.0))
        lane0 = [mine] + [other(s, [(k * 13 + i) % VOCAB]) for i, s in enumerate(lanes[0]) if (i + k) % 3]
        lane1 = [other(s, [(k * 7 + i) % VOCAB]) for i, s in enumerate(lanes[1]) if (i + k) % 5]
        width = STACK_WIDE if wide and k % 2 else STACK_WINDOW
        answers.append(answer(execute([lane0, lane1] if k % 2 else [lane0], width), 0))
    execute([[Row(s, [], end=True) for s in [me, *lanes[0]]], [Row(s, [], end=True) for s in lanes[1]]])
    assert eng.live_sequences() == 0
    return answers


@pytest.mark.slow
def test_a_flagged_row_beside_the_stacks_traffic_answers_as_alone(
    gpt2_dir: Path, engines: dict[int, StepEngine]
) -> None:
    """The whole-stack check on the GPU (2026-12-07: 12/100 seeded streams identical, 128 reserved
    slots) in the engine: two lanes' requests per execution over two KV partitions, a 64-wide window,
    unflagged neighbours drawing on the device in the same draw call. Every answer of the flagged row
    (logits, log-sum-exp, window, device draw) bitwise those of its run alone. GPU only: the reserved
    range of 128 rows of the 124M shape would take most of this machine's memory in fp32."""
    if engines[RESERVED].device_kind != "cuda":
        pytest.skip("the stack's reserved range of 128: GPU only")
    eng = make_engine(gpt2_dir, STACK_RESERVED, capacity=STACK_RESERVED + 96, partitions=2)
    alone = _stack_run(eng, 0)
    for others in (6, 60):
        assert_same(_stack_run(eng, others), alone, f"beside {others} unflagged rows of two lanes")
    # A wider window in some steps (a top_k 100 neighbour): the prefill and the reserved run are the
    # same passes (the window is cut from the logits), so the numbers are the same; ties inside a
    # window may come in another order (every window's may), so its values are compared, not ids.
    wide = _stack_run(eng, 6, wide=True)
    for i, (g, e) in enumerate(zip(wide, alone, strict=True)):
        what = f"a 104-wide window in every other step: step {i}"
        np.testing.assert_array_equal(g[0], e[0], err_msg=f"{what}: logits")
        assert (g[1], g[4:]) == (e[1], e[4:]), f"{what}: log-sum-exp, device draw"
        np.testing.assert_array_equal(g[3][:STACK_WINDOW], e[3], err_msg=f"{what}: window logits")


# ------------------------------------------------------------------------- the reserved range (tiny model)
def tiny_engine(model_repository: Path, reserved: int, capacity: int = 6, partitions: int = 1) -> StepEngine:
    version_dir = model_repository / TINY / "1"
    meta = ModelMeta.load(version_dir)
    return StepEngine(
        version_dir / "model.onnx",
        meta,
        capacity=capacity,
        partitions=partitions,
        invariant_slots=reserved,
        device="cpu",
    )


def test_slot_pool_keeps_the_reserved_range_apart() -> None:
    pool = SlotPool(10, 2, reserved=3)  # partitions [0, 4), [4, 7); reserved [7, 10)
    assert (pool.size, pool.partitions, len(pool), pool.reserved_free()) == (4, 2, 7, 3)
    assert [pool.take_reserved() for _ in range(3)] == [7, 8, 9]
    with pytest.raises(IndexError):
        pool.take_reserved()
    assert pool.start_of(8) == 7 and pool.start_of(5) == 4
    assert sorted(pool.take(None) for _ in range(7)) == list(range(7))
    with pytest.raises(IndexError):
        pool.take(1)
    pool.give(8)
    assert (len(pool), pool.reserved_free(), pool.take_reserved()) == (0, 1, 8)
    with pytest.raises(ValueError):
        SlotPool(4, 1, reserved=4)


def test_flagged_rows_wait_for_a_reserved_slot_and_others_never_take_one(model_repository: Path) -> None:
    eng = tiny_engine(model_repository, 2)  # general [0, 4), reserved [4, 6)
    res = step(eng, [Row(i, [5, 6], start=True, invariant=i <= 3) for i in range(1, 7)], check=False)
    # Rows 1, 2 take the reserved slots; flagged row 3 finds none; 4, 5, 6 take general slots.
    assert res.status.tolist() == [RowStatus.OK] * 2 + [RowStatus.CACHE_FULL] + [RowStatus.OK] * 3
    assert sorted(eng._slot_of[i] for i in (1, 2)) == [4, 5]
    assert sorted(eng._slot_of[i] for i in (4, 5, 6)) == [0, 1, 2]
    # Ignored without a reserved range: a flag is only a request.
    plain = tiny_engine(model_repository, 0)
    step(plain, [Row(1, [5], start=True, invariant=True)])
    assert plain._slot_of[1] == 0


def test_the_reserved_run_is_one_fixed_shape_and_other_runs_stop_before_it(model_repository: Path) -> None:
    eng = tiny_engine(model_repository, 3, capacity=8)  # general [0, 5), reserved [5, 8)
    step(eng, [Row(1, [5, 6], start=True, invariant=True), Row(2, [7], start=True)])
    step(eng, [Row(1, [8], invariant=True), Row(2, [9])])
    step(eng, [Row(1, [10], invariant=True)])
    assert {(d.first, d.rows) for d in eng.decoder.buffers.values()} == {(0, 1), (5, 3)}


def test_the_reserved_range_lies_outside_the_partitions_and_serves_every_lane_alike(model_repository: Path) -> None:
    """KV partitions (one per gateway lane) cut only the ordinary slots: a flagged row takes a
    reserved slot whichever partition its step names and decodes in the reserved range's own run;
    the same flagged sequence on either lane gets the same answers, bit for bit."""
    eng = tiny_engine(model_repository, 2, capacity=8, partitions=2)  # [0, 3), [3, 6); reserved [6, 8)
    assert (eng._free_slots.partitions, eng._free_slots.size, eng._free_slots.reserved_start) == (2, 3, 6)
    got = {}
    for lane, (me, other) in enumerate(((1, 2), (3, 4))):
        first = step(
            eng, [Row(me, [5, 6], start=True, invariant=True), Row(other, [7 + lane], start=True)], kv_partition=lane
        )
        then = step(eng, [Row(me, [8], invariant=True), Row(other, [9])], kv_partition=lane)
        got[lane] = [(r.logits[0].copy(), float(r.logsumexp[0])) for r in (first, then)]  # type: ignore[index]
    assert sorted(eng._slot_of[i] for i in (1, 3)) == [6, 7]
    assert (eng._slot_of[2], eng._slot_of[4]) == (0, 3)
    assert {(d.first, d.rows) for d in eng.decoder.buffers.values()} == {(0, 1), (3, 1), (6, 2)}
    for (logits_0, lse_0), (logits_1, lse_1) in zip(got[0], got[1], strict=True):
        np.testing.assert_array_equal(logits_0, logits_1)
        assert lse_0 == lse_1
    step(eng, [Row(i, [], end=True) for i in (1, 2, 3, 4)])
    assert eng.live_sequences() == 0 and len(eng._free_slots) == 6 and eng._free_slots.reserved_free() == 2


def test_replay_rows_are_checked(model_repository: Path) -> None:
    eng = tiny_engine(model_repository, 0)
    step(eng, [Row(1, [5], start=True)])
    bad = [
        Row(2, [5, 6], start=True, replay_from=0),
        Row(3, [5, 6], start=True, replay_from=3),
        Row(1, [7], replay_from=1),
        Row(4, [5, 6, 7], start=True, replay_from=2),
    ]
    width = 3
    req = StepRequest(
        sequence_ids=np.array([r.sequence_id for r in bad], dtype=np.uint64),
        input_ids=np.array([r.tokens + [0] * (width - len(r.tokens)) for r in bad], dtype=np.int64),
        lengths=np.array([len(r.tokens) for r in bad], dtype=np.int32),
        start=np.array([r.start for r in bad]),
        end=np.zeros(len(bad), dtype=bool),
        temperature=np.ones(len(bad), dtype=np.float32),
        replay_from=np.array([r.replay_from for r in bad], dtype=np.int32),
    )
    res = eng.step([req])[0]
    assert isinstance(res, StepResult)
    assert res.status.tolist() == [RowStatus.INVALID] * 3 + [RowStatus.OK]
    assert eng._length[eng._slot_of[4]] == 3 and eng.stats.replayed_tokens_total == 1
