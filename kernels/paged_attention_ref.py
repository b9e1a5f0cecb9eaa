"""Pure-torch reference of attention over a paged KV cache (prefill and decode alike)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PositionBias:
    """T5's learned relative position bias: `table` [buckets, Hq], indexed by the bucket of key position minus
    query position (both halves of the buckets by sign when `bidirectional`, else only the past); or one table
    per variant [R, buckets, Hq] with `rows` [nseq] the table of each sequence."""

    table: torch.Tensor
    bidirectional: bool
    max_distance: int = 128
    rows: torch.Tensor | None = None

    @property
    def buckets(self) -> int:
        return self.table.shape[-2]

    @property
    def exact(self) -> int:
        """Buckets of one distance each (the rest log-spaced up to max_distance), per side."""
        return (self.buckets // 2 if self.bidirectional else self.buckets) // 2

    def of(self, seq: int) -> torch.Tensor:
        """Sequence `seq`'s table [buckets, Hq]."""
        return self.table if self.rows is None else self.table[int(self.rows[seq])]

    def __post_init__(self) -> None:
        if (self.table.dim() == 3) != (self.rows is not None):
            raise ValueError(
                "a table per variant [R, buckets, Hq] goes with rows, one table [buckets, Hq] without"
            )
        if self.max_distance <= self.exact:
            raise ValueError(f"max_distance {self.max_distance} must exceed the {self.exact} exact buckets")


def relative_buckets(
    relative: torch.Tensor, bidirectional: bool, buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (key - query): exact for small distances, log-spaced beyond."""
    out = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        out += (relative > 0).long() * buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    exact = buckets // 2
    small = relative < exact
    large = (
        exact
        + (torch.log(relative.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).long()
    )
    large = torch.clamp(large, max=buckets - 1)
    return out + torch.where(small, relative, large)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
    *,
    causal: bool = True,
    bias: PositionBias | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys and values (with `causal` False,
    over all of them: an encoder, or cross-attention; `bias` adds T5's relative position bias).

    q [T, Hq, D]: the new tokens of all sequences, sequence b's at rows query_start[b]:query_start[b + 1];
    k_cache, v_cache [N, B, Hkv, D]: blocks of B tokens; block_tables [nseq, max_blocks]; context_lens [nseq]:
    tokens in the cache for each sequence, its new ones included (they are the last ones). -> [T, Hq, D]
    """
    out = torch.empty_like(q)
    n_heads, n_kv = q.shape[1], k_cache.shape[2]
    block = k_cache.shape[1]
    for b in range(len(context_lens)):
        lo, hi = int(query_start[b]), int(query_start[b + 1])
        if hi == lo:
            continue
        ctx = int(context_lens[b])
        blocks = block_tables[b, : -(-ctx // block)]
        k = k_cache[blocks].reshape(-1, n_kv, k_cache.shape[-1])[:ctx]  # [ctx, Hkv, D]
        v = v_cache[blocks].reshape(-1, n_kv, v_cache.shape[-1])[:ctx]
        k = k.repeat_interleave(n_heads // n_kv, dim=1).float()
        v = v.repeat_interleave(n_heads // n_kv, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * scale  # [Hq, nq, ctx]
        q_pos = torch.arange(ctx - (hi - lo), ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        if bias is not None:
            rel = k_pos[None, :] - q_pos[:, None]
            buckets = relative_buckets(rel, bias.bidirectional, bias.buckets, bias.max_distance)
            scores = scores + bias.of(b)[buckets].permute(2, 0, 1).float()
        if causal:
            scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
