"""Counter-based per-sequence uniforms (frontend.sampling.uniform)."""

from __future__ import annotations

import numpy as np
import pytest

from frontend.sampling.uniform import sequence_key, step_uniforms

pytestmark = pytest.mark.unit


def _splitmix64(seed: int, n: int) -> float:
    """Reference: the n-th (0-based) output of SplitMix64 seeded with `seed`, in plain Python."""
    mask = (1 << 64) - 1
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def test_equals_splitmix64_and_ignores_batch_company() -> None:
    keys = np.array([0, 1, 2**63 + 5, 2**64 - 1, 1234], dtype=np.uint64)
    draws = np.array([0, 7, 3, 100_000, 0], dtype=np.uint64)
    together = step_uniforms(keys, draws)
    for i in range(keys.size):
        alone = step_uniforms(keys[i : i + 1], draws[i : i + 1])[0]
        assert together[i] == alone == _splitmix64(int(keys[i]), int(draws[i]))
    assert ((together >= 0.0) & (together < 1.0)).all()


def test_seeds_map_to_keys_and_unseeded_sequences_get_fresh_ones() -> None:
    assert sequence_key(42, fresh=7) == 42
    assert sequence_key(-1, fresh=7) == 2**64 - 1
    assert sequence_key(None, fresh=7) == 7


def test_a_stream_is_uniform() -> None:
    u = step_uniforms(np.full(200_000, 99, dtype=np.uint64), np.arange(200_000, dtype=np.uint64))
    counts = np.histogram(u, bins=50, range=(0.0, 1.0))[0]
    expected = u.size / 50
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100.0  # 49 degrees of freedom: p < 1e-4 above ~ 90
    assert abs(float(np.corrcoef(u[:-1], u[1:])[0, 1])) < 0.01  # consecutive draws uncorrelated
