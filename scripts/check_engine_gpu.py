"""The engine on a GPU against transformers, on the zoo's trained tiny Mixtral variants.

    python scripts/check_engine_gpu.py --zoo ~/.cache/moeshare/zoo/tiny

Checks, with Triton kernels and CUDA graphs: teacher-forced logits and 32 greedy tokens against transformers
(float32); a batch mixing all variants against each alone, with prefills joining mid-decode (bfloat16);
partial reconfiguration (2 resident rows for 4 variants, copies on a side stream) against all resident.
Prints a table; exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from moeshare.consolidate import Options, consolidate
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import SamplingParams

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
PROMPTS = ["And God said unto Moses,", "A man who has", "Wer nicht wagt,", "def __init__(self,"]
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def together(engine: Engine, stagger: int) -> list[list[int]]:
    seqs = []
    for v, p in zip(VARIANTS, PROMPTS, strict=True):
        seqs.append(engine.add_request(v, p, GREEDY))
        for _ in range(stagger):
            engine.step()
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def main() -> int:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser()
    p.add_argument("--zoo", type=Path, required=True)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for v, prompt in zip(VARIANTS, PROMPTS, strict=True):
        path = args.zoo / "mixtral" / v
        engine = Engine([path], EngineConfig(device="cuda", dtype=torch.float32))
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
        text = (args.zoo / "heldout" / f"{v}.txt").read_text()[:300]
        ids = engine.tokenizer(v)(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            theirs = hf(torch.tensor([ids], device="cuda")).logits[0].float()
        ours = engine.score(v, ids)
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
                f"fp32 logits + greedy vs transformers: {v}",
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
                f"{same}/128 tokens, {st['swap_ins']} swap-ins, {st['swap_seconds'] * 1e3:.1f} ms",
            )
        )
    width = max(len(r[0]) for r in rows)
    for name, ok, detail in rows:
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {detail}")
    return 0 if all(r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
