"""Prometheus metrics on their own HTTP port, in a private registry (several servers may share a process)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from moeshare.engine.api import EngineStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moeshare_requests", "Requests by model and gRPC status code", ["model", "code"], registry=r
        )
        self.http_requests = Counter(
            "moeshare_http_requests",
            "Requests of the OpenAI-compatible HTTP API by model and HTTP status",
            ["model", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "moeshare_ttft_seconds", "Time to first token", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "moeshare_tpot_seconds", "Time per output token", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "moeshare_request_seconds",
            "End-to-end request time",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slo = Counter(
            "moeshare_slo_requests",
            "Finished requests that had latency targets, by model and whether they met them",
            ["model", "met"],
            registry=r,
        )
        self._engine: dict[str, Any] = {}
        self._queue_depth = 0
        gauges: dict[str, tuple[str, Callable[[], float]]] = {
            "moeshare_queue_depth": ("Requests waiting", lambda: self._queue_depth),
            "moeshare_running": ("Sequences running", lambda: self._engine.get("running", 0)),
            "moeshare_kv_blocks_used": ("KV blocks in use", lambda: self._engine.get("kv_blocks_used", 0)),
            "moeshare_kv_blocks_free": ("KV blocks free", lambda: self._engine.get("kv_blocks_free", 0)),
            "moeshare_resident_variants": (
                "Variants whose weights are on the device",
                lambda: len(self._engine.get("resident_variants", [])),
            ),
            "moeshare_swap_ins_total": ("Variant weights copied in", lambda: self._engine.get("swap_ins", 0)),
            "moeshare_kv_pages_free": (
                "Elastic KV pool pages free",
                lambda: self._pages.get("free_pages", 0),
            ),
            "moeshare_kv_pages_idle": (
                "Elastic KV pool pages given back, unmapped once queued work is done",
                lambda: self._pages.get("idle", 0),
            ),
            "moeshare_kv_page_maps_total": (
                "Elastic KV pool pages mapped",
                lambda: self._pages.get("maps", 0),
            ),
            "moeshare_kv_page_unmaps_total": (
                "Elastic KV pool pages unmapped",
                lambda: self._pages.get("unmaps", 0),
            ),
            "moeshare_kv_page_map_seconds_total": (
                "Time spent mapping and unmapping elastic KV pool pages",
                lambda: self._pages.get("map_seconds", 0.0) + self._pages.get("unmap_seconds", 0.0),
            ),
        }
        self._pages: dict[str, Any] = {}
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)
        self.pages_in_use = Gauge(
            "moeshare_kv_pages_in_use",
            "Elastic KV pool pages in use, per store or checkpoint",
            ["model"],
            registry=r,
        )
        self._http: Any = None

    def observe(
        self, model: str, ttft: float, tpot: float | None, e2e: float, met: bool | None = None
    ) -> None:
        if met is not None:
            self.slo.labels(model, "yes" if met else "no").inc()
        self.ttft.labels(model).observe(ttft)
        if tpot is not None:
            self.tpot.labels(model).observe(tpot)
        self.e2e.labels(model).observe(e2e)

    def count(self, model: str, code: str) -> None:
        self.requests.labels(model or "-", code).inc()

    def count_http(self, model: str, status: int) -> None:
        self.http_requests.labels(model or "-", str(status)).inc()

    def update(self, engine_stats: EngineStats, queue_depth: int) -> None:
        """Latest engine counters for the gauges (set by the server's refresh task)."""
        self._engine = asdict(engine_stats)
        self._queue_depth = queue_depth
        self._pages = self._engine.get("pages") or {}
        for model, n in self._pages.get("mapped", {}).items():
            self.pages_in_use.labels(model).set(n)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
