"""Triton kernels for the elementwise parts of a layer: residual add + RMSNorm, and the rotary embedding.

At decode sizes these ops are launch bound: torch spends ~7 launches on an RMSNorm and ~10 on the rotary
embedding, more time than the weights of the GEMMs between them. Each is one launch here.

add_rms_norm: one program per token row holds the whole row (H up to 8192) in registers; the residual sum
is rounded to h's dtype before it is normalized, as torch's `h + delta` is. rotary: q and k in one launch,
programs over (token, block of heads), the heads numbered q first then k; q and k may be strided views
(of a fused qkv output) and come back as new contiguous tensors. rotary_store: the same rotation, and the
new k and v written straight into their KV-cache slots (v heads numbered after k's), in place of rotary
plus two index_put launches. No kernel syncs with the host or takes a shape from the data, so all can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    h_ptr, d_ptr, w_ptr, rows_ptr, h_out_ptr, x_ptr, H, eps,
    stride_h, stride_d, stride_w, stride_ho, stride_x,
    HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """h_out[t] = h[t] + d[t]; x[t] = w[rows[t]] * norm(h_out[t]) cast to h's dtype first."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    h = tl.load(h_ptr + t * stride_h + offs, mask=ok, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + t * stride_d + offs, mask=ok, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(h_out_ptr.dtype.element_ty)
        tl.store(h_out_ptr + t * stride_ho + offs, h, mask=ok)
    hf = h.to(tl.float32)
    r = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
    y = (hf * r).to(h.dtype).to(tl.float32)
    row = tl.load(rows_ptr + t).to(tl.int64)
    w = tl.load(w_ptr + row * stride_w + offs, mask=ok, other=0.0)
    tl.store(x_ptr + t * stride_x + offs, (y * w.to(tl.float32)).to(x_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(
    h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, rows: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [T, H], delta [T, H] or None, weight [R, H], rows [T] -> (h_out, x), both [T, H].

    h_out = h + delta in h's dtype (h itself when delta is None); x = weight[rows] * rms_normalize(h_out),
    the normalized row cast to h's dtype before the product, x in the promoted dtype of weight and h.
    """
    T, H = h.shape
    if h.stride(-1) != 1:
        h = h.contiguous()
    if delta is not None:
        assert delta.shape == h.shape and delta.dtype == h.dtype, (delta.shape, delta.dtype)
        if delta.stride(-1) != 1:
            delta = delta.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    x = torch.empty(T, H, dtype=torch.promote_types(weight.dtype, h.dtype), device=h.device)
    h_out = h if delta is None else torch.empty(T, H, dtype=h.dtype, device=h.device)
    if T == 0:
        return h_out, x
    d = h if delta is None else delta
    block_h = triton.next_power_of_2(H)
    _add_rms_norm_kernel[(T,)](
        h, d, weight, rows, h_out, x, H, eps,
        h.stride(0), d.stride(0), weight.stride(0), h_out.stride(0), x.stride(0),
        HAS_DELTA=delta is not None, BLOCK_H=block_h, num_warps=min(16, max(1, block_h // 512)),
    )  # fmt: skip
    return h_out, x


@triton.jit
def _rotate_half(x1, x2, pos, inv_freq_ptr, j, j_ok):
    """(x1 cos - x2 sin, x2 cos + x1 sin) in x1's dtype; x1, x2 [heads, HALF], j [HALF] frequency indices."""
    # the angle is the same fp32 product torch forms; cos / sin are rounded to the activations' dtype
    freq = pos.to(tl.float32) * tl.load(inv_freq_ptr + j, mask=j_ok, other=0.0)
    cos = tl.cos(freq).to(x1.dtype).to(tl.float32)[None, :]
    sin = tl.sin(freq).to(x1.dtype).to(tl.float32)[None, :]
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    return (a1 * cos - a2 * sin).to(x1.dtype), (a2 * cos + a1 * sin).to(x1.dtype)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr, q_out_ptr, k_out_ptr, Hq, Hkv,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate heads [pid1 * BLOCK_HEADS, +BLOCK_HEADS) of token pid0, numbering q's heads then k's."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    is_q = (head < Hq)[:, None] & j_ok[None, :]
    kh = head - Hq
    is_k = ((kh >= 0) & (kh < Hkv))[:, None] & j_ok[None, :]
    q_off = t * stride_qt + head.to(tl.int64)[:, None] * stride_qh + j[None, :] * stride_qd
    k_off = t * stride_kt + kh.to(tl.int64)[:, None] * stride_kh + j[None, :] * stride_kd
    q1 = tl.load(q_ptr + q_off, mask=is_q, other=0.0)
    q2 = tl.load(q_ptr + q_off + HALF * stride_qd, mask=is_q, other=0.0)
    k1 = tl.load(k_ptr + k_off, mask=is_k, other=0.0)
    k2 = tl.load(k_ptr + k_off + HALF * stride_kd, mask=is_k, other=0.0)
    x1 = tl.where(is_q, q1, k1)
    x2 = tl.where(is_q, q2, k2)
    o1, o2 = _rotate_half(x1, x2, tl.load(pos_ptr + t), inv_freq_ptr, j, j_ok)
    q_dst = q_out_ptr + t * Hq * 2 * HALF + head[:, None] * 2 * HALF + j[None, :]
    tl.store(q_dst, o1, mask=is_q)
    tl.store(q_dst + HALF, o2, mask=is_q)
    k_dst = k_out_ptr + t * Hkv * 2 * HALF + kh[:, None] * 2 * HALF + j[None, :]
    tl.store(k_dst, o1, mask=is_k)
    tl.store(k_dst + HALF, o2, mask=is_k)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, Hq, D] and k [T, Hkv, D] (any strides) in one launch.

    positions [T] int, inv_freq [D/2] fp32 -> new contiguous (q_out, k_out); cos / sin and the products in
    fp32, cos / sin rounded to q's dtype first as the reference does.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == (T, Hkv, D) and k.dtype == q.dtype and D % 2 == 0, (q.shape, k.shape)
    assert inv_freq.dtype == torch.float32 and inv_freq.numel() == D // 2
    q_out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(T, Hkv, D, dtype=k.dtype, device=k.device)
    if T == 0:
        return q_out, k_out
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_heads = min(triton.next_power_of_2(Hq + Hkv), max(1, 1024 // block_half))
    grid = (T, triton.cdiv(Hq + Hkv, block_heads))
    _rotary_kernel[grid](
        q, k, positions, inv_freq.contiguous(), q_out, k_out, Hq, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HALF=half, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


@triton.jit
def _rotary_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, block_ptr, offset_ptr,
    Hq, Hkv, stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cn, stride_cb, stride_ch, stride_cd,
    HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Heads [pid1 * BLOCK_HEADS, +BLOCK_HEADS) of token pid0, numbered q, k, v: rotate q into q_out, rotate
    k into k_cache and copy v into v_cache at (block_of[t], offset_of[t])."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    is_q = (head < Hq)[:, None] & j_ok[None, :]
    kh = head - Hq
    is_k = ((kh >= 0) & (kh < Hkv))[:, None] & j_ok[None, :]
    vh = kh - Hkv
    is_v = ((vh >= 0) & (vh < Hkv))[:, None] & j_ok[None, :]
    q_off = t * stride_qt + head.to(tl.int64)[:, None] * stride_qh + j[None, :] * stride_qd
    k_off = t * stride_kt + kh.to(tl.int64)[:, None] * stride_kh + j[None, :] * stride_kd
    v_off = t * stride_vt + vh.to(tl.int64)[:, None] * stride_vh + j[None, :] * stride_vd
    q1 = tl.load(q_ptr + q_off, mask=is_q, other=0.0)
    q2 = tl.load(q_ptr + q_off + HALF * stride_qd, mask=is_q, other=0.0)
    k1 = tl.load(k_ptr + k_off, mask=is_k, other=0.0)
    k2 = tl.load(k_ptr + k_off + HALF * stride_kd, mask=is_k, other=0.0)
    v1 = tl.load(v_ptr + v_off, mask=is_v, other=0.0)
    v2 = tl.load(v_ptr + v_off + HALF * stride_vd, mask=is_v, other=0.0)
    x1 = tl.where(is_q, q1, k1)
    x2 = tl.where(is_q, q2, k2)
    o1, o2 = _rotate_half(x1, x2, tl.load(pos_ptr + t), inv_freq_ptr, j, j_ok)
    q_dst = q_out_ptr + t * Hq * 2 * HALF + head[:, None] * 2 * HALF + j[None, :]
    tl.store(q_dst, o1, mask=is_q)
    tl.store(q_dst + HALF, o2, mask=is_q)
    slot = tl.load(block_ptr + t).to(tl.int64) * stride_cn + tl.load(offset_ptr + t).to(tl.int64) * stride_cb
    kv_h = tl.where(head < Hq + Hkv, kh, vh).to(tl.int64)
    cache_off = slot + kv_h[:, None] * stride_ch + j[None, :] * stride_cd
    tl.store(k_cache_ptr + cache_off, o1, mask=is_k)
    tl.store(k_cache_ptr + cache_off + HALF * stride_cd, o2, mask=is_k)
    tl.store(v_cache_ptr + cache_off, v1, mask=is_v)
    tl.store(v_cache_ptr + cache_off + HALF * stride_cd, v2, mask=is_v)


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
    """`rotary` of q [T, Hq, D] and k [T, Hkv, D], with the rotated k and v [T, Hkv, D] (any strides) written
    into k_cache / v_cache [N, B, Hkv, D] (strided views, the same strides) at (block_of[t], offset_of[t]),
    in one launch. Returns the rotated q [T, Hq, D], contiguous; bit for bit what rotary + index_put give.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == v.shape == (T, Hkv, D) and k.dtype == v.dtype == q.dtype and D % 2 == 0
    assert k_cache.shape[2:] == (Hkv, D) and k_cache.stride() == v_cache.stride(), k_cache.shape
    assert k_cache.dtype == v_cache.dtype == q.dtype, (k_cache.dtype, q.dtype)
    assert inv_freq.dtype == torch.float32 and inv_freq.numel() == D // 2
    q_out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_heads = min(triton.next_power_of_2(Hq + 2 * Hkv), max(1, 1024 // block_half))
    grid = (T, triton.cdiv(Hq + 2 * Hkv, block_heads))
    _rotary_store_kernel[grid](
        q, k, v, positions, inv_freq.contiguous(), q_out, k_cache, v_cache, block_of, offset_of, Hq, Hkv,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(),
        HALF=half, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half, num_warps=4,
    )  # fmt: skip
    return q_out
