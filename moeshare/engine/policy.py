"""Which instances' work runs in a step.

`LeastSlack` (the default) weighs the requests' latency targets: each request with targets has a deadline for
its next token (its arrival plus its time-to-first-token target before the first token; after it, its first
token's time plus its time-per-output-token target per token so far), and an instance's slack is its most
pressing request's time to deadline. When some instance's slack is below `urgent` seconds, only the urgent
instances run that step, least slack first, so their steps come faster; the others wait. Fairness bound: an
instance with work is skipped at most `max_skips` steps in a row in which it could have queued a batch (with
multiplex "streams" a step finds some instances' batches still running: they are not skipped then), so every
model with work runs at least once every max_skips + 1 such steps whatever the others' targets. Without any
targets every instance with work runs every step, in load order, as `LoadOrder` does. Instances whose weights are not on the device are never urgent (they
cannot run; their activation goes on beside).
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from moeshare.engine.instance import Instance


class Policy(Protocol):
    def pick(self, instances: list[Instance]) -> list[Instance]:
        """The instances that run a batch this step, in the order they run."""
        ...


class LoadOrder:
    """Every instance with work, in load order."""

    def pick(self, instances: list[Instance]) -> list[Instance]:
        return [i for i in instances if i.has_work()]


class LeastSlack:
    def __init__(self, urgent: float = 0.0, max_skips: int = 4) -> None:
        self.urgent, self.max_skips = urgent, max_skips
        self._skipped: dict[int, int] = {}  # id(instance) -> steps skipped in a row

    def pick(self, instances: list[Instance]) -> list[Instance]:
        busy = [i for i in instances if i.has_work()]
        now = time.perf_counter()
        slack = {id(i): i.slack(now) if i.on_device else math.inf for i in busy}
        urgent = [i for i in busy if slack[id(i)] < self.urgent]
        if not urgent:
            picked = busy
        else:
            due = [i for i in busy if self._skipped.get(id(i), 0) >= self.max_skips]
            picked = sorted(urgent, key=lambda i: slack[id(i)]) + [i for i in due if i not in urgent]
        for i in busy:  # a step in which it could not have queued a batch anyway is no skip
            if i in picked:
                self._skipped[id(i)] = 0
            elif i.can_launch():
                self._skipped[id(i)] = self._skipped.get(id(i), 0) + 1
        for key in set(self._skipped) - {id(i) for i in busy}:
            del self._skipped[key]
        return picked


POLICIES = {"least-slack": LeastSlack, "load-order": LoadOrder}
