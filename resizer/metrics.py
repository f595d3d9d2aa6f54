"""Prometheus metrics, one registry per service instance (tests run several in a process).

Under ``[server] workers`` > 1 the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start, so prometheus_client keeps every value in per-process files there and
``render`` aggregates all workers (counters and histograms summed, gauges as marked). The
process gauges (resident memory, open descriptors) are read from ``/proc`` when scraped,
for every live worker, whichever worker answers the scrape.

Every label takes its values from a fixed set (README.md, "Metrics", lists them): a label
fed from a request (a path, a key, a method a client made up) would add series forever.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .concurrency.breaker import BreakerState, CircuitBreaker
from .concurrency.budget import ByteBudget

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Label values must come from a fixed set: a client can send any token as its method, and
# every new label value is a series that never goes away.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE"}
)
ROUTES = frozenset({"media", "health", "metrics", "admin", "other"})
QUEUE_CLASSES = ("high", "medium", "low")
FFMPEG_MODES = frozenset({"probe", "video", "frame", "spritesheet", "audio", "hls"})
SOURCE_KINDS = frozenset({"filesystem", "http", "s3", "remote"})
EVICTION_REASONS = ("expired", "size")  # why the disk cache sweep removed an entry
NO_CACHE_STATUS = "none"  # a response without X-Cache-Status (not media, or an error)
# X-Cache-Status values are the server's own words (HIT, MISS, COALESCED, HIT-STALE...):
# anything else becomes "other", so a bug can never turn a label into a free-form string.
_CACHE_STATUS = re.compile(r"[A-Z][A-Z-]{0,23}")

_SHORT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LONG = (*_SHORT, 60, 120, 300, 600)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def route_label(route: str) -> str:
    return route if route in ROUTES else "other"


def cache_status_label(value: str | None) -> str:
    if not value:
        return NO_CACHE_STATUS
    return value if _CACHE_STATUS.fullmatch(value) else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "resizer_requests", "HTTP requests answered", ["method", "status"], registry=r
        )
        self.request_duration = Histogram(
            "resizer_request_duration_seconds",
            "Whole requests: from the request's arrival to the last body byte sent",
            ["route", "cache_status"],
            buckets=_LONG,
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "resizer_time_to_first_byte_seconds",
            "From the request's arrival to the response's first bytes (headers with the"
            " first body chunk)",
            ["route", "cache_status"],
            buckets=_SHORT,
            registry=r,
        )
        # (route, cache status) -> the three series a finished request feeds; both come
        # from resizer's own code (a fixed set), so this stays small.
        self._request_series: dict[tuple[str, str | None], tuple[Any, Any, Any]] = {}
        self.body_bytes_sent = Counter(
            "resizer_body_bytes_sent",
            "Response body bytes sent (by sendfile on the hit layer; 0 for X-Accel-Redirect)",
            ["route"],
            registry=r,
        )
        self.active_requests = Gauge(
            "resizer_active_requests",
            "Requests being answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            "resizer_queue_wait_seconds",
            "Time an ffmpeg run waited in the scheduler's queue for a slot",
            ["class"],
            buckets=_LONG,
            registry=r,
        )
        self.queue_depth = Gauge(
            "resizer_queue_depth",
            "ffmpeg runs waiting for a slot",
            ["class"],
            registry=r,
            # Every worker reports the machine's one queue (scheduling/coordinator.py).
            multiprocess_mode="livemax",
        )
        for klass in QUEUE_CLASSES:  # present (0) before the first queued run
            self.queue_wait.labels(klass)
            self.queue_depth.labels(klass).set(0)
        self.ffmpeg_run = Histogram(
            "resizer_ffmpeg_run_seconds",
            "ffmpeg processes from start to exit (killed ones too)",
            ["mode"],
            buckets=_LONG,
            registry=r,
        )
        self.origin_fetch = Histogram(
            "resizer_origin_fetch_seconds",
            "Making a source available to ffmpeg: a download, or opening a local file",
            ["source"],
            buckets=_LONG,
            registry=r,
        )
        self.origin_bytes_fetched = Counter(
            "resizer_origin_bytes_fetched",
            "Bytes of sources fetched from their origins (a reused download counts 0)",
            ["source"],
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
        self.shared_hits = Counter(
            "resizer_shared_hits",
            "Local misses served from the shared store ([cluster.s3]), filling the local cache",
            registry=r,
        )
        self.shared_store_errors = Counter(
            "resizer_shared_store_errors",
            "Shared store lookups, uploads and reads that failed or timed out (served anyway)",
            registry=r,
        )
        self.cluster_follows = Counter(
            "resizer_cluster_follows",
            "Works that waited for another instance's lease, then read its shared entry",
            registry=r,
        )
        self.cluster_degraded = Counter(
            "resizer_cluster_degraded",
            "Lease acquisitions and purge broadcasts done local only: Redis was unreachable",
            registry=r,
        )
        self.revalidations = Counter(
            "resizer_revalidations",
            "Expired entries checked against their source: refreshed (unchanged, no ffmpeg), "
            "changed (produced again) or failed (the origin could not answer)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("refreshed", "changed", "failed"):
            self.revalidations.labels(outcome)
        # Measured by the disk cache's eviction sweep (cache/eviction.py), machine-wide: every
        # worker reports the one folder they share (the latest of their sweeps).
        self.cache_bytes = Gauge(
            "resizer_cache_bytes",
            "Bytes of the disk cache's published entries, as of the last sweep",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cache_entries = Gauge(
            "resizer_cache_entries",
            "Published entries in the disk cache, as of the last sweep",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cache_evictions = Counter(
            "resizer_cache_evictions",
            "Disk cache entries removed by the sweep",
            ["reason"],
            registry=r,
        )
        for reason in EVICTION_REASONS:
            self.cache_evictions.labels(reason)
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
        # Single-process mode only: with several workers, render() reads every worker's.
        r.register(ProcessStats(lambda: [os.getpid()]))

    def count_request(self, method: str, status: int) -> None:
        """One answered request; an unknown method counts as ``other``."""
        label = method if method in KNOWN_METHODS else "other"
        self.requests.labels(label, str(status)).inc()

    def request_finished(
        self,
        route: str,
        cache_status: str | None,
        *,
        ttfb: float | None,
        duration: float,
        body_bytes: int,
    ) -> None:
        """One answered request (``ttfb`` None: it ended before its first bytes)."""
        series = self._request_series.get((route, cache_status))
        if series is None:  # labels() costs a few us a call: a hit makes three
            label, status = route_label(route), cache_status_label(cache_status)
            series = (
                self.request_duration.labels(label, status),
                self.time_to_first_byte.labels(label, status),
                self.body_bytes_sent.labels(label),
            )
            self._request_series[(route, cache_status)] = series
        duration_series, ttfb_series, bytes_series = series
        duration_series.observe(duration)
        if ttfb is not None:
            ttfb_series.observe(ttfb)
        if body_bytes:
            bytes_series.inc(body_bytes)

    def cache_swept(self, size: int, entries: int, evicted: Mapping[str, int]) -> None:
        """A sweep measured the disk cache (``size`` bytes in ``entries`` entries, after it)
        and removed ``evicted[reason]`` entries (reasons: expired, size)."""
        self.cache_bytes.set(size)
        self.cache_entries.set(entries)
        for reason, count in evicted.items():
            if count:
                label = reason if reason in EVICTION_REASONS else "other"
                self.cache_evictions.labels(label).inc(count)

    def observe_queue_wait(self, klass: str, seconds: float) -> None:
        """A run left the scheduler's queue of ``klass`` (high, medium, low) after ``seconds``."""
        self.queue_wait.labels(_queue_class(klass)).observe(max(0.0, seconds))

    def set_queue_depth(self, klass: str, depth: int) -> None:
        """Runs now waiting in the machine's queue of ``klass`` (the same in every worker)."""
        self.queue_depth.labels(_queue_class(klass)).set(depth)

    def observe_ffmpeg_run(self, mode: str, seconds: float) -> None:
        """An ffmpeg process of ``mode`` (probe, video, frame...) ran for ``seconds``."""
        self.ffmpeg_run.labels(mode if mode in FFMPEG_MODES else "other").observe(seconds)

    def origin_fetched(self, source: str, seconds: float, fetched_bytes: int) -> None:
        """A source of kind ``source`` was made available in ``seconds``, fetching that many
        bytes from its origin (0 when a kept download was reused)."""
        label = source if source in SOURCE_KINDS else "other"
        self.origin_fetch.labels(label).observe(seconds)
        self.origin_bytes_fetched.labels(label).inc(fetched_bytes)

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
        every_worker.register(ProcessStats(lambda: live_workers(folder)))
        return generate_latest(every_worker)


def _queue_class(klass: str) -> str:
    return klass if klass in QUEUE_CLASSES else "other"


def live_workers(folder: str) -> list[int]:
    """The processes writing metrics to ``folder`` that are still alive.

    Every worker keeps live gauges (``gauge_livesum_<pid>.db``), whose files the supervisor
    removes when the worker dies (``mark_process_dead``); this process is always one.
    """
    pids = {os.getpid()}
    try:
        names = os.listdir(folder)
    except OSError:
        names = []
    for name in names:
        if name.startswith("gauge_live") and name.endswith(".db"):
            pid = name[: -len(".db")].rpartition("_")[2]
            if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
                pids.add(int(pid))
    return sorted(pids)


class ProcessStats(Collector):
    """Resident memory and open descriptors of each process ``pids`` names, read from
    ``/proc`` at scrape time (no background task); one series per ``pid``."""

    def __init__(self, pids: Callable[[], Iterable[int]]) -> None:
        self._pids = pids

    def collect(self) -> Iterable[Metric]:
        rss = GaugeMetricFamily(
            "resizer_process_resident_memory_bytes",
            "Resident memory of each worker process",
            labels=["pid"],
        )
        fds = GaugeMetricFamily(
            "resizer_process_open_fds",
            "Open file descriptors of each worker process",
            labels=["pid"],
        )
        for pid in self._pids():
            try:
                pages = int(Path(f"/proc/{pid}/statm").read_bytes().split()[1])
                open_fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile, or no /proc here
            rss.add_metric([str(pid)], pages * _PAGE_SIZE)
            fds.add_metric([str(pid)], open_fds)
        return [rss, fds]
