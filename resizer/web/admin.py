"""Seeing inside: ``/readyz``, ``/admin/inflight`` and the bearer token guarding admin pages.

* ``/readyz`` is readiness, for load balancers: 503 while the server drains (shutdown has
  begun) or while the scheduler says its high-priority queue is over its bound; otherwise 200.
  ``/healthz`` stays liveness only (200 while the process serves).
* ``POST /admin/purge`` removes cache entries by key, source or source prefix, here, in the
  shared store and on every other instance (see ``purge.py``).
* ``/admin/inflight`` lists this worker's in-flight Works (and HLS segment runs) as JSON: key,
  class, age, subscribers, bytes produced, ffmpeg pids. Each worker answers for itself and
  names its ``pid``.
* Admin and debug endpoints (``/admin/*``, ``debug=view``, see ``debug_view.py``) are off —
  404 — unless ``[admin] token_env`` names an environment variable holding a non-empty
  token; then they need ``Authorization: Bearer <token>`` (401 otherwise).
"""

from __future__ import annotations

import hmac
import json
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import NotFound

from ..concurrency.coalescing import Work
from ..config import Config
from ..errors import ResizerError
from ..pipeline import Service
from ..purge import BadPurgeRequest, PurgeSpec, purge

log = structlog.get_logger(__name__)

NO_STORE = "no-store"
REALM = 'Bearer realm="resizer"'


class Unauthorized(ResizerError):
    """An admin or debug request without the configured bearer token (or with a wrong one)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, *, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.public_message = message
        self.invalid_token = invalid_token

    def headers(self) -> dict[str, str]:
        # RFC 6750 section 3: a token that was sent and refused is an invalid_token.
        challenge = f'{REALM}, error="invalid_token"' if self.invalid_token else REALM
        return {"WWW-Authenticate": challenge}


@dataclass
class AdminState:
    """Per service: the admin token (None: admin and debug endpoints are off) and draining."""

    token: bytes | None
    draining: bool = False


_STATES: weakref.WeakKeyDictionary[Service, AdminState] = weakref.WeakKeyDictionary()


def admin_token(config: Config, env: Mapping[str, str] | None = None) -> bytes | None:
    """The bearer token ``[admin] token_env`` names, or None when unset or empty (off)."""
    name = config.admin.token_env.strip()
    if not name:
        return None
    value = (os.environ if env is None else env).get(name, "").strip()
    if not value:
        log.warning("admin endpoints are off: the token variable is unset or empty", env=name)
        return None
    return value.encode()


def admin_state(service: Service) -> AdminState:
    """``service``'s admin state; the token is read from the environment the first time."""
    state = _STATES.get(service)
    if state is None:
        state = _STATES[service] = AdminState(admin_token(service.config))
    return state


def mark_draining(service: Service) -> None:
    """Shutdown has begun: /readyz answers 503 from now on."""
    admin_state(service).draining = True
    log.info("draining: /readyz answers 503")


def require_admin(service: Service, authorization: str | None) -> None:
    """Raise 404 when admin endpoints are off, 401 unless ``authorization`` carries the token."""
    token = admin_state(service).token
    if token is None:
        raise NotFound()
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise Unauthorized("this endpoint needs an Authorization: Bearer <token> header")
    # Constant time: the comparison must not tell how much of a guess was right.
    if not hmac.compare_digest(credentials.encode("utf-8", "surrogateescape"), token):
        raise Unauthorized("the bearer token is not valid", invalid_token=True)


def not_ready_reason(service: Service) -> str | None:
    """Why ``service`` should get no new traffic now ("draining", "overloaded"), or None."""
    if admin_state(service).draining:
        return "draining"
    if service.scheduler.overloaded():  # the machine's high queue is at its bound
        return "overloaded"
    return None


def _json(body: object, status: int = 200) -> Response:
    return Response(
        json.dumps(body),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": NO_STORE},
    )


def describe_work(work: Work, now: float) -> dict[str, object]:
    return {
        "key": work.key,
        "class": work.priority.label,
        "queued_seconds": round(work.queued_seconds, 3),
        "age_seconds": round(max(0.0, now - work.started_at), 3),
        "subscribers": work.subscribers,
        "bytes_produced": work.current.produced,
        "state": work.state.value,
        "ffmpeg_pids": sorted(work.ffmpeg_pids),
        # True once only other processes (following its lease) still need it.
        "kept_for_followers": work.kept_for_followers.is_set(),
    }


def inflight(service: Service) -> dict[str, object]:
    """The body of /admin/inflight: this worker's Works, oldest first, and its HLS runs."""
    now = trio.current_time()
    works = sorted(service.registry, key=lambda work: work.started_at)
    runs = [
        {
            "rendition": run.rendition,
            "start": run.start,
            "next_segment": run.position,
            "wanted_until": run.wanted_until,
            "waiting": run.waiting,
            "idle_seconds": round(max(0.0, now - run.last_wanted), 3),
        }
        # SegmentRuns has no public listing; reading its table here changes nothing.
        for runs_of_rendition in list(service.hls._runs.values())
        for run in runs_of_rendition
    ]
    return {
        "pid": os.getpid(),
        "draining": admin_state(service).draining,
        "works": [describe_work(work, now) for work in works],
        "hls_runs": runs,
    }


def add_admin_routes(app: QuartTrio, service: Service) -> None:
    """Register /readyz and /admin/inflight on ``app`` (and read the admin token now)."""
    admin_state(service)

    @app.route("/readyz", methods=["GET"])
    async def readyz() -> Response:
        reason = not_ready_reason(service)
        if reason is not None:
            return _json({"status": reason}, status=503)
        return _json({"status": "ready"})

    @app.route("/admin/inflight", methods=["GET"])
    async def admin_inflight() -> Response:
        require_admin(service, request.headers.get("Authorization"))
        return _json(inflight(service))

    @app.route("/admin/purge", methods=["POST"])
    async def admin_purge() -> Response:
        require_admin(service, request.headers.get("Authorization"))
        raw = await request.get_data(as_text=False)
        try:
            body = json.loads(raw)
        except ValueError as exc:  # UnicodeDecodeError included
            raise BadPurgeRequest(f"the body is not JSON: {exc}") from None
        return _json(await purge(service, PurgeSpec.from_json(body)))
