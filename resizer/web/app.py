"""The quart-trio application: routes, media responses and error rendering."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping

import structlog
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..cache.base import EntryMeta
from ..cluster.store import SharedStoreError
from ..concurrency.coalescing import Subscription, WorkState
from ..errors import ResizerError
from ..metrics import CONTENT_TYPE_LATEST
from ..options import TransformOptions, cache_key
from ..pipeline import Job, Lookup, Service
from ..purge import tag_headers
from ..responsive import Resolved as Choice
from ..responsive import resolve_options
from ..scheduling.rules import is_prefetch, request_kind
from ..targets import Target, parse_target
from ..units import MiB
from .accel import accel_headers
from .admin import add_admin_routes
from .asgi import ERROR_HEADERS, ExchangeGuard, error_body, release_on_exchange_end
from .cors import Cors, CorsPolicy
from .debug_view import debug_view, is_debug_request
from .hits import LOOKUP_SCOPE_KEY, HitFastPath, negotiation_headers, plan_hit
from .ranges import (
    ByteRange,
    check_preconditions,
    if_range_allows,
    parse_range,
    parse_range_spec,
)
from .requestlog import current_record, new_request_id, note_lookup, observe_service
from .zerocopy import ZeroCopyHits

log = structlog.get_logger(__name__)

NO_STORE = "no-store"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str], max_age: float = 0
) -> Response:
    body = error_body(status, code, message)
    response = Response(body, status=status, content_type="application/json")
    response.headers.update(ERROR_HEADERS)
    # Errors are no-store unless the origin gives their class a TTL (negative caching).
    response.headers["Cache-Control"] = (
        f"public, max-age={max(1, int(max_age))}" if max_age > 0 else NO_STORE
    )
    response.headers.update(headers)
    return response


def create_app(service: Service) -> ExchangeGuard:
    """The ASGI application for ``service`` (Quart wrapped in the exchange guard)."""
    app = QuartTrio(__name__)
    # Quart cuts any response still streaming after RESPONSE_TIMEOUT (60 s) without a trace.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # resizer takes no request bodies

    @app.before_request
    async def bind_request_id() -> None:
        structlog.contextvars.clear_contextvars()
        record = current_record()  # the exchange guard's, which chose the id
        structlog.contextvars.bind_contextvars(
            request_id=record.request_id if record is not None else new_request_id(),
            method=request.method,
            path=request.path,
        )

    @app.after_request
    async def count_and_tag(response: Response) -> Response:
        service.metrics.count_request(request.method, response.status_code)
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if request_id:
            response.headers["X-Request-Id"] = str(request_id)
        return response

    @app.errorhandler(ResizerError)
    async def render_resizer_error(error: ResizerError) -> Response:
        level = log.warning if error.status >= 500 else log.info
        level("request refused", status=error.status, code=error.code, reason=error.message)
        message = error.public_message or error.message
        return error_response(error.status, error.code, message, error.headers(), error.max_age)

    @app.errorhandler(HTTPException)
    async def render_http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = (error.name or "error").lower().replace(" ", "_")
        # Werkzeug's own headers carry meaning (a 405's Allow); the body is ours.
        headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
        return error_response(status, code, error.description or code, headers)

    @app.errorhandler(Exception)
    async def render_bug(error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return error_response(500, "internal_error", "an internal error occurred", {})

    @app.route("/healthz", methods=["GET"])
    async def healthz() -> Response:
        return Response(
            json.dumps({"status": "ok"}),
            content_type="application/json",
            headers={"Cache-Control": NO_STORE},
        )

    @app.route("/metrics", methods=["GET"])
    async def metrics() -> Response:
        return Response(service.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    add_admin_routes(app, service)  # /readyz, /admin/inflight (web/admin.py)

    @app.route("/<path:_path>", methods=["GET", "HEAD"])
    async def media(_path: str) -> Response:
        if is_debug_request(request.path, request.query_string):
            return await debug_view(service)  # the diagnostics page (web/debug_view.py)
        return await serve_media(service)

    # Inside the guard: its shielded final send covers preflights too, and its own answer
    # (a 400 to TE + CL framing, which browsers never send) needs no CORS headers.
    policy = CorsPolicy.of(service.config.http.cors_allow_origins)
    observe_service(service)  # ffmpeg runs and source fetches: metrics and Server-Timing
    return ExchangeGuard(
        Cors(HitFastPath(app, service), policy, service.metrics.count_request),
        zerocopy=ZeroCopyHits(service, policy),
        metrics=service.metrics,
        trust_request_id=service.config.logging.trust_request_id,
    )


async def serve_media(service: Service) -> Response:
    target = parse_target(request.path, request.query_string)
    headers = {name: value for name, value in request.headers.items()}
    choice = resolve_options(target.params, headers, service.policy)
    key = cache_key(target.source, choice.options)
    remembered = service.failures.recall(key)
    if remembered is not None:
        raise remembered
    ttl = service.ttl_for(target)
    try:
        return await answer_media(service, target, choice, key, ttl)
    except ResizerError as exc:
        service.failures.remember(key, exc, ttl)
        raise


async def answer_media(
    service: Service,
    target: Target,
    choice: Choice,
    key: str,
    ttl: Mapping[str, float],
) -> Response:
    options = choice.options
    head = request.method == "HEAD"
    found = request.scope.get(LOOKUP_SCOPE_KEY)
    if not isinstance(found, Lookup) or found.key != key:
        looked_up = trio.current_time()
        found = await service.lookup_or_resolve(key, target)
        note_lookup(trio.current_time() - looked_up)
    elif found.error is not None:
        raise found.error
    entry = found.entry
    if entry is not None:
        response = respond_from_cache(service, entry, head=head)
        status = "HIT"
        if found.stale:  # expired: stale_while_revalidate or stale_if_error (pipeline.py)
            response.headers["X-Cache-Status"] = status = "STALE"
    else:
        resolved = found.resolved
        assert resolved is not None
        conditions = {name.lower(): value for name, value in request.headers.items()}
        # The variant exists ('*' matches) but has no ETag nor date before it is complete:
        # no listed tag matches (If-Match fails), and no If-Range, which voids the Range.
        if check_preconditions(conditions, None, None):  # may raise 412
            response = Response(b"", status=304)  # If-None-Match: *
            response.headers["X-Cache-Status"] = "MISS"
            status = "MISS"
        elif head:
            # Answering HEAD must not cost a transcode: say what a GET would send, which
            # has no Content-Length yet (an empty iterable keeps Quart from adding one).
            response = Response(no_body(), status=200)
            response.headers["X-Cache-Status"] = "MISS"
            status = "MISS"
        elif (
            shared_range := await respond_range_from_shared(service, key, conditions)
        ) is not None:
            response, status = shared_range, "HIT-SHARED"
        else:
            subscription = service.subscribe(
                Job(key, resolved, options, target),
                kind=request_kind(options, prefetch=is_prefetch(request.headers.items())),
                client=request.remote_addr or "",
            )
            release_on_exchange_end(subscription.detach)
            await subscription.wait_first_bytes()
            status = "COALESCED" if subscription.joined else "MISS"
            if subscription.work.tier == "shared":
                status = "HIT-SHARED"  # a local miss filled from the shared store
            spec = None
            if if_range_allows(conditions.get("if-range"), None, None):
                spec = parse_range_spec(conditions.get("range"))
            if spec is not None and spec != (0, None):
                response = await respond_range_in_flight(service, subscription, spec)
            else:
                # bytes=0- asks for everything: the live stream, as a 200 (RFC 9110 lets a
                # server ignore Range). A short 206 would end before the output does, and
                # Chromium fails on that; its total is unknown until the Work is done.
                response = Response(stream_subscription(service, subscription), status=200)
            response.headers["X-Cache-Status"] = status
        response.headers["X-Origin"] = resolved.origin
        response.headers["X-Source"] = resolved.source.kind
        response.headers.update(tag_headers(resolved.origin, target.source))
        apply_representation_headers(response, options, ttl.get("ok", service.config.cache.ttl))
    apply_negotiation_headers(response, service, options, choice.vary)
    return response


def apply_negotiation_headers(
    response: Response, service: Service, options: TransformOptions, vary: tuple[str, ...]
) -> None:
    """Headers that depend on how the options were chosen, on hits and misses alike."""
    response.headers.update(negotiation_headers(service, options, vary))


def apply_representation_headers(
    response: Response, options: TransformOptions, max_age: float
) -> None:
    response.headers["Content-Type"] = options.content_type
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["Cache-Control"] = f"public, max-age={int(max_age)}"


def respond_from_cache(service: Service, entry: EntryMeta, *, head: bool) -> Response:
    """A hit through Quart (the fast path in hits.py answers most of them first)."""
    headers = {name.lower(): value for name, value in request.headers.items()}
    plan = plan_hit(entry, headers, time.time())  # may raise 416
    offloaded = accel_headers(service, entry, plan, headers)
    if offloaded is not None:  # behind nginx: it sends the file (and cuts the range)
        return Response(b"", status=200, headers=offloaded)
    if plan.span is None:
        return Response(b"", status=plan.status, headers=plan.headers)
    body: bytes | AsyncIterator[bytes] = b"" if head else stream_entry(service, entry, plan.span)
    response = Response(body, status=plan.status, headers=plan.headers)
    response.headers["Content-Length"] = plan.headers["Content-Length"]
    return response


async def no_body() -> AsyncIterator[bytes]:
    """An empty streamed body (Quart's sync-iterable bodies need asyncio)."""
    return
    yield b""  # pragma: no cover - makes this an async generator


async def stream_entry(
    service: Service, entry: EntryMeta, chosen: ByteRange
) -> AsyncIterator[bytes]:
    """A cached entry's bytes, in chunks sized to how fast this client drains them."""
    chunks = service.adaptive_chunks()
    try:
        async with service.cache.open_range(
            entry, chosen.start, chosen.stop, chunks.next_size
        ) as reader:
            async for data in reader:
                handed_over = trio.current_time()
                yield data  # resumes once the server has written it to the socket
                del data  # not held while the next read waits for budget
                chunks.sent(trio.current_time() - handed_over)
    finally:
        chunks.release()


# A closed range of a shared entry at most this long is read from its parts alone; a longer
# one (or an open one, a-) goes through the Work, which fills the local cache once.
SHARED_RANGE_MAX = 16 * MiB


async def respond_range_from_shared(
    service: Service, key: str, conditions: Mapping[str, str]
) -> Response | None:
    """A 206 of a local miss that the shared store has, read from only the parts the range
    covers (nothing cached locally), or None: not a range, too long, or not shared."""
    if service.shared is None or "if-range" in conditions:
        return None
    spec = parse_range_spec(conditions.get("range"))
    if spec is None or spec == (0, None):
        return None
    first, last = spec
    if first is None or last is None or last - first + 1 > SHARED_RANGE_MAX:
        return None
    entry = await service.shared.lookup(key)
    if entry is None:
        return None
    selected = parse_range(conditions.get("range"), entry.size)  # may raise 416
    if selected is None:
        return None
    try:
        # Read whole before answering: a body that is an async generator may not hold the
        # store's read-ahead nursery open across its yields.
        async with service.shared.store.read(entry, selected.start, selected.stop) as chunks:
            data = b"".join([chunk async for chunk in chunks])
    except SharedStoreError:
        return None  # the Work serves it (transcoding, if the store stays unreadable)
    response = Response(data, status=206)
    response.headers["Content-Range"] = selected.content_range(entry.size)
    response.headers["ETag"] = entry.meta.etag
    response.headers["X-Cache-Status"] = "HIT-SHARED"
    service.metrics.shared_hits.inc()
    return response


async def respond_range_in_flight(
    service: Service, subscription: Subscription, spec: tuple[int | None, int | None]
) -> Response:
    """A byte range of output still being produced, served from the spool (no new work).

    ``a-b`` waits until byte b exists (``bytes a-b/*`` while the total is unknown). ``a-``
    (a > 0: a player reading on, or seeking, past what it has) and a suffix range need the
    end of the output, so they wait for it: a 206 must name its last byte, and one that ends
    before the output does (``bytes a-c/*`` with what exists now) breaks players.
    """
    first, last = spec
    if first is None or last is None:
        progress = await subscription.wait_for(lambda p: False)  # the end
    else:
        progress = await subscription.wait_for(lambda p: p.produced > last)
    done = progress.state is WorkState.DONE
    if done:
        selected = parse_range(request.headers.get("Range"), progress.produced)  # may be 416
        assert selected is not None
    else:
        assert first is not None
        assert last is not None
        selected = ByteRange(first, min(last + 1, progress.produced))
    response = Response(
        stream_subscription(service, subscription, selected.start, selected.stop), status=206
    )
    response.headers["Content-Range"] = selected.content_range(progress.produced if done else None)
    response.headers["Content-Length"] = str(selected.length)
    return response


async def stream_subscription(
    service: Service, subscription: Subscription, start: int = 0, stop: int | None = None
) -> AsyncIterator[bytes]:
    """The Work's output, live; detaching when the client goes lets the Work stop."""
    complete = False
    chunk = service.config.cache.read_chunk
    try:
        async for data in subscription.iter_bytes(start, chunk, stop):
            yield data
        complete = True
    finally:
        subscription.detach()
        if not complete:
            service.metrics.stream_aborts.inc()
