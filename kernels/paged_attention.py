"""Triton attention of new tokens over a paged KV cache: decode, prefill and mixed batches in one kernel.

The new tokens of each sequence are cut into chunks of BLOCK_Q tokens. A program takes one chunk and one KV
head; its rows are (token, query head) pairs of the chunk and that head's GQA group, so each K/V tile is
read once for the whole group. Keys are gathered BLOCK_N at a time through the block table, with an
online softmax in fp32 (flash attention over the pages). Prefill therefore runs in Triton too: a
sequence's queries form several chunks, each masked causally against the cached context.

Each program finds its sequence from query_start itself (a torch chunk table took ~10 small launches, more
than a small decode's attention), and the grid (chunks, kv heads, splits) depends only on T, the number of
sequences, the heads and the block table's width, so decode is graph-capturable; the context length only
bounds the loop. With few programs (small decode batches) the keys of a chunk are split into a fixed number
of parts whose partial softmax states are merged by a second kernel (flash decoding).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .grouped_gemm import INTERPRET
from .paged_attention_ref import PositionBias

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    block_m: int  # rows of a program: BLOCK_Q tokens times the GQA group padded to a power of two
    block_n: int  # keys per step
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class Tuned:
    """One GPU's choices: decode tiles for few and for many sequences, and the most key splits."""

    decode: AttnConfig
    decode_many: AttnConfig  # from MANY sequences up
    max_splits: int


MANY = 64
# the fastest of a sweep per GPU (scripts/check_kernels_gpu.py --tune: 8 kv heads, head_dim 128, pages of 16);
# the H100's serve any GPU not listed
TUNED = {
    "H100": Tuned(AttnConfig(16, 128, 4, 3), AttnConfig(16, 128, 4, 3), 16),
    "H200": Tuned(AttnConfig(16, 128, 4, 3), AttnConfig(16, 64, 4, 4), 8),
}


@functools.cache
def tuned(device: torch.device) -> Tuned:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((t for key, t in TUNED.items() if key in name), TUNED["H100"])


def attn_config(decode: bool, num_seqs: int, device: torch.device) -> AttnConfig:
    """Tiles for decode (by how many sequences) and prefill on this device."""
    if not decode:
        return AttnConfig(64, 64)
    t = tuned(device)
    return t.decode_many if num_seqs >= MANY else t.decode


@triton.jit
def _find_chunk(chunk, query_start_ptr, num_seqs, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    """The sequence of a chunk (num_seqs or more: a spare chunk), the chunk's index in it, its query range."""
    s = tl.arange(0, BLOCK_S)
    lo = tl.load(query_start_ptr + s, mask=s < num_seqs, other=0)
    q_len = tl.load(query_start_ptr + s + 1, mask=s < num_seqs, other=0) - lo
    n_chunks = (q_len + BLOCK_Q - 1) // BLOCK_Q
    end = tl.cumsum(n_chunks, axis=0)
    seq = tl.sum((end <= chunk).to(tl.int32), axis=0)
    mine = s == seq
    return (
        seq,
        chunk - tl.sum(tl.where(mine, end - n_chunks, 0)),
        tl.sum(tl.where(mine, lo, 0)),
        tl.sum(tl.where(mine, q_len, 0)),
    )


@triton.jit
def _chunk_rows(seq, ci, q_lo, q_len, kvh, context_lens_ptr,
                GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                CAUSAL: tl.constexpr = True):  # fmt: skip
    """The rows of one (chunk, kv head) program: token, query head, position and whether the row is real."""
    ctx = tl.load(context_lens_ptr + seq)
    r = tl.arange(0, BLOCK_M)
    qi = ci * BLOCK_Q + r // GROUP_PAD
    hg = r % GROUP_PAD
    row_ok = (qi < q_len) & (hg < GROUP)
    pos = ctx - q_len + qi  # each row's query sees the keys 0..pos
    kv_end = tl.minimum(ctx, ctx - q_len + ci * BLOCK_Q + BLOCK_Q) if CAUSAL else ctx
    return q_lo + qi, kvh * GROUP + hg, pos, row_ok, kv_end


@triton.jit
def _t5_bias(n, pos, head, row_ok, bias_ptr, stride_bb, stride_bh, inv_log_ratio,
             BIDIRECTIONAL: tl.constexpr, NUM_BUCKETS: tl.constexpr):  # fmt: skip
    """T5's relative position bias of each (query row, key) pair [BLOCK_M, BLOCK_N], float32; inv_log_ratio:
    1 / log(max_distance / exact buckets)."""
    rel = n[None, :] - pos[:, None]
    if BIDIRECTIONAL:
        half: tl.constexpr = NUM_BUCKETS // 2
        bucket = (rel > 0).to(tl.int32) * half
        dist = tl.abs(rel)
    else:
        half: tl.constexpr = NUM_BUCKETS
        bucket = tl.zeros_like(rel)
        dist = tl.maximum(-rel, 0)
    exact: tl.constexpr = half // 2
    scaled = tl.log(tl.maximum(dist, 1).to(tl.float32) / exact) * inv_log_ratio
    large = tl.minimum(exact + (scaled * (half - exact)).to(tl.int32), half - 1)
    bucket += tl.where(dist < exact, dist, large)
    ptrs = bias_ptr + bucket * stride_bb + head[:, None] * stride_bh
    return tl.load(ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)


# num_seqs and the block tables' width change every step: not specialized on (see grouped_gemm.py's note);
# BLOCK_S and SPLITS take powers of two only, so the kernels compile for a handful of values (warm_up).
@triton.jit(do_not_specialize=["num_seqs", "stride_bts"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    block_tables_ptr, context_lens_ptr, query_start_ptr, num_seqs, num_kv_heads, qk_scale,
    bias_ptr, bias_rows_ptr, stride_br, stride_bb, stride_bh, inv_log_ratio,
    stride_qt, stride_qh, stride_qd,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_vn, stride_vb, stride_vh, stride_vd,
    stride_bts, stride_btb,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    CAUSAL: tl.constexpr = True, BIAS: tl.constexpr = 0, NUM_BUCKETS: tl.constexpr = 32,
    PER_ROW: tl.constexpr = False,
):  # fmt: skip
    # BIAS: 0 none, 1 T5's relative position bias over past keys only, 2 over both sides
    chunk = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq, ci, q_lo, q_len = _find_chunk(chunk, query_start_ptr, num_seqs, BLOCK_Q, BLOCK_S)
    if seq >= num_seqs:
        return
    tok, head, pos, row_ok, kv_end = _chunk_rows(
        seq, ci, q_lo, q_len, kvh, context_lens_ptr, GROUP, GROUP_PAD, BLOCK_Q, BLOCK_M, CAUSAL
    )
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_ptrs = (
        q_ptr + tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(n_tiles, SPLITS)
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)
    # A finite floor keeps rows with no visible key in this split at exp2(0) rescaling instead of NaN.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < kv_end
        page = tl.load(block_tables_ptr + seq * stride_bts + (n // PAGE) * stride_btb, mask=n_ok, other=0)
        page = page.to(tl.int64)
        slot = n % PAGE
        k_ptrs = k_ptr + page[None, :] * stride_kn + slot[None, :] * stride_kb + kvh * stride_kh
        k = tl.load(k_ptrs + d[:, None] * stride_kd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v_ptrs = v_ptr + page[:, None] * stride_vn + slot[:, None] * stride_vb + kvh * stride_vh
        v = tl.load(v_ptrs + d[None, :] * stride_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if BIAS > 0:
            table = bias_ptr  # the sequence's own table: one per variant with PER_ROW
            if PER_ROW:
                table += tl.load(bias_rows_ptr + seq).to(tl.int64) * stride_br
            t5 = _t5_bias(
                n, pos, head, row_ok, table, stride_bb, stride_bh, inv_log_ratio, BIAS == 2, NUM_BUCKETS
            )
            s += t5 * 1.4426950408889634  # log2 units, as s
        if CAUSAL:
            s = tl.where((n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
        else:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(o_ptrs + d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
    else:
        part = ((chunk * num_kv_heads + kvh) * SPLITS + split) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(part_m_ptr + part, m_i)
        tl.store(part_l_ptr + part, l_i)
        tl.store(part_acc_ptr + part.to(tl.int64)[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit(do_not_specialize=["num_seqs"])
def _merge_splits_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    context_lens_ptr, query_start_ptr, num_seqs, num_kv_heads, stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    kvh = tl.program_id(1)
    seq, ci, q_lo, q_len = _find_chunk(chunk, query_start_ptr, num_seqs, BLOCK_Q, BLOCK_S)
    if seq >= num_seqs:
        return
    tok, head, _, row_ok, _ = _chunk_rows(
        seq, ci, q_lo, q_len, kvh, context_lens_ptr, GROUP, GROUP_PAD, BLOCK_Q, BLOCK_M
    )
    d = tl.arange(0, BLOCK_D)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for split in range(SPLITS):
        part = ((chunk * num_kv_heads + kvh) * SPLITS + split) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_s = tl.load(part_m_ptr + part)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + tl.load(part_l_ptr + part) * beta
        acc_s = tl.load(part_acc_ptr + part.to(tl.int64)[:, None] * BLOCK_D + d[None, :])
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = (
        out_ptr + tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _pick(
    num_tokens: int,
    num_seqs: int,
    width: int,
    page: int,
    num_kv_heads: int,
    group_pad: int,
    device: torch.device,
    num_splits: int | None = None,
    config: AttnConfig | None = None,
) -> tuple[AttnConfig, int, int]:
    """A call's tiles, programs per kv head for its query chunks, and key splits (width: its block tables')."""
    cfg = config or attn_config(num_tokens <= 2 * num_seqs, num_seqs, device)
    block_q = max(cfg.block_m, group_pad) // group_pad
    # bounds sum_b cdiv(q_len_b, block_q) over any split of T tokens into nseq sequences; nseq for decode
    chunks = (num_tokens + num_seqs * (block_q - 1)) // block_q
    if num_splits is None:
        max_tiles = triton.cdiv(width * page, cfg.block_n)
        most = tuned(device).max_splits
        num_splits = max(1, min(most, _num_sms(device) // (chunks * num_kv_heads), max_tiles // 2))
        num_splits = 1 << (num_splits.bit_length() - 1)  # a power of two: fewer compiled variants
    return cfg, chunks, num_splits


def variants(max_seqs: int, num_kv_heads: int, device: torch.device) -> list[tuple[int, bool, int]]:
    """What warm_up compiles: (sequences, decode tiles, key splits) for each BLOCK_S bucket's fewest sequences
    (where most splits fit) and the decode tiles' switch at MANY, each with every power-of-two split up to the
    most a call of that many sequences can pick."""
    most, sms = tuned(device).max_splits, _num_sms(device)
    out = []
    for n in sorted({1, 17, 33, MANY - 1, MANY, 65, 129, 257}):
        if n <= max_seqs:
            for decode in (True, False):
                top = max(1, min(most, sms // (n * num_kv_heads)))
                out += [(n, decode, 1 << i) for i in range(top.bit_length())]
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: AttnConfig | None = None,
    *,
    causal: bool = True,
    bias: PositionBias | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys and values (see the reference;
    `causal` False: over all of them, `bias`: T5's relative position bias).

    q [T, Hq, D]; k_cache, v_cache [N, B, Hkv, D] (any strides); block_tables [nseq, max_blocks];
    context_lens [nseq]; query_start [nseq + 1] -> [T, Hq, D]. num_splits: key splits per chunk (default:
    enough programs to fill the GPU); config: tile sizes (default by decode or prefill).
    """
    num_tokens, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = context_lens.numel()
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    width = block_tables.shape[1]
    cfg, chunks, num_splits = _pick(
        num_tokens, num_seqs, width, page, num_kv_heads, group_pad, q.device, num_splits, config
    )
    block_m = max(cfg.block_m, group_pad)
    block_q, block_n = block_m // group_pad, cfg.block_n
    block_d = max(16, triton.next_power_of_2(head_dim))
    part_m = part_l = part_acc = out  # unused when there is one split
    if num_splits > 1:
        rows = chunks * num_kv_heads * num_splits * block_m
        part_m = torch.empty(rows, dtype=torch.float32, device=q.device)  # [chunks, Hkv, splits, BLOCK_M]
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(rows, block_d, dtype=torch.float32, device=q.device)  # [..., BLOCK_D]
    common = dict(
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_S=max(16, triton.next_power_of_2(num_seqs)),
    )
    if bias is not None:
        per_row = bias.rows is not None
        position = dict(BIAS=2 if bias.bidirectional else 1, NUM_BUCKETS=bias.buckets, PER_ROW=per_row)
        table, inv_log_ratio = bias.table, 1.0 / math.log(bias.max_distance / bias.exact)
        rows = bias.rows if per_row else context_lens
        strides = (table.stride(0) if per_row else 0, table.stride(-2), table.stride(-1))
    else:
        position, table, inv_log_ratio, rows, strides = dict(BIAS=0), out, 1.0, context_lens, (0, 0, 0)
    _paged_attention_kernel[(chunks, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_m, part_l, part_acc,
        block_tables, context_lens, query_start, num_seqs, num_kv_heads, scale * _LOG2E,
        table, rows, *strides, inv_log_ratio,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        **common, BLOCK_N=block_n, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page, SPLITS=num_splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        CAUSAL=causal, **position, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(chunks, num_kv_heads)](
            out, part_m, part_l, part_acc, context_lens, query_start, num_seqs, num_kv_heads, *out.stride(),
            **common, HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=num_splits,
        )  # fmt: skip
    return out


def warm_up(
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
    """Compile now every variant of the kernels that paged_attention can pick for up to max_seqs sequences
    with q's heads, dtype and strides over these caches (decode and prefill tiles, each BLOCK_S bucket, each
    number of key splits the GPU's size allows it), so none compiles under traffic, stalling every running
    request for a second or two. Every sequence reads key block `block` only. Returns the launches."""
    dev, (heads, dim), page = q.device, q.shape[1:], k_cache.shape[1]
    launches = 0
    for n, decode, splits in variants(max_seqs, k_cache.shape[2], dev):
        lens = [1] * n if decode else [n + 2] + [1] * (n - 1)  # prefill tiles: more tokens than 2 n
        starts = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
        width = triton.cdiv(lens[0], page) + 1
        tables = torch.full((n, width), block, dtype=torch.int32, device=dev)
        contexts = torch.full((n,), width * page, dtype=torch.int32, device=dev)
        x = torch.empty_strided((sum(lens), heads, dim), q.stride(), dtype=q.dtype, device=dev).zero_()
        per_seq = bias if bias is None or bias.rows is None else replace(bias, rows=bias.rows.new_zeros(n))
        paged_attention(
            x, k_cache, v_cache, tables, contexts, starts, scale, splits, causal=causal, bias=per_seq
        )
        launches += 1
    return launches
