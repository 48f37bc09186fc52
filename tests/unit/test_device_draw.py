"""The step model's device draw (`step_model.draw`) against the gateway's own full-row sampler.

For the same row, settings and uniform the device draw must pick the very token the gateway's
`frontend.sampling.sample` picks from the full row (which the statistical tests in
test_sampling.py hold to transformers' warpers), including ties at every cut (fp16-rounded
logits tie often), top-k wider than any window, top-p with and without top-k, min-p, and no
truncation at all. And the rows `needs_draw` leaves to the gateway must be decidable from their
window, so that no step falls back to fetching a full row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from frontend.sampling import NeedFullRow, SamplingParams, StepLogits, sample
from step_model.draw import draw_rows, draw_rows_searched, draw_rows_sorted, needs_draw
from step_model.draw_host import draw_rows_host

pytestmark = pytest.mark.unit

VOCAB, WINDOW = 2000, 64

SETTINGS = [
    SamplingParams(temperature=0.7, top_p=0.9),  # the seed's own request
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=1.0, top_p=0.999),
    SamplingParams(temperature=1.0, top_k=500),  # wider than the window
    SamplingParams(temperature=1.0, top_k=500, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.8),  # cut inside the window
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=1.0, min_p=0.5, top_p=0.95),
    SamplingParams(temperature=1.0),  # no truncation
]


def _rows(rng: np.random.Generator, n: int, *, spread: float, fp16: bool) -> np.ndarray:
    z = rng.normal(0.0, spread, size=(n, VOCAB))
    if fp16:  # the GPU graph's logits: many exact ties
        z = z.astype(np.float16)
    return z.astype(np.float32)


def _lse(z: np.ndarray) -> np.ndarray:
    return torch.logsumexp(torch.from_numpy(z), dim=1).numpy()


def _columns(params: SamplingParams, u: np.ndarray) -> np.ndarray:
    n = u.shape[0]
    return np.column_stack((u, np.full(n, params.top_p), np.full(n, float(params.top_k)), np.full(n, params.min_p)))


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"p{p.top_p}-k{p.top_k}-m{p.min_p}")
@pytest.mark.parametrize(
    ("spread", "fp16"), [(1.0, True), (4.0, True), (1.0, False)], ids=["flat16", "peaked16", "flat32"]
)
@pytest.mark.parametrize(
    "draw_rows",
    [draw_rows, draw_rows_host, draw_rows_sorted, draw_rows_searched],
    ids=["binned", "host", "sorted", "searched"],
)
def test_the_device_draw_picks_the_gateways_full_row_token(
    params: SamplingParams, spread: float, fp16: bool, draw_rows: Any
) -> None:
    rng = np.random.default_rng(int(spread * 10) + fp16)
    z = _rows(rng, 48, spread=spread, fp16=fp16)
    lse = _lse(z)
    u = rng.random(48)
    u[:4] = [0.0, 1.0 - 2**-53, 0.5, 1e-12]  # the ends of [0, 1)
    tokens, logits = draw_rows(torch.from_numpy(z), torch.from_numpy(lse), torch.from_numpy(_columns(params, u)))
    for i in range(z.shape[0]):
        want = sample(
            StepLogits(np.zeros(1, np.float32), np.zeros(1, np.int64), float(lse[i]), full_logits=z[i]),
            params,
            float(u[i]),
        )
        assert int(tokens[i]) == want.token_id, f"row {i} u={u[i]!r}"
        assert float(logits[i]) - float(lse[i]) == want.logprob


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"p{p.top_p}-k{p.top_k}-m{p.min_p}")
@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])
def test_rows_left_to_the_gateway_are_decided_by_their_window(params: SamplingParams, spread: float) -> None:
    """No row that needs_draw leaves undrawn makes the gateway fetch its full row, except a tie at
    the window's edge (fp32 rows here: no ties)."""
    rng = np.random.default_rng(int(spread * 7))
    z = _rows(rng, 64, spread=spread, fp16=False)
    lse = _lse(z)
    values, ids = torch.topk(torch.from_numpy(z), WINDOW, dim=1)
    u = rng.random(64)
    drawn = needs_draw(_columns(params, u), values.numpy(), lse)
    for i in np.flatnonzero(~drawn):
        try:
            sample(StepLogits(values[i].numpy(), ids[i].numpy(), float(lse[i])), params, float(u[i]))
        except NeedFullRow as why:
            pytest.fail(f"row {i} (spread {spread}) left undrawn needs its full row: {why.reason}")


def test_rows_not_asked_are_never_drawn() -> None:
    z = _rows(np.random.default_rng(3), 4, spread=1.0, fp16=False)
    values, _ = torch.topk(torch.from_numpy(z), WINDOW, dim=1)
    columns = _columns(SamplingParams(top_p=0.5), np.full(4, -1.0))
    assert not needs_draw(columns, values.numpy(), _lse(z)).any()


def test_a_drawn_step_reports_what_the_full_row_path_reports() -> None:
    """`frontend.sampling.drawn`: the device's token with its logprob and the window's reported
    alternatives equals `sample` on the full row (logprobs 3), for every row the device draws."""
    from frontend.sampling import drawn

    rng = np.random.default_rng(11)
    z = _rows(rng, 32, spread=1.0, fp16=False)
    lse = _lse(z)
    values, ids = torch.topk(torch.from_numpy(z), WINDOW, dim=1)
    params = SamplingParams(temperature=0.7, top_p=0.9, logprobs=3)
    u = rng.random(32)
    columns = _columns(params, u)
    rows = np.flatnonzero(needs_draw(columns, values.numpy(), lse))
    assert rows.size > 16  # flat rows: the nucleus is wider than the window
    tokens, logits = draw_rows(torch.from_numpy(z[rows]), torch.from_numpy(lse[rows]), torch.from_numpy(columns[rows]))
    for j, i in enumerate(rows):
        window = StepLogits(values[i].numpy(), ids[i].numpy(), float(lse[i]))
        got = drawn(window, params, int(tokens[j]), float(logits[j]))
        full = StepLogits(values[i].numpy(), ids[i].numpy(), float(lse[i]), full_logits=z[i])
        assert got == sample(full, params, float(u[i]))


def _rows_of_every_shape(seed: int, n: int, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z [n, vocab], DRAW columns [n, 4], constant-row mask): flat, peaked and fp16-tied rows,
    banned tokens, a value repeated 300 times, constant rows; every cut (top-k up to past the
    vocabulary, top-p, min-p up to 1) and u at both ends of [0, 1)."""
    rng = np.random.default_rng(seed)
    spread = rng.choice([0.03, 0.3, 1.0, 3.0, 10.0, 100.0], size=n)
    z = (rng.normal(0.0, 1.0, size=(n, vocab)) * spread[:, None]).astype(np.float32)
    z[::3] = z[::3].astype(np.float16).astype(np.float32)  # ties
    z[1::25, :7] = float("-inf")  # banned tokens: zero mass
    z[2::25, :300] = 0.25  # one value, 300 times
    constant = np.zeros(n, dtype=bool)
    constant[::29] = True
    z[constant] = 1.5
    columns = np.column_stack(
        (
            rng.random(n),
            rng.choice([1.0, 0.9, 0.5, 0.999, 0.01], size=n),
            rng.choice([0.0, 0.0, 1.0, 5.0, 300.0, float(vocab), vocab + 100.0], size=n),
            rng.choice([0.0, 0.0, 0.05, 0.5, 1.0], size=n),
        )
    )
    columns[::11, 0] = 0.0
    columns[5::11, 0] = 1.0 - 2**-53
    return z, columns, constant


def test_the_binned_draw_equals_the_sorted_one_on_many_rows() -> None:
    """The binned draw (linear passes, one bin sorted per cut) against the full sort, on 3000 rows
    of every shape (`_rows_of_every_shape`), settings drawn at random, u = 0 among them. Both are
    exact up to float rounding, which they meet in different orders of summation: so rows where a
    sum lands on a boundary by construction are left out (constant rows, whose cumulative masses
    hit top_p exactly; u = 1 - 2**-53, whose draw meets the kept total), and there the binned
    token only has to be a kept token of the same value or a positive-mass one."""
    z, columns, constant = _rows_of_every_shape(5, 3000, 700)
    zt = torch.from_numpy(z)
    lse = torch.logsumexp(zt, dim=1)
    binned = draw_rows(zt, lse, torch.from_numpy(columns))
    reference = draw_rows_sorted(zt, lse, torch.from_numpy(columns))
    exact = ~constant & (columns[:, 0] < 0.5 + 0.5 * (1.0 - 2**-40))
    np.testing.assert_array_equal(binned[0].numpy()[exact], reference[0].numpy()[exact])
    np.testing.assert_array_equal(binned[1].numpy()[exact], reference[1].numpy()[exact])
    assert exact.sum() > 2600
    rows = np.flatnonzero(~exact)
    assert (z[rows, binned[0].numpy()[rows]] == binned[1].numpy()[rows]).all()
    # The host's binned draw (numpy, a row at a time) is the same binning and the same queries:
    # bitwise the torch version's token on every row, the boundary rows included.
    host = draw_rows_host(zt, lse, torch.from_numpy(columns))
    assert torch.equal(host[0], binned[0]) and torch.equal(host[1], binned[1])


def test_the_searched_draw_is_the_sorted_one_on_every_row() -> None:
    """The GPU's draw (counts by binary search over the sorted row) is the reference's selection
    itself: on the CPU, where the cumulative sums are sequential, equal on every row, the boundary
    rows (constant rows, u = 0, u = 1 - 2**-53) and min-p thresholds between float32 values included."""
    z, columns, _ = _rows_of_every_shape(8, 2000, 500)
    zt, ct = torch.from_numpy(z), torch.from_numpy(columns)
    lse = torch.logsumexp(zt, dim=1)
    searched, reference = draw_rows_searched(zt, lse, ct), draw_rows_sorted(zt, lse, ct)
    assert torch.equal(searched[0], reference[0]) and torch.equal(searched[1], reference[1])


@pytest.mark.parametrize(
    "draw_rows",
    [draw_rows, draw_rows_host, draw_rows_sorted, draw_rows_searched],
    ids=["binned", "host", "sorted", "searched"],
)
def test_a_rows_draw_does_not_depend_on_the_rows_beside_it(draw_rows: Any) -> None:
    """Batch invariance (issue 15): each row drawn alone gives the token it gets among 24 others, on
    GPT-2's vocabulary with the seed's request (every sum
    of the binned draw is a row's own: a sequential scatter into its bins, then prefix sums)."""
    rng = np.random.default_rng(17)
    z = (rng.normal(0.0, 1.0, size=(24, 50257)) / 0.7).astype(np.float32)
    lse = _lse(z)
    columns = _columns(SamplingParams(temperature=0.7, top_p=0.9), rng.random(24))
    columns[::4, 2] = 300.0  # some rows with a top-k cut too
    zt, lt, ct = torch.from_numpy(z), torch.from_numpy(lse), torch.from_numpy(columns)
    together = draw_rows(zt, lt, ct)
    for i in range(24):
        alone = draw_rows(zt[i : i + 1], lt[i : i + 1], ct[i : i + 1])
        assert int(alone[0][0]) == int(together[0][i]) and float(alone[1][0]) == float(together[1][i]), f"row {i}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA draw: the GPU suite runs it")
def test_on_the_gpu_the_graphed_draw_picks_the_cpu_references_tokens() -> None:
    """On the card: GPT-2's vocabulary, fp16-tied rows, mixed settings; the searched draw replayed
    from CUDA graphs (padded row buckets, eager past the largest) equals the CPU reference row for
    row, at row counts inside, across and past the buckets."""
    from step_model.draw_graphs import GraphedDraw, never_flagged

    rng = np.random.default_rng(23)
    n = 300
    z = (rng.normal(0.0, 1.0, size=(n, 50257)) / 0.7).astype(np.float16).astype(np.float32)
    columns = np.column_stack(
        (
            rng.random(n),
            rng.choice([1.0, 0.9, 0.5, 0.95], size=n),
            rng.choice([0.0, 0.0, 50.0, 1000.0], size=n),
            rng.choice([0.0, 0.0, 0.05], size=n),
        )
    )
    zt, ct = torch.from_numpy(z), torch.from_numpy(columns)
    lse = torch.logsumexp(zt, dim=1)
    want = draw_rows_sorted(zt, lse, ct)
    dev = torch.device("cuda")
    graphed = GraphedDraw(never_flagged(draw_rows_searched), draw_rows_searched, 50257, dev, max_rows=192)
    for a, b in [(0, 1), (1, 4), (4, 68), (68, 300)]:  # 1, 3, 64 and 232 rows (past 192: eager)
        ids, logits = graphed(zt[a:b].to(dev), lse[a:b].to(dev), ct[a:b].to(dev))
        np.testing.assert_array_equal(ids.cpu().numpy(), want[0][a:b].numpy())
        np.testing.assert_array_equal(logits.cpu().numpy(), want[1][a:b].numpy())
    assert graphed.replays == 3
