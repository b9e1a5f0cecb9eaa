"""Physical device memory in pages, shared by every instance of an engine.

An instance reserves a virtual range sized to the most it may ever use and gets a tensor view over it, so its
kernels and captured CUDA graphs see fixed addresses; the PageManager maps a physical page into a range when
the range's user needs it and unmaps it when it does not, so a page one model gives back is usable by any
other at once. The manager holds a budget of pages; a map beyond it fails (the caller preempts or waits).
A page given back is unmapped only once the work queued on the device when it was given back is done (a
queued step may still write a freed block); until then it counts as mapped and its owner may take it back.

Two backends stand behind it: on CUDA, the driver's virtual memory API (cuMemAddressReserve, cuMemCreate,
cuMemMap, cuMemSetAccess, cuMemUnmap, cuMemRelease) through the cuda-bindings package; on CPU, ordinary
memory (the range is one lazily committed tensor and mapping is bookkeeping), so every scheduling and
accounting behaviour is tested without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moeshare.errors import MoeshareError

log = logging.getLogger(__name__)

PAGE_BYTES = 2 << 20  # the CUDA driver's allocation granularity on current GPUs


class Backend(Protocol):
    page_bytes: int

    def reserve(self, nbytes: int) -> int:
        """A virtual range of nbytes (a multiple of page_bytes): its base address."""
        ...

    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over the range (its first page must be mapped: torch asks the driver about it)."""
        ...

    def map(self, base: int, offset: int) -> object:
        """Back the page at base + offset with physical memory; returns its handle."""
        ...

    def map_run(self, base: int, offset: int, count: int, chunk: int = 1) -> list[object]:
        """Back `count` pages from base + offset at once (one access call for all), `chunk` pages to one
        physical allocation (count is a multiple of it); each page's handle (a chunk's pages share one)."""
        ...

    def unmap(self, base: int, offset: int, handle: object, pages: int = 1) -> None:
        """Unmap what one map gave: `pages` pages from base + offset backed by `handle`."""
        ...

    def release(self, base: int, nbytes: int) -> None: ...


class HostBackend:
    """Ordinary memory: a range is one tensor (the OS commits its pages when they are first written)."""

    def __init__(self, page_bytes: int = PAGE_BYTES) -> None:
        self.page_bytes = page_bytes
        self._ranges: dict[int, torch.Tensor] = {}

    def reserve(self, nbytes: int) -> int:
        t = torch.empty(nbytes, dtype=torch.uint8)
        self._ranges[t.data_ptr()] = t
        return t.data_ptr()

    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        return self._ranges[base]

    def map(self, base: int, offset: int) -> object:
        return None

    def map_run(self, base: int, offset: int, count: int, chunk: int = 1) -> list[object]:
        return [None] * count

    def unmap(self, base: int, offset: int, handle: object, pages: int = 1) -> None:
        """Fill the pages with 0xff bytes (NaN in any float type): whatever still reads an unmapped page on CPU
        gets garbage, as it would get a fault on a GPU, so tests see it."""
        self._ranges[base][offset : offset + pages * self.page_bytes].fill_(0xFF)

    def release(self, base: int, nbytes: int) -> None:
        del self._ranges[base]


class _CudaArray:
    """A device address range as __cuda_array_interface__, for torch.as_tensor (no copy, not owned)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
        }


class CudaBackend:
    """The CUDA driver's virtual memory API on one device; physical pages are kept for reuse once made."""

    def __init__(self, device: torch.device) -> None:
        try:  # only where there is a GPU
            from cuda.bindings import driver as cu
        except ImportError:  # cuda-python before 12.6 named it cuda.cuda
            from cuda import cuda as cu

        self.cu, self.device = cu, device
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()  # the primary context the driver calls run in
        self.index = index
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        self.prop = prop
        flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        granularity = self._ok(cu.cuMemGetAllocationGranularity(prop, flag))
        self.page_bytes = max(PAGE_BYTES, int(granularity))
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = index
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.access = access
        # bytes -> physical allocations unmapped, kept for the next map
        self._spare: dict[int, list[object]] = {}
        self.held = 0  # bytes of physical memory made and not released
        self.limit: int | None = None  # the most bytes held at once (the pool's pages)
        self._ok(cu.cuInit(0))
        self._context = self._ok(cu.cuDevicePrimaryCtxRetain(self._ok(cu.cuDeviceGet(index))))

    def _ok(self, result: tuple) -> object:
        err, *rest = result
        if err != self.cu.CUresult.CUDA_SUCCESS:
            name = self.cu.cuGetErrorName(err)[1]
            raise MoeshareError(f"CUDA virtual memory call failed: {name.decode() if name else err}")
        return rest[0] if len(rest) == 1 else None

    @contextmanager
    def _on_device(self) -> Iterator[None]:
        """The device's primary context current on this thread for the driver calls (a thread that has run no
        CUDA call yet has none), and whatever was current before put back."""
        cu = self.cu
        before = self._ok(cu.cuCtxGetCurrent())
        if before != self._context:
            self._ok(cu.cuCtxSetCurrent(self._context))
        try:
            yield
        finally:
            if before != self._context:
                cu.cuCtxSetCurrent(before)

    def reserve(self, nbytes: int) -> int:
        with self._on_device():
            return int(self._ok(self.cu.cuMemAddressReserve(nbytes, self.page_bytes, 0, 0)))

    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        return torch.as_tensor(_CudaArray(base, nbytes), device=self.device)

    def create(self, pages: int) -> None:
        """Make `pages` physical pages now, so the budget is the device's from the start (a map never runs
        out of device memory later), and hold no more than that from then on; one line if the device does not
        have them."""
        self.limit = pages * self.page_bytes
        try:
            with self._on_device():
                while self.held < self.limit:
                    self._keep(self.page_bytes, self._make(self.page_bytes))
        except MoeshareError as e:
            self.trim()
            raise MoeshareError(
                f"the KV pool's {pages} pages of {self.page_bytes >> 20} MiB do not fit on the device ({e}): "
                "lower --pool"
            ) from None

    def lend(self, nbytes: int) -> int:
        """Give up to `nbytes` of the kept physical pages (none of them mapped) back to the device for a while:
        a model is built in torch's memory before it moves into the pool, and a pool that holds nearly the whole
        device would leave it no room. Maps meanwhile hold no more than what is left: the model's weights move
        into pages while it still holds the lent memory, so this helps only where the pool's unused pages hold
        its weights twice over (load the largest model first). Returns the bytes given."""
        given = 0
        with self._on_device():
            for size, handles in self._spare.items():
                while handles and given < nbytes:
                    self._ok(self.cu.cuMemRelease(handles.pop()))
                    self.held -= size
                    given += size
        if self.limit is not None:
            self.limit -= given
        return given

    def take_back(self, given: int) -> int:
        """Make the pages `lend` gave again, as far as the device has them back (what torch or the driver kept
        meanwhile stays theirs: the pool holds that much less from now on); returns the bytes it could not."""
        if self.limit is None:
            return 0
        target = self.limit + given
        with self._on_device():
            while self.held + self.page_bytes <= target:
                try:
                    handle = self._make(self.page_bytes)
                except MoeshareError:
                    break
                self._keep(self.page_bytes, handle)
        self.limit = self.held
        return target - self.held

    def _make(self, nbytes: int) -> object:
        handle = self._ok(self.cu.cuMemCreate(nbytes, self.prop, 0))
        self.held += nbytes
        return handle

    def _keep(self, nbytes: int, handle: object) -> None:
        self._spare.setdefault(nbytes, []).append(handle)

    def _handle(self, nbytes: int) -> object:
        """A kept physical allocation of nbytes, else a new one; kept ones of other sizes are released first
        as far as the new one would hold more than the limit (weights map larger allocations than KV)."""
        kept = self._spare.get(nbytes)
        if kept:
            return kept.pop()
        for size, handles in self._spare.items():
            while handles and self.limit is not None and self.held + nbytes > self.limit:
                self._ok(self.cu.cuMemRelease(handles.pop()))
                self.held -= size
        handle = self._make(nbytes)
        while self.limit is not None and self.held + nbytes <= self.limit:  # what a larger one left: kept
            self._keep(nbytes, self._make(nbytes))  # in this size, so the device never lends it elsewhere
        return handle

    def map(self, base: int, offset: int) -> object:
        return self.map_run(base, offset, 1)[0]

    def map_run(self, base: int, offset: int, count: int, chunk: int = 1) -> list[object]:
        """The driver's access call costs about the same for every physical allocation in the range (35 us on
        an H200, cuMemMap 3 us): larger chunks make mapping that many times cheaper."""
        assert count % chunk == 0, "a run is whole chunks"
        cu, size = self.cu, chunk * self.page_bytes
        handles: list[object] = []
        with self._on_device():
            try:
                for i in range(count // chunk):
                    handle = self._handle(size)
                    try:
                        self._ok(cu.cuMemMap(cu.CUdeviceptr(base + offset + i * size), size, 0, handle, 0))
                    except MoeshareError:
                        self._keep(size, handle)
                        raise
                    handles.append(handle)
                self._ok(
                    cu.cuMemSetAccess(
                        cu.CUdeviceptr(base + offset), count * self.page_bytes, [self.access], 1
                    )
                )
            except MoeshareError:
                for i, handle in enumerate(handles):
                    cu.cuMemUnmap(cu.CUdeviceptr(base + offset + i * size), size)
                    self._keep(size, handle)
                raise
        return [h for h in handles for _ in range(chunk)]

    def unmap(self, base: int, offset: int, handle: object, pages: int = 1) -> None:
        size = pages * self.page_bytes
        with self._on_device():
            self._ok(self.cu.cuMemUnmap(self.cu.CUdeviceptr(base + offset), size))
        self._keep(size, handle)

    def release(self, base: int, nbytes: int) -> None:
        with self._on_device():
            self._ok(self.cu.cuMemAddressFree(self.cu.CUdeviceptr(base), nbytes))

    def trim(self) -> None:
        """Give the kept physical pages back to the device."""
        with self._on_device():
            for size, handles in self._spare.items():
                while handles:
                    self._ok(self.cu.cuMemRelease(handles.pop()))
                    self.held -= size


UNFENCED = object()  # a given-back page's place-holder until the next fence records its event


@dataclass
class Region:
    """One owner's virtual range and which of its pages are mapped."""

    owner: str
    base: int
    nbytes: int
    mapped: dict[int, object] = field(default_factory=dict)  # page index in the range -> physical handle
    idle: dict[int, object] = field(default_factory=dict)  # mapped pages given back -> event (None: at once;
    # UNFENCED: given back since the last fence, no event yet)
    pinned: int = 0  # pages its owner never gives back while it lives (a KV pool's scratch block)
    chunk: int = 1  # pages to one physical allocation: mapped and unmapped together (weights use large ones)

    def chunk_of(self, page: int) -> range:
        first = page - page % self.chunk
        return range(first, first + self.chunk)


@dataclass(frozen=True)
class Limits:
    """One owner's share of the pages: `least` are kept for it even when it does not use them, it never holds
    more than `most` (None: no cap)."""

    least: int = 0
    most: int | None = None


@dataclass(frozen=True)
class PageStats:
    page_bytes: int
    total_pages: int
    free_pages: int
    mapped: dict[str, int]  # owner -> pages mapped and in use
    idle: int  # pages given back, still mapped until the work queued before is done (free to take)
    maps: int
    unmaps: int
    map_seconds: float
    unmap_seconds: float


class PageManager:
    """A budget of `total_pages` physical pages for every region of one device."""

    def __init__(self, total_pages: int, backend: Backend) -> None:
        if total_pages < 1:
            raise MoeshareError(f"the page pool needs at least one page, got {total_pages}")
        self.backend, self.total_pages = backend, total_pages
        self.page_bytes = backend.page_bytes
        self.regions: list[Region] = []
        self.limits: dict[str, Limits] = {}
        self._mapped = 0
        self.maps = self.unmaps = 0
        self.map_seconds = self.unmap_seconds = 0.0
        self._unfenced: list[tuple[Region, int]] = []  # pages given back since the last fence
        # the streams besides the device's default one whose work may read pages (the engine's instances'
        # with multiplex "streams"): a fence comes after their work queued so far too
        self.streams: Callable[[], Iterable[torch.cuda.Stream]] = tuple

    @classmethod
    def for_device(cls, device: torch.device, nbytes: int, page_bytes: int = PAGE_BYTES) -> PageManager:
        """A manager of `nbytes` (rounded down to pages) on `device`: the driver's on CUDA, memory on CPU."""
        if device.type != "cuda":
            return cls(max(1, nbytes // page_bytes), HostBackend(page_bytes))
        backend = CudaBackend(device)
        pages = max(1, nbytes // backend.page_bytes)
        backend.create(pages)
        return cls(pages, backend)

    @property
    def total_bytes(self) -> int:
        return self.total_pages * self.page_bytes

    @property
    def free_pages(self) -> int:
        return self.total_pages - self._mapped

    def available_pages(self) -> int:
        """Pages a map could get now: free ones and those given back but not unmapped yet."""
        return self.free_pages + sum(len(r.idle) for r in self.regions)

    def set_limits(self, owner: str, least: int = 0, most: int | None = None) -> None:
        """Keep `least` pages for `owner` and hold it to `most`; a one-line MoeshareError, nothing changed, if
        the limits contradict each other or the budget."""
        if least < 0 or (most is not None and most < max(1, least)):
            raise MoeshareError(
                f"{owner}: page limits must have 0 <= least <= most and most >= 1, got least {least}, most {most}"
            )
        others = sum(lim.least for o, lim in self.limits.items() if o != owner)
        if others + least > self.total_pages:
            raise MoeshareError(
                f"{owner}: {least} pages kept for it and {others} for the others exceed the pool's "
                f"{self.total_pages}: lower the minimums or grow the pool"
            )
        self.limits[owner] = Limits(least, most)

    def in_use(self, owner: str) -> int:
        return sum(len(r.mapped) - len(r.idle) for r in self.regions if r.owner == owner)

    def kept_for_others(self, owner: str) -> int:
        return sum(max(0, lim.least - self.in_use(o)) for o, lim in self.limits.items() if o != owner)

    def most(self, owner: str, evictable: Collection[str] = (), beside: int = 0) -> int:
        """The most pages `owner` could ever hold: its cap, and what others' minimums and the pages they never
        give back (their scratch blocks', resident weights') leave; the pinned pages of owners in `evictable`
        count as given back, and `beside` pages as held by others (what must stay with it, e.g. its weights)."""
        cap = self.limits.get(owner, Limits()).most
        others: dict[str, int] = {}
        for r in self.regions:
            if r.owner != owner and r.owner not in evictable:
                others[r.owner] = others.get(r.owner, 0) + r.pinned
        for o, lim in self.limits.items():
            if o != owner:
                others[o] = max(others.get(o, 0), lim.least)
        left = self.total_pages - sum(others.values()) - beside
        return min(cap, left) if cap is not None else left

    def room(self, owner: str) -> int:
        """Pages `owner` could map now (given-back pages count: they can be unmapped for it)."""
        cap = self.most(owner) - self.in_use(owner)
        return max(0, min(cap, self.available_pages() - self.kept_for_others(owner)))

    def pages_for(self, nbytes: int) -> int:
        return -(-nbytes // self.page_bytes)

    def lend(self, nbytes: int) -> int:
        """Up to `nbytes` of the pool's physical memory that no page holds now, the device's until `take_back`
        (see CudaBackend.lend; nothing on CPU, where pages take memory only when written). Returns the bytes."""
        lend = getattr(self.backend, "lend", None)
        return lend(nbytes) if lend is not None else 0

    def take_back(self, given: int) -> None:
        """The pages `lend` gave, made again; those the device does not give back (torch or the driver kept
        some meanwhile) leave the pool, with a warning."""
        if not given:
            return
        short = self.backend.take_back(given)
        if short > 0:
            lost = min(-(-short // self.page_bytes), self.total_pages - self._mapped)
            self.total_pages -= lost
            log.warning(
                "the page pool is %d pages (%d MiB) smaller: the device kept them after a model loaded",
                lost,
                lost * self.page_bytes >> 20,
            )

    def reserve(self, owner: str, nbytes: int, chunk: int = 1) -> Region:
        """A virtual range of at least nbytes (whole chunks of `chunk` pages), no page mapped yet."""
        size = -(-self.pages_for(nbytes) // chunk) * chunk * self.page_bytes
        region = Region(owner, self.backend.reserve(size), size, chunk=chunk)
        self.regions.append(region)
        return region

    def view(self, region: Region) -> torch.Tensor:
        """A uint8 tensor [nbytes] over the region, once its first page is mapped."""
        assert 0 in region.mapped, "map the region's first page before viewing it"
        return self.backend.tensor(region.base, region.nbytes)

    def map(self, region: Region, page: int) -> bool:
        """Back page `page` of the region; False (nothing changes) when the budget has no page for its owner
        (none free, or those left are kept for other owners' minimums, or the owner is at its maximum)."""
        assert region.chunk == 1, "a region of larger chunks maps whole runs"
        if page in region.mapped and page not in region.idle:
            return True
        if self.in_use(region.owner) >= self.most(region.owner):
            return False
        if page in region.idle:  # still mapped: taking it back costs nothing
            del region.idle[page]
            return True
        kept = self.kept_for_others(region.owner)
        for wait in (False, True):
            if self.free_pages - kept > 0:
                break
            self.reap(wait)
        if self.free_pages - kept <= 0:
            return False
        t0 = time.perf_counter()
        region.mapped[page] = self.backend.map(region.base, page * self.page_bytes)
        self.map_seconds += time.perf_counter() - t0
        self._mapped += 1
        self.maps += 1
        return True

    def map_run(self, region: Region, first: int, count: int) -> bool:
        """Back pages first .. first + count - 1 of the region, all of them or none (False: the budget has too
        few for the owner); the pages mapped anew in one driver access call per contiguous run."""
        pages = range(first, first + count)
        retake = [p for p in pages if p in region.idle]
        new = [p for p in pages if p not in region.mapped]
        if self.in_use(region.owner) + len(retake) + len(new) > self.most(region.owner):
            return False
        kept = self.kept_for_others(region.owner)
        for wait in (False, True):
            if self.free_pages - kept >= len(new):
                break
            self.reap(wait)
            retake = [p for p in pages if p in region.idle]  # a reap may have unmapped some of ours
            new = [p for p in pages if p not in region.mapped]
        if self.free_pages - kept < len(new):
            return False
        for p in retake:
            del region.idle[p]
        t0 = time.perf_counter()
        runs: list[list[int]] = []
        for p in new:
            if runs and runs[-1][-1] == p - 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        try:
            for run in runs:
                assert run[0] % region.chunk == 0 and len(run) % region.chunk == 0, "runs of whole chunks"
                handles = self.backend.map_run(region.base, run[0] * self.page_bytes, len(run), region.chunk)
                region.mapped.update(zip(run, handles, strict=True))
                self._mapped += len(run)
                self.maps += len(run)
        except BaseException:  # a driver error part-way: what this call took goes back
            for p in pages:
                if p in region.mapped and p not in region.idle:
                    self.unmap(region, p)
            raise
        finally:
            self.map_seconds += time.perf_counter() - t0
        return True

    def give_back(self, region: Region, page: int, after: torch.cuda.Event | None = None) -> None:
        """The region no longer needs the page: unmapped once the work queued before the next fence is done
        (one event for every page given back between two fences: a request that ends frees many at once),
        or once `after` fires (work on another stream that reads the page, e.g. an eviction's copy)."""
        if after is not None:
            region.idle[page] = after
        elif isinstance(self.backend, CudaBackend):
            region.idle[page] = UNFENCED
            self._unfenced.append((region, page))
        else:
            region.idle[page] = None

    def fence(self) -> None:
        """Record one event behind the work queued now for the pages given back since the last fence (the
        engine fences once a step; a reap fences first, so forgetting one is never unsafe, only slower)."""
        if not self._unfenced:
            return
        # on the engine device's default stream, whatever stream or device is current (a reap may run inside
        # one instance's step, on its stream), behind every stream that may read the pages
        stream = torch.cuda.default_stream(self.backend.device)
        for other in self.streams():
            stream.wait_stream(other)
        event = torch.cuda.Event()
        event.record(stream)
        for region, page in self._unfenced:
            if region.idle.get(page) is UNFENCED:  # not taken back (or released) since
                region.idle[page] = event
        self._unfenced.clear()

    def reap(self, wait: bool = False) -> None:
        """Unmap the given-back pages whose queued work is done (with `wait`, all of them, waiting)."""
        self.fence()
        for region in self.regions:
            for page in list(region.idle):
                chunk = region.chunk_of(page)
                if page != chunk[0] and chunk[0] in region.idle:  # the chunk is looked at once, by its first
                    continue
                if not all(p in region.idle for p in chunk):  # a chunk goes once all of it is given back
                    continue
                events = {id(e): e for p in chunk if (e := region.idle[p]) is not None}.values()
                if not all(e.query() for e in events):
                    if not wait:
                        continue
                    for e in events:
                        e.synchronize()
                self.unmap(region, page)

    def unmap(self, region: Region, page: int) -> None:
        """Unmap the page's chunk (the page, in regions of single pages)."""
        pages = region.chunk_of(page)
        t0 = time.perf_counter()
        self.backend.unmap(region.base, pages[0] * self.page_bytes, region.mapped[pages[0]], region.chunk)
        self.unmap_seconds += time.perf_counter() - t0
        for p in pages:
            del region.mapped[p]
            region.idle.pop(p, None)
        self._mapped -= region.chunk
        self.unmaps += region.chunk

    def release(self, region: Region) -> None:
        """Unmap every page of the region and give its range back (after the work queued on the device)."""
        if isinstance(self.backend, CudaBackend):
            torch.cuda.synchronize(self.backend.device)
        region.idle.clear()
        for page in list(region.mapped):
            if page in region.mapped:
                self.unmap(region, page)
        self.backend.release(region.base, region.nbytes)
        self.regions.remove(region)

    def stats(self) -> PageStats:
        mapped = Counter({r.owner: 0 for r in self.regions})
        for r in self.regions:
            mapped[r.owner] += len(r.mapped) - len(r.idle)
        return PageStats(
            self.page_bytes,
            self.total_pages,
            self.free_pages,
            dict(mapped),
            sum(len(r.idle) for r in self.regions),
            self.maps,
            self.unmaps,
            self.map_seconds,
            self.unmap_seconds,
        )
