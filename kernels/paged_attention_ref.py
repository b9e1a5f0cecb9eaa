"""Pure-torch reference of attention over a paged KV cache (prefill and decode alike)."""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys and values.

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
        mask = torch.arange(ctx, device=q.device)[None, :] > q_pos[:, None]
        scores = scores.masked_fill(mask, float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
