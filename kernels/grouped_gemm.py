"""Triton grouped GEMM over stacked per-group weights, and the Mixtral fused MoE over the bank built on it.

Routing prep ("align"): rows (tokens for `grouped_linear`, (token, k) pairs for `fused_moe`) are sorted by
group and each group's run is padded to a multiple of BLOCK_M, so every M tile belongs to one group and
reads that group's weight tile once. The tile count is an upper bound that depends only on the row count
and the group count; tiles past the real ones exit at once. No shape, grid or host value depends on the
routing data, so a decode step can be captured in a CUDA graph. The align step is one single-program Triton
launch (`align_rows`; `align_rows_ref` is its fixed-shape torch reference): as ~25 small torch ops it cost
~40 us per call even inside a CUDA graph on an H100, more than a decode q_proj's whole weight read.

fused_moe: GEMM 1 is x @ w13[s].T with silu(gate) * up fused in its epilogue -> inter [T*k, I]; GEMM 2 is
inter @ w2[s].T scaled by the routing weight -> [T*k, H] in fp32, summed over k. Accumulation is fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 bits; upcast there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    # programs per tile along K, each summing its share of K into a float32 partial that one torch sum adds up
    # (more programs when a decode's tiles are too few to keep every SM streaming weights; not for GATED)
    split_k: int = 1


def gemm_config(rows_per_group: int, gated: bool = False, element_size: int = 2) -> GemmConfig:
    """Tile sizes by how many rows a group holds on average; small counts are decode, weight-bandwidth bound.

    From a sweep on an H100 (scripts/check_kernels_gpu.py --tune). Narrow N tiles for decode give enough
    programs to keep every SM streaming weights when only one or two groups are present.
    """
    if element_size > 2:  # fp32 tiles take twice the shared memory: half as deep
        c = gemm_config(rows_per_group, gated)
        return GemmConfig(c.block_m, c.block_n, c.block_k // 2, c.num_warps, c.num_stages)
    if rows_per_group <= 16:
        return GemmConfig(16, 32, 256, 4, 5) if gated else GemmConfig(16, 64, 256, 4, 4)
    if rows_per_group <= 32:
        return GemmConfig(32, 64, 128, 4, 4) if gated else GemmConfig(32, 128, 128, 4, 4)
    if rows_per_group <= 64:
        return GemmConfig(64, 64, 128, 4, 4) if gated else GemmConfig(64, 64, 128, 4, 3)
    return GemmConfig(128, 64, 64, 8, 3) if gated else GemmConfig(128, 128, 64, 8, 3)


def align_rows_ref(ids: torch.Tensor, num_groups: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch align_rows (fixed-shape ops only), the reference of the Triton kernel."""
    n = ids.numel()
    tiles = (n + min(num_groups, n) * (block_m - 1)) // block_m
    ids = ids.reshape(-1).long()
    counts = torch.zeros(num_groups, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))  # [G]; bincount would sync on the maximum
    group_tiles = (counts + block_m - 1) // block_m
    tile_end = group_tiles.cumsum(0)  # [G]
    group_of, order = torch.sort(ids, stable=True)  # [n]
    rank = torch.arange(n, device=ids.device) - (counts.cumsum(0) - counts)[group_of]
    dest = (tile_end - group_tiles)[group_of] * block_m + rank
    sorted_rows = torch.full((tiles * block_m,), n, dtype=torch.int32, device=ids.device)
    sorted_rows.scatter_(0, dest, order.int())
    tile_group = torch.searchsorted(tile_end, torch.arange(tiles, device=ids.device), right=True)
    return sorted_rows, tile_group.int()


# Triton compiles a kernel again for every new value of a constexpr and for every change in whether an int
# argument is 1 or a multiple of 16; arguments that change from step to step are kept out of both, so a
# server compiles each kernel a few times at start, not again whenever a batch has a new size.
@triton.jit(do_not_specialize=["n", "num_tiles"])
def _align_kernel(
    ids_ptr, sorted_ptr, tile_group_ptr, n, num_groups, num_tiles,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """One program: counts per group, then each row to its group's padded run, then padding and tile groups."""
    g = tl.arange(0, BLOCK_G)
    counts = tl.zeros((BLOCK_G,), dtype=tl.int32)
    for start in range(0, n, CHUNK):
        r = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + r, mask=r < n, other=-1)
        counts += tl.sum((ids[:, None] == g[None, :]).to(tl.int32), axis=0)
    group_tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(group_tiles, axis=0)
    run_start = (tile_end - group_tiles) * BLOCK_M
    seen = tl.zeros((BLOCK_G,), dtype=tl.int32)
    for start in range(0, n, CHUNK):
        r = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + r, mask=r < n, other=-1)
        onehot = (ids[:, None] == g[None, :]).to(tl.int32)  # [CHUNK, BLOCK_G]
        before = tl.cumsum(onehot, axis=0) - onehot + seen[None, :]
        tl.store(sorted_ptr + tl.sum(onehot * (before + run_start[None, :]), axis=1), r, mask=r < n)
        seen += tl.sum(onehot, axis=0)
    real = (g < num_groups)[None, :]
    for start in range(0, num_tiles * BLOCK_M, CHUNK):
        p = start + tl.arange(0, CHUNK)
        grp = tl.sum(((tile_end[None, :] * BLOCK_M <= p[:, None]) & real).to(tl.int32), axis=1)
        fill_end = tl.sum(tl.where(g[None, :] == grp[:, None], run_start + counts, 0), axis=1)
        tl.store(sorted_ptr + p, n, mask=(p >= fill_end) & (p < num_tiles * BLOCK_M))
    for start in range(0, num_tiles, CHUNK):
        t = start + tl.arange(0, CHUNK)
        grp = tl.sum(((tile_end[None, :] <= t[:, None]) & real).to(tl.int32), axis=1)
        tl.store(tile_group_ptr + t, grp, mask=t < num_tiles)


SMALL = 64  # rows up to which align_rows takes narrow chunks


def align_rows(ids: torch.Tensor, num_groups: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by group and pad every group's run to a multiple of block_m, in one small kernel launch.

    ids [n] (group of each row) -> sorted_rows [tiles * block_m] int32 (row ids, n marks padding) and
    tile_group [tiles] int32 (group of each tile, num_groups marks a tile past the real ones), where
    tiles = (n + min(G, n) * (block_m - 1)) // block_m bounds sum_g cdiv(count_g, block_m).
    """
    n = ids.numel()
    tiles = (n + min(num_groups, n) * (block_m - 1)) // block_m
    sorted_rows = torch.empty(tiles * block_m, dtype=torch.int32, device=ids.device)
    tile_group = torch.empty(tiles, dtype=torch.int32, device=ids.device)
    block_g = max(2, triton.next_power_of_2(num_groups))
    # one value per group count and per side of SMALL rows (see the note above _align_kernel): a decode's few
    # rows in narrow chunks, a prompt's in wide ones (with wide chunks only, a batch-1 Mixtral step spent 16 us
    # per call here on an H200, 0.5 of its 2.7 ms; narrow chunks are not timed yet)
    chunk = max(16, 8192 // block_g)
    chunk = min(chunk, SMALL) if n <= SMALL else chunk
    _align_kernel[(1,)](
        ids.reshape(-1),
        sorted_rows,
        tile_group,
        n,
        num_groups,
        tiles,
        BLOCK_M=block_m,
        BLOCK_G=block_g,
        CHUNK=chunk,
    )
    return sorted_rows, tile_group


@triton.jit(do_not_specialize=["num_rows"])
def _grouped_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    sorted_ptr,
    tile_group_ptr,
    num_rows,
    num_groups,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wg,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    stride_os,
    A_DIV: tl.constexpr,
    GATED: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out[r] = a[r // A_DIV] @ w[g].T for the rows r of one tile of group g (GATED: silu(gate) * up); with
    SPLIT_K > 1, program k of a tile sums the k-th share of K into out[k] (the caller adds the shares)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # K of one share, whole tiles
    k_lo = pid_k * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    g = tl.load(tile_group_ptr + pid_m)
    if g >= num_groups:
        return
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // A_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + g.to(tl.int64) * stride_wg + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        up_ptrs = w_ptrs + N * stride_wn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k - k_lo < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            if EVEN_K:
                u = tl.load(up_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                u = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                u = u.to(tl.float32)
            acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
            up_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = (
        out_ptr + pid_k * stride_os + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    sorted_rows: torch.Tensor,
    tile_group: torch.Tensor,
    config: GemmConfig,
    a_div: int = 1,
    gated: bool = False,
    scale: torch.Tensor | None = None,
    relu: bool = False,
) -> None:
    cfg, n_out, k_dim = config, out.shape[1], a.shape[1]
    split = max(1, min(cfg.split_k, triton.cdiv(k_dim, cfg.block_k)))
    if split > 1 and (gated or relu):
        raise ValueError("split_k needs a GEMM whose output is a sum over K: not the gated one")
    # the shares of K land in float32 partials [split, rows, N], added into `out` by one torch sum
    dest = out if split == 1 else torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)
    grid = (tile_group.numel(), triton.cdiv(n_out, cfg.block_n), split)
    _grouped_gemm_kernel[grid](
        a,
        w,
        dest,
        scale if scale is not None else out,
        sorted_rows,
        tile_group,
        out.shape[0],
        w.shape[0],
        n_out,
        k_dim,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        dest.stride(-2),
        dest.stride(-1),
        dest.stride(0) if split > 1 else 0,
        A_DIV=a_div,
        GATED=gated,
        HAS_SCALE=scale is not None,
        RELU=relu,
        EVEN_K=k_dim % cfg.block_k == 0,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and a.dtype == torch.bfloat16,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=split,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split > 1:
        if out.dtype == torch.float32:
            torch.sum(dest, dim=0, out=out)
        else:
            out.copy_(dest.sum(dim=0))


def _rows_per_group(rows: int, groups: int) -> int:
    return triton.cdiv(rows, max(1, min(groups, rows)))


class _Alignments:
    """The last few alignments of a group tensor: every per-variant projection of a step (q/k/v, o, router, of
    every layer) groups its tokens by the same rows tensor, so one align launch serves them all instead of one
    each. Keyed by the tensor object itself (held, so its id cannot be reused while cached), its storage and
    shape: the engine never changes a step's rows in place (inference tensors keep no version counter)."""

    KEEP = 4

    def __init__(self) -> None:
        self.entries: list[tuple[torch.Tensor, int, int, int, tuple[torch.Tensor, torch.Tensor]]] = []

    def get(self, ids: torch.Tensor, num_groups: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        ptr = ids.data_ptr()
        for held, p, g, b, out in self.entries:
            if held is ids and p == ptr and g == num_groups and b == block_m:
                return out
        out = align_rows(ids, num_groups, block_m)
        self.entries = [(ids, ptr, num_groups, block_m, out), *self.entries[: self.KEEP - 1]]
        return out


_alignments = _Alignments()


def grouped_linear(
    x: torch.Tensor, w: torch.Tensor, group: torch.Tensor, config: GemmConfig | None = None
) -> torch.Tensor:
    """y[t] = x[t] @ w[group[t]].T  —  x [T, K], w [G, N, K], group [T] -> [T, N]."""
    num_tokens, num_groups = x.shape[0], w.shape[0]
    out = x.new_empty(num_tokens, w.shape[1])  # [T, N]
    if num_tokens == 0:
        return out
    cfg = config or gemm_config(_rows_per_group(num_tokens, num_groups), element_size=x.element_size())
    sorted_rows, tile_group = _alignments.get(group, num_groups, cfg.block_m)
    _gemm(x, w, out, sorted_rows, tile_group, cfg)
    return out


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    config: tuple[GemmConfig, GemmConfig] | None = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * w2[s] (silu(w1[s] x) * w3[s] x), s = slots[t, k]  —  x [T, H] -> [T, H].

    w13 [S, 2I, H] (gate rows then up rows), w2 [S, H, I], slots [T, k], weights [T, k]. config: the tiles
    of the two GEMMs (they must share block_m, the alignment of the rows).
    """
    return _moe(x, w13, w2, slots, weights, config, gated=True)


def fused_moe_relu(
    x: torch.Tensor,
    wi: torch.Tensor,
    wo: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    config: tuple[GemmConfig, GemmConfig] | None = None,
) -> torch.Tensor:
    """Switch experts: sum_k weights[t, k] * wo[s] relu(wi[s] x), s = slots[t, k]  —  x [T, D] -> [T, D].

    wi [S, F, D], wo [S, D, F], slots [T, k], weights [T, k]; config as for fused_moe.
    """
    return _moe(x, wi, wo, slots, weights, config, gated=False)


def _moe(x, w_in, w_out, slots, weights, config, gated: bool) -> torch.Tensor:
    """The two GEMMs over the bank, rows aligned by slot: silu-gated (w_in holds gate then up rows) or ReLU."""
    slots, weights = slots.contiguous(), weights.contiguous()  # the kernels index them flat
    num_tokens, top_k = slots.shape
    num_slots, inter_dim = w_in.shape[0], w_out.shape[2]
    if num_tokens == 0:
        return x.new_zeros(0, x.shape[1])
    pairs = num_tokens * top_k
    if config is None:
        per_slot = _rows_per_group(pairs, num_slots)
        size = x.element_size()
        config = (
            gemm_config(per_slot, gated=gated, element_size=size),
            gemm_config(per_slot, element_size=size),
        )
    cfg1, cfg2 = config
    if cfg1.block_m != cfg2.block_m:
        raise ValueError(f"the two GEMMs must share block_m, got {cfg1.block_m} and {cfg2.block_m}")
    sorted_rows, tile_group = align_rows(slots, num_slots, cfg1.block_m)
    inter = x.new_empty(pairs, inter_dim)  # [T*k, I] the activation, row t*k + j
    _gemm(x, w_in, inter, sorted_rows, tile_group, cfg1, a_div=top_k, gated=gated, relu=not gated)
    per_pair = torch.empty(pairs, x.shape[1], dtype=torch.float32, device=x.device)  # [T*k, H]
    _gemm(inter, w_out, per_pair, sorted_rows, tile_group, cfg2, scale=weights.reshape(-1))
    return per_pair.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)
