"""The elastic KV pool on a GPU: page map / unmap cost, and decode with it against the fixed pool.

Maps and unmaps pages of the CUDA driver's virtual memory API through PageManager and times them per page;
checks a tensor over a range reads back what was written; then decodes with an 8-layer Llama-3-8B-size
random model (bf16, CUDA graphs, 512-token prompts) at batch 1, 8, 32, 64 with a fixed KV pool and with the
elastic pool of the same bytes: tokens must be identical, throughput within 2%. Then two models share one pool
while the load moves from one to the other: pages per model over the steps, plotted. Last, a full-depth
Llama-3-8B-size checkpoint written to --scratch is evicted and activated (pinned host memory, and the checkpoint
with its page cache dropped): times, bandwidth against the measured pinned bandwidth, tokens before and after.

    python scripts/check_memory_gpu.py --out evals/results/memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moeshare.checkpoint.io import write_checkpoint
from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.models.llama import DenseLlama, LlamaDims, tensor_names
from moeshare.engine.request import SamplingParams
from moeshare.engine.synthetic import RandomDenseSource, llama_config
from moeshare.memory.blocks import BlockPool
from moeshare.memory.pages import PageManager
from moeshare.memory.weights import CHUNK, RUN


def page_costs(pages: int = 256) -> dict:
    manager = PageManager.for_device(torch.device("cuda"), pages * (2 << 20))
    region = manager.reserve("check", pages * manager.page_bytes)
    t0 = time.perf_counter()
    for p in range(pages):
        assert manager.map(region, p)
    first_map = (time.perf_counter() - t0) / pages
    view = manager.view(region)
    view.view(torch.int32).copy_(torch.arange(view.numel() // 4, device="cuda", dtype=torch.int32))
    ok = bool(
        (
            view.view(torch.int32)[:: 1 << 18] == torch.arange(0, view.numel() // 4, 1 << 18, device="cuda")
        ).all()
    )
    t0 = time.perf_counter()
    for p in range(pages):
        manager.give_back(region, p)
    manager.reap(wait=True)
    unmap = (time.perf_counter() - t0) / pages
    t0 = time.perf_counter()
    for p in range(pages):  # again, from the physical pages kept for reuse
        assert manager.map(region, p)
    remap = (time.perf_counter() - t0) / pages
    manager.release(region)
    chunked = manager.reserve("check", pages * manager.page_bytes, chunk=CHUNK)  # as weights map theirs
    t0 = time.perf_counter()
    for first in range(0, pages, RUN):
        assert manager.map_run(chunked, first, RUN)
    chunk_map = (time.perf_counter() - t0) / pages
    manager.release(chunked)
    manager.backend.trim()
    return {
        "page_bytes": manager.page_bytes,
        "map_first_us": first_map * 1e6,
        "map_reused_us": remap * 1e6,
        "unmap_us": unmap * 1e6,
        "map_in_chunks_us": chunk_map * 1e6,
        "view_reads_back": ok,
    }


def decode(
    configs: dict[str, EngineConfig], batches: list[int], prompt: int, gen: int, warm_runs: int = 3
) -> dict:
    """tok/s of each engine at each batch: the first time ("cold") the elastic pool maps fresh pages as the
    sequences grow, then ("warm", the median of `warm_runs`) it takes back the pages the first gave back, as
    in a long-running server. Both engines live at once and take turns, so drift of the GPU's clocks hits both
    alike."""
    engines = {name: Engine([RandomDenseSource(llama_config(layers=8))], c) for name, c in configs.items()}
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    result = {name: {"cold": {}, "warm": {}, "tokens": {}} for name in engines}
    for b in batches:
        for turn in ("cold", *["warm"] * warm_runs):
            prompts = [torch.randint(10, 30000, (prompt,), generator=g).tolist() for _ in range(b)]
            for name, engine in engines.items():
                ids = [engine.submit(Submit("llama", p, params)) for p in prompts]
                out = {i: [] for i in ids}
                for ev in engine.step():
                    out[ev.seq_id].append(ev.token_id)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                while engine.has_work():
                    for ev in engine.step():
                        out[ev.seq_id].append(ev.token_id)
                torch.cuda.synchronize()
                rate = b * (gen - 1) / (time.perf_counter() - t0)
                result[name][turn].setdefault(b, []).append(rate)
                if turn == "cold":
                    result[name]["tokens"][b] = [out[i] for i in ids]
    for name, engine in engines.items():
        result[name]["pages"] = engine.stats().pages
        for turn in ("cold", "warm"):
            result[name][turn] = {b: statistics.median(r) for b, r in result[name][turn].items()}
    del engines
    torch.cuda.empty_cache()
    return result


def trace(device: str, out: Path | None, layers: int = 8, steps: int = 240) -> list[dict]:
    """Two dense models on one elastic pool; the load moves from one to the other halfway: pages per model
    at every step (and a plot). Each wave keeps up to 16 requests of its model in flight."""
    small = device == "cpu"  # a smoke run of the same trace on CPU with a small model
    cfg = (
        llama_config(layers=2, hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=1000)
        if small
        else (llama_config(layers=layers))
    )
    dtype = torch.float32 if small else torch.bfloat16
    sources = [RandomDenseSource(cfg, device, dtype, seed=i, name=n) for i, n in enumerate(("a", "b"))]
    engine = Engine(
        sources,
        EngineConfig(
            device=device,
            pool_bytes=2 * weight_bytes(cfg, dtype) + ((64 if small else 4096) << 20),
            max_num_seqs=16,
        ),
    )
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    rows, live = [], {"a": 0, "b": 0}
    for step in range(steps):
        busy = "a" if step < steps // 2 else "b"
        while live[busy] < 16 and step < steps - 64:
            engine.submit(Submit(busy, torch.randint(10, 900, (256,), generator=g).tolist(), params))
            live[busy] += 1
        for ev in engine.step():
            if ev.finished:
                live[ev.model] -= 1
        pages = engine.stats().pages
        free = pages.free_pages + pages.idle  # given-back pages are anyone's for the taking
        rows.append({"step": step, **{m: pages.mapped.get(m, 0) for m in ("a", "b")}, "free": free})
    if out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key in ("a", "b", "free"):
            ax.plot(
                [r["step"] for r in rows],
                [r[key] for r in rows],
                label=f"model {key}" if key != "free" else "free",
            )
        ax.set_xlabel("engine step")
        ax.set_ylabel(f"pages of {pages.page_bytes >> 20} MiB")
        ax.set_title("Pages follow the load: model a busy, then model b")
        ax.legend()
        fig.tight_layout()
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "pages_follow_the_load.png", dpi=120)
    return rows


def weight_bytes(config: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """A dense model's weights, and a little for their range's alignment: what the pool holds beside the KV."""
    return DenseLlama(LlamaDims.from_config(config), 1, dtype, torch.device("meta")).row_bytes() + (32 << 20)


def pinned_bandwidth(nbytes: int = 4 << 30) -> float:
    """Host-to-device copy bandwidth from pinned memory, bytes/s (best of three)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def write_llama(out: Path, layers: int) -> Path:
    """A Llama-3-8B-size checkpoint of random weights on disk (bf16 safetensors)."""
    cfg = llama_config(layers=layers)
    src = RandomDenseSource(cfg)
    dims = LlamaDims.from_config(cfg)
    tensors = ((key, src.tensor("llama", key).cpu()) for key in tensor_names(dims).values())
    return write_checkpoint(out, cfg, tensors, max_shard_bytes=2 << 30, force=True)


def drop_from_page_cache(directory: Path) -> None:
    """Ask the kernel to forget the files' cached pages, so reading them goes to the disk."""
    for f in directory.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def eviction(layers: int, scratch: Path) -> dict:
    """Evict and activate a Llama-3-8B-size model served from a checkpoint on disk: to and from pinned host
    memory, and dropped and read again from the checkpoint; greedy tokens before and after each cycle."""
    bandwidth = pinned_bandwidth()
    ckpt = write_llama(scratch / "llama-8b", layers)
    try:
        return _evict_and_activate(ckpt, bandwidth)
    finally:
        shutil.rmtree(ckpt)


def _evict_and_activate(ckpt: Path, bandwidth: float, activations_timed: int = 5) -> dict:
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    cfg = EngineConfig(device="cuda", pool_bytes=weights + (8 << 30), max_num_seqs=8, evict_to="host")
    engine = Engine([ckpt], cfg)
    name = engine.models()[0].name
    instance = engine.instance(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 30000, (64,), generator=g).tolist() for _ in range(4)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)

    def tokens() -> list[list[int]]:
        ids = [engine.submit(Submit(name, p, params)) for p in prompts]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_work():
            for ev in engine.step():
                out[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
        return [out[i] for i in ids]

    def timed(fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if instance.weights.ready is not None:
            instance.weights.ready.synchronize()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    before = tokens()
    row = {"weights_bytes": instance.weights.nbytes, "pinned_h2d_bytes_per_s": bandwidth}
    row["evict_first_s"] = timed(lambda: engine.evict(name))  # pins a host buffer the first time
    engine.pages.reap(wait=True)
    row["activate_host_s"] = timed(instance.activate)
    row["same_after_host"] = tokens() == before
    evicts, activations = [], []
    for _ in tqdm(range(activations_timed), desc="evict -> activate", leave=False):
        evicts.append(timed(lambda: engine.evict(name)))
        engine.pages.reap(wait=True)  # its pages unmapped, as when another model took them: mapped again
        activations.append(timed(instance.activate))
    row["evict_again_s"] = statistics.median(evicts)
    row["activate_host_again_s"] = statistics.median(activations)
    row["activate_host_all_s"] = activations
    engine.evict(name)  # its pages given back but still mapped, as when nobody needed them: a copy only
    row["activate_host_mapped_s"] = timed(instance.activate)
    backend = engine.pages.backend
    row["physical_within_pool"] = backend.held <= backend.limit
    engine.config.evict_to = "disk"
    instance.weights.drop_host_copy()  # what an eviction under host-memory pressure keeps
    row["evict_drop_s"] = timed(lambda: engine.evict(name))
    engine.pages.reap(wait=True)
    drop_from_page_cache(ckpt)
    row["activate_disk_s"] = timed(instance.activate)
    row["same_after_disk"] = tokens() == before
    row["activate_host_fraction_of_pinned"] = weights / row["activate_host_again_s"] / bandwidth
    return row


def take_turns(rounds: int = 3) -> dict:
    """Two 8-layer Llama-3-8B-size models on a pool that holds one model's weights at a time: requests alternate
    between them, so each one activates its model (evicting the other, idle): time to first token of a request
    whose model is on the device, and of one whose model must come back; tokens the same as alone."""
    cfg = llama_config(layers=8)
    w = weight_bytes(cfg)
    sources = [RandomDenseSource(cfg, seed=i, name=n) for i, n in enumerate(("a", "b"))]
    alone = {}
    prompt = torch.randint(10, 30000, (128,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for src in sources:
        engine = Engine([src], EngineConfig(device="cuda", max_num_seqs=8, kv_blocks=256))
        alone[src.variants[0]] = engine.generate(src.variants[0], prompt, params)[1]
        del engine
        torch.cuda.empty_cache()
    engine = Engine(sources, EngineConfig(device="cuda", max_num_seqs=8, pool_bytes=w + (1 << 30)))

    def ttft(model: str) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        seq = engine.submit(Submit(model, prompt, params))
        first, tokens = None, []
        while engine.has_work():
            for ev in engine.step():
                if ev.seq_id == seq and ev.token_id >= 0:
                    first = first or time.perf_counter() - t0
                    tokens.append(ev.token_id)
        return first, tokens

    switch, stay, same = [], [], True
    for _ in range(rounds):
        for model in ("a", "b"):
            t, tokens = ttft(model)  # its model was evicted for the other one
            switch.append(t)
            same &= tokens == alone[model]
            t, tokens = ttft(model)  # on the device now
            stay.append(t)
            same &= tokens == alone[model]
    activations = sum(engine.instance(m).weights.activations for m in ("a", "b"))
    return {
        "weights_bytes": w,
        "ttft_switch_s": sorted(switch)[len(switch) // 2],
        "ttft_resident_s": sorted(stay)[len(stay) // 2],
        "activations": activations,
        "same_tokens": same,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument(
        "--layers", type=int, default=32, help="of the model evicted and activated (32: full depth)"
    )
    ap.add_argument("--scratch", type=Path, default=Path("/tmp"), help="where its checkpoint is written")
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    gpu = torch.cuda.get_device_name()
    costs = page_costs()
    print(f"{gpu}: {costs}", flush=True)
    prompt, most = 512, max(batches)
    blocks = most * (prompt + args.gen) // 16 + 64
    kv_bytes = blocks * BlockPool.block_bytes(16, 8, 8, 128, torch.bfloat16)  # 8 layers, 8 KV heads of 128
    common = dict(device="cuda", max_num_seqs=most, max_batched_tokens=most * prompt)
    runs = decode(
        {
            "fixed": EngineConfig(kv_blocks=blocks, **common),
            "elastic": EngineConfig(pool_bytes=weight_bytes(llama_config(layers=8)) + kv_bytes, **common),
        },
        batches,
        prompt,
        args.gen,
    )
    fixed, elastic = runs["fixed"], runs["elastic"]
    rows = []
    for b in batches:
        rows.append(
            {
                "batch": b,
                "fixed_tok_s": round(fixed["warm"][b], 1),
                "elastic_tok_s": round(elastic["warm"][b], 1),
                "diff": round(elastic["warm"][b] / fixed["warm"][b] - 1, 4),
                "cold_diff": round(elastic["cold"][b] / fixed["cold"][b] - 1, 4),
                "same_tokens": fixed["tokens"][b] == elastic["tokens"][b],
            }
        )
    lines = [
        f"# Elastic KV pool — {gpu}, {time.strftime('%Y-%m-%d')}",
        "",
        "`python scripts/check_memory_gpu.py --out evals/results/memory`",
        "",
        f"Pages of {costs['page_bytes'] >> 20} MiB: map + set access {costs['map_first_us']:.1f} us "
        f"(a new physical page), {costs['map_reused_us']:.1f} us (a kept one), "
        f"{costs['map_in_chunks_us']:.1f} us in runs of {CHUNK}-page chunks (as weights are mapped); "
        f"unmap {costs['unmap_us']:.1f} us; "
        f"a tensor over the range reads back what was written: {costs['view_reads_back']}.",
        "",
        "Decode, 8-layer Llama-3-8B-size random model, bf16, CUDA graphs, 512-token prompts, "
        f"{args.gen} generated; the elastic pool has the fixed pool's bytes and the weights. Both engines take turns at each "
        "batch: *cold*, the elastic pool maps fresh pages as sequences grow; *warm* (the figure, the median of "
        "3 runs), it takes back the pages the cold run gave back, as a long-running server does "
        f"(pages at the end: {elastic['pages']}).",
        "",
        "| batch | fixed tok/s | elastic tok/s | difference | cold difference | same tokens |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['batch']} | {r['fixed_tok_s']} | {r['elastic_tok_s']} | {r['diff']:+.1%} | {r['cold_diff']:+.1%} "
        f"| {r['same_tokens']} |"
        for r in rows
    ]
    rows_trace = trace("cuda", args.out)
    peak = {m: max(r[m] for r in rows_trace) for m in ("a", "b")}
    half = len(rows_trace) // 2
    lines += [
        "",
        "Two models on one pool, the load moving from a to b halfway (`pages_follow_the_load.png`): peak pages "
        f"a {peak['a']}, b {peak['b']}; a holds {rows_trace[half - 1]['a']} just before the switch and "
        f"{rows_trace[-1]['a']} at the end.",
    ]
    ev = eviction(args.layers, args.scratch)
    gb = ev["weights_bytes"] / 1e9
    lines += [
        "",
        f"Eviction and activation of a {args.layers}-layer Llama-3-8B-size model ({gb:.2f} GB of bf16 weights) "
        "served from a checkpoint on disk; pinned host-to-device bandwidth measured here "
        f"{ev['pinned_h2d_bytes_per_s'] / 1e9:.1f} GB/s.",
        "",
        "| what | seconds | GB/s | tokens the same after |",
        "|---|---|---|---|",
        f"| evict to pinned host memory, first time (pins the buffer) | {ev['evict_first_s']:.3f} | "
        f"{gb / ev['evict_first_s']:.1f} | |",
        f"| activate from pinned host memory | {ev['activate_host_s']:.3f} | {gb / ev['activate_host_s']:.1f} | "
        f"{ev['same_after_host']} |",
        f"| evict again (median of {len(ev['activate_host_all_s'])}) | {ev['evict_again_s']:.3f} | "
        f"{gb / ev['evict_again_s']:.1f} | |",
        f"| activate from pinned host memory, pages mapped again (median of {len(ev['activate_host_all_s'])}) "
        f"| {ev['activate_host_again_s']:.3f} | {gb / ev['activate_host_again_s']:.1f} | |",
        f"| activate from pinned host memory, its pages still mapped | {ev['activate_host_mapped_s']:.3f} | "
        f"{gb / ev['activate_host_mapped_s']:.1f} | |",
        f"| evict, dropping the weights | {ev['evict_drop_s']:.3f} | | |",
        f"| activate from the checkpoint on disk (page cache dropped) | {ev['activate_disk_s']:.3f} | "
        f"{gb / ev['activate_disk_s']:.1f} | {ev['same_after_disk']} |",
        "",
        f"Activation from pinned host memory runs at {ev['activate_host_fraction_of_pinned']:.0%} of the pinned "
        "bandwidth (target: at least 80%, and at most 0.5 s); every activation: "
        + ", ".join(f"{t:.3f}" for t in ev["activate_host_all_s"])
        + f" s. Physical memory held within the pool's pages throughout: {ev['physical_within_pool']}.",
    ]
    turns = take_turns()
    lines += [
        "",
        "Two 8-layer models on a pool with room for one model's weights "
        f"({turns['weights_bytes'] / 1e9:.2f} GB each), requests alternating between them "
        f"({turns['activations']} activations): median time to first token "
        f"{turns['ttft_resident_s'] * 1e3:.1f} ms with the model on the device, "
        f"{turns['ttft_switch_s'] * 1e3:.1f} ms when it must come back (the other evicted to pinned host memory); "
        f"tokens the same as alone: {turns['same_tokens']}.",
    ]
    print("\n".join(lines), flush=True)
    bad = [r for r in rows if not r["same_tokens"] or abs(r["diff"]) > 0.02] + (
        [] if costs["view_reads_back"] else [costs]
    )
    if not ev["physical_within_pool"]:
        bad.append({"eviction": "the pool holds more physical memory than its pages"})
    if not (ev["same_after_host"] and ev["same_after_disk"] and turns["same_tokens"]):
        bad.append({"eviction": "tokens differ after an evict -> activate cycle"})
    if ev["activate_host_fraction_of_pinned"] < 0.8 or ev["activate_host_again_s"] > 0.5:
        bad.append({"activation": "slower than 80% of the pinned bandwidth or 0.5 s"})
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_memory_gpu.md").write_text("\n".join(lines) + "\n")
        (args.out / "check_memory_gpu.json").write_text(
            json.dumps({"gpu": gpu, "pages": costs, "decode": rows, "eviction": ev, "turns": turns}, indent=1)
            + "\n"
        )
    if bad:
        print(f"check_memory_gpu: FAILED: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
