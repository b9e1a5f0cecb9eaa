"""Triton kernels for the elementwise parts of a layer: residual add + RMSNorm, and the rotary embedding.

At decode sizes these ops are launch bound: torch spends ~7 launches on an RMSNorm and ~10 on the rotary
embedding, more time than the weights of the GEMMs between them. Each is one launch here.

add_rms_norm: one program per token row holds the whole row (H up to 8192) in registers; the residual sum
is rounded to h's dtype before it is normalized, as torch's `h + delta` is. rotary: q and k in one launch,
programs over (token, block of heads), the heads numbered q first then k; q and k may be strided views
(of a fused qkv output) and come back as new contiguous tensors. Neither kernel syncs with the host or takes
a shape from the data, so both can be captured in a CUDA graph.
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
    x1 = tl.where(is_q, q1.to(tl.float32), k1.to(tl.float32))
    x2 = tl.where(is_q, q2.to(tl.float32), k2.to(tl.float32))
    # the angle is the same fp32 product torch forms; cos / sin are rounded to the activations' dtype
    freq = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + j, mask=j_ok, other=0.0)
    cos = tl.cos(freq).to(q1.dtype).to(tl.float32)[None, :]
    sin = tl.sin(freq).to(q1.dtype).to(tl.float32)[None, :]
    o1 = (x1 * cos - x2 * sin).to(q1.dtype)
    o2 = (x2 * cos + x1 * sin).to(q1.dtype)
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
