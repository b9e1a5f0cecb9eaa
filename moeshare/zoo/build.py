"""Builds the zoo: base + one variant per domain for each arch, evaluated, cached, published atomically. Adding an arch to a cached zoo trains only that arch: the others are copied over.

Layout: DIR/<arch>/base/, DIR/<arch>/<variant>/ (HF checkpoints with their tokenizer),
DIR/heldout/<domain>.txt, DIR/zoo.json.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from moeshare.checkpoint.output import follow_umask, remove_stale_leftovers
from moeshare.zoo.corpora import Corpora, load_corpora
from moeshare.zoo.evaluate import perplexity
from moeshare.zoo.recipes import ARCHS, RECIPE_VERSION, Recipe, Schedule, recipe
from moeshare.zoo.tokenizer import build_tokenizer, byte_ids, describe_tokenizer
from moeshare.zoo.train import new_model, train

ZOO_ENV = "MOESHARE_ZOO_DIR"
ZOO_FILE = "zoo.json"


def zoo_root() -> Path:
    return Path(os.environ.get(ZOO_ENV) or Path.home() / ".cache" / "moeshare" / "zoo").expanduser()


def zoo_dir(size: str) -> Path:
    return zoo_root() / recipe(size).size


def load_zoo(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / ZOO_FILE).read_text())


def parse_archs(arch: str) -> list[str]:
    if arch == "all":
        return list(ARCHS)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {[*ARCHS, 'all']}")
    return [arch]


def build_zoo(
    size: str = "tiny",
    arch: str = "all",
    out: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    seed: int = 0,
) -> Path:
    """Returns the zoo directory; a cached zoo of the same recipe, seed and archs is reused as it is."""
    rec = recipe(size)
    archs = parse_archs(arch)
    target = Path(out).expanduser() if out is not None else zoo_dir(size)
    cached = _cached(target)
    reuse: dict[str, dict[str, Any]] = {}
    if cached is not None and not force and _same_recipe(cached, rec, seed):
        if set(archs) <= set(cached["archs"]):
            return target
        archs = [a for a in ARCHS if a in set(archs) | set(cached["archs"])]
        if cached.get("built", {}).get("device") == device:
            # each arch trains from its own seeds, so a cached one is what training it again would give
            reuse = {a: cached["models"][a] for a in cached["archs"] if a in archs}
    if target.exists() and cached is None and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a zoo (no {ZOO_FILE}); refusing to replace it")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, rec.threads))  # at most the recipe's: builds stay reproducible
    try:
        zoo = _build_into(target, rec, seed, archs, device, reuse)
    finally:
        torch.set_num_threads(threads)
    _warn_unspecialised(zoo)
    return target


def _build_into(
    target: Path, rec: Recipe, seed: int, archs: list[str], device: str, reuse: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Builds beside `target` under a temporary name, then swaps it in: a failed build leaves nothing.
    `reuse`: archs of the zoo at `target` to copy instead of training (when its corpora are the same)."""
    corpora = load_corpora()
    cached = _cached(target)
    if cached is None or cached.get("corpora") != corpora.kind:
        reuse = {}
    start = time.perf_counter() - (cached["built"]["seconds"] if reuse else 0.0)  # the whole zoo's time
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    remove_stale_leftovers(target)
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "heldout").mkdir(parents=True)
    try:
        for domain in corpora.domains:
            (partial / "heldout" / f"{domain.name}.txt").write_text(domain.heldout, encoding="utf-8")
        models = {}
        for a in archs:
            if a in reuse:
                shutil.copytree(target / a, partial / a)
                models[a] = reuse[a]
            else:
                models[a] = _build_arch(a, rec, corpora, seed, partial, device)
        zoo = _zoo_record(rec, seed, archs, corpora, models, device, time.perf_counter() - start)
        (partial / ZOO_FILE).write_text(json.dumps(zoo, indent=2) + "\n")
        _publish(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return zoo


def stage_seed(seed: int, arch: str, stage: str) -> int:
    return int(hashlib.sha256(f"{seed}/{arch}/{stage}".encode()).hexdigest()[:8], 16)


def _build_arch(
    arch: str, rec: Recipe, corpora: Corpora, seed: int, root: Path, device: str
) -> dict[str, dict[str, Any]]:
    """The base on the mixture of all domains, then each variant fine-tuned from it on its own domain."""
    spec = rec.arch(arch)
    tokenizer = build_tokenizer(arch)
    streams = {d.name: byte_ids(d.train) for d in corpora.domains}
    stages: list[tuple[str, str | None, list[torch.Tensor], Schedule]] = [
        ("base", None, list(streams.values()), spec.base)
    ]
    stages += [(name, name, [stream], spec.finetune) for name, stream in streams.items()]
    base = new_model(arch, spec.config, stage_seed(seed, arch, "init")).to(device)
    models: dict[str, dict[str, Any]] = {}
    for name, domain, data, schedule in stages:
        model = base if domain is None else copy.deepcopy(base)
        result = train(
            model, arch, data, schedule, rec.seq_len, stage_seed(seed, arch, name), f"{arch} {name}"
        )
        _save(model, tokenizer, root / arch / name)
        ppl = {
            d.name: perplexity(model, arch, d.heldout, rec.seq_len, rec.eval_bytes) for d in corpora.domains
        }
        print(
            f"{arch} {name}: held-out perplexity " + ", ".join(f"{d} {p:.2f}" for d, p in ppl.items()),
            file=sys.stderr,
        )
        models[name] = {
            "path": f"{arch}/{name}",
            "domain": domain,
            "train": dataclasses.asdict(result),
            "perplexity": ppl,
        }
    return models


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    follow_umask(directory)  # safetensors writes its files 0600


def _zoo_record(
    rec: Recipe,
    seed: int,
    archs: list[str],
    corpora: Corpora,
    models: dict[str, dict[str, dict[str, Any]]],
    device: str,
    seconds: float,
) -> dict[str, Any]:
    return {
        "recipe_version": RECIPE_VERSION,
        "size": rec.size,
        "seed": seed,
        "archs": archs,
        "variants": corpora.names,
        "corpora": corpora.kind,
        "domains": [d.summary() | {"heldout_file": f"heldout/{d.name}.txt"} for d in corpora.domains],
        "recipe": {
            "seq_len": rec.seq_len,
            "eval_bytes": rec.eval_bytes,
            **{a: dataclasses.asdict(rec.arch(a)) for a in archs},
        },
        "tokenizer": describe_tokenizer(),
        "models": models,
        "specialised": {a: _specialised(models[a]) for a in archs},
        "built": {
            "seconds": round(seconds, 1),
            "device": device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def _specialised(models: dict[str, dict[str, Any]]) -> dict[str, bool]:
    base = models["base"]["perplexity"]
    return {
        name: entry["perplexity"][entry["domain"]] < base[entry["domain"]]
        for name, entry in models.items()
        if entry["domain"] is not None
    }


def _warn_unspecialised(zoo: dict[str, Any]) -> None:
    for arch, variants in zoo["specialised"].items():
        for name, ok in variants.items():
            if not ok:
                message = (
                    f"!!! zoo {zoo['size']}/{arch}: variant {name!r} is NOT better than the base on its own "
                    "domain; the fine-tune did not specialise (tune the recipe) !!!"
                )
                print(message, file=sys.stderr)
                warnings.warn(message, stacklevel=3)


def _cached(target: Path) -> dict[str, Any] | None:
    try:
        return load_zoo(target)
    except (OSError, ValueError):
        return None


def _same_recipe(zoo: dict[str, Any], rec: Recipe, seed: int) -> bool:
    return (
        zoo.get("recipe_version") == RECIPE_VERSION
        and zoo.get("size") == rec.size
        and zoo.get("seed") == seed
        and isinstance(zoo.get("archs"), list)
    )


def _publish(partial: Path, target: Path) -> None:
    """Swap the finished build into place; the old zoo is removed only once the new one is there."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    partial.rename(target)
    shutil.rmtree(old, ignore_errors=True)
