"""`make demo`: the main job end to end on whatever device is here.

Builds (or reuses) the tiny zoo's Mixtral, Switch and Llama models, consolidates the Mixtral and Switch variants
into stores at half the expert memory (printing each report), starts the server on loopback with the Mixtral
store and a dense Llama checkpoint beside it, streams a completion from each model, prints them with the
server's stats, and stops the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from moeshare.client import Client
from moeshare.consolidate import Options, consolidate, format_report, summarize
from moeshare.zoo import build_zoo, load_zoo
from moeshare.zoo import format_report as zoo_report

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
PROMPTS = ["And God said unto Moses,", "A man who has", "Wer nicht wagt,", "def __init__(self,"]
OUT = Path("build/demo")
DENSE = "llama-kjv"
# The tiny models run as fast on one CPU thread as on several, and one thread never waits at a barrier on a core
# another process holds: the demo (and the server it starts) stays about as fast on a busy machine.
THREADS = "1"


def _serve(paths: list[str], device: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "moeshare.cli", "serve", *paths, "--port", "0", "--device", device]
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", THREADS)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    address = ""
    for line in proc.stdout:
        print(line.rstrip(), flush=True)
        if line.startswith("moeshare: listening on "):
            address = line.split()[-1]
        if line.startswith("moeshare: serving"):
            return proc, address
    raise SystemExit(f"the server stopped before serving (exit {proc.wait()})")


def main() -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))
    for arch in ("mixtral", "switch", "llama"):  # what the demo uses: the other archs are for the tests
        zoo = build_zoo("tiny", arch)
    print(zoo_report(load_zoo(zoo)))
    stores = {}
    for arch in ("mixtral", "switch"):
        stores[arch] = OUT / f"{arch}-store"
        print(f"\n== moeshare consolidate {arch} variants --budget 0.5 -> {stores[arch]}", flush=True)
        manifest = consolidate(
            [zoo / arch / v for v in VARIANTS], stores[arch], Options(budget="0.5", force=True)
        )
        print(format_report(summarize(manifest)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the store's four variants, and beside them a dense model (the zoo's Llama fine-tuned on the KJV)
    paths = [str(stores["mixtral"]), f"{DENSE}={zoo / 'llama' / 'kjv'}"]
    print(f"\n== moeshare serve {' '.join(paths)} --device {device}", flush=True)
    proc, address = _serve(paths, device)
    try:
        with Client(address) as client:
            print(
                "\nEach model continues a prompt from its own domain. These are 2-layer models (hidden size 64)"
                "\ntrained for under a minute on a CPU: expect the look of the domain (its words, spelling and"
                "\npunctuation), not sense. The zoo report above shows each variant is best on its own domain.",
                flush=True,
            )
            for m in client.list_models():
                print(f"  {m.name:<12} {m.kind:<8} {m.architecture}")
            jobs = [*zip(VARIANTS, PROMPTS, strict=True), (DENSE, PROMPTS[0])]
            for i, (v, prompt) in enumerate(jobs):
                print(f"\n[{v}] {prompt}", end="", flush=True)
                for piece in client.generate(v, prompt, max_tokens=48, temperature=0.7, seed=i):
                    print(piece, end="", flush=True)
                print()
            s = client.stats()
            print("\nserver stats:")
            for m in s.models:
                print(
                    f"  {m.name:<12} requests {m.requests_total}  ttft p50 {m.ttft_p50_seconds * 1e3:6.1f} ms  "
                    f"tpot p50 {m.tpot_p50_seconds * 1e3:6.1f} ms  {m.tokens_per_second:7.1f} tok/s"
                )
            print(
                f"  KV blocks used/free {s.kv_blocks_used}/{s.kv_blocks_free}, resident: "
                f"{', '.join(s.resident_variants)}, swap-ins {s.swap_ins}"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    print(f"\nserver stopped (exit {code}); demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
