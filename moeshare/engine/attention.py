"""Per-step attention metadata: where each new token's K/V goes and which blocks each sequence reads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moeshare.engine import ops


class AttentionCalls:
    """The kinds of attention call a model makes (heads, strides, dtype, caches, options), one example of each,
    recorded while `record` is active: what a warm-up compiles the kernels for (ops.warm_up_attention)."""

    active: AttentionCalls | None = None

    def __init__(self) -> None:
        self.calls: dict[tuple, tuple] = {}

    def add(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, how: dict):
        bias = how.get("bias")
        kind = None if bias is None else (bias.bidirectional, bias.rows is None, bias.table.shape)
        key = (
            q.shape[1:],
            q.stride(),
            q.dtype,
            k_cache.shape,
            k_cache.stride(),
            how.get("causal", True),
            kind,
        )
        self.calls.setdefault(key, (q, k_cache, v_cache, scale, how))

    @contextmanager
    def record(self) -> Iterator[AttentionCalls]:
        AttentionCalls.active = self
        try:
            yield self
        finally:
            AttentionCalls.active = None

    def warm_up(self, max_seqs: int, block: int) -> int:
        """Compile every kernel variant each recorded kind of call can pick (block: the pool's scratch block)."""
        return sum(
            ops.warm_up_attention(q, k, v, scale, max_seqs, block, **how)
            for q, k, v, scale, how in self.calls.values()
        )


@dataclass
class AttnBatch:
    block_of: torch.Tensor  # [T] cache block of each new token
    offset_of: torch.Tensor  # [T] position inside that block
    block_tables: torch.Tensor  # [nseq, max_blocks] int32
    context_lens: torch.Tensor  # [nseq] tokens cached after this step, new ones included
    query_start: torch.Tensor  # [nseq + 1] where each sequence's new tokens start in the step

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float, **how
    ) -> torch.Tensor:
        """`how`: the kernel's causal / bias options (an encoder's, or cross-attention)."""
        if AttentionCalls.active is not None:
            AttentionCalls.active.add(q, k_cache, v_cache, scale, how)
        return ops.paged_attention(
            q, k_cache, v_cache, self.block_tables, self.context_lens, self.query_start, scale, **how
        )

    def self_attention(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        kv: torch.Tensor,
        layer: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
    ) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) D] -> attention output [T, Hq D]: RoPE on q and k, the new K/V stored in
        `layer` of the KV block pool kv [N, L, 2, B, Hkv, D] (one launch for both), then paged attention over
        each sequence's blocks."""
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k, v = q.view(-1, heads, head_dim), k.view(-1, kv_heads, head_dim), v.view(-1, kv_heads, head_dim)
        k_cache, v_cache = kv[:, layer, 0], kv[:, layer, 1]  # [N, B, Hkv, D] strided views
        q = ops.rotary_store(q, k, v, positions, inv_freq, k_cache, v_cache, self.block_of, self.offset_of)
        o = self.attend(q, k_cache, v_cache, head_dim**-0.5)  # [T, Hq, D]
        return o.reshape(-1, heads * head_dim)

    @classmethod
    def over(
        cls,
        tables: list[list[int]],
        contexts: list[int],
        counts: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttnBatch:
        """Queries (counts[b] of sequence b) over a context of fixed length that they add nothing to: contexts[b]
        tokens in tables[b] (an encoder-decoder's cross-attention)."""
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        query_start = [0]
        for n in counts:
            query_start.append(query_start[-1] + n)
        none = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(
            none,
            none,
            torch.tensor(padded, dtype=torch.int32, device=device),
            torch.tensor(contexts, dtype=torch.int32, device=device),
            torch.tensor(query_start, dtype=torch.int32, device=device),
        )

    @classmethod
    def build(
        cls,
        tables: list[list[int]],
        starts: list[int],
        counts: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttnBatch:
        """tables[b]: sequence b's blocks; starts[b]: tokens already cached; counts[b]: new tokens this step."""
        block_of, offset_of = [], []
        for table, start, n in zip(tables, starts, counts, strict=True):
            for pos in range(start, start + n):
                block_of.append(table[pos // block_size])
                offset_of.append(pos % block_size)
        contexts = [s + n for s, n in zip(starts, counts, strict=True)]
        batch = cls.over(tables, contexts, counts, block_size, device)
        batch.block_of = torch.tensor(block_of, dtype=torch.int64, device=device)
        batch.offset_of = torch.tensor(offset_of, dtype=torch.int64, device=device)
        return batch
