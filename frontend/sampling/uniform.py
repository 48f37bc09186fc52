"""Per-sequence uniform draws for a whole step at once, as a counter-based stream.

The n-th draw of a sequence with key k is the n-th output of SplitMix64 seeded with k:
``z = k + (n + 1) * 0x9E3779B97F4A7C15`` passed through SplitMix64's finaliser, top 53 bits as a
double in [0, 1). A draw depends only on (key, n), never on which other sequences share the
step or in which order, so a seeded request gets the same tokens whatever its batch company; and
the draws of every row of a step are one vectorized computation (a generator object per
sequence cost ~2 us a row per step). SplitMix64 (Steele, Lea, Flood 2014) is the seeding
generator of Java's SplittableRandom and of xoshiro; hand-written because numpy has no
vectorized counter-based generator keyed per row (its Philox needs one object per key).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["sequence_key", "step_uniforms"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def sequence_key(seed: int | None, fresh: int) -> int:
    """The stream key of a sequence: its seed (mod 2**64) when given, else `fresh` random bits."""
    return (seed if seed is not None else fresh) & _MASK64


def step_uniforms(keys: NDArray[np.uint64], draws: NDArray[np.uint64]) -> NDArray[np.float64]:
    """u[i] = the draws[i]-th uniform of the stream with key keys[i] (arrays of equal length)."""
    # uint64 array arithmetic wraps modulo 2**64, as SplitMix64 requires (arrays never warn).
    z = keys.astype(np.uint64) + (draws.astype(np.uint64) + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
