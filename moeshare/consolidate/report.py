"""What a store holds, as one JSON object (`inspect --json`) or a table for people."""

from __future__ import annotations


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def summarize(manifest: dict) -> dict:
    n_variants = len(manifest["variants"])
    per_variant = manifest["bank"]["experts_per_variant"]
    return {
        "architecture": manifest["architecture"],
        "variants": [v["name"] for v in manifest["variants"]],
        "layers": [
            {
                "layer": layer["layer"],
                "slots": layer["slots"],
                "slots_before": n_variants * per_variant,
                "shared_slots": sum(len(m) > 1 for m in layer["members"]),
                "mean_error": layer["mean_error"],
                "max_error": layer["max_error"],
            }
            for layer in manifest["bank"]["layers"]
        ],
        "bytes": manifest["bytes"],
        "made": manifest.get("made", {}),
    }


def format_report(summary: dict) -> str:
    b = summary["bytes"]
    made = summary["made"]
    lines = [
        f"{summary['architecture']} store of {len(summary['variants'])} variants: {', '.join(summary['variants'])}",
        f"similarity {made.get('similarity')}, merge {made.get('merge')}, "
        + (
            f"threshold {made['threshold']}"
            if made.get("threshold") is not None
            else f"budget {made.get('budget')}"
        ),
        "",
        f"{'layer':>12} {'slots':>11} {'shared':>7} {'mean err':>9} {'max err':>8}",
    ]
    for layer in summary["layers"]:
        lines.append(
            f"{layer['layer']:>12} {layer['slots']:>5} / {layer['slots_before']:<3} {layer['shared_slots']:>7} "
            f"{layer['mean_error']:>9.4f} {layer['max_error']:>8.4f}"
        )
    what = (
        "relative output error on the calibration tokens each member is routed"
        if made.get("merge") == "fit"
        else "relative weight distance of each member to its slot"
    )
    lines.append(f"{'':>12} (err: {what})")
    total_slots = sum(layer["slots"] for layer in summary["layers"])
    total_before = sum(layer["slots_before"] for layer in summary["layers"])
    lines += [
        "",
        f"experts: {_mib(b['experts_before'])} -> {_mib(b['experts_after'])} "
        f"({b['experts_after'] / b['experts_before']:.1%}, {total_slots} of {total_before} slots)",
        f"total:   {_mib(b['total_before'])} -> {_mib(b['total_after'])} "
        f"(saves {1 - b['total_after'] / b['total_before']:.1%})",
    ]
    if made.get("budget_bytes"):
        lines.append(
            f"budget:  {_mib(made['budget_bytes'])} for the bank; slots went where experts diverged most "
            f"(layers keeping the most: {', '.join(x['layer'] for x in sorted(summary['layers'], key=lambda x: -x['slots'])[:3])})"
        )
    return "\n".join(lines)
