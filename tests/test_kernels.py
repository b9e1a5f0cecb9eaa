"""The Triton kernels against their pure-torch references, under TRITON_INTERPRET=1 on tiny shapes.

Triton reads TRITON_INTERPRET when it decorates a kernel, so the interpreted checks run in one child
process (this file run as a script) and the kernels other test modules import stay untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKS: dict[str, Callable[[], None]] = {}


def _modules() -> tuple[ModuleType, ModuleType, ModuleType]:
    """The kernels package (dispatch and references), its grouped GEMM module, its paged attention module."""
    try:
        import moeshare.kernels as kernels
    except ImportError:  # a source tree without `pip install -e .`: the package-dir mapping is not active
        import kernels
    gemm = import_module(kernels.__name__ + ".grouped_gemm")
    return kernels, gemm, import_module(kernels.__name__ + ".paged_attention")


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 2e-2 if ref.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * ref.float().abs().max().item(), rtol=tol)


def _moe_case(num_tokens: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden, inter, slots, top_k = 32, 48, 6, 2
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(slots, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(slots, hidden, inter, generator=g) / inter**0.5).to(dtype)
    chosen = torch.randint(0, slots - 2, (num_tokens, top_k), generator=g)  # slots 4 and 5 stay empty
    chosen[0] = 3  # one token picks the same slot twice
    weights = torch.rand(num_tokens, top_k, generator=g).to(dtype)
    return x, w13, w2, chosen, weights


def _attention_case(q_lens: list[int], ctx_lens: list[int], dtype: torch.dtype, seed: int):
    """Pool [N, L, 2, B, Hkv, D] with caches as strided views of layer 1, shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, page, layers = 8, 2, 16, 4, 3
    blocks = [-(-c // page) for c in ctx_lens]
    pool = torch.randn(sum(blocks) + 3, layers, 2, page, kv_heads, head_dim, generator=g).to(dtype)
    free = torch.randperm(pool.shape[0], generator=g)
    tables = torch.zeros(len(q_lens), max(blocks) + 2, dtype=torch.int32)
    for b, n in enumerate(blocks):
        tables[b, :n], free = free[:n], free[n:]
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(query_start[-1]), heads, head_dim, generator=g).to(dtype)
    context = torch.tensor(ctx_lens, dtype=torch.int32)
    return q, pool[:, 1, 0], pool[:, 1, 1], tables, context, query_start, head_dim**-0.5


@check
def dispatch_sends_cpu_tensors_to_the_interpreted_kernels() -> None:
    k, gemm, _ = _modules()
    assert gemm.INTERPRET and k._triton(torch.zeros(1))


@check
def align_kernel_matches_torch_prep() -> None:
    _, gemm, _ = _modules()
    g = torch.Generator().manual_seed(8)
    # the larger cases take several CHUNK steps in every loop of the kernel (60 rows: narrow chunks, 16 tiles)
    for n, groups, block_m in (
        (1, 3, 16),
        (37, 6, 16),
        (60, 20, 64),
        (74, 5, 4),
        (700, 20, 16),
        (2000, 9, 64),
    ):
        ids = torch.randint(0, max(1, groups - 2), (n,), generator=g)  # the top two groups stay empty
        out, ref = gemm.align_rows(ids, groups, block_m), gemm.align_rows_ref(ids, groups, block_m)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), (n, groups, block_m)


@check
def grouped_linear_with_absent_groups_and_odd_token_count() -> None:
    k, gemm, _ = _modules()

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(13, 40, generator=g), torch.randn(5, 24, 40, generator=g)
    group = torch.tensor([0, 3, 3, 1, 0, 3, 3, 3, 1, 0, 0, 3, 1])  # groups 2 and 4 absent
    _close(k.grouped_linear(x, w, group), k.grouped_linear_ref(x, w, group))
    # several K steps with a ragged last one, several N tiles with a ragged last one
    small = gemm.GemmConfig(16, 16, 16)
    _close(gemm.grouped_linear(x, w, group, config=small), k.grouped_linear_ref(x, w, group))
    xb, wb = x.bfloat16(), w.bfloat16()
    _close(gemm.grouped_linear(xb, wb, group, config=small), k.grouped_linear_ref(xb, wb, group))


@check
def grouped_linear_aligns_a_rows_tensor_once_for_every_projection() -> None:
    """A step's projections share its rows tensor: one align launch for all of them; another rows tensor (or
    group count, or tile) gets its own, and every result matches the reference."""
    k, gemm, _ = _modules()
    g = torch.Generator().manual_seed(4)
    calls = []
    real = gemm.align_rows
    gemm.align_rows = lambda *a: calls.append(a[1:]) or real(*a)
    try:
        group = torch.tensor([2, 0, 0, 1, 2])
        for n in (24, 40, 24):
            x, w = torch.randn(5, 16, generator=g), torch.randn(3, n, 16, generator=g)
            _close(k.grouped_linear(x, w, group), k.grouped_linear_ref(x, w, group))
        assert len(calls) == 1
        other = group.clone()  # same values, another tensor: aligned again
        x, w = torch.randn(5, 16, generator=g), torch.randn(4, 8, 16, generator=g)
        _close(k.grouped_linear(x, w, other), k.grouped_linear_ref(x, w, other))
        _close(k.grouped_linear(x, w, group), k.grouped_linear_ref(x, w, group))  # 4 groups, not 3
        assert len(calls) == 3
    finally:
        gemm.align_rows = real


@check
def fused_moe_single_token_with_repeated_slot() -> None:
    k, _, _ = _modules()

    case = _moe_case(1, torch.float32, seed=1)
    _close(k.fused_moe(*case), k.fused_moe_ref(*case))


@check
def fused_moe_37_tokens_fp32_and_bf16() -> None:
    k, gemm, _ = _modules()

    for dtype in (torch.float32, torch.bfloat16):
        case = _moe_case(37, dtype, seed=2)
        _close(k.fused_moe(*case), k.fused_moe_ref(*case))
    small = (gemm.GemmConfig(16, 16, 16), gemm.GemmConfig(16, 16, 32))
    case = _moe_case(37, torch.float32, seed=3)
    _close(gemm.fused_moe(*case, config=small), k.fused_moe_ref(*case))


@check
def fused_moe_relu_the_switch_expert_form() -> None:
    k, gemm, _ = _modules()

    for dtype, tokens in ((torch.float32, 37), (torch.bfloat16, 5), (torch.float32, 1)):
        x, wi, wo, chosen, weights = _moe_case(tokens, dtype, seed=6)
        wi = wi[:, : wo.shape[2]]  # [S, F, D]: one projection up, no gate
        top1, w1 = chosen[:, :1], weights[:, :1]  # Switch routes each token to one expert
        for slots, w in ((top1, w1), (chosen, weights)):
            _close(k.fused_moe_relu(x, wi, wo, slots, w), k.fused_moe_relu_ref(x, wi, wo, slots, w))
    small = (gemm.GemmConfig(16, 16, 16), gemm.GemmConfig(16, 16, 32, split_k=2))
    x, wi, wo, chosen, weights = _moe_case(37, torch.float32, seed=7)
    wi = wi[:, : wo.shape[2]]
    ref = k.fused_moe_relu_ref(x, wi, wo, chosen, weights)
    _close(gemm.fused_moe_relu(x, wi, wo, chosen, weights, config=small), ref)
    # the ReLU matters here: without it the sums differ
    assert (ref - k.fused_moe_ref(x, torch.cat([wi, wi], 1), wo, chosen, weights)).abs().max() > 1e-3


@check
def split_k_shares_add_up_to_the_whole_sum() -> None:
    k, gemm, _ = _modules()

    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(13, 40, generator=g), torch.randn(5, 24, 40, generator=g)
    group = torch.tensor([0, 3, 3, 1, 0, 3, 3, 3, 1, 0, 0, 3, 1])
    # K = 40 in tiles of 16: 3 tiles, so 2 shares of 2 and 1 tiles, 3 of one each, 8 clamped to 3
    for split in (2, 3, 8):
        cfg = gemm.GemmConfig(16, 16, 16, split_k=split)
        _close(gemm.grouped_linear(x, w, group, config=cfg), k.grouped_linear_ref(x, w, group))
        xb, wb = x.bfloat16(), w.bfloat16()
        _close(gemm.grouped_linear(xb, wb, group, config=cfg), k.grouped_linear_ref(xb, wb, group))
    # the MoE's second GEMM (scaled by the routing weights, into float32) in shares; the gated first one cannot
    case = _moe_case(37, torch.float32, seed=3)
    tiles = (gemm.GemmConfig(16, 16, 16), gemm.GemmConfig(16, 16, 16, split_k=3))
    _close(gemm.fused_moe(*case, config=tiles), k.fused_moe_ref(*case))
    try:
        gemm.fused_moe(*case, config=(gemm.GemmConfig(16, 16, 16, split_k=2), gemm.GemmConfig(16, 16, 16)))
    except ValueError as e:
        assert "not the gated one" in str(e)
    else:
        raise AssertionError("a gated GEMM in shares of K was not refused")


@check
def paged_attention_with_t5_position_bias_encoder_decoder_and_cross() -> None:
    k, _, attn = _modules()

    g = torch.Generator().manual_seed(9)
    # max_distances of 16 and 40: contexts up to 63 reach the log-spaced buckets and the last one
    table = torch.randn(32, 8, generator=g)
    cases = [
        # encoder: whole prompts, every key, buckets on both sides
        ([7, 30, 63], [7, 30, 63], False, k.PositionBias(table, bidirectional=True, max_distance=16)),
        # decoder self-attention: a prefill chunk and decodes, causal, past buckets only
        ([5, 1, 1], [40, 17, 63], True, k.PositionBias(table, bidirectional=False, max_distance=40)),
        # cross-attention: decoder tokens over a whole encoder output, no bias
        ([3, 1], [30, 9], False, None),
    ]
    for i, (q_lens, ctx, causal, bias) in enumerate(cases):
        case = _attention_case(q_lens, ctx, torch.float32, seed=10 + i)
        ref = k.paged_attention_ref(*case, causal=causal, bias=bias)
        _close(k.paged_attention(*case, causal=causal, bias=bias), ref)
        for splits in (1, 4):  # the key splits of flash decoding merge the biased partial softmaxes
            _close(attn.paged_attention(*case, num_splits=splits, causal=causal, bias=bias), ref)
    # one table per variant, each sequence its own
    tables = torch.randn(3, 32, 8, generator=g)
    rows = torch.tensor([2, 0, 1])
    case = _attention_case([7, 30, 63], [7, 30, 63], torch.float32, seed=13)
    per_row = k.PositionBias(tables, bidirectional=True, max_distance=16, rows=rows)
    ref = k.paged_attention_ref(*case, causal=False, bias=per_row)
    _close(k.paged_attention(*case, causal=False, bias=per_row), ref)
    one = k.paged_attention_ref(*case, causal=False, bias=k.PositionBias(tables[0], True, 16))
    assert torch.allclose(ref[7:37], one[7:37]) and not torch.allclose(ref[:7], one[:7])
    # the bias and the mask change the result: the checks above could not pass by ignoring them
    case = _attention_case([7, 30, 63], [7, 30, 63], torch.float32, seed=10)
    plain = k.paged_attention_ref(*case)
    assert (plain - k.paged_attention_ref(*case, causal=False)).abs().max() > 1e-3
    assert (plain - k.paged_attention_ref(*case, bias=cases[1][3])).abs().max() > 1e-3


@check
def paged_attention_decode_gqa_over_strided_shuffled_pages() -> None:
    k, _, attn = _modules()

    case = _attention_case([1, 1, 1, 1], [5, 17, 1, 63], torch.float32, seed=4)
    ref = k.paged_attention_ref(*case)
    _close(k.paged_attention(*case), ref)
    _close(attn.paged_attention(*case, num_splits=3), ref)
    case = _attention_case([1, 1], [30, 9], torch.bfloat16, seed=5)
    _close(attn.paged_attention(*case, num_splits=2), k.paged_attention_ref(*case))


@check
def paged_attention_mixed_prefill_and_decode_batch() -> None:
    k, _, attn = _modules()

    # a fresh prompt, a decode, an idle sequence, a chunk of prompt after a cached prefix
    case = _attention_case([7, 1, 0, 20], [7, 33, 4, 45], torch.float32, seed=6)
    ref = k.paged_attention_ref(*case)
    _close(k.paged_attention(*case), ref)
    _close(attn.paged_attention(*case, num_splits=2), ref)
    case = _attention_case([9, 1, 3], [9, 22, 70], torch.bfloat16, seed=7)
    _close(k.paged_attention(*case), k.paged_attention_ref(*case))


def _norm_case(num_tokens: int, hidden: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(num_tokens, hidden, generator=g) * 3).to(dtype)
    delta = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    weight = (1 + 0.5 * torch.randn(5, hidden, generator=g)).to(dtype)
    return h, delta, weight, torch.randint(0, 5, (num_tokens,), generator=g)


def _rotary_case(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """q and k as strided views of a fused qkv output [T, (Hq + 2 Hkv) D], as the engine splits it.

    With D=128 and Hq + Hkv = 18 the kernel takes two blocks of 16 heads: one of q and k heads, one of k heads.
    """
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.reshape(-1, heads, head_dim), k.reshape(-1, kv_heads, head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g)
    positions[0] = 0
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return q, k, positions, inv_freq


@check
def attention_warm_up_compiles_every_variant_a_call_can_pick() -> None:
    """What a call picks (tiles by decode or prefill and sequence count, BLOCK_S, key splits) for any tokens,
    sequences and table width is among what warm_up launched; the warm-up only reads the caches."""
    import triton

    k, _, attn = _modules()
    dev, kv_heads, page, most = torch.device("cpu"), 2, 4, 40
    warmed = {
        (attn.attn_config(decode, n, dev), max(16, triton.next_power_of_2(n)), splits)
        for n, decode, splits in attn.variants(most, kv_heads, dev)
    }
    g = torch.Generator().manual_seed(3)
    for _ in range(400):
        seqs = int(torch.randint(1, most + 1, (1,), generator=g))
        tokens = seqs + int(torch.randint(0, 3 * seqs + 40, (1,), generator=g))
        width = int(torch.randint(1, 300, (1,), generator=g))
        cfg, _, splits = attn._pick(tokens, seqs, width, page, kv_heads, 4, dev)
        assert (cfg, max(16, triton.next_power_of_2(seqs)), splits) in warmed, (tokens, seqs, width)
    q, kc, vc, *_ = _attention_case([1, 2], [5, 9], torch.float32, seed=5)
    before = kc.clone()
    bias = k.PositionBias(torch.randn(3, 32, 8), True, 128, rows=torch.tensor([0, 2]))
    launches = k.warm_up_attention(q, kc, vc, 0.25, 18, 1, causal=False, bias=bias)
    assert launches == len(attn.variants(18, kc.shape[2], dev)) > 2 and torch.equal(kc, before)


@check
def route_picks_the_references_experts_slots_and_weights() -> None:
    """Softmax, top-k renormalized and mapped through each row's table, for float32 and bfloat16 logits and
    more tokens than a program takes; among tied experts the lowest first (token 0 ties two at the top)."""
    k, _, _ = _modules()
    g = torch.Generator().manual_seed(11)
    cases = ((37, 8, 2, torch.float32), (5, 4, 1, torch.bfloat16), (2, 8, 2, torch.bfloat16))
    for tokens, experts, top_k, dtype in cases:
        logits = torch.randn(tokens, experts, generator=g).to(dtype)
        logits[0, 1] = logits[0, experts - 1] = logits[0].max() + 1
        rows = torch.randint(0, 3, (tokens,), generator=g)
        table = torch.stack([torch.randperm(20, generator=g)[:experts] for _ in range(3)])  # [R, E] slots
        slots, weights = k.route(logits, rows, table, top_k, dtype)
        ref_slots, ref_weights = k.route_ref(logits, rows, table, top_k, dtype)
        assert torch.equal(slots[1:], ref_slots[1:]), (
            tokens,
            experts,
            top_k,
        )  # torch's order among ties varies
        assert slots[0].tolist() == [table[rows[0], 1], table[rows[0], experts - 1]][:top_k]
        assert weights.dtype == dtype  # within one rounding of the dtype (the sums' order differs)
        ulp = 2**-8 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(weights.float(), ref_weights.float(), atol=ulp, rtol=0)
    strided = torch.randn(3, 8, generator=g)
    table = (torch.arange(48).view(3, 2, 8) * 3)[:, 1]  # a layer's view of [R, L, E] tables
    rows = torch.tensor([2, 0, 1])
    assert torch.equal(
        k.route(strided, rows, table, 2, torch.float32)[0],
        k.route_ref(strided, rows, table, 2, torch.float32)[0],
    )


@check
def add_rms_norm_with_and_without_residual_over_variant_rows() -> None:
    k, _, _ = _modules()

    for dtype in (torch.float32, torch.bfloat16):
        for tokens, hidden in ((7, 48), (1, 64), (5, 300)):  # ragged row blocks (48, 300)
            h, delta, weight, rows = _norm_case(tokens, hidden, dtype, seed=tokens + hidden)
            h_out, x = k.add_rms_norm(h, delta, weight, rows, 1e-5)
            h_ref, x_ref = k.add_rms_norm_ref(h, delta, weight, rows, 1e-5)
            if dtype == torch.float32:
                assert torch.equal(h_out, h_ref), (tokens, hidden)
            else:  # the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even like torch
                _close(h_out, h_ref)
            assert x.dtype == x_ref.dtype
            _close(x, x_ref)
            h_out, x = k.add_rms_norm(h, None, weight, rows, 1e-5)
            assert h_out is h
            _close(x, k.add_rms_norm_ref(h, None, weight, rows, 1e-5)[1])
    h, delta, weight, rows = _norm_case(9, 32, torch.bfloat16, seed=11)  # fp32 weights: an fp32 product
    x = k.add_rms_norm(h, delta, weight.float(), rows, 1e-6)[1]
    x_ref = k.add_rms_norm_ref(h, delta, weight.float(), rows, 1e-6)[1]
    assert x.dtype == x_ref.dtype == torch.float32
    _close(x, x_ref.bfloat16())  # the normalized row went through bf16: a bf16 tolerance


@check
def rotary_of_strided_q_and_k_views_in_one_launch() -> None:
    k, _, _ = _modules()

    for dtype in (torch.float32, torch.bfloat16):
        for tokens, heads, kv_heads, head_dim in ((7, 4, 2, 16), (3, 14, 4, 128), (5, 3, 1, 24)):
            case = _rotary_case(tokens, heads, kv_heads, head_dim, dtype, seed=tokens * head_dim)
            (q, kk), (q_ref, k_ref) = k.rotary(*case), k.rotary_ref(*case)
            assert q.is_contiguous() and kk.is_contiguous() and q.dtype == kk.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(q, q_ref, atol=2e-6, rtol=2e-6)
                torch.testing.assert_close(kk, k_ref, atol=2e-6, rtol=2e-6)
            else:  # fp32 products rounded once against torch's rounding after every bf16 op: 1 bf16 ulp
                _close(q, q_ref)
                _close(kk, k_ref)


def _kernel(name: str) -> ModuleType:
    k, _, _ = _modules()
    return import_module(f"{k.__name__}.{name}")


def _kv_case(num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """The rotary case plus v, a pool [N, L, 2, B, Hkv, D] and a distinct shuffled cache slot per token."""
    q, k, positions, inv_freq = _rotary_case(num_tokens, heads, kv_heads, head_dim, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(num_tokens, kv_heads * 3, head_dim, generator=g).to(dtype)[:, 1::3]  # strided heads
    page = 4
    pool = torch.randn(num_tokens // page + 3, 2, 2, page, kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.randperm(pool.shape[0] * page, generator=g)[:num_tokens]
    return q, k, v, positions, inv_freq, pool, slots // page, slots % page


@check
def greedy_pick_first_argmax_and_logprob_over_tiles() -> None:
    k = _kernel("greedy")
    ref = _kernel("greedy_ref").greedy_pick_ref
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(7, 1000, generator=g) * 3
    logits[0, [3, 700]] = 50.0  # ties in different tiles and lanes: the first index wins
    logits[1, [130, 258]] = 40.0  # the same lane of two tiles (tile 128)
    logits[2, [150, 200, 999]] = 45.0  # an earlier lane in the later tile
    logits[3, :] = float("-inf")
    logits[3, [17, 901]] = -2.0  # all but two masked out
    logits[4, :] = -3.5  # one value everywhere
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        want, want_lp = ref(x)
        for block_v in (None, 128, 64):  # one tile; ragged tiles
            chosen, logprob = k.greedy_pick(x, block_v=block_v)
            assert chosen.dtype == torch.int64 and logprob.dtype == torch.float32
            assert torch.equal(chosen, want), (dtype, block_v, chosen, want)
            torch.testing.assert_close(logprob, want_lp, atol=1e-5, rtol=1e-5)
    one = torch.tensor([[1.5]])
    assert k.greedy_pick(one)[0].item() == 0 and k.greedy_pick(one)[1].item() == 0.0
    assert k.greedy_pick(torch.zeros(0, 10))[0].shape == (0,)


@check
def greedy_sampling_through_the_kernel_draws_the_filtered_samplers_tokens() -> None:
    from moeshare.engine.sampling import FILTERED, GREEDY, SamplingBatch, sample

    g = torch.Generator().manual_seed(13)
    logits = (torch.randn(6, 3000, generator=g) * 3).bfloat16()
    n = logits.shape[0]
    ones = torch.ones(n)
    batch = SamplingBatch(0 * ones, ones, torch.zeros(n, dtype=torch.int64), torch.arange(n), torch.zeros(n))
    fast, fast_lp = sample(logits, batch, GREEDY)
    full, full_lp = sample(logits, batch, FILTERED)
    assert torch.equal(fast, full), (fast, full)
    torch.testing.assert_close(fast_lp, full_lp, atol=1e-5, rtol=1e-5)


@check
def silu_mul_of_gate_up_rows_any_count() -> None:
    k, _, _ = _modules()
    g = torch.Generator().manual_seed(14)
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, inter in ((0, 48), (1, 48), (7, 300), (3, 1500)):  # one ragged block; two blocks
            wide = (torch.randn(tokens, 2 * inter + 8, generator=g) * 4).to(dtype)
            gate_up = wide[:, : 2 * inter]  # rows strided past the 2I columns
            out, ref = k.silu_mul(gate_up), k.silu_mul_ref(gate_up)
            assert out.shape == (tokens, inter) and out.dtype == dtype and out.is_contiguous()
            if dtype == torch.float32:  # numpy's exp against torch's: an ulp or so
                torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
            elif tokens:  # the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even
                _close(out, ref)


@check
def rotary_store_is_rotary_then_index_put_in_one_launch() -> None:
    k, _, _ = _modules()
    for dtype in (torch.float32, torch.bfloat16):
        for tokens, heads, kv_heads, head_dim in (
            (7, 4, 2, 16),
            (3, 14, 4, 128),
            (5, 3, 1, 24),
            (0, 4, 2, 16),
        ):
            case = _kv_case(max(tokens, 1), heads, kv_heads, head_dim, dtype, seed=tokens + head_dim)
            q, kk, v, positions, inv_freq, pool, block_of, offset_of = case
            q, kk, v, positions, block_of, offset_of = (
                x[:tokens] for x in (q, kk, v, positions, block_of, offset_of)
            )
            fused, split, ref = pool.clone(), pool.clone(), pool.clone()
            caches = [(p[:, 1, 0], p[:, 1, 1]) for p in (fused, split, ref)]  # strided views of layer 1
            args = (positions, inv_freq)
            q_out = k.rotary_store(q, kk, v, *args, *caches[0], block_of, offset_of)
            q_rot, k_rot = k.rotary(q, kk, *args)
            caches[1][0][block_of, offset_of] = k_rot
            caches[1][1][block_of, offset_of] = v
            assert q_out.is_contiguous() and q_out.shape == q.shape
            assert torch.equal(q_out, q_rot) and torch.equal(fused, split), (dtype, tokens, heads, head_dim)
            q_ref = k.rotary_store_ref(q, kk, v, *args, *caches[2], block_of, offset_of)
            if tokens:
                _close(q_out, q_ref)
                _close(fused, ref)


def _run_checks() -> dict[str, str]:
    assert os.environ.get("TRITON_INTERPRET") == "1", (
        "run the checks through pytest, or set TRITON_INTERPRET=1"
    )
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = "ok"
        except Exception as e:  # report every check, not just the first failure
            results[name] = f"{type(e).__name__}: {e}"
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOESHARE_TRITON_INTERPRET_TEST": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_kernel_matches_reference_under_interpreter(interpreted: dict[str, str], name: str) -> None:
    assert interpreted[name] == "ok", interpreted[name]


def test_cpu_tensors_use_the_reference_without_the_test_switch() -> None:
    k, _, _ = _modules()
    x, w, group = torch.randn(5, 8), torch.randn(3, 4, 8), torch.tensor([2, 0, 2, 1, 0])
    assert torch.equal(k.grouped_linear(x, w, group), k.grouped_linear_ref(x, w, group))


def test_cpu_tensors_use_the_norm_and_rotary_references() -> None:
    k, _, _ = _modules()
    h, delta, weight, rows = _norm_case(5, 16, torch.float32, seed=0)
    norm_args = (h, delta, weight, rows, 1e-5)
    outs = [*k.add_rms_norm(*norm_args), *k.rotary(*_rotary_case(3, 4, 2, 16, torch.float32, seed=0))]
    refs = [*k.add_rms_norm_ref(*norm_args), *k.rotary_ref(*_rotary_case(3, 4, 2, 16, torch.float32, seed=0))]
    assert all(torch.equal(out, ref) for out, ref in zip(outs, refs, strict=True))


def test_cpu_tensors_use_the_greedy_silu_mul_and_rotary_store_references() -> None:
    k, _, _ = _modules()
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert all(
        torch.equal(a, b) for a, b in zip(k.greedy_pick(logits), k.greedy_pick_ref(logits), strict=True)
    )
    gate_up = torch.randn(3, 32).bfloat16()
    assert torch.equal(k.silu_mul(gate_up), k.silu_mul_ref(gate_up))
    q, kk, v, positions, inv_freq, pool, block_of, offset_of = _kv_case(5, 4, 2, 16, torch.float32, seed=0)
    a, b = pool.clone(), pool.clone()
    q_a = k.rotary_store(q, kk, v, positions, inv_freq, a[:, 0, 0], a[:, 0, 1], block_of, offset_of)
    q_b = k.rotary_store_ref(q, kk, v, positions, inv_freq, b[:, 0, 0], b[:, 0, 1], block_of, offset_of)
    assert torch.equal(q_a, q_b) and torch.equal(a, b) and not torch.equal(a, pool)


def test_routing_prep_shapes_depend_only_on_token_count() -> None:
    _, gemm, _ = _modules()
    a = gemm.align_rows_ref(torch.zeros(40, dtype=torch.long), 6, 16)
    b = gemm.align_rows_ref(torch.arange(40) % 6, 6, 16)
    assert [t.shape for t in a] == [t.shape for t in b]
    rows, tile_group = b
    real = rows[rows < 40]
    assert sorted(real.tolist()) == list(range(40))
    assert ((torch.arange(40) % 6)[real.long()].diff() >= 0).all()  # sorted by group
    assert (tile_group[:-1] <= tile_group[1:]).all() and tile_group.max() == 6  # spare tiles at the end


if __name__ == "__main__":
    print(json.dumps(_run_checks()))
