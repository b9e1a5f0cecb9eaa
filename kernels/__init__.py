"""The engine's kernels: Triton on CUDA tensors, the pure-torch references on CPU tensors.

MOESHARE_TRITON_INTERPRET_TEST=1 sends CPU tensors to the Triton kernels too (with TRITON_INTERPRET=1 set
before this package is imported, that is how CI checks them without a GPU).
"""

from __future__ import annotations

import os

import torch

from .activation_ref import silu_mul_ref
from .greedy_ref import greedy_pick_ref
from .grouped_gemm_ref import fused_moe_ref, fused_moe_relu_ref, grouped_linear_ref
from .norm_rope_ref import add_rms_norm_ref, rotary_ref, rotary_store_ref
from .paged_attention_ref import PositionBias, paged_attention_ref, relative_buckets
from .router_ref import route_ref

try:
    from . import activation as _act
    from . import greedy as _greedy
    from . import grouped_gemm as _gemm
    from . import norm_rope as _norm_rope
    from . import paged_attention as _attn
    from . import router as _router
except ImportError:  # no Triton on this platform: the references serve everything
    _gemm = _attn = _norm_rope = _act = _greedy = _router = None

_FORCE_TRITON = os.environ.get("MOESHARE_TRITON_INTERPRET_TEST") == "1"


def _triton(x: torch.Tensor) -> bool:
    return _gemm is not None and (x.is_cuda or _FORCE_TRITON)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t] @ w[group[t]].T  —  x [T, K], w [G, N, K], group [T] -> [T, N]."""
    return _gemm.grouped_linear(x, w, group) if _triton(x) else grouped_linear_ref(x, w, group)


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Mixtral experts over the bank — x [T, H], w13 [S, 2I, H], w2 [S, H, I], slots, weights [T, k] -> [T, H]."""
    if _triton(x):
        return _gemm.fused_moe(x, w13, w2, slots, weights)
    return fused_moe_ref(x, w13, w2, slots, weights)


def fused_moe_relu(
    x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Switch experts over the bank — x [T, D], wi [S, F, D], wo [S, D, F], slots, weights [T, k] -> [T, D]."""
    if _triton(x):
        return _gemm.fused_moe_relu(x, wi, wo, slots, weights)
    return fused_moe_relu_ref(x, wi, wo, slots, weights)


def paged_attention(
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
    """Causal attention of new tokens over a paged KV cache — q [T, Hq, D], caches [N, B, Hkv, D] -> [T, Hq, D]
    (`causal` False: over every cached key; `bias`: T5's relative position bias)."""
    args = (q, k_cache, v_cache, block_tables, context_lens, query_start, scale)
    if _triton(q):
        return _attn.paged_attention(*args, causal=causal, bias=bias)
    return paged_attention_ref(*args, causal=causal, bias=bias)


def warm_up_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    max_seqs: int,
    block: int,
    *,
    causal: bool = True,
    bias: PositionBias | None = None,
) -> int:
    """Compile every variant of the attention kernels paged_attention may pick for calls like this one, up to
    max_seqs sequences (each reading key block `block`); nothing to do for the reference. Returns launches."""
    if not _triton(q):
        return 0
    return _attn.warm_up(q, k_cache, v_cache, scale, max_seqs, block, causal=causal, bias=bias)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, rows: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + per-variant RMSNorm — h, delta [T, H] (delta may be None), weight [R, H], rows [T].

    Returns (h + delta, weight[rows] * rms_normalize(h + delta)); h itself when delta is None.
    """
    args = (h, delta, weight, rows, eps)
    return _norm_rope.add_rms_norm(*args) if _triton(h) else add_rms_norm_ref(*args)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding — q [T, Hq, D], k [T, Hkv, D] (views allowed), positions [T] -> new q, k."""
    args = (q, k, positions, inv_freq)
    return _norm_rope.rotary(*args) if _triton(q) else rotary_ref(*args)


def rotary_store(
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
    """`rotary`, with the new k and v [T, Hkv, D] stored in k_cache / v_cache [N, B, Hkv, D] at
    (block_of[t], offset_of[t]) by the same launch -> rotated q [T, Hq, D]."""
    args = (q, k, v, positions, inv_freq, k_cache, v_cache, block_of, offset_of)
    return _norm_rope.rotary_store(*args) if _triton(q) else rotary_store_ref(*args)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Gated MLP activation — gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I], rounded as torch does."""
    return _act.silu_mul(gate_up) if _triton(gate_up) else silu_mul_ref(gate_up)


def route(
    logits: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, top_k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing — router logits [T, E], rows [T], table [R, E] -> (bank slots [T, k], weights [T, k] in
    `dtype`): softmax, top-k, renormalized, each local expert through its row's table."""
    args = (logits, rows, table, top_k, dtype)
    return _router.route(*args) if _triton(logits) else route_ref(*args)


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy sampling — logits [B, V] in any float dtype -> (argmax [B] int64, its log-probability [B] fp32)."""
    return _greedy.greedy_pick(logits) if _triton(logits) else greedy_pick_ref(logits)


__all__ = [
    "PositionBias",
    "add_rms_norm",
    "add_rms_norm_ref",
    "fused_moe",
    "fused_moe_ref",
    "fused_moe_relu",
    "fused_moe_relu_ref",
    "greedy_pick",
    "greedy_pick_ref",
    "route",
    "route_ref",
    "grouped_linear",
    "grouped_linear_ref",
    "paged_attention",
    "paged_attention_ref",
    "relative_buckets",
    "rotary",
    "rotary_ref",
    "rotary_store",
    "rotary_store_ref",
    "silu_mul",
    "silu_mul_ref",
]
