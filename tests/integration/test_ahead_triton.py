"""Decodes run ahead through a real tritonserver and the gateway's own Triton client: the wire
(AHEAD_U, the `ahead` and `rewind` parameters, AHEAD_* outputs, a BOOL output) carries what the
engine computes, and a run ahead answers what stepping one token per request does."""

from __future__ import annotations

import numpy as np
import pytest

from embedded_triton import TritonServer
from frontend.engine.step_rows import Row, compose
from frontend.engine.triton_client import StepClient
from frontend.sampling import SamplingParams, StepLogits, sample
from step_model.contract import RowStatus
from tests.conftest import TINY

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

_ids = iter(range(3_000_000, 4_000_000))


async def test_a_run_ahead_through_triton_answers_as_single_steps(triton: TritonServer) -> None:
    client = StepClient(triton.grpc_url, TINY, "1")
    ahead_id, single_id, prompt = next(_ids), next(_ids), [21, 22, 23]
    try:
        started = await client.step(
            [Row(ahead_id, prompt, start=True, temperature=0.8), Row(single_id, prompt, start=True, temperature=0.8)],
            window=8,
        )
        assert started.status.tolist() == [RowStatus.OK] * 2
        cuts = (1.0, 6.0, 0.0)  # top-k 6: inside the window
        uniforms = [0.11, 0.52, 0.93, 0.37]
        batch = compose(
            np.array([ahead_id], dtype=np.uint64),
            np.array([30]),
            np.array([0.8], dtype=np.float32),
            [],
            [],
            draw=np.array([[uniforms[3], *cuts]]),
            decode_ahead=np.array([3], dtype=np.int32),
            decode_ahead_u=np.array([uniforms[:3]]),
        )
        out = await client.step(batch, window=8)
        assert out.status.tolist() == [RowStatus.OK]
        assert out.ahead_ids is not None and out.ahead_drawn is not None and out.ahead_topk_logits is not None
        assert out.ahead_logsumexp is not None and out.ahead_topk_ids is not None
        assert out.ahead_ids.shape == (1, 3) and out.ahead_drawn.dtype == np.bool_ and not out.ahead_drawn.any()
        params = SamplingParams(temperature=0.8, top_k=6)
        fed = [30, *out.ahead_ids[0].tolist()]
        for s, token in enumerate(fed):
            single = await client.step([Row(single_id, [token], temperature=0.8)], window=8)
            if s < 3:
                np.testing.assert_array_equal(out.ahead_topk_logits[0, s], single.topk_logits[0])
                np.testing.assert_array_equal(out.ahead_topk_ids[0, s], single.topk_ids[0])
                assert out.ahead_logsumexp[0, s] == single.logsumexp[0]
                window = StepLogits(single.topk_logits[0], single.topk_ids[0], float(single.logsumexp[0]))
                assert sample(window, params, uniforms[s]).token_id == fed[s + 1]
            else:  # the run's answer is its last decode
                np.testing.assert_array_equal(out.topk_logits[0], single.topk_logits[0])
                assert out.logsumexp[0] == single.logsumexp[0]
        # A rewind through the wire: drop the last two fed tokens, feed another, as the single row.
        rewound = compose(
            np.array([ahead_id], dtype=np.uint64),
            np.array([7]),
            np.array([0.8], dtype=np.float32),
            [],
            [],
            decode_rewind=np.array([2], dtype=np.int32),
        )
        again = await client.step(rewound, window=8)
        replay = next(_ids)
        await client.step([Row(replay, prompt + fed[:2], start=True, temperature=0.8)], window=8)
        want = await client.step([Row(replay, [7], temperature=0.8)], window=8)
        np.testing.assert_allclose(again.topk_logits[0], want.topk_logits[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(again.topk_ids[0], want.topk_ids[0])
        await client.step([Row(replay, [], end=True)], window=1)
    finally:
        await client.step([Row(ahead_id, [], end=True), Row(single_id, [], end=True)], window=1)
        await client.close()
