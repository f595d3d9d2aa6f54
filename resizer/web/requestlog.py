"""One record per HTTP request: its access-log line, its metrics and its Server-Timing.

The web layer opens a ``RequestRecord`` as a request arrives (``web.asgi.ExchangeGuard``,
or the hit layer in ``web.zerocopy`` for the hits it answers itself) and makes it current
in a context variable. Code serving the request fills what it learns (``current_record()``;
None outside a request). Tasks started while serving it inherit the variable: a Work runs
in the context of the request that started it, so the pipeline's phases (origin fetch,
queue, ffmpeg's first output) land in that request's record through the ``note_*`` hooks.
``finish`` observes the request's metrics and writes its access-log line.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from ..log import info_enabled
from ..metrics import Metrics
from ..transform.runner import FfmpegTransformer

if TYPE_CHECKING:  # the pipeline may import this module (its note_* hooks)
    from ..pipeline import Service

log = structlog.get_logger("resizer.access")

# A request id taken from the request (``[logging] trust_request_id``) is logged and echoed:
# printable ASCII without spaces, at most this long; anything else is replaced.
MAX_REQUEST_ID = 128
_REQUEST_ID = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID}}}")
MAX_LOGGED_PATH = 2048  # characters of the path and of the query kept in the log line

_ROUTE_PATHS = {"/healthz": "health", "/readyz": "health", "/metrics": "metrics"}

_current: ContextVar[RequestRecord | None] = ContextVar("resizer_request", default=None)

# Generated ids: a random per-process prefix and a counter (cheap on the hit layer), 16 hex.
_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count()


@dataclass(slots=True)
class RequestRecord:
    """What the access log says about one request. Durations are seconds."""

    method: str
    path: str
    query: str
    request_id: str
    route: str  # media, health, metrics, admin, other (see ``route_of``)
    started: float  # trio.current_time() at arrival
    status: int | None = None  # None: no response was started
    bytes: int = 0  # body bytes sent
    ttfb: float | None = None  # to the first bytes of the response
    duration: float | None = None  # to the last body byte
    cache_status: str | None = None  # X-Cache-Status (HIT, MISS, COALESCED...)
    origin: str | None = None  # X-Origin: the origin's name
    source: str | None = None  # X-Source: the source's kind
    queue_class: str | None = None  # the scheduler's class of the request's ffmpeg run
    queue_wait: float | None = None  # its wait for a slot (also Server-Timing "queue")
    aborted: bool = False  # the response ended before its last byte
    # Server-Timing phases (only those that happened; see ``server_timing``):
    lookup: float | None = None  # cache lookup (and the origin check it runs beside)
    origin_fetch: float | None = None  # making the source available (a download)
    transform_first_byte: float | None = None  # ffmpeg's start to its first output byte


def current_record() -> RequestRecord | None:
    """The record of the request being served in this context, or None."""
    return _current.get()


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    """Make ``record`` current for the block (and for the tasks it starts)."""
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


def note_origin_fetch(seconds: float) -> None:
    """The pipeline made the current request's source available in ``seconds``."""
    record = _current.get()
    if record is not None and record.origin_fetch is None:
        record.origin_fetch = seconds


def note_transform_first_byte(seconds: float) -> None:
    """ffmpeg gave its first output byte ``seconds`` after it started."""
    record = _current.get()
    if record is not None and record.transform_first_byte is None:
        record.transform_first_byte = seconds


def note_queue(klass: str, seconds: float) -> None:
    """An ffmpeg run of the current request waited ``seconds`` in the queue of ``klass``
    before its slot: call it from the task that waited, once the slot is granted.

    Waits add up (a probe's, then the transformation's); the class is the last run's.
    """
    record = _current.get()
    if record is not None:
        record.queue_class = klass
        record.queue_wait = (record.queue_wait or 0.0) + max(0.0, seconds)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):08x}"


def request_id_for(sent: str | None, *, trust: bool) -> str:
    """The request's id: the one it carries when trusted and well-formed, else a new one."""
    if trust and sent is not None and _REQUEST_ID.fullmatch(sent):
        return sent
    return new_request_id()


def route_of(method: str, path: str) -> str:
    """The metrics' ``route`` label of a request (a fixed set: never the path itself)."""
    route = _ROUTE_PATHS.get(path)
    if route is not None:
        return route
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if method in ("GET", "HEAD"):
        return "media"  # the catch-all route, and the hit layer
    return "other"


def open_record(
    method: str,
    path: str,
    query: str,
    request_id: str,
    started: float,
    route: str | None = None,  # known already (the hit layer's: media)
) -> RequestRecord:
    return RequestRecord(
        method=method,
        path=path,
        query=query,
        request_id=request_id,
        route=route or route_of(method, path),
        started=started,
    )


def server_timing(record: RequestRecord) -> str | None:
    """The ``Server-Timing`` value of the phases that happened (milliseconds), or None."""
    phases = (
        ("lookup", record.lookup),
        ("origin", record.origin_fetch),
        ("queue", record.queue_wait),
        ("transform", record.transform_first_byte),
    )
    parts = [f"{name};dur={seconds * 1000:.3f}" for name, seconds in phases if seconds is not None]
    return ", ".join(parts) if parts else None


def finish(record: RequestRecord, metrics: Metrics | None, now: float) -> None:
    """The request has ended: observe its metrics and write its access-log line."""
    record.duration = max(0.0, now - record.started)
    if metrics is not None and record.status is not None:
        metrics.request_finished(
            record.route,
            record.cache_status if record.route == "media" else None,
            ttfb=record.ttfb,
            duration=record.duration,
            body_bytes=record.bytes,
        )
    if not info_enabled():
        return
    log.info(
        "access",
        method=record.method,
        path=record.path[:MAX_LOGGED_PATH],
        query=record.query[:MAX_LOGGED_PATH],
        status=record.status,
        bytes=record.bytes,
        ttfb=_rounded(record.ttfb),
        duration=_rounded(record.duration),
        cache_status=record.cache_status,
        request_id=record.request_id,
        origin=record.origin,
        source=record.source,
        queue_class=record.queue_class,
        queue_wait=_rounded(record.queue_wait),
        aborted=record.aborted,
        route=record.route,
    )


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


def note_lookup(seconds: float) -> None:
    """The web layer looked the current request's key up (and its origin) in ``seconds``."""
    record = _current.get()
    if record is not None and record.lookup is None:
        record.lookup = seconds


def observe_service(service: Service) -> None:
    """Connect ``service``'s ffmpeg runs and source fetches to its metrics and to the
    records of the requests they serve (see ``note_*``)."""
    metrics = service.metrics
    transformer = service.transformer
    if isinstance(transformer, FfmpegTransformer):
        transformer.on_run = metrics.observe_ffmpeg_run
        transformer.on_first_output = note_transform_first_byte

    def fetched(source: str, seconds: float, fetched_bytes: int) -> None:
        metrics.origin_fetched(source, seconds, fetched_bytes)
        note_origin_fetch(seconds)

    service.origins.on_fetched = fetched
    service.on_slot_granted = lambda claim: note_queue(claim.priority.label, claim.waited or 0.0)
