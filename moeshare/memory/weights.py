"""An instance's device weights in one virtual range of the page pool, so they can leave the device and come
back at the same addresses: captured CUDA graphs stay valid across an evict -> activate cycle.

The model is built as usual, then every device tensor it holds is moved into the range (views keep their
offsets inside their storage, so a fused weight and its split views, or tied embeddings, stay one memory).
Evicting copies the range to host memory on a side stream (or keeps nothing, for a model that can re-read
its weights from its checkpoint) and gives its pages back to the pool behind that copy; activating maps
pages again and copies the bytes back on the side stream while other models keep running.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moeshare.errors import MoeshareError, summary
from moeshare.memory.pages import PageManager

ALIGN = 512  # bytes between storages in the range: enough for any kernel's vector loads
RUN = 64  # pages mapped with one access call; an activation copies each run while the next one is mapped
# pages to one physical allocation for weights of at least 8 chunks: mapping costs the driver about the same per
# allocation whatever its size (16x fewer for 32 MiB ones), and a small model wastes no more than 1/8
CHUNK = 16


def chunk_for(pages: int) -> int:
    """Pages to one physical allocation for weights of `pages` pages."""
    return CHUNK if pages >= 8 * CHUNK else 1


def arena_pages(pages: int) -> int:
    """The pages weights of `pages` pages take in the pool: whole chunks."""
    chunk = chunk_for(pages)
    return -(-pages // chunk) * chunk


def size(nbytes: int) -> str:
    """Bytes for a person: GiB, or MiB below one GiB."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def device_tensors(model: object, device: torch.device) -> list[torch.Tensor]:
    """Every tensor on `device` that the model object holds, through its attributes' dicts, lists and tuples
    (each tensor object once; views of one storage are separate objects and all listed)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(x: object) -> None:
        if isinstance(x, torch.Tensor):
            if id(x) not in seen and x.device.type == device.type and x.device.index == device.index:
                seen.add(id(x))
                out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    for value in vars(model).values():
        walk(value)
    return out


def _same_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def host_bytes_available() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class HostCopy:
    """Page-locked host memory of exactly `nbytes` for an evicted model's weights (torch's pinned allocator
    rounds a request up to a power of two: 32 GiB held for a 16.1 GB model): ordinary memory registered with
    the driver, unregistered by `free` (the copies that use it are done by then), or ordinary memory alone on
    CPU or where the driver refuses to lock it (copies are slower from there, not wrong)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.locked = False
        if device.type == "cuda" and nbytes:
            with torch.cuda.device(device):
                rt = torch.cuda.cudart()
                self.locked = int(rt.cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)) == 0
                # a refused register leaves the runtime's last error set: cleared, or the next launch reports it
                if not self.locked and hasattr(rt, "cudaGetLastError"):
                    rt.cudaGetLastError()

    def free(self) -> None:
        if self.locked:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.locked = False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the runtime may be gone first
            self.free()


class Loading:
    """Weights read again from a checkpoint on a thread of their own (on the arena's side stream), so the
    engine thread goes on stepping the other models meanwhile."""

    def __init__(
        self, fn: Callable[[], None], device: torch.device, stream: torch.cuda.Stream | None
    ) -> None:
        self.error: BaseException | None = None
        self.event = torch.cuda.Event() if stream is not None else None

        def work() -> None:
            try:
                if stream is None:
                    fn()
                    return
                with torch.cuda.device(device), torch.cuda.stream(stream):
                    fn()
                    self.event.record(stream)
            except BaseException as e:  # reported by the engine thread, on the model's requests
                self.error = e

        self.thread = threading.Thread(target=work, name="moeshare-activate", daemon=True)
        self.thread.start()

    def query(self) -> bool:
        return not self.thread.is_alive() and (
            self.error is not None or self.event is None or self.event.query()
        )

    def synchronize(self) -> None:
        self.thread.join()
        if self.event is not None and self.error is None:
            self.event.synchronize()


class WeightArena:
    """The weights of one instance in a range of `pages` owned by `owner`."""

    def __init__(self, pages: PageManager, owner: str, model: object, device: torch.device) -> None:
        device = _same_device(device)
        tensors = device_tensors(model, device)
        self.pages, self.device = pages, device
        starts: dict[int, int] = {}  # storage address -> its offset in the range
        storages = []
        end = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in starts:
                end = -(-end // ALIGN) * ALIGN
                starts[storage.data_ptr()] = end
                storages.append(storage)
                end += storage.nbytes()
        self.nbytes = max(end, 1)
        self.region = pages.reserve(owner, self.nbytes, chunk_for(pages.pages_for(self.nbytes)))
        self.npages = self.region.nbytes // pages.page_bytes
        try:
            if not self._map_all():
                raise MoeshareError(
                    f"{owner}: its weights need {self.npages} pages ({size(self.nbytes)}) of the "
                    f"pool and {pages.room(owner)} are free: raise --pool or unload a model"
                )
            self.view = pages.view(self.region)[: self.nbytes]
            for storage in storages:
                start = starts[storage.data_ptr()]
                old = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
                self.view[start : start + storage.nbytes()].copy_(old)
            arena = self.view.untyped_storage()
            with torch.no_grad():
                for t in tensors:
                    at = starts[t.untyped_storage().data_ptr()] + t.storage_offset() * t.element_size()
                    t.set_(arena, at // t.element_size(), t.size(), t.stride())
        except BaseException:
            pages.release(self.region)
            raise
        self.resident = True
        self._host: HostCopy | None = None  # the copy an eviction left in host memory
        self.ready: torch.cuda.Event | Loading | None = None  # an activation's copy is done when this fires
        self.failed: str | None = None  # why the last activation could not read the weights again
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.evictions = self.activations = 0
        self.evict_seconds = self.activate_seconds = 0.0

    def _map_all(self, each=None) -> bool:
        """Map every page of the range, RUN pages at a time (`each(start, end)` after each run: the bytes that
        are mapped now), or none (False) when the pool has too few for the owner now."""
        if self.pages.room(self.region.owner) < self.npages:  # given-back pages count: they are anyone's
            return False
        page_bytes = self.pages.page_bytes
        for first in range(0, self.npages, RUN):
            count = min(RUN, self.npages - first)
            if not self.pages.map_run(self.region, first, count):  # a limit room() did not foresee
                after = None
                if self._stream is not None:  # copies queued into the runs mapped so far finish first
                    after = torch.cuda.Event()
                    after.record(self._stream)
                for page in range(first):
                    self.pages.give_back(self.region, page, after=after)
                return False
            if each is not None:
                each(first * page_bytes, min((first + count) * page_bytes, self.nbytes))
        self.region.pinned = self.npages  # never given back while resident: others' shares leave them out
        return True

    def evict(self, keep: bool) -> None:
        """Leave the device: with `keep`, the bytes go to (pinned) host memory first, on the side stream behind
        the work queued so far; without, nothing is kept (the owner re-reads its checkpoint on activation).
        The pages go back to the pool once that is done."""
        assert self.resident, "evicting weights that are not on the device"
        t0 = time.perf_counter()
        done = None
        if keep:
            if self._host is None:
                self._host = HostCopy(self.nbytes, self.device)
            if self._stream is None:
                self.host.copy_(self.view)
            else:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    self.host.copy_(self.view, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._stream)
        else:
            self.drop_host_copy()
        self.region.pinned = 0
        for page in range(self.npages):
            self.pages.give_back(self.region, page, after=done)
        self.resident = False
        self.evictions += 1
        self.evict_seconds += time.perf_counter() - t0

    def activate(self) -> bool:
        """Map the range again and queue the copy back from host memory on the side stream (`ready` fires
        when it is done); False, nothing changed, if the pool has too few free pages now. Without a host copy
        the caller loads the weights into the same tensors."""
        assert not self.resident, "activating weights that are on the device"
        t0 = time.perf_counter()
        host, stream = self.host, self._stream

        def copy(start: int, end: int) -> None:  # each run of pages as soon as it is mapped
            if stream is None:
                self.view[start:end].copy_(host[start:end])
            else:
                with torch.cuda.stream(stream):
                    self.view[start:end].copy_(host[start:end], non_blocking=True)

        if not self._map_all(copy if host is not None else None):
            return False
        self.ready = None
        if host is not None and stream is not None:
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.resident = True
        self.activations += 1
        self.activate_seconds += time.perf_counter() - t0
        return True

    def copied(self) -> bool:
        """Whether the last activation's copy is done (the compute stream then waits for it)."""
        ready = self.ready
        if ready is None:
            return True
        if not ready.query():
            return False
        self.ready = None
        if isinstance(ready, Loading):
            if ready.error is not None:  # the bytes in the range are no model's: they go, the owner reports
                self.failed = (
                    f"its weights could not be read again from its checkpoint ({summary(ready.error)})"
                )
                self.evict(keep=False)
                return False
            ready = ready.event
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        return True

    def load_in_background(self, fn: Callable[[], None]) -> None:
        """Fill the (mapped) range with `fn` on a thread; `copied` says when it is done."""
        self.ready = Loading(fn, self.device, self._stream)

    @property
    def host(self) -> torch.Tensor | None:
        """The bytes an eviction kept in host memory (None: none kept, or dropped)."""
        return self._host.tensor if self._host is not None else None

    def drop_host_copy(self) -> None:
        """Forget the host copy (the next eviction drops the weights or makes a new one)."""
        if self._host is not None:
            if self._stream is not None:  # a copy from it or into it may still be queued
                self._stream.synchronize()
            self._host.free()
            self._host = None

    def release(self) -> None:
        self.pages.release(self.region)
        self.drop_host_copy()
