"""Origins: map a request path to the sources that may hold it, and fail over between them.

Matching and template expansion are pure. ``resolve`` asks each candidate source, by
priority, whether the object exists; a not-found, a failure (connection error, 5xx,
timeout) or an open circuit breaker moves on to the next one. When none has it the error
says why: 404 if every source said not-found, else it follows the last failure (504 for a
timeout, 503 with Retry-After for an open breaker, 502 otherwise).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from ..cache.sources import SourceFileCache
from ..concurrency.breaker import CircuitBreaker
from ..config import Config, OriginConfig, SourceConfig
from ..errors import (
    ConfigError,
    NoOriginMatched,
    OriginFailed,
    OriginTimeout,
    ResizerError,
    ServiceUnavailable,
    SourceNotFound,
)
from .base import FetchObserver, LocalSource, Source, SourceStat
from .filesystem import FilesystemSource
from .http import HttpSource
from .security import AddressPolicy, ListeningAddresses

_TEMPLATE_RE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")

# Sources whose open() downloads (a local copy is worth keeping for other variants).
REMOTE_KINDS = frozenset({"http", "s3"})

# Errors that say "this source is unhealthy": count against its breaker, try the next one.
_FAILOVER_ERRORS = (OriginFailed, OriginTimeout)


def expand_template(template: str, match: re.Match[str]) -> str:
    """Fill ``$1``, ``${1}``, ``$name`` and ``${name}`` from a matcher's captures.

    An unknown group name or number expands to the empty string rather than raising, so a
    template cannot turn a request into a 500; config validation catches such typos.
    """

    def replace(found: re.Match[str]) -> str:
        ref = found[1] or found[2]
        try:
            value = match.group(int(ref) if ref.isdigit() else ref)
        except IndexError:  # no such group
            return ""
        return value or ""

    return _TEMPLATE_RE.sub(replace, template)


@dataclass(frozen=True, slots=True)
class SourceSlot:
    """One configured source of an origin."""

    source: Source
    template: str  # the object's path, from the matcher's captures
    priority: int
    breaker: CircuitBreaker


@dataclass(frozen=True, slots=True)
class Candidate:
    """One source that may hold the requested object, with the path to ask it for."""

    slot: SourceSlot
    path: str


@dataclass(frozen=True, slots=True)
class Origin:
    name: str
    matcher: re.Pattern[str]
    slots: tuple[SourceSlot, ...]
    ttl: Mapping[str, float] = field(default_factory=dict)  # Cache-Control by class

    @classmethod
    def simple(cls, name: str, pattern: str, *sources: Source) -> Origin:
        """An origin whose sources take the ``path`` capture, tried in the given order."""
        slots = tuple(
            SourceSlot(source, "${path}", index, CircuitBreaker(f"{name}.{index}"))
            for index, source in enumerate(sources)
        )
        return cls(name, re.compile(pattern), slots, {})


@dataclass(frozen=True, slots=True)
class Resolved:
    """The source that holds the object: the outcome of ``Origins.resolve``."""

    origin: str
    source: Source
    path: str
    stat: SourceStat
    breaker: CircuitBreaker | None = None
    ttl: Mapping[str, float] | None = None  # the origin's TTL by response class
    request_path: str = ""  # what was resolved, to fall over to another source later
    # Told of each successful open: the source's kind label, seconds, bytes fetched.
    on_fetched: FetchObserver | None = None

    @property
    def fetch_label(self) -> str:
        """The source's kind for metrics ("remote": an allowed remote URL, not an origin)."""
        return "remote" if self.origin == "remote" and not self.request_path else self.source.kind

    @asynccontextmanager
    async def open(self, files: SourceFileCache | None = None) -> AsyncIterator[LocalSource]:
        """Fetch the object, reporting the outcome to the breaker and to ``on_fetched``.

        Remote objects go through ``files`` when given: downloaded once, shared by variants
        (a reused download fetches no bytes; a filesystem source "fetches" its file's size).
        """
        opened: AbstractAsyncContextManager[LocalSource]
        kept = files if files is not None and self.source.kind in REMOTE_KINDS else None
        downloads = -1  # the kept files' download count before opening (-1: kept already)
        if kept is not None:
            if not kept.holds(self.source, self.path, self.stat):
                downloads = kept.downloads
            opened = kept.open(self.source, self.path, self.stat)
        else:
            opened = self.source.open(self.path)
        breaker = self.breaker
        began = trio.current_time()
        try:
            async with opened as local:
                if breaker is not None:
                    breaker.record_success()  # fetched; what the caller does next is not ours
                if self.on_fetched is not None:
                    fetched = local.size
                    if kept is not None and not 0 <= downloads < kept.downloads:
                        fetched = 0  # a kept download, nothing fetched now
                    self.on_fetched(self.fetch_label, trio.current_time() - began, fetched)
                yield local
        except _FAILOVER_ERRORS:
            if breaker is not None:
                breaker.record_failure()
            raise


class Origins:
    def __init__(
        self, origins: Sequence[Origin], *, on_fetched: FetchObserver | None = None
    ) -> None:
        self.origins = tuple(origins)
        # Given to every Resolved (metrics: set by the web layer, web.requestlog).
        self.on_fetched = on_fetched

    @property
    def breakers(self) -> list[CircuitBreaker]:
        return [slot.breaker for origin in self.origins for slot in origin.slots]

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        client: httpx.AsyncClient | None = None,
        spill_dir: Path | None = None,
        on_breaker_change: Callable[[CircuitBreaker], None] | None = None,
        env: Mapping[str, str] | None = None,
        listening: ListeningAddresses | None = None,
    ) -> Origins:
        """Build every configured source; raises ConfigError for missing credentials."""
        builder = _SourceBuilder(
            config, client, spill_dir, env if env is not None else os.environ, listening
        )
        origins = []
        for origin in config.origins:
            slots = []
            for index, source in enumerate(origin.sources):
                name = source.name or f"{origin.name}.{index}"
                breaker = CircuitBreaker(
                    name,
                    failure_threshold=source.failure_threshold,
                    reset_timeout=source.reset_timeout,
                    half_open_max=source.half_open_max,
                    on_change=on_breaker_change,
                )
                slots.append(
                    SourceSlot(builder.build(origin, source), source.path, source.priority, breaker)
                )
            origins.append(
                Origin(origin.name, re.compile(origin.matcher), tuple(slots), origin.ttl)
            )
        return cls(origins)

    def match(self, request_path: str) -> tuple[Origin, list[Candidate]]:
        """The first origin whose matcher accepts the path, with its candidates by priority."""
        for origin in self.origins:
            found = origin.matcher.search(request_path)
            if found is None:
                continue
            candidates = [
                Candidate(slot, expand_template(slot.template, found)) for slot in origin.slots
            ]
            candidates.sort(key=lambda c: c.slot.priority)
            return origin, candidates
        raise NoOriginMatched(f"no origin is configured for {request_path!r}")

    async def resolve(
        self, request_path: str, *, exclude: frozenset[int] = frozenset()
    ) -> Resolved:
        """The first candidate, by priority, that has the object (see the module doc).

        ``exclude`` holds ``id()``s of sources to skip: ones whose download just failed.
        """
        origin, candidates = self.match(request_path)
        last_failure: ResizerError | None = None
        for candidate in candidates:
            breaker = candidate.slot.breaker
            if id(candidate.slot.source) in exclude:
                continue
            if not candidate.path:
                continue  # the template names nothing for this path: not here
            if not breaker.admit():
                last_failure = ServiceUnavailable(
                    f"origin {origin.name!r} is failing; retry later",
                    retry_after=breaker.retry_after() or 1.0,
                )
                continue
            try:
                stat = await candidate.slot.source.stat(candidate.path)
            except SourceNotFound:
                breaker.record_success()  # a definite answer from a healthy source
                continue
            except _FAILOVER_ERRORS as exc:
                breaker.record_failure()
                last_failure = exc
                continue
            except BaseException:
                breaker.record_abandoned()  # cancelled, or an error that is not the source's
                raise
            breaker.record_success()
            return Resolved(
                origin.name,
                candidate.slot.source,
                candidate.path,
                stat,
                breaker,
                origin.ttl,
                request_path,
                self.on_fetched,
            )
        if last_failure is None:
            raise SourceNotFound(f"{request_path!r} does not exist on origin {origin.name!r}")
        if isinstance(last_failure, ServiceUnavailable):
            raise last_failure
        if isinstance(last_failure, OriginTimeout):
            raise OriginTimeout(
                f"origin {origin.name!r} timed out for {request_path!r}"
            ) from last_failure
        raise OriginFailed(f"origin {origin.name!r} failed for {request_path!r}") from last_failure


class _SourceBuilder:
    """Turns [[origins.sources]] tables into Source adapters sharing one HTTP client."""

    def __init__(
        self,
        config: Config,
        client: httpx.AsyncClient | None,
        spill_dir: Path | None,
        env: Mapping[str, str],
        listening: ListeningAddresses | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.spill_dir = spill_dir
        self.env = env
        self.policy = AddressPolicy.from_config(config, listening)

    def build(self, origin: OriginConfig, source: SourceConfig) -> Source:
        if source.type == "filesystem":
            return FilesystemSource(self.config.resolve_path(source.root))
        if self.client is None or self.spill_dir is None:
            raise ConfigError([(f"origins.{origin.name}", "remote sources need an HTTP client")])
        if source.type == "s3":
            from .s3 import S3Source, credentials_from

            where = f"origins.{origin.name}.sources"
            try:
                credentials = credentials_from(
                    source.access_key_id, source.secret_access_key, self.env
                )
            except ValueError as exc:
                raise ConfigError([(where, str(exc))]) from exc
            return S3Source(
                self.client,
                spill_dir=self.spill_dir,
                bucket=source.bucket,
                region=source.region,
                endpoint_url=source.endpoint_url,
                credentials=credentials,
                headers=dict(source.headers),
                address_policy=self.policy,
                max_size=self.config.limits.max_source_size,
                connect_timeout=source.connect_timeout,
                first_byte_timeout=source.first_byte_timeout,
                total_timeout=source.total_timeout,
                idle_timeout=source.idle_timeout,
            )
        headers = {**source.headers, **self._auth_headers(origin, source)}
        base = httpx.URL(source.base_url)
        # Redirects may stay on the source's own host and port (see targets.host_allowed).
        own = f"[{base.host}]" if ":" in base.host else base.host
        own += f":{base.port or (443 if base.scheme == 'https' else 80)}"
        return HttpSource(
            self.client,
            spill_dir=self.spill_dir,
            base_url=source.base_url,
            headers=headers,
            max_size=self.config.limits.max_source_size,
            connect_timeout=source.connect_timeout,
            first_byte_timeout=source.first_byte_timeout,
            total_timeout=source.total_timeout,
            idle_timeout=source.idle_timeout,
            address_policy=self.policy,
            redirect_hosts=frozenset({own, *self.config.security.allowed_remote_hosts}),
        )

    def _auth_headers(self, origin: OriginConfig, source: SourceConfig) -> dict[str, str]:
        auth = source.auth
        if not auth:
            return {}
        value = auth.get("value", "")
        if auth.get("env"):
            value = self.env.get(auth["env"], "")
            if not value:
                where = f"origins.{origin.name}.sources.auth.env"
                raise ConfigError([(where, f"${auth['env']} is not set")])
        if auth["type"] == "bearer":
            return {"Authorization": f"Bearer {value}"}
        return {auth["name"]: value}
