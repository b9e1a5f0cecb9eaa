"""Which instances' work runs in a step. Today: every instance with work, in load order; a later policy weighs
SLO slack and fairness between models."""

from __future__ import annotations

from typing import Protocol

from moeshare.engine.instance import Instance


class Policy(Protocol):
    def pick(self, instances: list[Instance]) -> list[Instance]:
        """The instances that run a batch this step, in the order they run."""
        ...


class LoadOrder:
    def pick(self, instances: list[Instance]) -> list[Instance]:
        return [i for i in instances if i.has_work()]
