"""PNG plots of an eval run: quality against bank memory per variant, and per-layer merge error."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeshare.evals.harness import Results  # noqa: E402
from moeshare.evals.report import Table  # noqa: E402

ONE_MODEL = {"average": "tab:red", "ties": "tab:purple", "base": "tab:gray"}


def _value(t: Table, key: tuple, pair: tuple[str, str], metric: str) -> float | None:
    if metric == "perplexity":
        change = t.change(key, pair)
        return None if change is None else 100 * change
    return t.get(key, pair, metric)


def plot_quality(t: Table, path: Path) -> Path:
    metrics = ["perplexity", "rouge1"] if t.denoising else ["perplexity"]
    memory = t.memory
    cols = len(t.pairs)
    fig, axes = plt.subplots(len(metrics), cols, figsize=(4.2 * cols, 3.6 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, pair in enumerate(t.pairs):
            ax = axes[row][col]
            for combo in t.combos():
                keys = [k for b in sorted({k[1] for k in t.moeshare_keys()}) if (k := t.at(combo, b))]
                pts = [(memory[k], _value(t, k, pair, metric)) for k in keys if k in memory]
                if pts:
                    x, y = zip(*sorted(pts), strict=True)
                    ax.plot(x, y, marker="o", ms=3, lw=1.2, label=f"moeshare {combo[0]}/{combo[1]}")
            sip = sorted((k for k in t.index if k[0] == "same-index-pick"), key=lambda k: k[1])
            if sip:
                x = [memory[k] for k in sip]
                ax.plot(
                    x,
                    [_value(t, k, pair, metric) for k in sip],
                    "k--",
                    marker="s",
                    ms=3,
                    label="same-index-pick",
                )
            for name, color in ONE_MODEL.items():
                if (k := t.baseline(name)) is not None:
                    ax.axhline(
                        _value(t, k, pair, metric),
                        color=color,
                        ls=":",
                        label=f"{name} (memory {memory[k]:.2f})",
                    )
            orig = ("original", 1.0, None, None)
            ax.axhline(_value(t, orig, pair, metric), color="tab:green", lw=0.8, label="original")
            if metric == "perplexity":
                ax.axhspan(0, 3, color="tab:green", alpha=0.07)
            ax.set_title(pair[0] if pair[0] == pair[1] else f"{pair[0]} on {pair[1]}", fontsize=10)
            ax.set_xlabel("bank memory (fraction of all experts)")
            ax.set_ylabel("perplexity change (%)" if metric == "perplexity" else "ROUGE-1")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_rows = -(-len(labels) // 4)
    legend_in = 0.25 * legend_rows + 0.15  # inches under the plots for the legend
    fig.set_size_inches(fig.get_size_inches()[0], fig.get_size_inches()[1] + legend_in)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Quality against bank memory: {t.r.subject['label'] or t.r.subject['arch']}", fontsize=11)
    fig.tight_layout(rect=(0, legend_in / fig.get_size_inches()[1], 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_merge_error(results: Results, combo: tuple[str, str], path: Path) -> Path:
    rows = [r for r in results.merge_error if (r["similarity"], r["merge"]) == combo or r["budget"] == 1.0]
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    grid = np.full((len(budgets), len(layers)), np.nan)
    for r in rows:
        grid[budgets.index(r["budget"]), layers.index(r["layer"])] = r["mean_error"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(layers), 1.2 + 0.55 * len(budgets)))
    im = ax.imshow(grid, cmap="magma_r", aspect="auto")
    for i in range(len(budgets)):
        for j in range(len(layers)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7, color="tab:blue")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(budgets)), [f"{b:g}" for b in budgets])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("bank budget")
    ax.set_title(f"Mean merge error per layer ({combo[0]}/{combo[1]})", fontsize=10)
    fig.colorbar(im, ax=ax, label="relative weight distance to the merged slot")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
