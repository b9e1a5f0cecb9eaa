"""`moeshare eval`: the command line of the quality harness."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from moeshare.errors import MoeshareError
from moeshare.evals.config import BASELINES, BUDGETS, MERGES, SIMILARITIES, EvalConfig, Subject

CALIB_CHUNK = 256  # bytes; the domains take turns so every variant's text reaches the calibration
CALIB_PER_DOMAIN = 2048
EVAL_ARCHS = ("mixtral", "switch")  # checkpoint adapters' names, as Subject.arch takes them


def zoo_subject(size: str, arch: str, work: Path) -> Subject:
    """A zoo's variants on their own domains' held-out text, its base, and calibration text from the
    domains' training text (never the held-out text)."""
    from moeshare.zoo import build_zoo, load_zoo
    from moeshare.zoo.corpora import load_corpora

    directory = build_zoo(size=size, arch=arch)
    zoo = load_zoo(directory)
    variants = {v: directory / arch / v for v in zoo["variants"]}
    heldout = {v: {v: (directory / "heldout" / f"{v}.txt").read_text(encoding="utf-8")} for v in variants}
    corpora = load_corpora(prefer_debian=zoo["corpora"] == "debian")
    train = {d.name: d.train.encode("utf-8") for d in corpora.domains if d.name in variants}
    calib = work / "calib.txt"
    work.mkdir(parents=True, exist_ok=True)
    if len(train) == len(variants):
        chunks = [
            train[v][i : i + CALIB_CHUNK] for i in range(0, CALIB_PER_DOMAIN, CALIB_CHUNK) for v in variants
        ]
        calib.write_bytes(b"".join(chunks))
    return Subject(
        arch,
        variants,
        heldout,
        directory / arch / "base",
        calib if calib.exists() else None,
        f"zoo {size} ({arch})",
    )


def _heldout(specs: list[str], variants: dict[str, Path]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {v: {} for v in variants}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not file:
            raise MoeshareError(f"--heldout {spec}: write it as VARIANT=FILE")
        if name not in variants:
            raise MoeshareError(f"--heldout {spec}: no variant {name!r} (variants: {', '.join(variants)})")
        try:
            text = Path(file).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise MoeshareError(f"--heldout {spec}: cannot read {file} ({e.strerror or e})") from None
        out[name][Path(file).stem] = text
    if missing := [v for v, d in out.items() if not d]:
        raise MoeshareError(f"variant {missing[0]!r} has no held-out text: pass --heldout {missing[0]}=FILE")
    return out


def variants_subject(args: argparse.Namespace) -> Subject:
    from moeshare.checkpoint import open_checkpoint

    variants = {Path(p).name: Path(p) for p in args.variants}
    if len(variants) < len(args.variants):
        raise MoeshareError("two variants share a directory name; a variant is named after its directory")
    archs = {p: open_checkpoint(p).adapter.name for p in args.variants}
    arch = archs[args.variants[0]]
    if arch not in EVAL_ARCHS:
        raise MoeshareError(f"{args.variants[0]}: eval scores {' and '.join(EVAL_ARCHS)} models, not {arch}")
    if other := next((p for p, a in archs.items() if a != arch), None):
        raise MoeshareError(
            f"{other} is {archs[other]} but {args.variants[0]} is {arch}: judge variants of one architecture"
        )
    if args.base is not None and (base := open_checkpoint(args.base).adapter.name) != arch:
        raise MoeshareError(f"--base {args.base} is {base} but the variants are {arch}: give their own base")
    heldout = _heldout(args.heldout, variants)
    return Subject(arch, variants, heldout, args.base, args.calib, "variants")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise MoeshareError(
            f"--budgets {text}: give fractions separated by commas, e.g. 1,0.5,0.25"
        ) from None


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    got = tuple(x for x in text.split(",") if x)
    if bad := [x for x in got if x not in allowed]:
        raise MoeshareError(f"{flag} {bad[0]}: choose from {','.join(allowed)}")
    return got


def _check_out(out: Path) -> None:
    """Refuse an --out that could not be written, before hours of scoring (nothing is created here)."""
    if out.exists() and not out.is_dir():
        raise MoeshareError(f"--out {out}: is a file; name a directory")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise MoeshareError(f"--out {out}: {parent} is a file; name a directory")
    if not os.access(out if out.exists() else parent, os.W_OK):
        raise MoeshareError(f"--out {out}: not writable here; name another directory")


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise MoeshareError(f"--device {device}: name cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MoeshareError(f"--device {device}: no CUDA device is available here; use cpu")


def run_eval(args: argparse.Namespace) -> int:
    if bool(args.zoo) == bool(args.variants):
        raise MoeshareError("give --zoo SIZE or --variants DIR..., one of them")
    config = EvalConfig(
        budgets=_floats(args.budgets),
        similarities=_choices(args.similarity, SIMILARITIES, "--similarity"),
        merges=_choices(args.merge, MERGES, "--merge"),
        baselines=_choices(args.baselines, BASELINES, "--baselines"),
        max_tokens=args.max_tokens,
        prompts=args.prompts,
        continuation=args.continuation,
        device=args.device,
    )
    command = (
        "moeshare " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("moeshare") else shlex.join(sys.argv)
    )
    for flag, value, least in (("--prompts", args.prompts, 1), ("--continuation", args.continuation, 1)):
        if value < least:
            raise MoeshareError(f"{flag} {value}: must be at least {least}")
    if args.max_tokens < config.seq_len:
        raise MoeshareError(f"--max-tokens {args.max_tokens}: must be at least one window ({config.seq_len})")
    if args.threads is not None and args.threads < 1:
        raise MoeshareError(f"--threads {args.threads}: must be at least 1")
    _check_out(Path(args.out))
    _check_device(args.device)
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _run_all(args, config, command)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run_all(args: argparse.Namespace, config: EvalConfig, command: str) -> None:
    from moeshare.evals.harness import run
    from moeshare.evals.report import write_report

    out = Path(args.out)
    archs = (["mixtral", "switch"] if args.arch == "all" else [args.arch]) if args.zoo else [None]
    for arch in archs:
        with tempfile.TemporaryDirectory(prefix="moeshare-eval-") as work:
            subject = zoo_subject(args.zoo, arch, Path(work)) if arch else variants_subject(args)
            results = run(subject, config, Path(work))
        for f in write_report(results, out / arch if arch else out, command):
            print(f"wrote {f}")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="judge a consolidation: every method's quality against the original variants"
    )
    p.add_argument("--zoo", choices=["tiny", "small"], help="the zoo's variants, base and held-out text")
    p.add_argument(
        "--arch", choices=["mixtral", "switch", "all"], default="all", help="with --zoo (default all)"
    )
    p.add_argument("--variants", nargs="+", type=Path, help="instead of --zoo: HF checkpoint directories")
    p.add_argument(
        "--heldout", action="append", default=[], metavar="VARIANT=FILE", help="held-out text (repeatable)"
    )
    p.add_argument("--base", type=Path, help="the base model the variants were fine-tuned from (ties, base)")
    p.add_argument("--calib", type=Path, help="calibration text (output similarity, frequency merge)")
    p.add_argument("--out", required=True, help="directory for report.json, report.md and the plots")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    p.add_argument("--similarity", default=",".join(SIMILARITIES))
    p.add_argument("--merge", default=",".join(MERGES))
    p.add_argument("--baselines", default=",".join(BASELINES))
    p.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens scored per domain")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts for greedy continuations")
    p.add_argument("--continuation", type=int, default=64, help="greedy tokens compared per prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(run=run_eval)
