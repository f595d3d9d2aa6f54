"""Purges (``POST /admin/purge``): drop cache entries by key, by source or by source prefix.

A purge names cache keys (``"keys"``), sources (``"sources"``: every variant made from that
source path, i.e. every key starting ``v1:<source>?``) and source prefixes (``"prefixes"``:
every key starting ``v1:<prefix>``), in any combination. The instance that receives it
removes the matching entries from its local cache (memory: its dict; disk: by digest for
keys, by a scan of the metadata files for sources and prefixes, in a worker thread), from the
shared store (``[cluster.s3]``), and publishes it on the cluster's purge channel so that
every other instance removes them from its own local cache (``serve_cluster_purges``).

**Races with in-flight Works.** A Work that started fetching its source before a purge must
not publish the bytes it made from the old source. ``PurgeLog`` counts purges (its
``generation``) and keeps each purge's matcher for ``RETENTION``; a Work notes the generation
when it starts fetching, and ``commit_unless_purged`` checks it right before the local
commit publishes: if a purge matching the key arrived since, the Work's clients still get
their bytes (they read the spool) but nothing is published, locally or to the shared store.
A purge that arrives *during* the commit is caught by a second check just after it, which
deletes what was just published.

**Cache tags.** Media responses carry ``Cache-Tag`` (comma-separated) and ``Surrogate-Key``
(space-separated) naming the origin and the source path (``tag_headers``), so a CDN in front
can purge by the same names.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import quote

import structlog

from .cache.base import CacheStore, EntryMeta
from .cache.disk import DiskCacheStore
from .cache.memory import MemoryCacheStore
from .cluster.store import SharedStoreError
from .errors import ResizerError
from .options import KEY_VERSION
from .units import SECONDS

if TYPE_CHECKING:
    from .pipeline import Service

log = structlog.get_logger(__name__)

# How long a purge's matcher is kept for the in-flight check (a Work older than this that
# has not published yet is rare: its check then answers "purged", to be safe).
RETENTION: Final = 3600 * SECONDS
MAX_REMEMBERED: Final = 10_000
# At most this many names per list in one request (a purge is an admin action, not a bulk API).
MAX_NAMES: Final = 10_000
# Characters a tag may carry as they are; everything else (spaces, commas, %, non-ASCII...)
# is percent-encoded, so tags split on ", " (Cache-Tag) and " " (Surrogate-Key) losslessly.
_TAG_SAFE: Final = "/:@!$&'()*+;=~"


class BadPurgeRequest(ResizerError):
    """A purge request whose body is not the JSON object the API takes."""

    status = 400
    code = "bad_purge_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.public_message = message


@dataclass(frozen=True, slots=True)
class PurgeSpec:
    """What one purge removes: exact keys, sources and source prefixes."""

    keys: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, body: object) -> PurgeSpec:
        """The purge ``body`` asks for; raises ``BadPurgeRequest`` unless it is an object
        with at least one of "keys", "sources", "prefixes", each a list of non-empty strings."""
        if not isinstance(body, dict):
            raise BadPurgeRequest('the body must be a JSON object such as {"keys": [...]}')
        unknown = sorted(set(body) - {"keys", "sources", "prefixes"})
        if unknown:
            raise BadPurgeRequest(f"unknown fields: {', '.join(unknown)}")
        lists: dict[str, tuple[str, ...]] = {}
        for name in ("keys", "sources", "prefixes"):
            value = body.get(name, [])
            if not isinstance(value, list) or not all(
                isinstance(item, str) and item for item in value
            ):
                raise BadPurgeRequest(f'"{name}" must be a list of non-empty strings')
            if len(value) > MAX_NAMES:
                raise BadPurgeRequest(f'"{name}" has more than {MAX_NAMES} entries')
            lists[name] = tuple(dict.fromkeys(value))
        spec = cls(**lists)
        if spec.empty:
            raise BadPurgeRequest('nothing to purge: give "keys", "sources" or "prefixes"')
        return spec

    def to_json(self) -> dict[str, list[str]]:
        return {
            "keys": list(self.keys),
            "sources": list(self.sources),
            "prefixes": list(self.prefixes),
        }

    @property
    def empty(self) -> bool:
        return not (self.keys or self.sources or self.prefixes)

    @property
    def key_prefixes(self) -> tuple[str, ...]:
        """Every key starting with one of these matches (sources and prefixes as keys)."""
        return tuple(f"{KEY_VERSION}:{source}?" for source in self.sources) + tuple(
            f"{KEY_VERSION}:{prefix}" for prefix in self.prefixes
        )

    def matches(self, key: str) -> bool:
        return key in self.keys or key.startswith(self.key_prefixes)


@dataclass
class PurgeLog:
    """Purges this instance has seen (its own and the cluster's), for in-flight Works."""

    generation: int = 0
    clock: Any = time.monotonic
    _recent: deque[tuple[int, float, PurgeSpec]] = field(default_factory=deque)
    _forgotten_up_to: int = 0  # the newest generation whose matcher was dropped
    # Seconds the last purge received from another instance took to arrive (for the report).
    last_delivery: float | None = None

    def record(self, spec: PurgeSpec) -> int:
        """Note a purge; returns its generation."""
        self.generation += 1
        now = self.clock()
        self._recent.append((self.generation, now, spec))
        while self._recent and (
            len(self._recent) > MAX_REMEMBERED or self._recent[0][1] < now - RETENTION
        ):
            self._forgotten_up_to = self._recent.popleft()[0]
        return self.generation

    def purged_since(self, key: str, generation: int) -> bool:
        """Whether a purge matching ``key`` happened after ``generation`` (a Work's start)."""
        if generation >= self.generation:
            return False
        if generation < self._forgotten_up_to:
            return True  # a purge we no longer remember may have matched: do not publish
        return any(gen > generation and spec.matches(key) for gen, _, spec in self._recent)


class _Writer(Protocol):
    @property
    def bytes_written(self) -> int: ...

    async def commit(self) -> EntryMeta: ...


async def commit_unless_purged(
    service: Service, writer: _Writer, key: str, since: int, content_type: str = ""
) -> EntryMeta:
    """``writer.commit()``, unless a purge matching ``key`` arrived after generation
    ``since``: then nothing is published, and the returned entry (its size only is right)
    is for the Work's own clients, who read its spool."""
    purges = service.purges
    if purges.purged_since(key, since):
        log.info("purged while in flight: not published", key=key)
        return EntryMeta(
            key=key,
            content_type=content_type,
            size=writer.bytes_written,
            etag="",
            created=time.time(),
            ttl=0.0,
            options="",
        )
    entry = await writer.commit()
    if purges.purged_since(key, since):  # it arrived while the commit ran
        log.info("purged while publishing: removed again", key=key)
        await service.cache.delete(key)
    return entry


async def purge_local(cache: CacheStore, spec: PurgeSpec) -> int:
    """Remove ``spec``'s entries from the local cache; how many were removed."""
    if isinstance(cache, DiskCacheStore | MemoryCacheStore):
        return await cache.purge(spec.keys, spec.key_prefixes)
    for key in spec.keys:  # another store: exact keys only
        await cache.delete(key)
    return 0


async def purge_shared(service: Service, spec: PurgeSpec) -> int | None:
    """Remove ``spec``'s entries from the shared store; how many (None: no store, or it
    failed, which is logged and counted)."""
    if service.shared is None:
        return None
    store = service.shared.store
    try:
        removed = 0
        present = [key for key in spec.keys if await store.lookup(key, include_stale=True)]
        await store.delete(present)
        removed += len(present)
        for prefix in spec.key_prefixes:
            removed += await store.delete_prefix(prefix)
    except SharedStoreError as exc:
        log.warning("shared store purge failed", error=exc.message)
        service.metrics.shared_store_errors.inc()
        return None
    return removed


async def purge_shared_key(service: Service, key: str) -> None:
    """Remove ``key`` from the shared store (a Work's upload that a purge overtook)."""
    if service.shared is None:
        return
    try:
        await service.shared.store.delete([key])
    except SharedStoreError as exc:
        log.warning("shared store purge failed", key=key, error=exc.message)
        service.metrics.shared_store_errors.inc()


async def purge(service: Service, spec: PurgeSpec) -> dict[str, object]:
    """Purge ``spec`` on this instance, the shared store and (broadcast) every other
    instance; the counts ``POST /admin/purge`` answers with."""
    generation = service.purges.record(spec)
    local = await purge_local(service.cache, spec)
    shared = await purge_shared(service, spec)
    broadcast = False
    if service.cluster is not None:
        message = {
            "purge": spec.to_json(),
            "from": service.cluster.instance_id,
            "sent_at": time.time(),
        }
        broadcast = await service.cluster.publish_purge(message)
    log.info("purged", generation=generation, local=local, shared=shared, broadcast=broadcast)
    return {"local": local, "shared": shared, "broadcast": broadcast}


async def on_cluster_purge(service: Service, message: Mapping[str, Any]) -> None:
    """A purge another instance published: remove its entries from the local cache."""
    if service.cluster is not None and message.get("from") == service.cluster.instance_id:
        return  # our own, already done
    try:
        spec = PurgeSpec.from_json(message.get("purge"))
    except BadPurgeRequest as exc:
        log.warning("ignored a malformed purge message", error=exc.message)
        return
    service.purges.record(spec)
    sent_at = message.get("sent_at")
    if isinstance(sent_at, int | float):
        service.purges.last_delivery = max(0.0, time.time() - sent_at)
    local = await purge_local(service.cache, spec)
    log.info(
        "purged for another instance",
        origin=message.get("from"),
        local=local,
        delivery_seconds=service.purges.last_delivery,
    )


def tag_headers(origin: str, source: str) -> dict[str, str]:
    """``Cache-Tag`` and ``Surrogate-Key`` naming ``origin`` and ``source`` (the path)."""
    tags = [_tag(kind, value) for kind, value in (("origin", origin), ("source", source)) if value]
    return {"Cache-Tag": ", ".join(tags), "Surrogate-Key": " ".join(tags)}


def _tag(kind: str, value: str) -> str:
    return f"{kind}:{quote(value, safe=_TAG_SAFE)}"


def source_of_key(key: str) -> str:
    """The source part of a cache key ``v1:<source>?<options>``."""
    return key.partition(":")[2].rpartition("?")[0]


def entry_tag_headers(entry: EntryMeta) -> dict[str, str]:
    """``tag_headers`` for a cached entry (its origin is in ``source``, its path in the key)."""
    origin = entry.source.rpartition(":")[0]
    return tag_headers(origin, source_of_key(entry.key))
