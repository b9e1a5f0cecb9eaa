"""`moeshare consolidate`: variants in, store out. Two streaming passes over the MoE layers: cluster, then merge."""

from __future__ import annotations

import datetime
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moeshare.checkpoint import Checkpoint, open_checkpoint
from moeshare.checkpoint.output import writing
from moeshare.consolidate.align import Alignment
from moeshare.consolidate.budget import parse_budget
from moeshare.consolidate.calibrate import (
    SELF_CALIB_TOKENS,
    Calibration,
    calibrate,
    can_sample,
    read_calibration_text,
)
from moeshare.consolidate.cluster import (
    UNRELATED,
    LayerClustering,
    allocate,
    cluster_layer,
    distance_to_others,
    shares_a_slot,
)
from moeshare.consolidate.experts import load_layer, require_finite
from moeshare.consolidate.fit import FitData
from moeshare.consolidate.merge import METHODS, merge_slot
from moeshare.consolidate.similarity import AlignmentCache, output_distances, weight_distances
from moeshare.errors import MoeshareError
from moeshare.store import StoreWriter, is_moeshare_store


@dataclass
class Options:
    budget: str | None = None  # fraction or size; default 1.0 when no threshold
    threshold: float | None = None
    similarity: str | None = None  # weight | output; default output with calib, else weight
    merge: str | None = None  # average | frequency | medoid | fit; default fit when calibrated, else average
    calib: Path | None = None
    force: bool = False
    self_calib: int = SELF_CALIB_TOKENS  # without calib, tokens a causal variant samples to calibrate `fit`
    # share the experts of a variant that is far from all others (see cluster.UNRELATED)
    force_merge: bool = False


def _check_variants(paths: list[Path]) -> list[Checkpoint]:
    if len(paths) < 2:
        raise MoeshareError(f"consolidate needs at least two variants, got {len(paths)}")
    names = [Path(p).name for p in paths]
    if dup := [n for n, c in Counter(names).items() if c > 1]:
        raise MoeshareError(
            f"two variants are named {dup[0]!r} (a variant is named after its directory); rename one"
        )
    ckpts = [open_checkpoint(p) for p in paths]
    first = ckpts[0]
    for ckpt in ckpts:
        if not ckpt.adapter.moe_layers:
            raise MoeshareError(
                f"{ckpt.path}: {ckpt.adapter.name} is a dense model with no experts; only MoE variants consolidate"
            )
    for ckpt in ckpts[1:]:
        if ckpt.adapter.name != first.adapter.name:
            raise MoeshareError(
                f"{ckpt.path} is {ckpt.adapter.name} but {first.path} is {first.adapter.name}: variants must share one architecture"
            )
        for name in sorted(set(first.names) | set(ckpt.names)):
            if name not in ckpt.names or name not in first.names:
                where = ckpt.path if name not in ckpt.names else first.path
                raise MoeshareError(
                    f"{where}: has no tensor {name}, which the other variants have: not the same model shape"
                )
            if ckpt.shape(name) != first.shape(name):
                raise MoeshareError(
                    f"{ckpt.path}: tensor {name} is {list(ckpt.shape(name))} but {list(first.shape(name))} in {first.path}"
                )
    return ckpts


def _slot_bytes(ckpt: Checkpoint, layer: str) -> int:
    return sum(t.numel() * t.element_size() for t in ckpt.read_expert(layer, 0).values())


def _check_fit(ckpts: list[Checkpoint], calibrated: bool, self_calib: int) -> None:
    """Refuse `--merge fit` where no calibration can exist: no --calib, and variants that cannot sample."""
    if calibrated:
        return
    if self_calib <= 0:
        raise MoeshareError("--merge fit needs calibration: pass --calib FILE, or a --self-calib above 0")
    if not all(can_sample(c) for c in ckpts):
        raise MoeshareError(
            f"--merge fit needs calibration text for {ckpts[0].adapter.name} variants "
            "(only causal LMs sample their own): pass --calib FILE"
        )


@dataclass
class Plan:
    """What consolidation learns before it picks a budget or a merge: every layer's merge history.

    One plan serves many stores (several budgets, merge methods) without comparing the experts again."""

    ckpts: list[Checkpoint]
    similarity: str
    calib: Calibration | None
    calib_path: Path | None
    clusterings: list[LayerClustering]
    slot_bytes: dict[str, int]
    alignments: dict[str, dict[tuple[int, int], Alignment]]  # layer -> what the merge pass can reuse
    self_calib: int = SELF_CALIB_TOKENS
    _sampled: Calibration | None = field(default=None, repr=False)

    @property
    def can_fit(self) -> bool:
        return self.calib is not None or (self.self_calib > 0 and all(can_sample(c) for c in self.ckpts))

    def fit_calibration(self) -> Calibration:
        """What the fit merge learns from: the calibration text's activations, else (sampled once, on first
        need, so plans for other merges never pay for it) those of text each variant samples from itself."""
        if self.calib is not None:
            return self.calib
        _check_fit(self.ckpts, False, self.self_calib)
        if self._sampled is None:
            self._sampled = calibrate(self.ckpts, None, max_tokens=self.self_calib)
        return self._sampled


def plan(
    paths: list[str | Path],
    similarity: str | None = None,
    calib: Path | None = None,
    self_calib: int = SELF_CALIB_TOKENS,
) -> Plan:
    ckpts = _check_variants([Path(p) for p in paths])
    return _plan(ckpts, _layer_slot_bytes(ckpts), similarity, calib, self_calib)


def _layer_slot_bytes(ckpts: list[Checkpoint]) -> dict[str, int]:
    return {layer: _slot_bytes(ckpts[0], layer) for layer in ckpts[0].adapter.moe_layers}


def _plan(
    ckpts: list[Checkpoint],
    slot_bytes: dict[str, int],
    similarity: str | None,
    calib: Path | None,
    self_calib: int,
) -> Plan:
    if similarity == "output" and calib is None:
        raise MoeshareError("--similarity output needs calibration text: pass --calib FILE")
    text = read_calibration_text(calib) if calib is not None else None
    _check_finite_others(ckpts)
    adapter, arch = ckpts[0].adapter, ckpts[0].adapter.name
    similarity = similarity or ("output" if text else "weight")
    cal: Calibration | None = calibrate(ckpts, text) if text else None
    # one layer in memory at a time
    clusterings: list[LayerClustering] = []
    alignments: dict[str, dict[tuple[int, int], Alignment]] = {}
    for layer in tqdm(adapter.moe_layers, desc="clustering", unit="layer"):
        lx = load_layer(ckpts, layer)
        cache = AlignmentCache(lx)
        if similarity == "output":
            dist, exact = output_distances(arch, lx, cal.inputs[layer])
        else:
            dist, exact = weight_distances(lx, cache)
        alignments[layer] = cache.done
        clusterings.append(cluster_layer(layer, dist, lx.owner, exact, adapter.num_experts))
    return Plan(ckpts, similarity, cal, calib, clusterings, slot_bytes, alignments, self_calib)


def _check_options(opts: Options) -> None:
    if opts.merge is not None and opts.merge not in METHODS:
        raise MoeshareError(f"--merge {opts.merge}: choose one of {', '.join(METHODS)}")
    if opts.threshold is not None and opts.budget is not None:
        raise MoeshareError("give --budget or --threshold, not both")
    if opts.threshold is not None and not (math.isfinite(opts.threshold) and opts.threshold >= 0):
        raise MoeshareError(
            f"--threshold {opts.threshold}: give a distance of 0 or more (0 merges only identical experts)"
        )
    if opts.self_calib < 0:
        raise MoeshareError(f"--self-calib {opts.self_calib}: give a number of tokens, or 0 for none")


def _check_related(made: Plan, taken: dict[str, int]) -> None:
    """Refuse to share the experts of a variant that is far from every other (not a fine-tune of their base)."""
    names = [c.path.name for c in made.ckpts]
    distances = distance_to_others(made.clusterings, len(names))
    far = [v for v, d in enumerate(distances) if d > UNRELATED and shares_a_slot(made.clusterings, taken, v)]
    if far:
        which = ", ".join(f"{names[v]} ({distances[v]:.2f})" for v in far)
        raise MoeshareError(
            f"far from every other variant: {which}; the median {made.similarity} distance of its experts to the "
            f"nearest other variant's is above {UNRELATED} (unrelated weights sit near 1.41, fine-tunes of one "
            "base well below 1), so it is probably not a fine-tune of the same base: leave it out, "
            "or pass --force-merge to share its experts anyway"
        )


def consolidate(paths: list[str | Path], out: str | Path, opts: Options, made: Plan | None = None) -> dict:
    """Write a store of the variants at `paths`; `made`: a plan of the same variants to reuse."""
    out = Path(out)
    _check_options(opts)
    if made is None:
        ckpts = _check_variants([Path(p) for p in paths])
        slot_bytes = _layer_slot_bytes(ckpts)
    elif (
        opts.similarity not in (None, made.similarity)
        or opts.calib != made.calib_path
        or opts.self_calib != made.self_calib
    ):
        raise ValueError("the plan was made with another similarity or calibration text")
    else:
        ckpts, slot_bytes = made.ckpts, made.slot_bytes
    n_experts = ckpts[0].adapter.num_experts
    experts_before = sum(slot_bytes.values()) * n_experts * len(ckpts)
    budget = opts.budget if opts.budget is not None or opts.threshold is not None else "1.0"
    budget_bytes = None
    if budget is not None:
        budget_bytes = parse_budget(budget, experts_before)
        smallest = sum(slot_bytes.values()) * n_experts
        if budget_bytes < smallest:
            raise MoeshareError(
                f"--budget {budget} allows {int(budget_bytes)} bytes, below one slot per (layer, local expert): "
                f"the smallest bank is {smallest} bytes ({smallest / experts_before:.3f} of the experts)"
            )
    if opts.merge == "fit":  # refused now, not after the clustering pass
        _check_fit(ckpts, opts.calib is not None, opts.self_calib)
    inputs = [c.path for c in ckpts] + ([opts.calib] if opts.calib is not None else [])
    with writing(
        out, force=opts.force, ours=is_moeshare_store, what="a moeshare store", inputs=inputs
    ) as tmp:
        if made is None:
            made = _plan(ckpts, slot_bytes, opts.similarity, opts.calib, opts.self_calib)
        taken = allocate(made.clusterings, slot_bytes, budget_bytes, opts.threshold)
        if not opts.force_merge:
            _check_related(made, taken)
        merge = opts.merge or ("fit" if made.can_fit else "average")
        if merge == "frequency" and not made.calib:
            # frequency weights come from routing calibration text; without it, a plain mean
            merge = "average"
        fit_calib = made.fit_calibration() if merge == "fit" else None
        writer, variants, bank, experts_after = _write(tmp, made, taken, merge, fit_calib)
        sizes = {
            "experts_after": experts_after,
            "experts_before": experts_before,
            "total_before": sum(ckpt.nbytes(n) for ckpt in ckpts for n in ckpt.names),
            "total_after": writer.tensor_bytes(),
        }
        how = {
            "similarity": made.similarity,
            "merge": merge,
            "budget": budget,
            "budget_bytes": budget_bytes,
            "threshold": opts.threshold,
            "calib": str(made.calib_path) if made.calib_path else None,
            "calib_tokens": made.calib.tokens if made.calib else 0,
            "self_calib_tokens": fit_calib.tokens if fit_calib is not None and fit_calib.sampled else 0,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        return writer.finish(ckpts[0].config, variants, bank, bytes=sizes, made=how)


def _write(
    tmp: Path, made: Plan, taken: dict[str, int], merge: str, fit_calib: Calibration | None
) -> tuple[StoreWriter, list[dict], dict, int]:
    """Merge each layer's clusters into bank slots and write them, then the variants: (the writer, the
    variants' manifest entries, the bank's manifest entry, bytes of the bank)."""
    ckpts, clusterings, calib = made.ckpts, made.clusterings, made.calib
    adapter, arch = ckpts[0].adapter, ckpts[0].adapter.name
    n_experts = adapter.num_experts
    names = [c.path.name for c in ckpts]
    tables: dict[str, dict[str, list[int]]] = {name: {} for name in names}
    bank_layers = []
    # the bank's header is known before any weight is merged, so it streams layer by layer
    writer = StoreWriter(
        tmp,
        arch,
        [(c.layer, len(c.states[taken[c.layer]]), ckpts[0].read_expert(c.layer, 0)) for c in clusterings],
    )
    experts_after = 0
    for c in tqdm(clusterings, desc="merging", unit="layer"):
        lx = load_layer(ckpts, c.layer)
        cache = AlignmentCache(lx, made.alignments[c.layer])
        freq = calib.counts[c.layer].reshape(-1) if calib else None
        fit = (
            FitData(arch, fit_calib.inputs[c.layer], fit_calib.gates[c.layer])
            if fit_calib is not None
            else None
        )
        slots = [merge_slot(members, cache, c.dist, merge, freq, fit) for members in c.states[taken[c.layer]]]
        for s, slot in enumerate(slots):
            for m in slot.members:
                tables[names[m // n_experts]].setdefault(c.layer, [0] * n_experts)[m % n_experts] = s
        experts_after += writer.write_layer(c.layer, [slot.expert for slot in slots])
        bank_layers.append(
            {
                "layer": c.layer,
                "slots": len(slots),
                "members": [[[names[m // n_experts], m % n_experts] for m in s.members] for s in slots],
                "errors": [[round(e, 6) for e in s.errors] for s in slots],
                "mean_error": float(np.mean([e for s in slots for e in s.errors])),
                "max_error": float(max(e for s in slots for e in s.errors)),
                "merge_costs": [round(x, 6) for x in c.costs[: taken[c.layer]]],
            }
        )
    variants = writer.write_variants(ckpts, tables)
    return writer, variants, {"experts_per_variant": n_experts, "layers": bank_layers}, experts_after


def _check_finite_others(ckpts: list[Checkpoint]) -> None:
    """Non-expert weights, before calibration runs them; experts are checked as each layer is loaded."""
    for ckpt in ckpts:
        for name in ckpt.names:
            if ckpt.adapter.classify(name).kind != "expert":
                require_finite(ckpt, name, ckpt.tensor(name))
