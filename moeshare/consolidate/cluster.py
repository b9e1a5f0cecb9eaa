"""Agglomerative clustering of one layer's experts under a cannot-link constraint, and the global budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass
class LayerClustering:
    """The merge history of one layer: clusters after each step, and what each step cost."""

    layer: str
    owner: np.ndarray  # [n] variant index of each expert
    dist: np.ndarray  # [n, n] the distances it was built from
    states: list[list[list[int]]] = field(default_factory=list)  # states[k]: clusters after k merges
    costs: list[float] = field(default_factory=list)  # costs[k]: linkage distance of merge k+1
    free: int = 0  # merges of bitwise-identical experts, always taken

    @property
    def min_clusters(self) -> int:
        return len(self.states[-1])


def _complete_linkage(dist: np.ndarray, owner: np.ndarray, exact: np.ndarray) -> tuple[list, list, int]:
    n = len(owner)
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    owners = {i: {int(owner[i])} for i in range(n)}
    # cluster-to-cluster complete linkage; inf where two clusters share a variant; bitwise-equal pairs
    # below zero so they merge before anything else, even a permuted copy at distance 0
    link = np.where(exact, -1.0, dist)
    np.fill_diagonal(link, np.inf)
    all_exact = exact.copy()
    states, costs, free = [[[i] for i in range(n)]], [], 0
    alive = np.ones(n, dtype=bool)
    while True:
        masked = np.where(alive[:, None] & alive[None, :], link, np.inf)
        a, b = np.unravel_index(np.argmin(masked), masked.shape)
        if not np.isfinite(masked[a, b]):
            break
        a, b = int(min(a, b)), int(max(a, b))
        if all_exact[a, b] and free == len(costs):
            free += 1
        costs.append(max(float(masked[a, b]), 0.0))
        clusters[a] += clusters.pop(b)
        owners[a] |= owners.pop(b)
        alive[b] = False
        link[a, :] = np.maximum(link[a, :], link[b, :])
        link[:, a] = link[a, :]
        all_exact[a, :] &= all_exact[b, :]
        all_exact[:, a] = all_exact[a, :]
        for c in clusters:
            if c != a and owners[a] & owners[c]:
                link[a, c] = link[c, a] = np.inf
        link[a, a] = np.inf
        states.append(sorted(sorted(c) for c in clusters.values()))
    return states, costs, free


def _matching_partition(dist: np.ndarray, owner: np.ndarray, experts_per_variant: int) -> list[list[int]]:
    """Exactly E clusters: every variant's experts matched one-to-one onto the most central variant's."""
    variants = sorted(set(owner.tolist()))
    members = {v: np.flatnonzero(owner == v) for v in variants}
    finite = np.where(np.isfinite(dist), dist, 0.0)
    anchor = min(variants, key=lambda v: finite[members[v]].sum())
    clusters = [[int(i)] for i in members[anchor]]
    for v in variants:
        if v == anchor:
            continue
        cost = finite[np.ix_(members[anchor], members[v])]
        rows, cols = linear_sum_assignment(cost)
        for r, c in zip(rows, cols, strict=True):
            clusters[r].append(int(members[v][c]))
    return sorted(sorted(c) for c in clusters)


def cluster_layer(
    layer: str, dist: np.ndarray, owner: np.ndarray, exact: np.ndarray, experts: int
) -> LayerClustering:
    """dist [n, n] aligned distances (inf within a variant), owner [n], exact [n, n] bitwise-equal pairs."""
    states, costs, free = _complete_linkage(dist, owner, exact)
    if len(states[-1]) > experts:
        # Greedy merging can paint itself into a corner (every remaining pair shares a variant); finish
        # with a matching so the smallest bank, one slot per local expert, is always reachable.
        final = _matching_partition(dist, owner, experts)
        spread = max(max((dist[i, j] for i in c for j in c if i != j), default=0.0) for c in final)
        states.append(final)
        costs.append(float(max(spread, costs[-1] if costs else 0.0)))
    return LayerClustering(layer, owner, dist, states, costs, free)


def allocate(
    layers: list[LayerClustering],
    slot_bytes: dict[str, int],
    budget_bytes: float | None,
    threshold: float | None,
) -> dict[str, int]:
    """How many merges each layer takes: free ones always, then the cheapest next merge of any layer
    until the bank fits `budget_bytes`, or every merge closer than `threshold`."""
    taken = {c.layer: c.free for c in layers}
    if threshold is not None:
        for c in layers:
            while taken[c.layer] < len(c.costs) and c.costs[taken[c.layer]] <= threshold:
                taken[c.layer] += 1
        return taken

    def size() -> float:
        return sum(len(c.states[taken[c.layer]]) * slot_bytes[c.layer] for c in layers)

    while budget_bytes is not None and size() > budget_bytes:
        open_layers = [c for c in layers if taken[c.layer] < len(c.costs)]
        if not open_layers:
            break
        # cost per byte saved, so a layer of larger slots gives way first at equal distance
        best = min(open_layers, key=lambda c: (c.costs[taken[c.layer]], -slot_bytes[c.layer]))
        taken[best.layer] += 1
    return taken


# A variant whose experts are this far from every other variant's is not a fine-tune of the same base. Distances
# are RMS-relative (align.relative_distance): 1.0 is a cosine of 0.5 between equal-norm weights; unrelated weights
# sit near sqrt(2) = 1.41, fine-tunes of one base well below 1 (0.07-0.34 in the zoo).
UNRELATED = 1.0


def distance_to_others(layers: list[LayerClustering], n_variants: int) -> np.ndarray:
    """[V] per variant, the median over its experts (every layer) of the distance to the nearest expert of
    another variant."""
    nearest: list[list[float]] = [[] for _ in range(n_variants)]
    for c in layers:
        for i, v in enumerate(c.owner):
            others = c.dist[i][c.owner != v]
            nearest[int(v)].append(float(others.min()) if len(others) else 0.0)
    return np.array([float(np.median(d)) if d else 0.0 for d in nearest])


def shares_a_slot(layers: list[LayerClustering], taken: dict[str, int], variant: int) -> bool:
    """Whether the allocation puts any expert of `variant` in a slot with another variant's."""
    return any(
        len(cluster) > 1 and variant in c.owner[cluster]
        for c in layers
        for cluster in c.states[taken[c.layer]]
    )
