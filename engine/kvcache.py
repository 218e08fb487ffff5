"""KV pool: one K and one V tensor per layer holding the cached context rows of every live request.

A request's contexts live in one contiguous allocation (the context planner lays shared prefixes out so
every context is a contiguous range), so the attention kernel reads a cached prefix straight from the pool
by (start, length), with no per-step concatenation. First-fit allocation over a sorted free list;
a pool without a fixed capacity doubles when full (offsets stay valid).
"""

from __future__ import annotations

import bisect

import torch


class KVPoolFull(RuntimeError):
    """The pool has no contiguous free range of the requested size and cannot grow."""


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        capacity: int = 4096,
        growable: bool = True,
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device, self.growable = dtype, torch.device(device), growable
        self.capacity = 0
        self.k = torch.empty(num_layers, 0, num_kv_heads, head_dim, dtype=dtype, device=self.device)
        self.v = torch.empty_like(self.k)
        self._free: list[tuple[int, int]] = []  # sorted (start, length)
        self._grow_to(max(capacity, 1))

    @property
    def used(self) -> int:
        return self.capacity - sum(n for _, n in self._free)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (capacity, Hkv, D) views of layer i
        return self.k[i], self.v[i]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.num_layers)]

    def allocate(self, n: int) -> int:
        """Reserve n contiguous slots; returns the first slot."""
        if n <= 0:
            return 0
        while True:
            for i, (start, length) in enumerate(self._free):
                if length >= n:
                    if length == n:
                        self._free.pop(i)
                    else:
                        self._free[i] = (start + n, length - n)
                    return start
            if not self.growable:
                raise KVPoolFull(f"KV pool full: need {n} contiguous slots, {self.capacity - self.used} free")
            self._grow_to(max(self.capacity * 2, self.capacity + n))

    def free(self, start: int, n: int) -> None:
        if n <= 0:
            return
        i = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(i, (start, n))
        # Coalesce with neighbours so large requests still find room.
        merged: list[tuple[int, int]] = []
        for s, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self._free = merged

    def _grow_to(self, capacity: int) -> None:
        extra = capacity - self.capacity
        shape = (self.num_layers, extra, self.num_kv_heads, self.head_dim)
        self.k = torch.cat([self.k, torch.zeros(shape, dtype=self.dtype, device=self.device)], dim=1)
        self.v = torch.cat([self.v, torch.zeros(shape, dtype=self.dtype, device=self.device)], dim=1)
        self.free(self.capacity, extra)
        self.capacity = capacity
