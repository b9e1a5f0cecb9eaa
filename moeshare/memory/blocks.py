"""KV blocks: a pool of fixed-size blocks that sequences borrow and return.

An instance only ever calls `allocate`, `free`, `can_allocate` and the counters, so the plain backend here (one preallocated
tensor) and an elastic CUDA virtual-memory backend (2 MiB physical pages mapped on demand) can stand behind
the same interface.
"""

from __future__ import annotations

from collections import deque

import torch

from moeshare.errors import MoeshareError


class OutOfBlocks(MoeshareError):
    """Asked for more KV blocks than are free; the scheduler preempts instead of crashing."""


class BlockPool:
    """num_blocks blocks of `block_size` tokens; each block holds K and V of every layer. [N, L, 2, B, Hkv, D]"""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        if num_blocks < 1:
            raise MoeshareError(f"the KV pool needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # one block more than is handed out: padding rows of a captured decode step write there
        self.scratch_block = num_blocks
        self.kv = torch.zeros(
            num_blocks + 1, layers, 2, block_size, kv_heads, head_dim, dtype=dtype, device=device
        )
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def capacity(self) -> int:
        """The most blocks one request could ever hold."""
        return self.num_blocks

    def release(self) -> None:
        """Nothing to give back but the tensor itself."""

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def held_free_blocks(self) -> int:
        """Free blocks in memory the pool holds: all of them (its tensor is its own)."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    @staticmethod
    def block_bytes(block_size: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """One block: K and V of every layer for block_size tokens."""
        return 2 * layers * block_size * kv_heads * head_dim * dtype.itemsize

    @staticmethod
    def blocks_that_fit(
        bytes_available: int, block_size: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return bytes_available // BlockPool.block_bytes(block_size, layers, kv_heads, head_dim, dtype)
