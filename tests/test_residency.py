"""Residency on its own (CPU): which variants sit in the rows, and which row a swap takes."""

import torch

from moeshare.engine.residency import Residency

VARIANTS = ["a", "b", "c"]


class Rows:
    """The weights a residency fills: one value per row, and what each load brought."""

    def __init__(self, rows: int) -> None:
        self.weights = torch.zeros(rows)
        self.loads: list[tuple[int, str]] = []

    def fetch(self, variant: str) -> tuple[dict, torch.Tensor]:
        return {"w": torch.tensor(float(VARIANTS.index(variant) + 1))}, torch.zeros(1, 1, dtype=torch.int64)

    def load(self, row: int, tensors, table: torch.Tensor, non_blocking: bool) -> None:
        for _, t in tensors:
            self.weights[row] = t
            self.loads.append((row, VARIANTS[int(t.item()) - 1]))


def _residency(rows: int) -> tuple[Residency, Rows]:
    model = Rows(rows)
    return Residency(rows, VARIANTS, model.fetch, model.load, torch.device("cpu")), model


def test_the_first_variants_start_in_place_and_are_not_counted_as_swaps():
    residency, model = _residency(2)
    assert residency.resident == ["a", "b"] and model.weights.tolist() == [1.0, 2.0]
    assert residency.swap_ins == 0 and residency.row("a", set()) == 0


def test_a_swap_takes_the_least_recently_used_idle_row():
    residency, model = _residency(2)
    residency.row("b", set())
    residency.row("a", set())  # b is now the least recently used
    row = residency.row("c", set())
    assert row == 1 and model.weights.tolist() == [1.0, 3.0]
    assert residency.resident == ["a", "c"] and residency.swap_ins == 1 and "b" not in residency.row_of


def test_a_busy_row_is_never_taken():
    residency, model = _residency(2)
    assert residency.row("c", busy={0, 1}) is None
    assert residency.resident == ["a", "b"] and residency.swap_ins == 0
    assert residency.row("c", busy={1}) == 0 and model.weights.tolist() == [3.0, 2.0]


def test_with_a_row_for_every_variant_nothing_moves():
    residency, model = _residency(3)
    for v in VARIANTS * 2:
        residency.row(v, set())
    assert residency.swap_ins == 0 and len(model.loads) == 3
