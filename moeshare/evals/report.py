"""report.json and report.md from one eval run: tables, the targets, and the smallest safe budgets."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from moeshare.evals.harness import Results

TARGET_BUDGET = 0.5
LIMITS = (0.01, 0.03)  # perplexity within 1% and 3% of the original
ROUGE_LIMIT = 0.03
BASELINE_ORDER = ("same-index-pick", "average", "ties", "base")


class Table:
    """The results indexed by (method, budget, similarity, merge) -> (variant, domain) -> metric -> value."""

    def __init__(self, results: Results) -> None:
        self.r = results
        self.index: dict[tuple, dict[tuple[str, str], dict[str, float]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        for rec in results.results:
            key = (rec["method"], rec["budget"], rec["similarity"], rec["merge"])
            self.index[key][(rec["variant"], rec["domain"])][rec["metric"]] = rec["value"]
        self.pairs = sorted({(r["variant"], r["domain"]) for r in results.results}, key=self._order)
        # (method, budget, similarity, merge) -> bank memory as a fraction of all variants' experts
        self.memory = {
            (m["method"], m["budget"], m["similarity"], m["merge"]): m["bank_fraction"]
            for m in results.memory
        }
        self.denoising = results.subject["arch"] != "mixtral"

    def _order(self, pair: tuple[str, str]) -> tuple[int, str]:
        names = list(self.r.subject["variants"])
        return names.index(pair[0]), pair[1]

    def get(self, key: tuple, pair: tuple[str, str], metric: str) -> float | None:
        return self.index.get(key, {}).get(pair, {}).get(metric)

    def original(self, pair: tuple[str, str], metric: str = "perplexity") -> float:
        return self.index[("original", 1.0, None, None)][pair][metric]

    def change(self, key: tuple, pair: tuple[str, str]) -> float | None:
        """Relative perplexity change against the original."""
        got = self.get(key, pair, "perplexity")
        return None if got is None else got / self.original(pair) - 1

    def moeshare_keys(self) -> list[tuple]:
        return sorted((k for k in self.index if k[0] == "moeshare"), key=lambda k: (k[2], k[3], -k[1]))

    def combos(self) -> list[tuple[str, str]]:
        return sorted({(k[2], k[3]) for k in self.moeshare_keys()})

    def at(self, combo: tuple[str, str], budget: float) -> tuple | None:
        key = ("moeshare", budget, *combo)
        if key in self.index:
            return key
        key = next((k for k in self.index if k[0] == "moeshare" and k[1] == budget == 1.0), None)
        return key  # budget 1.0 is scored once, under the first combo

    def best_combo(self, budget: float = TARGET_BUDGET) -> tuple[str, str] | None:
        scored = [(c, self.at(c, budget)) for c in self.combos()]
        scored = [(c, k) for c, k in scored if k is not None and k[1] == budget]
        if not scored:
            return None
        return min(scored, key=lambda ck: max(self.change(ck[1], p) for p in self.pairs))[0]

    def baseline(self, name: str, budget: float | None = None) -> tuple | None:
        key = (name, budget, None, None)
        return key if key in self.index else None


def smallest_budgets(t: Table, combo: tuple[str, str]) -> dict[tuple[str, str], dict[float, float | None]]:
    """Per (variant, domain), the smallest budget whose perplexity stays within each limit (None: none does)."""
    out = {}
    budgets = sorted({k[1] for k in t.index if k[0] == "moeshare"})
    for pair in t.pairs:
        out[pair] = {}
        for limit in LIMITS:
            ok = [b for b in budgets if (k := t.at(combo, b)) is not None and t.change(k, pair) <= limit]
            out[pair][limit] = min(ok) if ok else None
    return out


def targets(t: Table) -> dict:
    """Issue targets at budget 0.5 for the best moeshare combination: perplexity within 3% of the original
    (or, for denoising, ROUGE-1 within 0.03), and lower perplexity than same-index-pick at 0.5, average and
    ties."""
    combo = t.best_combo()
    if combo is None:
        return {}
    key = t.at(combo, TARGET_BUDGET)
    rows = []
    for pair in t.pairs:
        ours = t.get(key, pair, "perplexity")
        within = t.change(key, pair) <= LIMITS[1]
        if t.denoising:
            within = within or abs(t.get(key, pair, "rouge1") - t.original(pair, "rouge1")) <= ROUGE_LIMIT
        beats = {}
        for name, budget in (("same-index-pick", TARGET_BUDGET), ("average", None), ("ties", None)):
            if (bk := t.baseline(name, budget)) is not None:
                beats[name] = ours < t.get(bk, pair, "perplexity")
        rows.append(
            {"variant": pair[0], "domain": pair[1], "perplexity": ours, "within": within, "beats": beats}
        )
    return {
        "budget": TARGET_BUDGET,
        "similarity": combo[0],
        "merge": combo[1],
        "rows": rows,
        "met": all(r["within"] and all(r["beats"].values()) for r in rows),
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.2f}%"


def markdown(results: Results, command: str) -> str:
    t = Table(results)
    names = [f"{v}" if v == d else f"{v} ({d})" for v, d in t.pairs]
    s = results.subject
    lines = [f"# Quality report: {s['label'] or s['arch']}", "", f"Command: `{command}`", ""]
    scorer = "the moeshare engine (float32); transformers on `moeshare export` output as a check"
    lines += [
        f"Scored with {scorer}. Perplexity: {'span-denoising' if t.denoising else 'next-token'}; KL: mean "
        "KL(original ‖ method) per scored token; top-1: agreement of the argmax token with the original; "
        f"greedy: share of {results.config['prompts']} held-out prompts whose {results.config['continuation']} "
        "greedy tokens equal the original's"
        + ("; ROUGE over the reconstructed spans' tokens (bytes)." if t.denoising else "."),
        "",
    ]
    lines += [
        "Stores: weight-similarity stores are made as `moeshare consolidate --budget B --merge M` makes them "
        "without calibration text (`fit` calibrates on text each Mixtral variant samples from itself); "
        "`frequency`, and `fit` for Switch, are given the calibration text; output-similarity stores are "
        f"made with `--calib` ({s['calib'] or 'none given'}).",
        "",
    ]
    tg = targets(t)
    if tg:
        lines += [
            f"## Targets at budget {tg['budget']} (moeshare {tg['similarity']}/{tg['merge']}, the best combination)",
            "",
            f"Every variant within 3% perplexity{' (or 0.03 ROUGE-1)' if t.denoising else ''} of its original, "
            f"and lower perplexity than same-index-pick at {tg['budget']}, average and ties: "
            f"**{'met' if tg['met'] else 'NOT met'}**.",
            "",
            "| variant | perplexity | original | change | within | "
            + " | ".join(f"beats {b}" for b in ("same-index-pick", "average", "ties"))
            + " |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r, name in zip(tg["rows"], names, strict=True):
            orig = t.original((r["variant"], r["domain"]))
            beats = [
                ("yes" if r["beats"][b] else "no") if b in r["beats"] else "—"
                for b in ("same-index-pick", "average", "ties")
            ]
            lines.append(
                f"| {name} | {r['perplexity']:.3f} | {orig:.3f} | {_pct(r['perplexity'] / orig - 1)} | "
                f"{'yes' if r['within'] else 'no'} | " + " | ".join(beats) + " |"
            )
        lines.append("")
    lines += [
        "## Smallest budget within 1% / 3% perplexity",
        "",
        "| similarity/merge | " + " | ".join(names) + " |",
    ]
    lines.append("|---" * (len(names) + 1) + "|")
    for combo in t.combos():
        sb = smallest_budgets(t, combo)
        cells = [" / ".join(_fmt(sb[p][lim], "g") for lim in LIMITS) for p in t.pairs]
        lines.append(f"| {combo[0]}/{combo[1]} | " + " | ".join(cells) + " |")
    lines += ["", "## Perplexity against the original", ""]
    lines += [
        "| method | budget | bank memory | " + " | ".join(names) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    row_keys = [("original", 1.0, None, None)]
    row_keys += [
        k
        for b in BASELINE_ORDER
        for k in sorted((k for k in t.index if k[0] == b), key=lambda k: -(k[1] or 0))
    ]
    row_keys += t.moeshare_keys()
    for k in row_keys:
        label = k[0] if k[0] != "moeshare" else f"moeshare {k[2]}/{k[3]}"
        cells = [
            f"{t.get(k, p, 'perplexity'):.3f}" + ("" if k[0] == "original" else f" ({_pct(t.change(k, p))})")
            for p in t.pairs
        ]
        lines.append(
            f"| {label} | {_fmt(k[1], 'g')} | {_fmt(t.memory.get(k), '.3f')} | " + " | ".join(cells) + " |"
        )
    metrics = ["perplexity", "kl", "top1_agreement", "greedy_match"] + (
        ["rouge1", "rouge2", "rougeL"] if t.denoising else []
    )
    lines += ["", f"## Every metric at budget {TARGET_BUDGET} (and the one-model baselines)", ""]
    for pair, name in zip(t.pairs, names, strict=True):
        lines += [
            f"### {name}",
            "",
            "| method | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for k in row_keys:
            if k[0] not in ("original", "average", "ties", "base") and k[1] != TARGET_BUDGET:
                continue
            label = k[0] if k[0] != "moeshare" else f"moeshare {k[2]}/{k[3]}"
            lines.append(f"| {label} | " + " | ".join(_fmt(t.get(k, pair, m), ".4f") for m in metrics) + " |")
        lines.append("")
    if t.denoising and all(
        len({v[p].get("rouge1") for v in t.index.values() if p in v}) == 1 for p in t.pairs
    ):
        lines += [
            "ROUGE and greedy match are the same for every method and variant: the models' greedy "
            "reconstructions do not depend on the method, so here only perplexity, KL and top-1 agreement "
            "tell the methods apart.",
            "",
        ]
    if results.checks:
        worst = max(c["relative_difference"] for c in results.checks)
        lines += [
            "## Engine against transformers",
            "",
            f"{len(results.checks)} (store, variant) perplexities scored both ways; largest relative difference "
            f"{worst:.2e}.",
            "",
        ]
    if results.skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in results.skipped] + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: Results, out: Path, command: str) -> list[Path]:
    from moeshare.evals.plots import plot_merge_error, plot_quality

    out.mkdir(parents=True, exist_ok=True)
    t = Table(results)
    tg = targets(t)
    summary = {"targets": tg}
    if (combo := t.best_combo()) is not None:
        sb = smallest_budgets(t, combo)
        summary["smallest_budget"] = [
            {
                "variant": v,
                "domain": d,
                "similarity": combo[0],
                "merge": combo[1],
                "within_1pct": b[0.01],
                "within_3pct": b[0.03],
            }
            for (v, d), b in sb.items()
        ]
    payload = {"command": command, **asdict(results), "summary": summary}
    (out / "report.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "report.md").write_text(markdown(results, command))
    files = [out / "report.json", out / "report.md"]
    files.append(plot_quality(t, out / "quality_vs_memory.png"))
    if results.merge_error:
        # the weight distance of members to an averaged slot; fit moves weights far while matching outputs
        heat = combo or t.combos()[0]
        heat = (heat[0], "average") if (heat[0], "average") in t.combos() else heat
        files.append(plot_merge_error(results, heat, out / "merge_error.png"))
    return files
