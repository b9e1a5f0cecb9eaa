"""A KV block pool over pages of a PageManager: the same interface as BlockPool, physical memory on demand.

The pool reserves a virtual range for its most blocks at once, with the layout of BlockPool
([N + 1, L, 2, B, Hkv, D]; here block 0 is the scratch block padding rows write to, mapped first, as the
tensor over the range needs), so the attention kernels and captured graphs see one fixed tensor. Blocks are grouped into units: the blocks of one page (blocks smaller
than a page), or the pages of one block (larger ones); a unit is mapped when its first block is handed out
and given back when its last one returns. Allocation fills partly used units first, then maps the lowest
free one, so a model that goes quiet gives its pages back.
"""

from __future__ import annotations

import heapq

import torch

from moeshare.errors import MoeshareError
from moeshare.memory.blocks import BlockPool, OutOfBlocks
from moeshare.memory.pages import PageManager


def block_stride(block_bytes: int, page_bytes: int) -> int:
    """Bytes from one block to the next: the block itself if it tiles pages evenly, else padded so it does
    (to a power of two below a page, to whole pages above), so no block straddles a page it does not own."""
    if page_bytes % block_bytes == 0 or block_bytes % page_bytes == 0:
        return block_bytes
    if block_bytes < page_bytes:
        return 1 << (block_bytes - 1).bit_length()
    return -(-block_bytes // page_bytes) * page_bytes


class ElasticBlockPool:
    def __init__(
        self,
        pages: PageManager,
        owner: str,
        num_blocks: int,
        block_size: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        if num_blocks < 1:
            raise MoeshareError(f"the KV pool needs at least one block, got {num_blocks}")
        self.pages, self.block_size, self.num_blocks = pages, block_size, num_blocks
        self.scratch_block = 0
        nbytes = BlockPool.block_bytes(block_size, layers, kv_heads, head_dim, dtype)
        stride = block_stride(nbytes, pages.page_bytes)
        self.region = pages.reserve(owner, (num_blocks + 1) * stride)
        if stride <= pages.page_bytes:  # a unit is one page and the blocks in it
            self.blocks_per_unit, self.pages_per_unit = pages.page_bytes // stride, 1
        else:  # a unit is one block and its pages
            self.blocks_per_unit, self.pages_per_unit = 1, stride // pages.page_bytes
        units = -(-(num_blocks + 1) // self.blocks_per_unit)
        self._free: list[list[int]] = [
            [
                b
                for b in range(u * self.blocks_per_unit, (u + 1) * self.blocks_per_unit)
                if 0 < b <= num_blocks
            ]
            for u in range(units)
        ]
        self._used = [0] * units
        self._partial: set[int] = set()  # mapped units with blocks out and blocks free
        self._unmapped = list(range(units))  # a heap: the lowest unit first keeps the range compact
        self._out = 0
        self._last = self._unit(num_blocks)
        self._missing = self.blocks_per_unit - len(self._free[self._last])  # blocks the last unit lacks
        # the owners whose weights could leave the device for this pool's blocks, and the pages that must stay
        # beside them (its own model's weights, on the device or coming back): set by the engine
        self.evictable: frozenset[str] = frozenset()
        self.beside = 0
        try:
            scratch = self._unit(self.scratch_block)
            if not self._map(scratch):
                raise MoeshareError(f"{owner}: no free page for the KV pool's scratch block")
            self.region.pinned = self.pages_per_unit
            self._unmapped.remove(scratch)
            heapq.heapify(self._unmapped)
            self._used[scratch] += 1  # the scratch block keeps its unit mapped
            if self._free[scratch]:
                self._partial.add(scratch)
            shape = (num_blocks + 1, layers, 2, block_size, kv_heads, head_dim)
            inner = torch.empty(shape[1:], dtype=dtype, device="meta").stride()
            view = pages.view(self.region).view(dtype)
            self.kv = view.as_strided(shape, (stride // dtype.itemsize, *inner))  # [N + 1, L, 2, B, Hkv, D]
        except BaseException:
            pages.release(self.region)
            raise

    # ---- the BlockPool interface ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The most blocks one request could ever hold: the range, or what the page budget leaves once every
        model whose weights could leave has left (its own model's weights stay)."""
        most = self.pages.most(self.region.owner, self.evictable, self.beside)
        budget = most // self.pages_per_unit * self.blocks_per_unit - 1
        return max(0, min(self.num_blocks, budget))

    @property
    def used_blocks(self) -> int:
        return self._out

    @property
    def free_blocks(self) -> int:
        """Blocks this pool could hand out now: free ones in its mapped units and in units the budget can map."""
        units = len(self._unmapped)
        missing = self._unmapped_missing()
        mapped = self.num_blocks - self._out - (units * self.blocks_per_unit - missing)
        can = min(units, self.pages.room(self.region.owner) // self.pages_per_unit)  # the lowest units first
        return mapped + can * self.blocks_per_unit - (missing if can == units else 0)

    def can_allocate(self, n: int) -> bool:
        """Whether `allocate(n)` would succeed now; cheap while the mapped units have the blocks (a decode step
        asks once for every sequence that crosses into a new block)."""
        return n <= self.held_free_blocks or n <= self.free_blocks

    @property
    def held_free_blocks(self) -> int:
        """Free blocks in the pages this pool has mapped (the free pages of the pool are anyone's: counted once,
        in the page stats, not in every model's blocks)."""
        return (
            self.num_blocks
            - self._out
            - (len(self._unmapped) * self.blocks_per_unit - self._unmapped_missing())
        )

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        """n blocks, partly used units first; raises OutOfBlocks (handing out nothing) if the budget is short."""
        out: list[int] = []
        try:
            while len(out) < n:
                u = self._next_unit()
                if u is None:
                    raise OutOfBlocks(f"asked for {n} KV blocks, {len(out)} could be mapped")
                take = min(n - len(out), len(self._free[u]))
                out += self._free[u][:take]
                del self._free[u][:take]
                self._used[u] += take
                self._out += take
                (self._partial.add if self._free[u] else self._partial.discard)(u)
        except BaseException:  # out of pages, or a driver error: nothing handed out
            self.free(out)
            raise
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            u = self._unit(b)
            self._free[u].append(b)
            self._used[u] -= 1
            self._out -= 1
            if self._used[u] == 0:  # its last block came back: its pages go back to the budget
                self._partial.discard(u)
                for page in self._unit_pages(u):
                    self.pages.give_back(self.region, page)
                heapq.heappush(self._unmapped, u)
            else:
                self._partial.add(u)

    def release(self) -> None:
        """Unmap every page and give the range back (the instance is going away)."""
        self.pages.release(self.region)

    # ---- units ------------------------------------------------------------------------------------------------

    def pages_to_hold(self, blocks: int) -> int:
        """Pages `blocks` blocks need at the least, beside the scratch block (whole units)."""
        return -(-(blocks + 1) // self.blocks_per_unit) * self.pages_per_unit

    def _unmapped_missing(self) -> int:
        """Blocks the unmapped units lack of whole units: the last unit's shortfall while it is unmapped."""
        return self._missing if self._used[self._last] == 0 else 0

    def _unit(self, block: int) -> int:
        return block // self.blocks_per_unit

    def _unit_pages(self, u: int) -> range:
        return range(u * self.pages_per_unit, (u + 1) * self.pages_per_unit)

    def _next_unit(self) -> int | None:
        """A partly used unit, else the lowest unmapped one, mapped now; None if the budget has no page."""
        if self._partial:
            return min(self._partial)
        if not self._unmapped or not self._map(self._unmapped[0]):
            return None
        return heapq.heappop(self._unmapped)

    def _map(self, u: int) -> bool:
        done = []
        for page in self._unit_pages(u):
            if not self.pages.map(self.region, page):
                for p in done:  # a unit is mapped whole or not at all
                    self.pages.give_back(self.region, p)
                return False
            done.append(page)
        return True
