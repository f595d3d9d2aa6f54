"""Prometheus metrics, one registry per service instance (tests run several in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


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
        self.inflight_works = Gauge("resizer_inflight_works", "Works in flight", registry=r)
        self.transforms_running = Gauge(
            "resizer_transforms_running", "ffmpeg processes running", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
