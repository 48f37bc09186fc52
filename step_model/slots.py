"""The KV pool's free slots, cut into partitions: equal contiguous slot ranges.

A decode run covers one contiguous range of slots (GroupQueryAttention binds a block of the pool
by pointer), so the rows a step does not name but that lie inside its range are computed for
nothing. A gateway that keeps several steps in flight gives each its own partition
(`contract.PARAM_KV_PARTITION`): each step's decode then runs over its own partition's slots, not
over the other step's. Within a partition, lowest slot first keeps the range short; a start row
whose partition is full takes the nearest partition's lowest free slot (slower, never refused
while any slot is free).
"""

from __future__ import annotations

import heapq

__all__ = ["SlotPool"]


class SlotPool:
    """Free slots of a pool of `capacity`, in `partitions` ranges of `size` slots (the last may be
    shorter)."""

    def __init__(self, capacity: int, partitions: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        partitions = max(1, min(int(partitions), capacity))
        self.capacity = capacity
        self.size = -(-capacity // partitions)
        self.partitions = -(-capacity // self.size)  # no empty trailing partition
        self._free: list[list[int]] = [
            list(range(p * self.size, min((p + 1) * self.size, capacity))) for p in range(self.partitions)
        ]
        self._count = capacity

    def __len__(self) -> int:
        return self._count

    def partition_of(self, slot: int) -> int:
        return slot // self.size

    def start_of(self, slot: int) -> int:
        """The first slot of `slot`'s partition: where a decode run over it begins."""
        return (slot // self.size) * self.size

    def take(self, partition: int | None = None) -> int:
        """The lowest free slot of `partition` (None or out of range: of the whole pool), else of
        the nearest partition that has one. Raises IndexError when the pool is full."""
        if not self._count:
            raise IndexError("no free KV slot")
        order: list[int]
        if partition is None or not 0 <= partition < self.partitions:
            order = list(range(self.partitions))
        else:
            order = sorted(range(self.partitions), key=lambda p: (abs(p - partition), p))
        for p in order:
            if self._free[p]:
                self._count -= 1
                return heapq.heappop(self._free[p])
        raise AssertionError("free count and lists disagree")  # unreachable

    def give(self, slot: int) -> None:
        heapq.heappush(self._free[slot // self.size], slot)
        self._count += 1
