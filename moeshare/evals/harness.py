"""`moeshare eval`: every method's models scored against the original variants, in one run.

Methods: original, moeshare (budgets x similarity x merge), same-index-pick (budgets), average, ties, base.
Both architectures are scored with our engine's forward (float32; Switch through its paged encoder and decoder),
and at one budget also with transformers on `moeshare export` output as a check.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from tqdm import tqdm

from moeshare.consolidate import Options, Plan, consolidate, export_variant, plan
from moeshare.consolidate.calibrate import calibrate, read_calibration_text
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.models.switch import MultiVariantSwitch
from moeshare.engine.source import Source
from moeshare.errors import MoeshareError
from moeshare.evals import baselines
from moeshare.evals.config import EvalConfig, Subject
from moeshare.evals.data import EvalSet, causal_set, denoising_set
from moeshare.evals.metrics import Reference, perplexity, quality, reference
from moeshare.evals.scorers import EngineScorer, Scorer, SwitchScorer, TransformersScorer


@dataclass
class Method:
    method: str
    budget: float | None = None
    similarity: str | None = None
    merge: str | None = None


@dataclass
class Results:
    subject: dict
    config: dict
    results: list[dict] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    merge_error: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Harness:
    def __init__(self, subject: Subject, config: EvalConfig, work: Path) -> None:
        self.subject, self.config, self.work = subject, config, Path(work)
        self.denoising = subject.arch != "mixtral"
        self.paths = list(subject.variants.values())
        self.sets = {v: self._sets(v) for v in subject.variants}
        self.refs: dict[tuple[str, str], Reference] = {}
        self.out = Results(
            {
                "label": subject.label,
                "arch": subject.arch,
                "variants": {k: str(p) for k, p in subject.variants.items()},
                "domains": {v: list(d) for v, d in subject.heldout.items()},
                "base": str(subject.base) if subject.base else None,
                "calib": str(subject.calib) if subject.calib else None,
            },
            {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        )

    def _sets(self, variant: str) -> list[EvalSet]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.subject.variants[variant])
        make = denoising_set if self.denoising else causal_set
        c = self.config
        return [
            make(domain, text, tokenizer, c.seq_len, c.max_tokens, c.prompts)
            for domain, text in self.subject.heldout[variant].items()
        ]

    # ---- what each method serves -------------------------------------------------------------------------

    @contextmanager
    def _engine(self, paths: list[Path]) -> Iterator[Engine]:
        engine = Engine(paths, EngineConfig(device=self.config.device, dtype=torch.float32))
        try:
            yield engine
        finally:
            del engine
            gc.collect()

    @contextmanager
    def checkpoint_scorers(self, checkpoints: dict[str, Path]) -> Iterator[dict[str, Scorer]]:
        """variant -> the HF checkpoint that stands for it (several variants may share one)."""
        if self.denoising:
            models = {p: self._switch(p) for p in set(checkpoints.values())}
            yield {v: SwitchScorer(models[p][0], 0, models[p][1].config) for v, p in checkpoints.items()}
            return
        distinct = sorted(set(checkpoints.values()))
        with self._engine(distinct) as engine:
            yield {v: EngineScorer(engine, p.name) for v, p in checkpoints.items()}

    @contextmanager
    def store_scorers(self, store: Path) -> Iterator[dict[str, Scorer]]:
        if not self.denoising:
            with self._engine([store]) as engine:
                yield {v: EngineScorer(engine, v) for v in self.subject.variants}
            return
        model, source = self._switch(store)
        yield {v: SwitchScorer(model, source.variants.index(v), source.config) for v in self.subject.variants}

    def _switch(self, path: Path) -> tuple[MultiVariantSwitch, Source]:
        """A Switch store's or checkpoint's variants through our reference forward, float32."""
        source = Source(path)
        return MultiVariantSwitch.from_source(source, torch.float32, torch.device(self.config.device)), source

    def _export(self, store: Path) -> dict[str, Path]:
        shutil.rmtree(self.work / "export", ignore_errors=True)
        return {v: export_variant(store, v, self.work / "export" / v) for v in self.subject.variants}

    # ---- scoring -----------------------------------------------------------------------------------------

    def score(self, method: Method, scorers: dict[str, Scorer]) -> dict[tuple[str, str], dict[str, float]]:
        """Score every variant's held-out sets, record them under `method`, return {(variant, domain): metrics}."""
        got = {}
        n = self.config.continuation
        for variant, sets in self.sets.items():
            for data in sets:
                key = (variant, data.domain)
                if key not in self.refs:
                    raise RuntimeError("score the originals first")
                metrics = quality(scorers[variant], data, self.refs[key], self.denoising, n)
                got[key] = metrics
                for metric, value in metrics.items():
                    self.out.results.append(
                        {
                            "variant": variant,
                            "domain": data.domain,
                            **asdict(method),
                            "metric": metric,
                            "value": value,
                        }
                    )
        return got

    def memory(self, method: Method, fraction: float, bank_bytes: int) -> None:
        self.out.memory.append({**asdict(method), "bank_fraction": fraction, "bank_bytes": bank_bytes})

    # ---- the methods -------------------------------------------------------------------------------------

    def originals(self) -> None:
        with self.checkpoint_scorers(self.subject.variants) as scorers:
            for variant, sets in self.sets.items():
                for data in sets:
                    self.refs[(variant, data.domain)] = reference(
                        scorers[variant], data, self.config.continuation
                    )
            self.score(Method("original", 1.0), scorers)
        self.memory(Method("original", 1.0), 1.0, self.expert_bytes)

    @cached_property
    def expert_bytes(self) -> int:
        """Every variant's expert weights: what bank memory is a fraction of."""
        from moeshare.checkpoint import open_checkpoint

        total = 0
        for path in self.paths:
            ckpt = open_checkpoint(path)
            total += sum(ckpt.nbytes(n) for n in ckpt.names if ckpt.adapter.classify(n).kind == "expert")
        return total

    def _plans(self, similarity: str) -> tuple[Plan, Plan]:
        """The plan `moeshare consolidate` makes for this similarity (calibration text only for output
        similarity, so fit samples each variant's own text), and the same plan given the calibration text,
        for the merges that need it (frequency; fit where variants cannot sample their own)."""
        calib = self.subject.calib
        made = plan(self.paths, similarity, calib if similarity == "output" else None)
        if made.calib is not None or calib is None:
            return made, made
        return made, replace(
            made, calib=calibrate(made.ckpts, read_calibration_text(calib)), calib_path=calib
        )

    def moeshare(self, similarity: str, stores: list[tuple[float, str]], bar: tqdm) -> None:
        own, given = self._plans(similarity)
        for budget, merge in stores:
            made = given if merge == "frequency" or (merge == "fit" and not own.can_fit) else own
            method = Method("moeshare", budget, similarity, merge)
            bar.set_postfix_str(f"moeshare {similarity}/{merge} @ {budget:g}")
            store = self.work / "store"
            opts = Options(str(budget), None, similarity, merge, made.calib_path, force=True)
            manifest = consolidate(self.paths, store, opts, made)
            sizes = manifest["bytes"]
            self.memory(method, sizes["experts_after"] / sizes["experts_before"], sizes["experts_after"])
            for layer in manifest["bank"]["layers"]:
                self.out.merge_error.append(
                    {
                        **asdict(method),
                        "layer": layer["layer"],
                        "mean_error": layer["mean_error"],
                        "slots": layer["slots"],
                    }
                )
            with self.store_scorers(store) as scorers:
                got = self.score(method, scorers)
            if budget == self.config.check_budget:
                self._check(method, store, got)
            shutil.rmtree(store, ignore_errors=True)
            bar.update()

    def _check(self, method: Method, store: Path, got: dict[tuple[str, str], dict[str, float]]) -> None:
        """The same store's perplexity from transformers on `moeshare export`."""
        exported = self._export(store)
        for variant, path in exported.items():
            scorer = TransformersScorer(path, self.subject.arch, self.config.device)
            for data in self.sets[variant]:
                hf = perplexity(scorer.logits(data.inputs, data.labels).log_softmax(-1), data)
                ours = got[(variant, data.domain)]["perplexity"]
                self.out.checks.append(
                    {
                        **asdict(method),
                        "variant": variant,
                        "domain": data.domain,
                        "engine_perplexity": ours,
                        "transformers_perplexity": hf,
                        "relative_difference": abs(ours - hf) / hf,
                    }
                )
        shutil.rmtree(self.work / "export", ignore_errors=True)

    def same_index_pick(self, budget: float) -> None:
        method = Method("same-index-pick", budget)
        out = self.work / "same-index-pick"
        shutil.rmtree(out, ignore_errors=True)
        picked = baselines.same_index_pick(self.paths, out, budget)
        self.memory(method, picked.fraction, round(picked.fraction * self.expert_bytes))
        with self.checkpoint_scorers(picked.checkpoints) as scorers:
            self.score(method, scorers)
        shutil.rmtree(out, ignore_errors=True)

    def one_model(self, name: str) -> None:
        """average, ties or base: one model stands for every variant."""
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        if name == "average":
            path = baselines.average(self.paths, out)
        elif name == "ties":
            path = baselines.ties(self.paths, self.subject.base, out)
        else:
            path = self.subject.base
        n = len(self.paths)
        self.memory(Method(name), 1 / n, self.expert_bytes // n)
        with self.checkpoint_scorers({v: path for v in self.subject.variants}) as scorers:
            self.score(Method(name), scorers)
        if path != self.subject.base:
            shutil.rmtree(out, ignore_errors=True)


def plan_runs(
    subject: Subject, config: EvalConfig
) -> tuple[list[tuple[str, list[tuple[float, str]]]], list[str]]:
    """Per similarity, the (budget, merge) stores moeshare is scored at; and what is skipped and why."""
    skipped = []
    sims = list(config.similarities)
    merges = list(config.merges)
    if subject.calib is None:
        if "output" in sims:
            skipped.append("moeshare output similarity: needs calibration text (--calib)")
            sims.remove("output")
        if "frequency" in merges:
            skipped.append("moeshare frequency merge: needs calibration text (--calib)")
            merges.remove("frequency")
        if "fit" in merges and subject.arch != "mixtral":
            skipped.append("moeshare fit merge: Switch variants cannot sample their own text; needs --calib")
            merges.remove("fit")
    runs = []
    for i, sim in enumerate(sims):
        # budget 1.0 merges nothing but bitwise-identical experts, whatever the method: score it once
        stores = [(b, m) for b in config.budgets for m in merges if b < 1.0 or (i == 0 and m == merges[0])]
        runs.append((sim, stores))
    return runs, skipped


def run(subject: Subject, config: EvalConfig, work: Path) -> Results:
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    n = len(subject.variants)
    if n < 2:
        raise MoeshareError(f"eval needs at least two variants, got {n}")
    if bad := [b for b in config.budgets if not 1 / n - 1e-9 <= b <= 1.0]:
        raise MoeshareError(f"budget {bad[0]} is outside [1/{n}, 1] for {n} variants")
    runs, skipped = plan_runs(subject, config)
    wanted = list(config.baselines)
    if subject.base is None:
        for name in ("ties", "base"):
            if name in wanted:
                wanted.remove(name)
                skipped.append(f"{name}: needs the base model (--base)")
    harness = Harness(subject, config, work)
    harness.out.skipped = skipped
    total = 1 + len(wanted) - ("same-index-pick" in wanted) + sum(len(stores) for _, stores in runs)
    total += len(config.budgets) if "same-index-pick" in wanted else 0
    with tqdm(total=total, desc=f"eval {subject.label or subject.arch}", unit="model") as bar:
        bar.set_postfix_str("original")
        harness.originals()
        bar.update()
        for name in wanted:
            if name == "same-index-pick":
                for budget in config.budgets:
                    bar.set_postfix_str(f"same-index-pick @ {budget:g}")
                    harness.same_index_pick(budget)
                    bar.update()
            else:
                bar.set_postfix_str(name)
                harness.one_model(name)
                bar.update()
        for similarity, stores in runs:
            harness.moeshare(similarity, stores, bar)
    return harness.out
