"""Where a store's weights go under a device memory limit: the MoE layers' banks that do not fit wait in host
memory (the last layers first) and are copied in per step; the KV pool's default size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeshare.engine.models.mixtral import MixtralDims
from moeshare.errors import MoeshareError
from moeshare.memory.pool import PagePool

if TYPE_CHECKING:
    from moeshare.engine.engine import EngineConfig

GIB = 2**30


def work_bytes(c: EngineConfig, dims: MixtralDims, dtype: torch.dtype) -> int:
    """Room for one step's activations at the largest batch, and the logits of the largest decode."""
    per_token = dims.top_k * 3 * dims.intermediate + 8 * dims.hidden + dims.vocab
    return c.max_batched_tokens * per_token * dtype.itemsize + 2 * c.max_num_seqs * dims.vocab * 4


def block_bytes(c: EngineConfig, dims: MixtralDims, dtype: torch.dtype) -> int:
    return PagePool.block_bytes(c.block_size, dims.layers, dims.kv_heads, dims.head_dim, dtype)


def offload_layers(
    limit: int | None,
    c: EngineConfig,
    dims: MixtralDims,
    dtype: torch.dtype,
    rows: int,
    slots: list[int],
    blocks: int,
    row_bytes: int,
    slot_bytes: int,
) -> tuple[frozenset[int], int]:
    """The MoE layers whose banks must wait in host memory for the store to fit `limit` bytes (what is left
    of the memory limit; None: no limit): the last ones first, until resident rows + resident banks + one
    staging bank + KV (and its scratch block) + work space fit; `row_bytes` is one variant's non-expert
    weights, `slot_bytes` one expert. Also returns the bytes the store takes."""
    if limit is None:
        return frozenset(), 0
    fixed = rows * row_bytes + block_bytes(c, dims, dtype) * (blocks + 1) + work_bytes(c, dims, dtype)
    for n in range(len(slots) + 1):
        offload = range(len(slots) - n, len(slots))
        staging = max((slots[i] for i in offload), default=0) * slot_bytes
        resident = sum(slots[: len(slots) - n]) * slot_bytes
        if fixed + resident + staging <= limit:
            return frozenset(offload), fixed + resident + staging
    need = fixed + max(slots, default=0) * slot_bytes
    raise MoeshareError(
        f"the memory limit leaves {limit / GIB:.2f} GiB, which cannot hold {rows} resident variant row(s), "
        f"{blocks} KV blocks and one staged layer ({need / GIB:.2f} GiB): raise the limit or lower "
        "--kv-blocks / --max-resident-variants"
    )


def default_blocks(c: EngineConfig, dims: MixtralDims, dtype: torch.dtype, device: torch.device) -> int:
    """512 on CPU; on CUDA, kv_memory_fraction of the free memory (or of the memory limit, if lower)."""
    if device.type != "cuda":
        return 512
    free, _ = torch.cuda.mem_get_info(device)
    if c.memory_limit_bytes is not None:
        free = min(free, c.memory_limit_bytes)
    budget = int(free * c.kv_memory_fraction)
    return max(
        1, PagePool.blocks_that_fit(budget, c.block_size, dims.layers, dims.kv_heads, dims.head_dim, dtype)
    )
