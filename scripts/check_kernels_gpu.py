"""Check the Triton kernels against their references on a GPU at Mixtral-8x7B layer sizes, and time them.

    PYTHONPATH=. python scripts/check_kernels_gpu.py [--out kernels_gpu.json] [--tune]

Each kernel call (routing prep included) is captured in a CUDA graph, as the engine runs decode, and the
replay is timed with triton.testing.do_bench. bytes_moved counts the weights of the groups / bank slots
the batch touches (or the K/V it reads) plus the activations in and out; frac_copy compares the rate with
a large device-to-device copy_. --tune also sweeps tile configs and prints the fastest.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib import import_module

import torch
import triton
from triton.testing import do_bench

try:
    import moeshare.kernels as K
except ImportError:  # a source tree without `pip install -e .`: the package-dir mapping is not active
    import kernels as K

gemm = import_module(K.__name__ + ".grouped_gemm")
attn = import_module(K.__name__ + ".paged_attention")

HIDDEN, INTER, SLOTS, TOP_K, VARIANTS, VOCAB = 4096, 14336, 16, 2, 4, 32000
LLAMA3_VOCAB = 128256
HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS = 32, 8, 128, 16, 2
DECODE_T = (1, 8, 32, 64, 128)
PREFILL_T = 512
LONG_PREFILL_T = 2048  # the GEMMs' compute-bound tiles (more than 64 rows per group)
LAUNCHES = ((4, 3), (4, 4), (4, 5), (8, 3), (8, 4))  # (num_warps, num_stages) tried by --tune
DEV, DT = torch.device("cuda"), torch.bfloat16


@dataclass
class Row:
    kernel: str
    tokens: int
    time_us: float
    bytes_moved: int
    gbps: float
    frac_copy: float
    max_err: float
    rel_err: float
    ok: bool
    graph: bool  # timed as a CUDA-graph replay (False: the capture failed, timed eagerly)


def graph_time_us(fn: Callable[[], object], rep: int = 100) -> float:
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=10, rep=rep) * 1e3


def copy_gbps() -> float:
    src = torch.empty(1 << 29, dtype=DT, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (do_bench(lambda: dst.copy_(src), rep=200) * 1e-3) / 1e9


def row(
    name: str,
    tokens: int,
    fn: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]],
    ref: torch.Tensor | tuple[torch.Tensor, ...],
    nbytes: int,
    copy: float,
) -> Row:
    out = fn()
    if isinstance(out, tuple):  # several outputs (norm + rotary): compare them all at once
        out, ref = (torch.cat([o.float().reshape(-1) for o in outs]) for outs in (out, ref))
    err = (out.float() - ref.float()).abs().max().item()
    rel = err / max(ref.float().abs().max().item(), 1e-6)
    try:
        t, graph = graph_time_us(fn), True
    except Exception as e:  # report it and keep measuring
        print(f"  {name} T={tokens}: CUDA graph capture failed: {type(e).__name__}: {e}", flush=True)
        t, graph = do_bench(fn) * 1e3, False
    gbps = nbytes / (t * 1e-6) / 1e9
    result = Row(
        name, tokens, round(t, 1), nbytes, round(gbps, 1), round(gbps / copy, 3), err, rel, rel < 3e-2, graph
    )
    print(result, flush=True)
    return result


def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, device=DEV).mul_(scale)


def moe_inputs(tokens: int) -> tuple[torch.Tensor, ...]:
    x = randn(tokens, HIDDEN)
    top, slots = torch.randn(tokens, SLOTS, device=DEV).topk(TOP_K, dim=-1)  # [T, k]
    return x, slots, top.softmax(dim=-1).to(DT)


def attention_inputs(q_lens: list[int], ctx_lens: list[int]) -> tuple:
    """Pool [N, L, 2, B, Hkv, D]; the caches are strided views of layer 1; pages handed out shuffled."""
    blocks = [triton.cdiv(c, PAGE) for c in ctx_lens]
    pool = randn(sum(blocks) + 8, LAYERS, 2, PAGE, KV_HEADS, HEAD_DIM)
    free = torch.randperm(pool.shape[0], device=DEV).int()
    tables = torch.zeros(len(q_lens), max(blocks), dtype=torch.int32, device=DEV)
    for b, n in enumerate(blocks):
        tables[b, :n], free = free[:n], free[n:]
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = randn(sum(q_lens), HEADS, HEAD_DIM)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    return q, pool[:, 1, 0], pool[:, 1, 1], tables, ctx, starts, HEAD_DIM**-0.5


def kv_bytes(ctx_lens: list[int], tokens: int) -> int:
    return sum(ctx_lens) * KV_HEADS * HEAD_DIM * 2 * 2 + 2 * tokens * HEADS * HEAD_DIM * 2


def check_moe(copy: float) -> list[Row]:
    rows = []
    w13 = randn(SLOTS, 2 * INTER, HIDDEN, scale=HIDDEN**-0.5)
    w2 = randn(SLOTS, HIDDEN, INTER, scale=INTER**-0.5)
    slot_bytes = (w13[0].numel() + w2[0].numel()) * 2
    for t in (*DECODE_T, PREFILL_T, LONG_PREFILL_T):
        x, slots, weights = moe_inputs(t)
        ref = K.fused_moe_ref(x, w13, w2, slots, weights)
        nbytes = slots.unique().numel() * slot_bytes + 2 * t * HIDDEN * 2
        rows.append(row("fused_moe", t, partial(K.fused_moe, x, w13, w2, slots, weights), ref, nbytes, copy))
    return rows


def check_linear(copy: float) -> list[Row]:
    rows = []
    for name, n_out in (("grouped_linear q_proj", HIDDEN), ("grouped_linear lm_head", VOCAB)):
        w = randn(VARIANTS, n_out, HIDDEN, scale=HIDDEN**-0.5)
        for t in (*DECODE_T, PREFILL_T, LONG_PREFILL_T):
            x, group = randn(t, HIDDEN), torch.arange(t, device=DEV) % VARIANTS
            nbytes = min(t, VARIANTS) * n_out * HIDDEN * 2 + t * (HIDDEN + n_out) * 2
            ref = K.grouped_linear_ref(x, w, group)
            rows.append(row(name, t, partial(K.grouped_linear, x, w, group), ref, nbytes, copy))
    return rows


def check_attention(copy: float) -> list[Row]:
    rows = []
    cases = [("paged_attention decode", [1] * t, torch.randint(1024, 2049, (t,)).tolist()) for t in DECODE_T]
    cases.append(("paged_attention prefill", [PREFILL_T], [PREFILL_T]))
    decodes = [1500 + 37 * i for i in range(8)]
    cases.append(("paged_attention mixed", [PREFILL_T] + [1] * 8, [PREFILL_T, *decodes]))
    for name, q_lens, ctx_lens in cases:
        args = attention_inputs(q_lens, ctx_lens)
        ref = K.paged_attention_ref(*args)
        nbytes = kv_bytes(ctx_lens, sum(q_lens))
        rows.append(row(name, sum(q_lens), partial(K.paged_attention, *args), ref, nbytes, copy))
    return rows


def check_norm_rope(copy: float) -> list[Row]:
    """Residual add + RMSNorm and rotary at layer sizes; the bf16 residual sum must be torch's exactly."""
    rows = []
    weight = 1 + 0.1 * randn(VARIANTS, HIDDEN)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=DEV) / HEAD_DIM))
    for t in (*DECODE_T, PREFILL_T):
        h, delta, group = randn(t, HIDDEN), randn(t, HIDDEN), torch.arange(t, device=DEV) % VARIANTS
        args = (h, delta, weight, group, 1e-5)
        ref = K.add_rms_norm_ref(*args)
        if not torch.equal(K.add_rms_norm(*args)[0], ref[0]):
            print(f"  add_rms_norm T={t}: h + delta differs from torch's bf16 sum", flush=True)
        nbytes = 4 * t * HIDDEN * 2 + min(t, VARIANTS) * HIDDEN * 2
        rows.append(row("add_rms_norm", t, partial(K.add_rms_norm, *args), ref, nbytes, copy))
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    for t, dt in ((1, DT), (8, DT), (32, DT), (128, DT), (PREFILL_T, DT), (128, torch.float32)):
        q, k, _ = (
            randn(t, width).to(dt).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        )
        q, k = q.reshape(t, HEADS, HEAD_DIM), k.reshape(t, KV_HEADS, HEAD_DIM)
        positions = torch.randint(0, 32768, (t,), device=DEV)  # large angles: cos / sin range reduction
        args = (q, k, positions, inv_freq)
        nbytes = 2 * t * (HEADS + KV_HEADS) * HEAD_DIM * q.element_size()
        name = "rotary" if dt == DT else "rotary fp32"
        rows.append(row(name, t, partial(K.rotary, *args), K.rotary_ref(*args), nbytes, copy))
    return rows


def check_decode_fused(copy: float) -> list[Row]:
    """The greedy pick, silu * up and rotary + KV store at Llama-3-8B sizes, and Mixtral's routing. silu_mul and
    rotary_store must be the unfused ops bit for bit, the greedy pick torch's argmax, the routing's slots
    torch's; each prints the unfused ops' time beside it."""
    rows = []
    for b in (1, 128):
        logits = randn(b, LLAMA3_VOCAB, scale=3)
        ref = K.greedy_pick_ref(logits)
        if not torch.equal(K.greedy_pick(logits)[0], ref[0]):
            print(f"  greedy_pick B={b}: the chosen tokens differ from torch's argmax", flush=True)
        unfused = graph_time_us(partial(K.greedy_pick_ref, logits))
        print(f"  greedy_pick B={b}: unfused .float() + log_softmax + argmax {unfused:.1f} us", flush=True)
        rows.append(row("greedy_pick", b, partial(K.greedy_pick, logits), ref, logits.nbytes, copy))
    for t in (1, 128):
        gate_up = randn(t, 2 * INTER)
        ref = K.silu_mul_ref(gate_up)
        if not torch.equal(K.silu_mul(gate_up), ref):
            print(f"  silu_mul T={t}: differs from torch's F.silu(gate) * up", flush=True)
        unfused = graph_time_us(partial(K.silu_mul_ref, gate_up))
        print(f"  silu_mul T={t}: unfused F.silu(gate) * up {unfused:.1f} us", flush=True)
        rows.append(row("silu_mul", t, partial(K.silu_mul, gate_up), ref, 3 * t * INTER * 2, copy))
    inv_freq = 1.0 / (5e5 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32, device=DEV) / HEAD_DIM))
    rows += [rotary_store_row(t, inv_freq, copy) for t in (1, 128)]
    for t in (1, 128):  # Mixtral's routing: 8 experts, top 2, four variants' tables
        logits = randn(t, 8, scale=2)
        token_rows = torch.randint(0, 4, (t,), device=DEV)
        table = torch.randint(0, 16, (4, 8), device=DEV)
        ref = K.route_ref(logits, token_rows, table, 2, torch.bfloat16)
        if not torch.equal(K.route(logits, token_rows, table, 2, torch.bfloat16)[0], ref[0]):
            print(f"  route T={t}: the slots differ from torch's softmax + topk + gather", flush=True)
        unfused = graph_time_us(partial(K.route_ref, logits, token_rows, table, 2, torch.bfloat16))
        print(f"  route T={t}: unfused softmax + topk + renormalize + gather {unfused:.1f} us", flush=True)
        run = partial(K.route, logits, token_rows, table, 2, torch.bfloat16)
        rows.append(row("route", t, lambda run=run: run()[1], ref[1], logits.nbytes, copy))
    return rows


def rotary_store_row(t: int, inv_freq: torch.Tensor, copy: float) -> Row:
    """q, k, v as views of a fused qkv output; the caches strided views of layer 1 of a pool, slots shuffled."""
    q, k, v = randn(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM).split(
        [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1
    )
    q, k, v = q.view(t, HEADS, HEAD_DIM), k.view(t, KV_HEADS, HEAD_DIM), v.view(t, KV_HEADS, HEAD_DIM)
    pool = randn(triton.cdiv(t, PAGE) + 8, LAYERS, 2, PAGE, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(pool.shape[0] * PAGE, device=DEV)[:t]
    positions = torch.randint(0, 32768, (t,), device=DEV)
    where = (slots // PAGE, slots % PAGE)
    fused, split, ref_pool = pool.clone(), pool.clone(), pool.clone()

    def run(p: torch.Tensor, fn: Callable = K.rotary_store) -> torch.Tensor:
        return fn(q, k, v, positions, inv_freq, p[:, 1, 0], p[:, 1, 1], *where)

    def unfused() -> torch.Tensor:  # the engine's former path: rotary, then two index_put
        q_rot, k_rot = K.rotary(q, k, positions, inv_freq)
        split[:, 1, 0][where], split[:, 1, 1][where] = k_rot, v
        return q_rot

    if not (torch.equal(run(fused), unfused()) and torch.equal(fused, split)):
        print(f"  rotary_store T={t}: differs from rotary + index_put", flush=True)
    print(f"  rotary_store T={t}: unfused rotary + 2 index_put {graph_time_us(unfused):.1f} us", flush=True)
    ref = (run(ref_pool, K.rotary_store_ref), ref_pool)
    nbytes = 2 * t * (HEADS + 2 * KV_HEADS) * HEAD_DIM * 2
    return row("rotary_store", t, lambda: (run(fused), fused), ref, nbytes, copy)


def graph_replays_follow_new_routing() -> dict[str, float]:
    """Capture once, then change the routing / block tables in place: replays must match the reference."""
    errs = {}
    w13, w2 = randn(4, 2 * 1024, 512, scale=512**-0.5), randn(4, 512, 1024, scale=1024**-0.5)
    x, slots, weights = randn(8, 512), torch.zeros(8, 2, dtype=torch.long, device=DEV), randn(8, 2).abs()
    out = K.fused_moe(x, w13, w2, slots, weights)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.fused_moe(x, w13, w2, slots, weights)
    slots.copy_(torch.tensor([[3, 1]] * 4 + [[2, 2]] * 4))
    graph.replay()
    errs["fused_moe"] = (out.float() - K.fused_moe_ref(x, w13, w2, slots, weights).float()).abs().max().item()
    w, group = randn(3, 256, 512), torch.zeros(8, dtype=torch.long, device=DEV)
    out = K.grouped_linear(x, w, group)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.grouped_linear(x, w, group)
    group.copy_(torch.tensor([2, 0, 2, 2, 1, 0, 2, 1]))
    graph.replay()
    errs["grouped_linear"] = (out.float() - K.grouped_linear_ref(x, w, group).float()).abs().max().item()
    q, k_cache, v_cache, tables, ctx, starts, scale = attention_inputs([1] * 4, [300, 40, 17, 900])
    out = K.paged_attention(q, k_cache, v_cache, tables, ctx, starts, scale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.paged_attention(q, k_cache, v_cache, tables, ctx, starts, scale)
    ctx.copy_(torch.tensor([290, 3, 16, 650]))
    tables.copy_(tables.flip(1).roll(1, 0))
    graph.replay()
    ref = K.paged_attention_ref(q, k_cache, v_cache, tables, ctx, starts, scale)
    errs["paged_attention"] = (out.float() - ref.float()).abs().max().item()
    return errs


def sweep(label: str, run: Callable[..., object], configs: list, nbytes: int, deadline: float) -> list:
    """Time run(config=c) for each config until the deadline; print the three fastest, return all, fastest first."""
    results = []
    for cfg in configs:
        if time.time() > deadline:
            break
        try:
            results.append((round(graph_time_us(partial(run, config=cfg), rep=30), 1), str(cfg)))
        except Exception as e:  # out of shared memory or registers: skip that tile
            print(f"  {label} {cfg}: {type(e).__name__}", flush=True)
    results.sort()
    for t, cfg in results[:3]:
        print(f"  {label:32s} {t:9.1f} us {nbytes / t / 1e3:8.1f} GB/s  {cfg}", flush=True)
    return results


def gemm_candidates(block_m: int, splits: tuple[int, ...] = (1,)) -> list:
    """Tiles to sweep; `splits`: shares of K per tile too (decode: few tiles, so K split over more programs)."""
    shapes = [(bn, bk) for bn in (32, 64, 128) for bk in (64, 128, 256)]
    return [
        gemm.GemmConfig(block_m, bn, bk, wp, st, split)
        for bn, bk in shapes
        for wp, st in LAUNCHES
        for split in splits
    ]


def tune_moe(deadline: float) -> dict[str, list]:
    best = {}
    w13, w2 = randn(SLOTS, 2 * INTER, HIDDEN), randn(SLOTS, HIDDEN, INTER)
    for t in (1, 128, PREFILL_T):
        x, slots, weights = moe_inputs(t)
        bm = gemm.gemm_config(gemm._rows_per_group(t * TOP_K, SLOTS)).block_m
        rows, tiles = gemm.align_rows(slots, SLOTS, bm)
        inter = torch.empty(t * TOP_K, INTER, dtype=DT, device=DEV)
        per_pair = torch.empty(t * TOP_K, HIDDEN, dtype=torch.float32, device=DEV)
        touched = slots.unique().numel()
        gate_up = partial(gemm._gemm, x, w13, inter, rows, tiles, a_div=TOP_K, gated=True)
        down = partial(gemm._gemm, inter, w2, per_pair, rows, tiles, scale=weights.reshape(-1))
        for name, run, nbytes in (("gate_up", gate_up, w13[0].nbytes), ("down", down, w2[0].nbytes)):
            label = f"moe {name} T={t}"
            best[label] = sweep(label, run, gemm_candidates(bm), touched * nbytes, deadline)
    return best


def tune_linear_and_attention(deadline: float) -> dict[str, list]:
    best = {}
    for name, n_out, t in (("q_proj", HIDDEN, 1), ("q_proj", HIDDEN, 128), ("lm_head", VOCAB, 1)):
        w, x, group = randn(VARIANTS, n_out, HIDDEN), randn(t, HIDDEN), torch.arange(t, device=DEV) % VARIANTS
        bm = gemm.gemm_config(gemm._rows_per_group(t, VARIANTS)).block_m
        label = f"grouped_linear {name} T={t}"
        run = partial(gemm.grouped_linear, x, w, group)
        splits = (1, 2, 4, 8) if t == 1 else (1,)
        best[label] = sweep(label, run, gemm_candidates(bm, splits), min(t, VARIANTS) * w[0].nbytes, deadline)
    decode = [attn.AttnConfig(16, bn, wp, st) for bn in (32, 64, 128) for wp in (4, 8) for st in (2, 3)]
    prefill = [
        attn.AttnConfig(bm, bn, wp, st)
        for bm in (32, 64, 128)
        for bn in (32, 64)
        for wp in (4, 8)
        for st in (2, 3)
    ]
    for t, q_len, cands in ((1, 1, decode), (32, 1, decode), (128, 1, decode), (1, PREFILL_T, prefill)):
        args = attention_inputs([q_len] * t, [2048] * t)
        label = f"paged_attention {'decode' if q_len == 1 else 'prefill'} T={t * q_len}"
        run = partial(attn.paged_attention, *args)
        best[label] = sweep(label, run, cands, kv_bytes([2048] * t, t * q_len), deadline)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the table (and tuning results) as JSON here")
    parser.add_argument("--tune", action="store_true", help="also sweep tile configs")
    parser.add_argument("--budget", type=float, default=380.0, help="seconds after which tuning stops")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(0)
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device-to-device copy_: {copy:.0f} GB/s", flush=True)
    rows = []
    for check in (check_moe, check_linear, check_attention, check_norm_rope, check_decode_fused):
        rows += check(copy)
    graph = graph_replays_follow_new_routing()
    print(
        f"\n{'kernel':26s} {'T':>5s} {'time_us':>9s} {'MB':>9s} {'GB/s':>8s} {'frac':>6s} {'max_err':>9s} ok"
    )
    for r in rows:
        print(
            f"{r.kernel:26s} {r.tokens:5d} {r.time_us:9.1f} {r.bytes_moved / 1e6:9.1f} {r.gbps:8.1f} "
            f"{r.frac_copy:6.2f} {r.max_err:9.2e} {'ok' if r.ok else 'FAIL'}{'' if r.graph else ' (eager)'}"
        )
    print(f"graph replay after new routing, max error: {graph}", flush=True)
    report = {"device": torch.cuda.get_device_name(), "copy_gbps": copy, "rows": [asdict(r) for r in rows]}
    report["graph_replay_max_err"] = graph
    if args.tune:
        report["tune"] = tune_moe(start + args.budget) | tune_linear_and_attention(start + args.budget)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
