"""The KV pool's free slots, cut into partitions: equal contiguous slot ranges.

A decode run covers one contiguous range of slots (GroupQueryAttention binds a block of the pool
by pointer), so the rows a step does not name but that lie inside its range are computed for
nothing. A gateway that keeps several steps in flight gives each its own partition
(`contract.PARAM_KV_PARTITION`): each step's decode then runs over its own partition's slots, not
over the other step's. Within a partition, lowest slot first keeps the range short; a start row
whose partition is full takes the nearest partition's lowest free slot (slower, never refused
while any slot is free).

Batch invariance (`contract.CONFIG_INVARIANT_SLOTS`): the top `reserved` slots are kept apart for
rows flagged invariant; the partitions cut the rest. Only flagged rows take them (`take_reserved`)
and they take no other: when the range is full a flagged start row waits (CACHE_FULL).
"""

from __future__ import annotations

import heapq

__all__ = ["SlotPool"]


class SlotPool:
    """Free slots of a pool of `capacity`: the first `capacity - reserved` in `partitions` ranges of
    `size` slots (the last may be shorter), the top `reserved` apart (`reserved_start` on)."""

    def __init__(self, capacity: int, partitions: int = 1, reserved: int = 0) -> None:
        if not 0 <= reserved < capacity:
            raise ValueError(f"reserved slots must be in [0, {capacity}), got {reserved}")
        self.reserved = reserved
        self.reserved_start = capacity - reserved
        self._reserved_free = list(range(self.reserved_start, capacity))
        capacity -= reserved
        partitions = max(1, min(int(partitions), capacity))
        self.capacity = capacity
        self.size = -(-capacity // partitions)
        self.partitions = -(-capacity // self.size)  # no empty trailing partition
        self._free: list[list[int]] = [
            list(range(p * self.size, min((p + 1) * self.size, capacity))) for p in range(self.partitions)
        ]
        self._count = capacity

    def __len__(self) -> int:
        """Free slots outside the reserved range."""
        return self._count

    def reserved_free(self) -> int:
        return len(self._reserved_free)

    def is_reserved(self, slot: int) -> bool:
        return slot >= self.reserved_start

    def take_reserved(self) -> int:
        """The lowest free reserved slot. Raises IndexError when there is none."""
        if not self._reserved_free:
            raise IndexError("no free reserved KV slot")
        return heapq.heappop(self._reserved_free)

    def partition_of(self, slot: int) -> int:
        return slot // self.size

    def start_of(self, slot: int) -> int:
        """The first slot of `slot`'s partition (or of the reserved range): where a decode run over it begins."""
        if slot >= self.reserved_start:
            return self.reserved_start
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
        if slot >= self.reserved_start:
            heapq.heappush(self._reserved_free, slot)
            return
        heapq.heappush(self._free[slot // self.size], slot)
        self._count += 1
