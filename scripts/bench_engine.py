"""Decode throughput of the engine at Mixtral-8x7B layer sizes against transformers and the bandwidth floor.

    python scripts/bench_engine.py                       # full run (an H100: about 8 minutes)
    python scripts/bench_engine.py --quick               # batch 1 and 32, fewer tokens

Random bf16 weights at real layer sizes (hidden 4096, intermediate 14336, 8 experts top-2, 32/8 heads,
vocab 32000), `--layers` layers. Systems: `moeshare` (one variant), `moeshare-4var` (four variants sharing
one bank of 16 slots per layer: each keeps 2 experts of its own), `transformers` (generate on the same
model). The floor is the bytes a decode step must read (non-expert weights of the variants in the batch,
the experts that uniform top-2 routing touches, the KV cache) over the measured copy bandwidth.
`dense` is a random Llama-3-8B-size model (hidden 4096, intermediate 14336, 32/8 heads, vocab 128256) with
`--dense-layers` layers, against `transformers-dense` (generate on the same model); its floor is its
weights and KV cache read once per step. `switch` and `switch-4var` are random Switch-Base-8-size models
(d_model 768, d_ff 3072, 12/12 heads of 64, 12 encoder and 12 decoder blocks with every other feed-forward
8 experts top-1, vocab 32128; four variants over one bank of 14 slots per sparse block), at batch 64 at most,
against `transformers-switch` (generate on the one-variant model): the prompt is the encoder's input, the
decode steps the decoder's; their floor is the decoder's non-expert weights (and the tied LM head) of the
variants in the batch, the experts top-1 routing touches, and the self and cross K/V read once per step.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import SamplingParams
from moeshare.engine.synthetic import (
    RandomDenseSource,
    RandomMixtralSource,
    RandomSwitchSource,
    llama_config,
    mixtral_config,
    switch_config,
)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second moved (read + write) by a large device-to-device copy."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * n / (time.perf_counter() - t0)


def step_bytes(cfg: dict, batch: int, variants: int, context: int) -> float:
    h, i, e, k = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_local_experts"],
        cfg["num_experts_per_tok"],
    )
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layers, b2 = cfg["num_hidden_layers"], 2  # bf16
    present = min(variants, batch)  # variants with a token in the step
    attn = (h * q + 2 * h * kv + q * h + e * h + 2 * h) * b2
    head = cfg["vocab_size"] * h * b2
    expert = 3 * h * i * b2
    slots = expected_slots(e, k, batch, variants)
    kv_bytes = batch * context * 2 * kv * b2
    return layers * (present * attn + slots * expert + kv_bytes) + present * head


def expected_slots(e: int, k: int, batch: int, variants: int, own: int = 2) -> float:
    """Distinct bank slots one MoE layer reads in a decode step of `batch` tokens spread evenly over `variants`
    (each keeping `own` experts of its own, the rest shared) under uniform top-k routing."""
    present = min(variants, batch)
    per_variant = batch / present
    if variants == 1:
        return e * (1 - (1 - k / e) ** per_variant)
    shared = e - own
    # shared slots are read once whoever touches them; own slots once per variant present
    return shared * (1 - (1 - k / e) ** batch) + present * own * (1 - (1 - k / e) ** per_variant)


def switch_step_bytes(cfg: dict, batch: int, variants: int, context: int, prompt: int) -> float:
    """What a decode step of a Switch model reads: the decoder's non-expert weights and tied LM head per variant
    present, the experts of its sparse blocks top-1 routing touches, each sequence's self (context tokens)
    and cross (prompt tokens) K/V."""
    d, f, e, b2 = cfg["d_model"], cfg["d_ff"], cfg["num_experts"], 2
    inner, layers, step = (
        cfg["num_heads"] * cfg["d_kv"],
        cfg["num_decoder_layers"],
        cfg["decoder_sparse_step"],
    )
    sparse = sum(1 for j in range(layers) if step > 0 and (step == 1 or j % step == 1))
    row = layers * (8 * inner * d + 3 * d) + (layers - sparse) * 2 * f * d + sparse * e * d
    row += cfg["vocab_size"] * d + d + cfg["relative_attention_num_buckets"] * cfg["num_heads"]
    present = min(variants, batch)
    experts = sparse * expected_slots(e, 1, batch, variants) * 2 * f * d
    kv = layers * batch * (context + prompt) * 2 * inner
    return (present * row + experts + kv) * b2


def dense_step_bytes(cfg: dict, batch: int, context: int) -> float:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    b2 = 2  # bf16
    layer = (h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h) * b2
    kv_bytes = batch * context * 2 * kv * b2
    return cfg["num_hidden_layers"] * (layer + kv_bytes) + v * h * b2


def bench_engine(cfg: dict, variants: int, batches: list[int], prompt: int, gen: int) -> dict[int, float]:
    kind = cfg["model_type"]
    if kind == "llama":
        source, label = RandomDenseSource(cfg), "dense"
    elif kind == "switch_transformers":
        source, label = RandomSwitchSource(cfg, variants=variants, own=2), f"switch x{variants}"
    else:
        source, label = RandomMixtralSource(cfg, variants=variants, own=2), f"moeshare x{variants}"
    blocks = max(batches) * (prompt + gen) // 16 + 64
    engine = Engine(
        [source],
        EngineConfig(
            device="cuda",
            kv_blocks=blocks,
            max_num_seqs=max(batches),
            max_batched_tokens=max(batches) * prompt,
        ),
    )
    names = [m.name for m in engine.models()]
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in batches:
        params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
        for j in range(b):
            ids = torch.randint(10, 30000, (prompt,), generator=g).tolist()
            engine.submit(Submit(names[j % len(names)], ids, params))
        tokens = len(engine.step())  # the prefill (each request's first token), done before the clock starts
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_work():
            tokens += len(engine.step())
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        assert tokens == b * gen
        decodes = gen - 1  # the steps computed on the clock, whether their events come out then or one later
        out[b] = b * decodes / dt
        print(
            f"  {label}  batch {b:4d}: {out[b]:9.1f} tok/s ({dt / decodes * 1e3:.2f} ms/step)",
            flush=True,
        )
    del engine, source
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _generate(model: torch.nn.Module, ids: torch.Tensor, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_transformers(cfg: dict, batches: list[int], prompt: int, gen: int) -> dict[int, float]:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        SwitchTransformersConfig,
        SwitchTransformersForConditionalGeneration,
    )

    kinds = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mixtral": (MixtralConfig, MixtralForCausalLM),
        "switch_transformers": (SwitchTransformersConfig, SwitchTransformersForConditionalGeneration),
    }
    config_cls, model_cls = kinds[cfg["model_type"]]
    with torch.device("cuda"):
        model = model_cls(
            config_cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        )
    model = model.to(torch.bfloat16).eval()
    out = {}
    for b in batches:
        ids = torch.randint(10, 30000, (b, prompt), device="cuda")

        _generate(model, ids, 2)
        dt = _generate(model, ids, gen) - _generate(model, ids, 1)  # decode only, like the engine's figure
        out[b] = b * (gen - 1) / dt
        print(f"  transformers  batch {b:4d}: {out[b]:9.1f} tok/s", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def load_check(layers: int, directory: Path) -> dict:
    """Write a random checkpoint at real layer sizes, then load it into the engine in a fresh process and
    report that process's peak host memory next to the largest tensor."""
    import subprocess

    from moeshare.checkpoint import open_checkpoint, write_checkpoint

    cfg = mixtral_config(layers=layers)
    source = RandomMixtralSource(cfg, variants=1, device="cpu")
    adapter = source.adapter
    names = [n for n in _checkpoint_names(cfg) if adapter.classify(n).kind != "expert"]

    def tensors():
        for n in names:
            yield n, source.tensor("v0", n)
        for layer in adapter.moe_layers:
            for e in range(adapter.num_experts):
                slot = source.bank_slot(layer, e)
                w1, w3 = slot["w13"].chunk(2)
                for role, t in (("w1", w1), ("w3", w3), ("w2", slot["w2"])):
                    yield adapter.expert_key(layer, e, role), t

    path = write_checkpoint(directory / "ckpt", cfg, tensors(), max_shard_bytes=2 << 30, force=True)
    with open_checkpoint(path) as ckpt:
        largest = max(ckpt.nbytes(n) for n in ckpt.names)
        total = sum(ckpt.nbytes(n) for n in ckpt.names)
    code = (
        "import resource, torch; from moeshare.engine.engine import Engine, EngineConfig;"
        f"e = Engine([{str(path)!r}], EngineConfig(device='cuda', kv_blocks=64, cuda_graphs=False));"
        "torch.cuda.synchronize(); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    base = "import resource, torch; torch.zeros(1, device='cuda'); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    runs = [subprocess.run([sys.executable, "-c", c], capture_output=True, text=True) for c in (code, base)]
    for r in runs:
        if r.returncode != 0:
            raise RuntimeError(f"loading check failed: {r.stderr.strip().splitlines()[-1:]}")
    peak, idle = (int(r.stdout.split()[-1]) for r in runs)
    return {
        "checkpoint_bytes": total,
        "largest_tensor_bytes": largest,
        "peak_rss_bytes": peak,
        "process_baseline_rss_bytes": idle,
        "loading_rss_bytes": peak - idle,
    }


def _checkpoint_names(cfg: dict) -> list[str]:
    from moeshare.engine.models.mixtral import MixtralDims, variant_tensor_names

    return sorted(set(variant_tensor_names(MixtralDims.from_config(cfg)).values()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--hf-batches", default="1,8,32")
    p.add_argument("--dense-layers", type=int, default=8, help="layers of the Llama-3-8B-size dense model")
    p.add_argument(
        "--systems",
        default="moeshare,moeshare-4var,transformers,dense,transformers-dense,switch,switch-4var,transformers-switch",
    )
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--out",
        type=Path,
        help="directory for the results (default: a new scratch directory, printed); the committed results "
        "are in evals/results/engine",
    )
    p.add_argument(
        "--load-check-layers", type=int, default=2, help="layers of the on-disk loading check (0: skip)"
    )
    p.add_argument("--scratch", type=Path, default=Path("/tmp/moeshare-bench"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_engine needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.batches, args.hf_batches, args.gen = "1,32", "1", 32
    if args.out is None:  # never the committed results unless named
        args.out = Path(tempfile.mkdtemp(prefix="bench-engine-out-"))
        print(f"bench_engine: results go to {args.out} (--out names another directory)", flush=True)
    batches = [int(x) for x in args.batches.split(",")]
    cfg = mixtral_config(layers=args.layers)
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"{gpu}: copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    dense_cfg = llama_config(layers=args.dense_layers)
    switch_cfg = switch_config()
    switch_batches = [b for b in batches if b <= 64]
    # a Switch prompt is the encoder's input: at most its context (n_positions, 512) less one
    switch_prompt = min(args.prompt, int(switch_cfg.get("n_positions") or 512) - 1)
    hf_batches = [int(x) for x in args.hf_batches.split(",")]
    runs = {
        "moeshare": lambda: bench_engine(cfg, 1, batches, args.prompt, args.gen),
        "moeshare-4var": lambda: bench_engine(cfg, 4, batches, args.prompt, args.gen),
        "transformers": lambda: bench_transformers(cfg, hf_batches, args.prompt, args.gen),
        "dense": lambda: bench_engine(dense_cfg, 1, batches, args.prompt, args.gen),
        "transformers-dense": lambda: bench_transformers(dense_cfg, hf_batches, args.prompt, args.gen),
        "switch": lambda: bench_engine(switch_cfg, 1, switch_batches, switch_prompt, args.gen),
        "switch-4var": lambda: bench_engine(switch_cfg, 4, switch_batches, switch_prompt, args.gen),
        "transformers-switch": lambda: bench_transformers(switch_cfg, hf_batches, switch_prompt, args.gen),
    }
    chosen = [x for x in args.systems.split(",") if x]
    if bad := [x for x in chosen if x not in runs]:
        print(f"bench_engine: --systems {bad[0]}: choose from {','.join(runs)}", file=sys.stderr)
        return 2
    results = {name: runs[name]() for name in chosen}
    loading = None
    if args.load_check_layers:
        try:
            loading = load_check(args.load_check_layers, args.scratch)
        except RuntimeError as e:
            print(e, flush=True)
    if loading:
        print(
            f"loading: peak host RSS {loading['peak_rss_bytes'] / 2**30:.2f} GiB for a "
            f"{loading['checkpoint_bytes'] / 2**30:.1f} GiB checkpoint (largest tensor "
            f"{loading['largest_tensor_bytes'] / 2**20:.0f} MiB; an idle CUDA process: "
            f"{loading['process_baseline_rss_bytes'] / 2**30:.2f} GiB)",
            flush=True,
        )
    date = datetime.date.today().isoformat()
    context = args.prompt + args.gen // 2
    records = []
    for system, per_batch in results.items():
        for b, tok_s in per_batch.items():
            variants = 4 if system.endswith("4var") else 1
            if system.endswith("dense"):
                floor = b / (dense_step_bytes(dense_cfg, b, context) / bw)
            elif system.endswith(("switch", "switch-4var")):
                floor = b / (switch_step_bytes(switch_cfg, b, variants, args.gen // 2, switch_prompt) / bw)
            else:
                floor = b / (step_bytes(cfg, b, variants, context) / bw)
            records.append(
                {
                    "system": system,
                    "batch": b,
                    "tok_s": round(tok_s, 1),
                    "floor_tok_s": round(floor, 1),
                    "frac_of_floor": round(tok_s / floor, 3),
                    "gpu": gpu,
                    "date": date,
                }
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_engine.json").write_text(json.dumps(records, indent=1) + "\n")
    # the row each system is compared with
    reference = {"dense": "dense", "transformers-dense": "dense", "transformers-switch": "switch"}
    reference |= {"switch": "switch", "switch-4var": "switch"}
    lines = [
        f"# Engine decode throughput — {gpu}, {date}",
        "",
        f"`python scripts/bench_engine.py {' '.join(argv or sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"{args.layers} layers at Mixtral-8x7B sizes; dense: {args.dense_layers} layers at Llama-3-8B sizes; "
        "switch: Switch-Base-8 sizes (12 + 12 blocks; the prompt is the encoder's input); "
        f"bf16, prompt {args.prompt}, {args.gen} generated; copy bandwidth {bw / 1e9:.0f} GB/s.",
        "",
        "| system | batch | tok/s | floor tok/s | of floor | vs our engine (same model, x1) |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        ours = results.get(reference.get(r["system"], "moeshare"), {})
        rel = r["tok_s"] / ours[r["batch"]] if r["batch"] in ours else float("nan")
        lines.append(
            f"| {r['system']} | {r['batch']} | {r['tok_s']} | {r['floor_tok_s']} | "
            f"{r['frac_of_floor']:.0%} | {rel:.2f}x |"
        )
    if loading:
        (args.out / "loading.json").write_text(json.dumps(loading, indent=1) + "\n")
        lines += [
            "",
            f"Loading a {loading['checkpoint_bytes'] / 2**30:.1f} GiB checkpoint ({args.load_check_layers} layers) "
            f"from disk: peak host RSS {loading['peak_rss_bytes'] / 2**30:.2f} GiB, of which "
            f"{loading['process_baseline_rss_bytes'] / 2**30:.2f} GiB is an idle CUDA process; largest tensor "
            f"{loading['largest_tensor_bytes'] / 2**20:.0f} MiB.",
        ]
    (args.out / "bench_engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for system in results:
            rs = [r for r in records if r["system"] == system]
            ax.plot([r["batch"] for r in rs], [r["tok_s"] for r in rs], marker="o", label=system)
        for system, style in (("moeshare", "k--"), ("dense", "k:")):
            rs = [r for r in records if r["system"] == system]
            if rs:
                ax.plot(
                    [r["batch"] for r in rs], [r["floor_tok_s"] for r in rs], style, label=f"{system} floor"
                )
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tok/s", title=f"{gpu}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "bench_engine.png", dpi=120)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
