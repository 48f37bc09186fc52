"""Decodes run ahead (step_model.ahead, contract.PARAM_AHEAD): a row that runs a decodes ahead gets,
at every one of them, the numbers it gets stepping one token per execution with the same tokens fed
(bitwise), its proposals are the gateway's own sampler's picks for the row's cuts and uniforms, a
rewind drops exactly the tokens fed after a refused proposal, and rows that ran ahead answer
fetches and later steps from their own last decode."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from frontend.sampling import SamplingParams, StepLogits, sample
from step_model.contract import RowStatus
from step_model.draw import draw_rows_sorted
from step_model.engine import InvalidRequest, ModelMeta, StepEngine, StepRequest, StepResult
from tests.conftest import DEVICE, STRICT, TINY

pytestmark = pytest.mark.unit

WINDOW = 16
NO_DRAW = (-1.0, -1.0, -1.0, -1.0)  # the gateway's DRAW row for greedy


@dataclass
class Row:
    sequence_id: int
    tokens: list[int]
    start: bool = False
    end: bool = False
    temperature: float = 1.0
    draw: tuple[float, float, float, float] = NO_DRAW  # u, top_p, top_k, min_p
    ahead: int = 0
    ahead_u: list[float] = field(default_factory=list)
    rewind: int = 0


def step(eng: StepEngine, rows: list[Row], *, check: bool = True, logits: bool = False) -> StepResult:
    width = max(1, max(len(r.tokens) for r in rows))
    depth = max(r.ahead for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    ahead_u = np.zeros((len(rows), depth))
    for i, r in enumerate(rows):
        ids[i, : len(r.tokens)] = r.tokens
        ahead_u[i, : len(r.ahead_u)] = r.ahead_u
    req = StepRequest(
        sequence_ids=np.array([r.sequence_id for r in rows], dtype=np.uint64),
        input_ids=ids,
        lengths=np.array([len(r.tokens) for r in rows], dtype=np.int32),
        start=np.array([r.start for r in rows]),
        end=np.array([r.end for r in rows]),
        temperature=np.array([r.temperature for r in rows], dtype=np.float32),
        window=WINDOW,
        want_logits=logits,
        draw=np.array([r.draw for r in rows], dtype=np.float64),
        ahead=np.array([r.ahead for r in rows], dtype=np.int32) if depth else None,
        ahead_u=ahead_u if depth else None,
        rewind=np.array([r.rewind for r in rows], dtype=np.int32),
    )
    res = eng.step([req])[0]
    assert isinstance(res, StepResult), res
    assert not check or (res.status == RowStatus.OK).all(), res.messages
    return res


@pytest.fixture(scope="module")
def version_dir(model_repository: Path) -> Path:
    return model_repository / TINY / "1"


def make_engine(version_dir: Path) -> StepEngine:
    eng = StepEngine(
        version_dir / "model.onnx",
        ModelMeta.load(version_dir),
        capacity=8,
        device=DEVICE,
        strict_device=STRICT,
        cuda_graphs=True,
    )
    eng.warm_up()
    return eng


rng = np.random.default_rng(16)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
# (temperature, DRAW cuts (top_p, top_k, min_p), decodes ahead), one row each, in slot order: a
# row that does not run ahead; greedy; top-k inside the window; top-k with top-p and min-p; top-p
# alone (its cut may lie outside any window: drawn whole). The highest slot runs the most decodes,
# so that one token per execution covers the same slot range (on the GPU: the same graph).
KINDS = [
    (1.0, (0.95, 8.0, 0.0), 0),
    (1.0, None, 4),
    (0.8, (1.0, 5.0, 0.0), 3),
    (0.7, (0.9, 12.0, 0.02), 2),
    (0.9, (0.9, 0.0, 0.0), 4),
]
GREEDY_ROW, TOP_K_ROW = 1, 2


def _params(temperature: float, cuts: tuple[float, float, float] | None) -> SamplingParams:
    if cuts is None:
        return SamplingParams(temperature=0.0)
    top_p, top_k, min_p = cuts
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=int(top_k), min_p=min_p)


def _start(eng: StepEngine, base: int) -> StepResult:
    return step(
        eng, [Row(base + i, p, start=True, temperature=KINDS[i][0]) for i, p in enumerate(PROMPTS)], logits=True
    )


def _ahead_rows(base: int, first: list[int], uniforms: np.ndarray) -> list[Row]:
    rows = []
    for i, (temperature, cuts, ahead) in enumerate(KINDS):
        draw = NO_DRAW if cuts is None else (float(uniforms[i, ahead]), *cuts)
        rows.append(
            Row(
                base + i, [first[i]], temperature=temperature, draw=draw, ahead=ahead, ahead_u=list(uniforms[i, :ahead])
            )
        )
    return rows


def test_decodes_run_ahead_equal_one_token_per_execution_and_propose_the_gateways_tokens(version_dir: Path) -> None:
    eng = make_engine(version_dir)
    _start(eng, 100)
    first = [20, 21, 22, 23, 24]
    uniforms = rng.random((len(KINDS), 5))
    res = step(eng, _ahead_rows(100, first, uniforms), logits=True)
    assert res.ahead_ids is not None and res.ahead_topk_logits is not None and res.ahead_drawn is not None
    assert res.ahead_logsumexp is not None and res.ahead_topk_ids is not None and res.ahead_logits is not None
    assert res.ahead_ids.shape == (len(KINDS), 4)
    assert eng.stats.ahead_tokens_total == sum(k[2] for k in KINDS)

    # The same rows, one token per execution, fed the proposals: the same numbers at every decode.
    ref = make_engine(version_dir)
    _start(ref, 200)
    fed = [[first[i], *res.ahead_ids[i, :ahead].tolist()] for i, (_, _, ahead) in enumerate(KINDS)]
    for s in range(5):
        rows = [i for i, (_, _, ahead) in enumerate(KINDS) if s <= ahead]
        single = step(ref, [Row(200 + i, [fed[i][s]], temperature=KINDS[i][0]) for i in rows], logits=True)
        assert single.logits is not None
        for j, i in enumerate(rows):
            temperature, cuts, ahead = KINDS[i]
            if s == ahead:  # the row's last decode: its answer
                np.testing.assert_array_equal(res.topk_logits[i], single.topk_logits[j])
                np.testing.assert_array_equal(res.topk_ids[i], single.topk_ids[j])
                assert res.logsumexp[i] == single.logsumexp[j]
                assert res.logits is not None
                np.testing.assert_array_equal(res.logits[i], single.logits[j])
                continue
            np.testing.assert_array_equal(res.ahead_topk_logits[i, s], single.topk_logits[j])
            np.testing.assert_array_equal(res.ahead_topk_ids[i, s], single.topk_ids[j])
            assert res.ahead_logsumexp[i, s] == single.logsumexp[j]
            proposed, u = int(res.ahead_ids[i, s]), float(uniforms[i, s])
            if cuts is not None and cuts[1] == 0.0:  # drawn from the whole row, as the gateway's full row
                assert res.ahead_drawn[i, s]
                z = torch.from_numpy(single.logits[j : j + 1])
                lse = torch.from_numpy(single.logsumexp[j : j + 1])
                want, want_z = draw_rows_sorted(z, lse, torch.tensor([[u, *cuts]], dtype=torch.float64))
                assert proposed == int(want[0]) and res.ahead_logits[i, s] == float(want_z[0])
                continue
            assert not res.ahead_drawn[i, s]
            window = StepLogits(single.topk_logits[j], single.topk_ids[j], float(single.logsumexp[j]))
            picked = sample(window, _params(temperature, cuts), u)
            assert proposed == picked.token_id
            assert res.ahead_logits[i, s] == single.topk_logits[j][list(single.topk_ids[j]).index(proposed)]
    # past a row's count: nothing proposed
    for i, (_, _, ahead) in enumerate(KINDS):
        assert (res.ahead_ids[i, ahead:] == -1).all()


def test_a_rewind_drops_the_tokens_fed_after_a_refused_proposal(version_dir: Path) -> None:
    eng = make_engine(version_dir)
    _start(eng, 300)
    uniforms = rng.random((len(KINDS), 5))
    res = step(eng, _ahead_rows(300, [30, 31, 32, 33, 34], uniforms))
    assert res.ahead_ids is not None
    # The top-k row ran 3 ahead: the gateway accepts its first proposal, then draws another token
    # than the second: 2 tokens kept (its input and the first proposal), so 3 + 1 - 2 = 2 dropped.
    k_row, g_row = 300 + TOP_K_ROW, 300 + GREEDY_ROW
    kept = int(res.ahead_ids[TOP_K_ROW, 0])
    other = (int(res.ahead_ids[TOP_K_ROW, 1]) + 1) % 64
    after = step(eng, [Row(k_row, [other], temperature=0.8, rewind=2)], logits=True)
    # The greedy row (4 ahead): every proposal accepted, and its next token too; nothing dropped.
    greedy_next = int(res.topk_ids[GREEDY_ROW, 0])
    after_greedy = step(eng, [Row(g_row, [greedy_next])], logits=True)

    ref = make_engine(version_dir)
    _start(ref, 400)
    for token in (30 + TOP_K_ROW, kept):
        step(ref, [Row(400 + TOP_K_ROW, [token], temperature=0.8)])
    want = step(ref, [Row(400 + TOP_K_ROW, [other], temperature=0.8)], logits=True)
    assert after.logits is not None and want.logits is not None
    np.testing.assert_array_equal(after.logits[0], want.logits[0])
    for token in (30 + GREEDY_ROW, *res.ahead_ids[GREEDY_ROW, :4].tolist()):
        step(ref, [Row(400 + GREEDY_ROW, [int(token)])])
    want_greedy = step(ref, [Row(400 + GREEDY_ROW, [greedy_next])], logits=True)
    assert after_greedy.logits is not None and want_greedy.logits is not None
    np.testing.assert_array_equal(after_greedy.logits[0], want_greedy.logits[0])


def test_rows_that_ran_ahead_answer_fetches_from_their_own_last_decode(version_dir: Path) -> None:
    eng = make_engine(version_dir)
    _start(eng, 500)
    res = step(eng, _ahead_rows(500, [40, 41, 42, 43, 44], rng.random((len(KINDS), 5))), logits=True)
    fetched = step(eng, [Row(500 + i, []) for i in range(len(KINDS))], logits=True)
    assert res.logits is not None and fetched.logits is not None
    np.testing.assert_array_equal(fetched.logits, res.logits)  # rows that ended early were kept apart


def test_running_ahead_is_refused_where_it_cannot_apply(version_dir: Path) -> None:
    eng = make_engine(version_dir)
    res = step(eng, [Row(600, [1, 2], start=True, ahead=2, ahead_u=[0.5, 0.5])], check=False)
    assert res.status.tolist() == [RowStatus.INVALID] and "only a decode row" in res.messages[0]
    step(eng, [Row(601, [1, 2], start=True)])
    res = step(eng, [Row(601, [3], rewind=3)], check=False)
    assert res.status.tolist() == [RowStatus.INVALID] and "at least one cached token" in res.messages[0]
    max_context = eng.meta.max_context
    res = step(eng, [Row(601, [3], ahead=max_context)], check=False)
    assert res.status.tolist() == [RowStatus.INVALID] and "context" in res.messages[0]
    res = step(eng, [Row(601, [3], draw=(0.5, 1.0, 0.0, 0.0), ahead=2, ahead_u=[0.5, 1.5])], check=False)
    assert res.status.tolist() == [RowStatus.INVALID] and "AHEAD_U" in res.messages[0]
    bad = StepRequest(
        sequence_ids=np.array([601], dtype=np.uint64),
        input_ids=np.array([[3]]),
        lengths=np.array([1], dtype=np.int32),
        start=np.array([False]),
        end=np.array([False]),
        temperature=np.array([1.0], dtype=np.float32),
        window=WINDOW,
        draw=np.array([[0.5, 1.0, 0.0, 0.0]]),
        ahead=np.array([2], dtype=np.int32),
    )
    assert isinstance(eng.step([bad])[0], InvalidRequest)
    # nothing changed: the row still steps one token from where it was
    ok = step(eng, [Row(601, [3])])
    assert ok.status.tolist() == [RowStatus.OK]
