"""The `fit` merge: a slot's expert fitted to what its members compute on the tokens routed to them.

Averaging weights loses what each fine-tune changed. Here the merged expert is the least-squares fit of the
members' outputs, each member on the calibration tokens its own router sends it, weighted by the gate weight
those outputs get: first RegMean for the input projections (a closed form that matches their outputs), then
the output projection refitted on the members' full outputs given those inputs. A small ridge pulls both
towards the plain average, so an expert with few routed tokens stays close to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeshare.consolidate.align import NEURON_AXIS
from moeshare.consolidate.experts import OUTPUT_ROLE, expert_forward, expert_hidden

RIDGE = 1e-3  # relative to the mean diagonal of the normal equations


@dataclass
class FitData:
    """One layer's calibration tokens: per variant, what its MoE layer sees and how its router weighs them."""

    arch: str
    inputs: list[torch.Tensor]  # per variant [T, H]
    gates: list[torch.Tensor]  # per variant [T, E]
    ridge: float = RIDGE

    def routed(self, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Member i = variant * E + local expert: its routed tokens [T_i, H] and their loss weights [T_i]."""
        v, e = divmod(member, self.gates[0].shape[1])
        g = self.gates[v][:, e]
        picked = g > 0
        # the expert's output is scaled by its gate weight, so its error counts with that weight squared
        return self.inputs[v][picked], g[picked].square()


def _ridge_solve(a: torch.Tensor, b: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ||X W - Y||^2 + ridge * mean(diag a) * ||W - prior||^2, given a = X^T X [D, D] and
    b = X^T Y [D, K]."""
    lam = max(ridge * float(a.diagonal().mean()), 1e-12)  # > 0: solvable even when no token reached
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.solve(a.double() + lam * eye, b.double() + lam * prior.double()).float()


def fit_expert(
    fit: FitData, members: list[int], aligned: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor] | None:
    """The fitted expert in float32 from the members' neuron-aligned weights; None if no token reached any."""
    routed = [fit.routed(m) for m in members]
    if sum(len(x) for x, _ in routed) == 0:
        return None
    roles = list(aligned[0])
    average = {r: sum(a[r].float() for a in aligned) / len(aligned) for r in roles}
    out = dict(average)
    grams = [x.T @ (w[:, None] * x) for x, w in routed]  # each [H, H]
    gram = sum(grams)
    for r in (r for r in roles if NEURON_AXIS[r] == 0):  # input projections [I, H]
        target = sum(g @ a[r].float().T for g, a in zip(grams, aligned, strict=True))  # [H, I]
        out[r] = _ridge_solve(gram, target, average[r].T, fit.ridge).T
    o = OUTPUT_ROLE[fit.arch]  # [H, I]
    hidden = [expert_hidden(fit.arch, out, x) for x, _ in routed]  # each [T_i, I]
    wanted = [expert_forward(fit.arch, a, x) for a, (x, _) in zip(aligned, routed, strict=True)]  # [T_i, H]
    hh = sum(h.T @ (w[:, None] * h) for h, (_, w) in zip(hidden, routed, strict=True))  # [I, I]
    hy = sum(h.T @ (w[:, None] * y) for h, y, (_, w) in zip(hidden, wanted, routed, strict=True))  # [I, H]
    out[o] = _ridge_solve(hh, hy, average[o].T, fit.ridge).T
    return out
