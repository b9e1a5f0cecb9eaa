"""Pure-torch references for the fused residual-add + RMSNorm and the rotary embedding (the CPU engine runs these).

They define the semantics of the Triton kernels in norm_rope.py and match the engine's `rms_norm` / `rotate`
(and transformers' MixtralRMSNorm / apply_rotary_pos_emb) exactly for fp32.
"""

from __future__ import annotations

import torch


def add_rms_norm_ref(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, rows: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, H], delta [T, H] or None, weight [R, H], rows [T] -> (h_out, x), both [T, H].

    h_out = h + delta (h itself when delta is None), rounded to h's dtype as torch does;
    x = weight[rows] * (h_out.float() * rsqrt(mean(h_out.float()^2) + eps)).to(h.dtype), in the promoted dtype.
    """
    h_out = h if delta is None else h + delta
    y = h_out.float()
    y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
    return h_out, weight[rows] * y.to(h_out.dtype)


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding — q [T, Hq, D], k [T, Hkv, D], positions [T], inv_freq [D/2] fp32.

    cos / sin are computed in fp32 and cast to q's dtype; out = x * cos + cat(-x2, x1) * sin.
    """
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, D]
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    return rotate(q), rotate(k)


def rotary_store_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_of: torch.Tensor,
    offset_of: torch.Tensor,
) -> torch.Tensor:
    """rotary_ref of q and k; the rotated k and v [T, Hkv, D] stored into k_cache / v_cache [N, B, Hkv, D] at
    (block_of[t], offset_of[t]). Returns the rotated q [T, Hq, D], contiguous."""
    q, k = rotary_ref(q, k, positions, inv_freq)
    k_cache[block_of, offset_of] = k
    v_cache[block_of, offset_of] = v
    return q.contiguous()
