"""Prometheus metrics, one registry per service instance (tests run several in a process).

Under ``[server] workers`` > 1 the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start, so prometheus_client keeps every value in per-process files there and
``render`` aggregates all workers (counters and histograms summed, gauges as marked).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from .concurrency.breaker import BreakerState, CircuitBreaker
from .concurrency.budget import ByteBudget

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Label values must come from a fixed set: a client can send any token as its method, and
# every new label value is a series that never goes away.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE"}
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "resizer_requests", "HTTP requests answered", ["method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "resizer_request_duration_seconds",
            "Time to the response headers (not the whole body)",
            ["cache_status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.cache_hits = Counter("resizer_cache_hits", "Requests served from cache", registry=r)
        self.cache_misses = Counter(
            "resizer_cache_misses", "Requests that found no cache entry", registry=r
        )
        self.origin_fetches = Counter(
            "resizer_origin_fetches", "Sources opened for a transformation", registry=r
        )
        self.transforms = Counter("resizer_transforms", "ffmpeg processes started", registry=r)
        self.lease_follows = Counter(
            "resizer_lease_follows",
            "Works that tailed the output another process was producing (shared disk cache)",
            registry=r,
        )
        self.coalesced = Counter(
            "resizer_coalesced", "Requests that attached to in-flight work", registry=r
        )
        self.stream_aborts = Counter(
            "resizer_stream_aborts", "Clients that disconnected mid-body", registry=r
        )
        self.inflight_works = Gauge(
            "resizer_inflight_works", "Works in flight", registry=r, multiprocess_mode="livesum"
        )
        self.transforms_running = Gauge(
            "resizer_transforms_running",
            "ffmpeg processes running",
            registry=r,
            multiprocess_mode="livesum",
        )

        self.stream_budget_bytes = Gauge(
            "resizer_stream_budget_bytes",
            "Response body bytes held in memory by streams (the stream budget in use)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams_waiting = Gauge(
            "resizer_streams_waiting_for_budget",
            "Streams waiting for stream budget before their next read",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.stream_budget_overdrafts = Counter(
            "resizer_stream_budget_overdrafts",
            "Chunks granted over the stream budget (a first chunk, or after stream_budget_wait)",
            registry=r,
        )
        self._overdrafts_seen = 0

        self.breaker_trips = Counter(
            "resizer_circuit_breaker_trips",
            "Times a source's circuit breaker opened",
            ["source"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "resizer_circuit_breaker_state",
            "Circuit breaker state per source: 0 closed, 1 half-open, 2 open",
            ["source"],
            registry=r,
            multiprocess_mode="liveall",  # breakers are per worker: one series per pid
        )

    def count_request(self, method: str, status: int) -> None:
        """One answered request; an unknown method counts as ``other``."""
        label = method if method in KNOWN_METHODS else "other"
        self.requests.labels(label, str(status)).inc()

    def budget_changed(self, budget: ByteBudget) -> None:
        """``ByteBudget.on_change``: keep the stream budget's gauges current."""
        self.stream_budget_bytes.set(budget.used)
        self.streams_waiting.set(budget.waiting)
        if budget.overdrafts != self._overdrafts_seen:
            self.stream_budget_overdrafts.inc(budget.overdrafts - self._overdrafts_seen)
            self._overdrafts_seen = budget.overdrafts

    def track_breakers(self, breakers: Iterable[CircuitBreaker]) -> None:
        """Export every source's breaker (state 0 until it changes)."""
        for breaker in breakers:
            self.breaker_state.labels(breaker.name).set(breaker.state.value)
            self.breaker_trips.labels(breaker.name)

    def breaker_changed(self, breaker: CircuitBreaker) -> None:
        """``CircuitBreaker.on_change``: keep the gauge current and count the trips."""
        state = breaker._state  # not .state: reading it may itself report a change
        self.breaker_state.labels(breaker.name).set(state.value)
        if state is BreakerState.OPEN:
            self.breaker_trips.labels(breaker.name).inc()

    def render(self) -> bytes:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, folder)  # type: ignore[no-untyped-call]
        return generate_latest(every_worker)
