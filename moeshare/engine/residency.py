"""Partial reconfiguration: which variants' non-expert weights sit in the model's R resident rows.

Every variant's weights wait in (pinned) host memory. A request for a non-resident variant takes a free row,
or the least recently used row that no running sequence needs, and its weights are copied in on a side CUDA
stream while steps of other variants go on. The bank and the expert tables never move.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LazyTensor:
    """A variant's tensor not read yet: loading reads it straight into its resident row."""

    source: object
    variant: str
    name: str

    def read(self) -> torch.Tensor:
        return self.source.tensor(self.variant, self.name)


def _host(t: LazyTensor | torch.Tensor, pin: bool) -> torch.Tensor:
    """A tensor in host memory, pinned when copies go to a GPU (one already there, e.g. a view of a pinned
    bank, stays as it is)."""
    t = (t.read() if isinstance(t, LazyTensor) else t).cpu()
    return t.pin_memory() if pin and not t.is_pinned() else t


@dataclass
class _Pending:
    row: int
    event: torch.cuda.Event
    started: torch.cuda.Event


class Residency:
    def __init__(
        self,
        rows: int,
        variants: list[str],
        fetch: Callable[[str], tuple[dict, torch.Tensor]],
        load: Callable[[int, Iterable, torch.Tensor, bool], None],
        device: torch.device,
    ) -> None:
        self.rows = rows
        self.device = device
        self._load = load
        pin = device.type == "cuda"
        # With a row for every variant nothing ever moves, so weights stream from disk straight into their
        # rows. Otherwise every variant waits in (pinned) host memory, ready to be copied in.
        self.host: dict[str, tuple[dict, torch.Tensor]] = {}
        for v in variants:
            tensors, table = fetch(v)
            if rows < len(variants):
                tensors = {k: _host(t, pin) for k, t in tensors.items()}
            self.host[v] = (tensors, table)
        self.row_of: dict[str, int] = {}
        self.variant_in: list[str | None] = [None] * rows
        self.last_used = [0.0] * rows
        self.pending: dict[str, _Pending] = {}
        self.swap_ins = 0
        self.swap_seconds = 0.0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        for v in variants[:rows]:  # start with the first R variants in place
            self._start(v, len(self.row_of))
        if self._stream is not None:
            self._stream.synchronize()
            self._settle()
        self.swap_ins = 0  # the initial placement is loading, not swapping
        self.swap_seconds = 0.0

    @property
    def resident(self) -> list[str]:
        return [v for v in self.variant_in if v is not None and v not in self.pending]

    def _start(self, variant: str, row: int) -> None:
        old = self.variant_in[row]
        if old is not None:
            del self.row_of[old]
        self.variant_in[row] = variant
        self.row_of[variant] = row
        tensors, table = self.host[variant]
        items = ((k, t.read() if isinstance(t, LazyTensor) else t) for k, t in tensors.items())
        t0 = time.perf_counter()
        if self._stream is None:
            self._load(row, items, table, False)
            self.swap_seconds += time.perf_counter() - t0
            self.swap_ins += 1
            return
        # the side stream waits for steps already queued (one may still read the row being replaced)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            begin, event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(self._stream)
            self._load(row, items, table, True)
            event.record(self._stream)
        self.pending[variant] = _Pending(row, event, begin)

    def reload(self) -> torch.cuda.Event | None:
        """Copy every resident row in again from where its variant waits (host memory or the checkpoint), on
        the side stream: the rows' memory was given up and is back empty. Returns the event that fires when
        all of it is in place (None on CPU: already). Not counted as swaps."""
        swaps, seconds = self.swap_ins, self.swap_seconds
        for row, variant in enumerate(self.variant_in):
            if variant is not None:
                self._start(variant, row)
        done = None
        if self._stream is not None:
            done = torch.cuda.Event()
            done.record(self._stream)
            self._stream.synchronize()
            self._settle()
        self.swap_ins, self.swap_seconds = swaps, seconds
        return done

    def _settle(self) -> None:
        for v, p in list(self.pending.items()):
            if p.event.query():
                torch.cuda.current_stream(self.device).wait_event(p.event)
                self.swap_seconds += p.started.elapsed_time(p.event) / 1e3  # the copy itself, on the GPU
                self.swap_ins += 1
                del self.pending[v]

    def row(self, variant: str, busy: set[int]) -> int | None:
        """The variant's row if its weights are in place; else start bringing them in and return None."""
        self._settle()
        if variant in self.row_of and variant not in self.pending:
            self.last_used[self.row_of[variant]] = time.perf_counter()
            return self.row_of[variant]
        if variant in self.pending:
            return None
        free = [r for r in range(self.rows) if self.variant_in[r] is None]
        idle = [r for r in range(self.rows) if r not in busy and self.variant_in[r] not in self.pending]
        candidates = free or sorted(idle, key=lambda r: self.last_used[r])
        if candidates:
            self._start(variant, candidates[0])
            self._settle()
            if variant not in self.pending:
                self.last_used[self.row_of[variant]] = time.perf_counter()
                return self.row_of[variant]
        return None
