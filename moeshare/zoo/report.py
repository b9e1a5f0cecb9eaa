"""The variant × domain perplexity table of a zoo, one per arch."""

from __future__ import annotations

from typing import Any

METRIC = {
    "mixtral": "next-token perplexity",
    "switch": "span-denoising perplexity",
    "llama": "next-token perplexity",
    "qwen2": "next-token perplexity",
}


def format_report(zoo: dict[str, Any]) -> str:
    blocks = [
        f"zoo {zoo['size']} (seed {zoo['seed']}, {zoo['recipe_version']}, corpora: {zoo['corpora']}, "
        f"built in {zoo['built']['seconds']:.0f} s on {zoo['built']['device']})"
    ]
    blocks += [_arch_table(arch, zoo["models"][arch], zoo["variants"]) for arch in zoo["archs"]]
    return "\n\n".join(blocks) + "\n"


def _arch_table(arch: str, models: dict[str, dict[str, Any]], domains: list[str]) -> str:
    base = models["base"]["perplexity"]
    name_width = max(len(name) for name in models) + 1
    widths = [max(len(d), 8) for d in domains]
    header = "model".ljust(name_width) + "".join(d.rjust(w + 2) for d, w in zip(domains, widths, strict=True))
    lines = [
        f"{arch}: held-out {METRIC.get(arch, 'perplexity')} (* = the variant's own domain)",
        header + "  own vs base",
    ]
    for name, entry in models.items():
        own = entry["domain"]
        cells = []
        for domain, width in zip(domains, widths, strict=True):
            mark = "*" if domain == own else " "
            cells.append(f"{mark}{entry['perplexity'][domain]:.2f}".rjust(width + 2))
        change = "" if own is None else f"{100.0 * (entry['perplexity'][own] / base[own] - 1.0):+.1f}%"
        lines.append(name.ljust(name_width) + "".join(cells) + change.rjust(13))
    return "\n".join(lines)
