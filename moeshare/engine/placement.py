"""Where an instance's bytes go under a device memory limit, and its KV block pool's default size.

The limit is reserved in this order: the KV pool, the work space, the resident variants' rows, then the MoE
layers' banks; the banks that do not fit wait in host memory (the last layers first) and are copied in per
step through one staging bank. The engine allocates in the same order, so what the arithmetic misses shows
up as weights that do not fit, never as a KV pool that does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeshare.engine.models import Footprint
from moeshare.errors import MoeshareError
from moeshare.memory.blocks import BlockPool

if TYPE_CHECKING:
    from moeshare.engine.config import EngineConfig

GIB = 2**30
# what the arithmetic cannot see on CUDA: the caching allocator's rounding and fragmentation, and the work
# buffers of cuBLAS and the Triton kernels, which it hands out too
CUDA_ALLOCATOR_SLACK = 512 * 2**20


def work_bytes(c: EngineConfig, fp: Footprint, dtype: torch.dtype) -> int:
    """Room for one step's activations at the largest batch, and the logits of the largest decode (`c`: an
    instance's config, its step budgets set; planner.plan makes it)."""
    return c.max_batched_tokens * fp.work_per_token * dtype.itemsize + 2 * c.max_num_seqs * fp.vocab * 4


def load_bytes(fp: Footprint, dtype: torch.dtype) -> int:
    """Loading reads one expert or one tensor at a time; a source that draws its weights on the device holds
    the largest (an expert's w13 and w2, or the embedding) in float32 beside its cast copy. No step runs
    while a store loads, so this shares the work space."""
    return fp.largest_load * (4 + dtype.itemsize)


def block_bytes(c: EngineConfig, fp: Footprint, dtype: torch.dtype) -> int:
    return BlockPool.block_bytes(c.block_size, fp.layers, fp.kv_heads, fp.head_dim, dtype)


@dataclass(frozen=True)
class Placement:
    """An instance's device bytes under a memory limit, part by part."""

    offload: frozenset[int]  # MoE layers whose banks wait in host memory
    kv: int  # the KV pool, with its scratch block
    work: int  # a step's activations or loading's largest draw, whichever is larger (and slack on CUDA)
    rows: int  # the resident variants' non-expert weights
    banks: int  # the resident banks and the staging bank

    @property
    def total(self) -> int:
        return self.kv + self.work + self.rows + self.banks


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def place(
    limit: int | None,
    c: EngineConfig,
    fp: Footprint,
    dtype: torch.dtype,
    device: torch.device,
    rows: int,
    slots: list[int],
    blocks: int,
    row_bytes: int,
    slot_bytes: int,
    kv_elsewhere: bool = False,
) -> Placement:
    """The placement of a store in `limit` bytes (what is left of the memory limit; None: no limit, every bank
    on the device): KV (`blocks` and a scratch block), work space and `rows` resident rows of `row_bytes`
    first, then as many MoE layers' banks (`slots` per layer, `slot_bytes` each) as fit beside one staging
    bank for the rest (`kv_elsewhere`: the KV blocks live in the engine's elastic pool, counted there).
    Raises MoeshareError, before anything is allocated, when not even one layer fits."""
    if blocks < 1:
        raise MoeshareError(f"the KV pool needs at least one block, got {blocks}")
    kv = 0 if kv_elsewhere else block_bytes(c, fp, dtype) * (blocks + 1)  # elastic: the engine's pool
    work = max(work_bytes(c, fp, dtype), load_bytes(fp, dtype))
    work += CUDA_ALLOCATOR_SLACK if device.type == "cuda" else 0
    fixed = kv + work + rows * row_bytes
    if limit is None:
        return Placement(frozenset(), kv, work, rows * row_bytes, sum(slots) * slot_bytes)
    for n in range(len(slots) + 1):
        offload = range(len(slots) - n, len(slots))
        staging = max((slots[i] for i in offload), default=0) * slot_bytes
        resident = sum(slots[: len(slots) - n]) * slot_bytes
        if fixed + resident + staging <= limit:
            return Placement(frozenset(offload), kv, work, rows * row_bytes, resident + staging)
    staged = max(slots, default=0) * slot_bytes
    need = math.ceil((fixed + staged) / GIB * 100) / 100
    raise MoeshareError(
        f"the memory limit leaves {_gib(limit)}, which cannot hold {rows} resident variant row(s) "
        f"({_gib(rows * row_bytes)}), {blocks} KV blocks ({_gib(kv)}), work space ({_gib(work)}) and one "
        f"staged MoE layer ({_gib(staged)}), {need:.2f} GiB in all: raise the limit, or lower --kv-blocks / "
        "--max-resident-variants"
    )


def out_of_memory(store: object, placement: Placement, limit: int | None, reason: str) -> str:
    """The one-line error for a device allocation that failed while `store` loaded."""
    if limit is None:
        fix = (
            "give --memory-limit to keep the MoE layers that do not fit in host memory, or lower --kv-blocks"
        )
    else:
        fix = (
            f"{_gib(placement.total)} were placed in the {_gib(limit)} the memory limit left; lower "
            "--memory-limit or --kv-blocks (or another process holds device memory)"
        )
    return f"{store}: out of device memory while loading ({reason}): {fix}"


def default_blocks(
    c: EngineConfig, fp: Footprint, dtype: torch.dtype, device: torch.device, limit: int | None
) -> int:
    """512 on CPU; on CUDA, kv_memory_fraction of the free memory (or of `limit`, what is left of the memory
    limit, if lower)."""
    if device.type != "cuda":
        return 512
    free, _ = torch.cuda.mem_get_info(device)
    if limit is not None:
        free = min(free, limit)
    budget = int(free * c.kv_memory_fraction)
    return max(1, BlockPool.blocks_that_fit(budget, c.block_size, fp.layers, fp.kv_heads, fp.head_dim, dtype))
