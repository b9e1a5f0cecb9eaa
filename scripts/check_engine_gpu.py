"""The engine on a GPU against transformers, on the zoo's trained tiny Mixtral variants and dense models.

    python scripts/check_engine_gpu.py --zoo ~/.cache/moeshare/zoo/tiny

Checks, with Triton kernels and CUDA graphs: teacher-forced logits and 32 greedy tokens against transformers
(float32); a batch mixing all variants against each alone, with prefills joining mid-decode (bfloat16);
partial reconfiguration (2 resident rows for 4 variants, copies on a side stream) against all resident;
dense Llama and Qwen2 models the same way (float32 against transformers; bfloat16 with CUDA graphs, in one
engine with the Mixtral store, together against alone, on one stream and on a stream per model); and models on
streams of their own sharing a page pool with a few KV pages to spare (preempted, pages handed between them)
against one stream with room; Switch (encoder-decoder) checkpoints against transformers (float32) and a
Switch store's variants together against alone (bfloat16).
Prints a table; exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeshare.consolidate import Options, consolidate
from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import SamplingParams
from moeshare.engine.synthetic import from_spec

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
DENSE = [("llama", "kjv"), ("qwen2", "python")]  # zoo arch, variant
PROMPTS = ["And God said unto Moses,", "A man who has", "Wer nicht wagt,", "def __init__(self,"]
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def together(
    engine: Engine, stagger: int, jobs: list[tuple[str, str]] | None = None, params: SamplingParams = GREEDY
) -> list[list[int]]:
    handles, tokens = [], {}

    def collect(events: list) -> None:
        for ev in events:
            tokens.setdefault(ev.seq_id, []).extend([ev.token_id] if ev.token_id >= 0 else [])

    for v, p in jobs or list(zip(VARIANTS, PROMPTS, strict=True)):
        handles.append(engine.submit(Submit(v, p, params)))
        for _ in range(stagger):
            collect(engine.step())
    while engine.has_work():
        collect(engine.step())
    return [tokens[h] for h in handles]


def streams_under_pressure() -> tuple[str, bool, str]:
    """Two dense models and a 2-variant store (random weights, float32) on a page pool with a few KV pages
    beyond their weights, their batches on a stream each: KV pages go back and forth between models whose
    work runs side by side (preemptions, maps and unmaps every step), tokens as one stream with room."""
    dense = "kind=llama,layers=8,hidden=512,intermediate=1024,heads=8,kv_heads=8,vocab=1000"
    store = "variants=2,own=1,experts=4,layers=4,hidden=512,intermediate=1024,heads=8,kv_heads=8,vocab=1000"
    params = SamplingParams(max_tokens=160, temperature=0, ignore_eos=True)

    def engine(multiplex: str, pool: int) -> Engine:
        config = EngineConfig(
            device="cuda", dtype=torch.float32, multiplex=multiplex, pool_bytes=pool, max_num_seqs=16
        )
        e = Engine([], config)
        e.load(from_spec(dense, "cuda", torch.float32), name="a")
        e.load(from_spec(dense + ",seed=3", "cuda", torch.float32), name="b")
        e.load(from_spec(store, "cuda", torch.float32))
        return e

    g = torch.Generator().manual_seed(0)
    jobs = [
        (m, torch.randint(5, 900, (40,), generator=g).tolist())
        for _ in range(6)
        for m in ("a", "b", "v0", "v1")
    ]

    def run(e: Engine) -> list[list[int]]:
        handles, tokens = [], {}
        for i, (m, p) in enumerate(jobs):
            handles.append(e.submit(Submit(m, p, params)))
            if i % 4 == 3:
                for ev in e.step():
                    tokens.setdefault(ev.seq_id, []).extend([ev.token_id] if ev.token_id >= 0 else [])
        while e.has_work():
            for ev in e.step():
                tokens.setdefault(ev.seq_id, []).extend([ev.token_id] if ev.token_id >= 0 else [])
        return [tokens.get(h, []) for h in handles]

    reference = run(engine("serial", 4 << 30))
    roomy = engine("streams", 4 << 30).stats().pages
    tight = engine("streams", (sum(roomy.mapped.values()) + 3) * roomy.page_bytes)
    got = run(tight)
    same = sum(x == y for a, b in zip(got, reference, strict=True) for x, y in zip(a, b, strict=True))
    total = sum(len(a) for a in reference)
    st = tight.stats()
    detail = (
        f"{same}/{total} tokens, {st.preemptions} preemptions, {st.pages.maps} maps, {st.pages.unmaps} unmaps"
    )
    return (
        "fp32, 3 models on streams, 3 KV pages beyond their weights vs one stream with room",
        same == total,
        detail,
    )


SWITCH_PROMPTS = [  # span-denoising prompts for the zoo's Switch variants, in VARIANTS order
    "And God said, Let there be <extra_id_0>: and there was light.",
    "A man who has <extra_id_0> is never alone.",
    "Wer nicht <extra_id_0>, der nicht.",
    "def main(<extra_id_0>):\n    return 0",
]


def switch_checks(zoo: Path, tmp: Path, mixtral: Path) -> list[tuple[str, bool, str]]:
    """Switch (encoder-decoder) through the engine's Triton kernels: float32 greedy tokens against transformers'
    generate for two checkpoints; bfloat16, decode steps replayed from captured graphs against eager ones, a
    consolidated store's four variants together against each alone,
    and beside the Mixtral store `mixtral` with each instance's batches on a stream of its own."""
    from transformers import AutoModelForSeq2SeqLM

    rows = []
    params = SamplingParams(max_tokens=24, temperature=0)
    for v in ("kjv", "python"):
        path, prompt = zoo / "switch" / v, SWITCH_PROMPTS[VARIANTS.index(v)]
        engine = Engine([path], EngineConfig(device="cuda", dtype=torch.float32))
        ids = engine.tokenizer(v)(prompt, add_special_tokens=False)["input_ids"]
        mine = engine.generate(v, ids, params)[1]
        hf = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, do_sample=False)
        ref = ref[0, 1:].tolist()
        eos = hf.config.eos_token_id
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref
        rows.append((f"fp32 greedy vs transformers: switch/{v}", mine == ref, f"{len(mine)} tokens"))
    store = tmp / "switch"
    consolidate([zoo / "switch" / v for v in VARIANTS], store, Options(budget="0.5", self_calib=0))

    def check(name: str, engine: Engine, jobs: list[tuple[str, str]], alone: list[list[int]], stagger: int):
        got = together(engine, stagger, jobs, params)
        n = sum(len(a) for a in alone)
        same = sum(a == b for x, y in zip(got, alone, strict=True) for a, b in zip(x, y, strict=True))
        rows.append((f"{name}, stagger {stagger}", same == n, f"{same}/{n} tokens"))

    jobs = list(zip(VARIANTS, SWITCH_PROMPTS, strict=True))
    alone = [Engine([store], EngineConfig(device="cuda")).generate(v, p, params)[1] for v, p in jobs]
    eager = Engine([store], EngineConfig(device="cuda", cuda_graphs=False))
    plain = [eager.generate(v, p, params)[1] for v, p in jobs]
    same = sum(a == b for x, y in zip(plain, alone, strict=True) for a, b in zip(x, y, strict=True))
    n = sum(len(a) for a in alone)
    rows.append(("bf16 switch decode: captured graphs vs eager", same == n, f"{same}/{n} tokens"))
    for stagger in (0, 3):
        check(
            "bf16 switch variants together vs alone",
            Engine([store], EngineConfig(device="cuda")),
            jobs,
            alone,
            stagger,
        )
    # the Mixtral store's variants are served under their own names too: the Switch checkpoints go by s-NAME here
    both = Engine([], EngineConfig(device="cuda", multiplex="streams"))
    for v in VARIANTS:
        both.load(zoo / "switch" / v, name=f"s-{v}")
    both.load(mixtral)
    mixed = [(f"s-{v}", p) for v, p in jobs] + list(zip(VARIANTS, PROMPTS, strict=True))
    ref = [
        Engine([zoo / "switch" / v], EngineConfig(device="cuda")).generate(v, p, params)[1] for v, p in jobs
    ]
    ref += [Engine([mixtral], EngineConfig(device="cuda")).generate(v, p, params)[1] for v, p in mixed[4:]]
    check("bf16 4 switch checkpoints + mixtral store on streams vs alone", both, mixed, ref, 2)
    return rows


def main() -> int:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser()
    p.add_argument("--zoo", type=Path, required=True)
    p.add_argument("--only", choices=["all", "switch"], default="all", help="switch: the Switch checks alone")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = Rows()
    checked = [("mixtral", v, p) for v, p in zip(VARIANTS, PROMPTS, strict=True)]
    checked += [(arch, v, PROMPTS[VARIANTS.index(v)]) for arch, v in DENSE]
    if args.only == "switch":
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "store"
            consolidate([args.zoo / "mixtral" / v for v in VARIANTS], store, Options(budget="1.0"))
            rows += switch_checks(args.zoo, Path(tmp), store)
        return rows.table()
    for arch, v, prompt in checked:
        path = args.zoo / arch / v
        engine = Engine([path], EngineConfig(device="cuda", dtype=torch.float32))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        text = (args.zoo / "heldout" / f"{v}.txt").read_text()[:300]
        ids = engine.tokenizer(v)(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            theirs = hf(torch.tensor([ids], device="cuda")).logits[0].float()
        ours = engine.teacher_forced(v, ids)
        rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        pids = engine.tokenizer(v)(prompt, add_special_tokens=False)["input_ids"]
        mine = engine.generate(v, pids, GREEDY)[1]
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([pids], device="cuda"),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(pids) :].tolist()
        same = sum(a == b for a, b in zip(mine, ref, strict=True))
        rows.append(
            (
                f"fp32 logits + greedy vs transformers: {arch}/{v}",
                rel < 1e-3 and same == 32,
                f"rel err {rel:.1e}, {same}/32 tokens",
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        consolidate([args.zoo / "mixtral" / v for v in VARIANTS], store, Options(budget="1.0"))
        alone = [
            Engine([store], EngineConfig(device="cuda")).generate(v, p, GREEDY)[1]
            for v, p in zip(VARIANTS, PROMPTS, strict=True)
        ]
        for stagger in (0, 3):
            got = together(Engine([store], EngineConfig(device="cuda")), stagger)
            same = sum(a == b for x, y in zip(got, alone, strict=True) for a, b in zip(x, y, strict=True))
            rows.append((f"bf16 mixed batch vs alone, stagger {stagger}", same == 128, f"{same}/128 tokens"))
        engine = Engine([store], EngineConfig(device="cuda", max_resident_variants=2))
        full = together(Engine([store], EngineConfig(device="cuda")), 2)
        got = together(engine, 2)
        same = sum(a == b for x, y in zip(got, full, strict=True) for a, b in zip(x, y, strict=True))
        st = engine.stats()
        rows.append(
            (
                "bf16 2 resident rows vs all resident",
                same == 128,
                f"{same}/128 tokens, {st.swap_ins} swap-ins, {st.swap_seconds * 1e3:.1f} ms",
            )
        )
        # dense models beside the store, bf16 with CUDA graphs: all together against each alone
        names = [f"{arch}-{v}" for arch, v in DENSE]
        jobs = list(zip(VARIANTS, PROMPTS, strict=True))
        jobs += [(n, PROMPTS[VARIANTS.index(v)]) for n, (_, v) in zip(names, DENSE, strict=True)]

        def mixed(multiplex: str = "serial", pool: int | None = None) -> Engine:
            engine = Engine([store], EngineConfig(device="cuda", multiplex=multiplex, pool_bytes=pool))
            for n, (arch, v) in zip(names, DENSE, strict=True):
                engine.load(args.zoo / arch / v, name=n)
            return engine

        alone = [mixed().generate(m, p, GREEDY)[1] for m, p in jobs]
        # serial: one stream; streams: each instance's batches on a stream of its own (with the page pool,
        # pages and weights move between models whose work runs side by side)
        for multiplex, pool, stagger in (("serial", None, 0), ("serial", None, 3), ("streams", None, 0),
                                         ("streams", None, 3), ("streams", 2 << 30, 3)):  # fmt: skip
            got = together(mixed(multiplex, pool), stagger, jobs)
            same = sum(a == b for x, y in zip(got, alone, strict=True) for a, b in zip(x, y, strict=True))
            where = f"{multiplex}{', page pool' if pool else ''}"
            rows.append(
                (
                    f"bf16 graphs, store + 2 dense models together vs alone ({where}), stagger {stagger}",
                    same == 32 * len(jobs),
                    f"{same}/{32 * len(jobs)} tokens",
                )
            )
        rows += switch_checks(args.zoo, Path(tmp), store)
    rows.append(streams_under_pressure())
    return rows.table()


class Rows(list):
    """The checks' rows, each also shown as it comes (with the seconds since the start) on stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.perf_counter()

    def append(self, row: tuple[str, bool, str]) -> None:
        super().append(row)
        took = time.perf_counter() - self.start
        print(
            f"[{took:6.0f} s] {'ok  ' if row[1] else 'FAIL'} {row[0]}: {row[2]}", file=sys.stderr, flush=True
        )

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self

    def table(self) -> int:
        width = max(len(r[0]) for r in self)
        for name, ok, detail in self:
            print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {detail}")
        return 0 if all(r[1] for r in self) else 1


if __name__ == "__main__":
    sys.exit(main())
