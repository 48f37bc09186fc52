"""KV partitions: start rows take slots from their request's partition, and a decode runs over
its own partition's slot range only, with the same results as one undivided pool."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from step_model.engine import ModelMeta, StepEngine, StepResult
from step_model.slots import SlotPool
from tests.conftest import TINY
from tests.unit.test_step_engine import request

pytestmark = pytest.mark.unit


def test_slot_pool_takes_lowest_first_within_a_partition_then_the_nearest() -> None:
    pool = SlotPool(10, 3)  # partitions of 4: [0, 4), [4, 8), [8, 10)
    assert (pool.size, pool.partitions, len(pool)) == (4, 3, 10)
    taken = [pool.take(1) for _ in range(4)]
    assert taken == [4, 5, 6, 7]
    taken.append(pool.take(1))  # full: the nearest partition, a tie going to the lower one
    assert taken[-1] == 0
    taken.append(pool.take(None))  # the lowest free slot of the whole pool
    assert taken[-1] == 1
    pool.give(5)
    assert pool.take(1) == 5
    assert pool.start_of(9) == 8 and pool.partition_of(9) == 2
    rest = [pool.take(2) for _ in range(len(pool))]
    assert rest[:2] == [8, 9] and sorted(rest + taken) == list(range(10))
    with pytest.raises(IndexError):
        pool.take(0)


def test_one_partition_is_the_old_lowest_first_heap() -> None:
    pool = SlotPool(5, 1)
    assert [pool.take(3) for _ in range(3)] == [0, 1, 2]
    pool.give(1)
    assert pool.take(None) == 1


def _engine(version_dir: Path, partitions: int) -> StepEngine:
    meta = ModelMeta.load(version_dir)
    return StepEngine(version_dir / "model.onnx", meta, capacity=8, partitions=partitions, device="cpu")


def _run(eng: StepEngine, partitioned: bool) -> list[StepResult]:
    """Two callers, each with its own partition (when partitioned), stepping in turns."""
    a = replace(request([(1, [5, 6, 7], True, False), (2, [8], True, False)]), kv_partition=0 if partitioned else None)
    b = replace(request([(3, [9, 10], True, False), (4, [11], True, False)]), kv_partition=1 if partitioned else None)
    results = []
    for req in (a, b):
        out = eng.step([req])[0]
        assert isinstance(out, StepResult)
        results.append(out)
    for token in range(20, 24):
        for ids in ((1, 2), (3, 4)):
            out = eng.step([request([(i, [token + i], False, False) for i in ids], logits=True)])[0]
            assert isinstance(out, StepResult)
            results.append(out)
    return results


def test_each_callers_decode_runs_over_its_own_partition_with_the_same_results(model_repository: Path) -> None:
    version_dir = model_repository / TINY / "1"
    whole, parted = _engine(version_dir, 1), _engine(version_dir, 2)
    expected, got = _run(whole, False), _run(parted, True)
    assert sorted(parted._slot_of.values()) == [0, 1, 4, 5]  # the second caller's rows in [4, 8)
    assert {(d.first, d.rows) for d in parted.decoder.buffers.values()} == {(0, 2), (4, 2)}
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g.topk_ids, e.topk_ids)
        np.testing.assert_allclose(g.topk_logits, e.topk_logits, rtol=1e-5, atol=1e-5)
        if e.logits is not None:
            np.testing.assert_allclose(g.logits, e.logits, rtol=1e-5, atol=1e-5)


def test_a_full_partition_lends_slots_and_decodes_still_cover_them(model_repository: Path) -> None:
    eng = _engine(model_repository / TINY / "1", 2)
    rows = [(i, [i + 1], True, False) for i in range(1, 7)]  # six starts into partition 1 (4 slots)
    out = eng.step([replace(request(rows), kv_partition=1)])[0]
    assert isinstance(out, StepResult) and not out.status.any()
    assert sorted(eng._slot_of.values()) == [0, 1, 4, 5, 6, 7]  # two lent by partition 0
    step = eng.step([request([(i, [30], False, False) for i in range(1, 7)])])[0]
    assert isinstance(step, StepResult) and not step.status.any()
    assert max(d.rows for d in eng.decoder.buffers.values() if d.first == 0) == 8
