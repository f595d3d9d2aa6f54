"""The request pipeline: cache -> coalesce -> source -> transform -> cache.put.

``Service`` owns every long-lived part (cache store, origins, transformer, registry of
in-flight works, metrics) and the nursery that in-flight works run in. The web layer calls
``lookup`` and ``subscribe``; everything shared between requests happens here.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import structlog
import trio

from .cache.base import CacheStore, EntryMeta, PublishedSpool, source_validators
from .cache.disk import DiskCacheStore, DiskSpoolReader, DiskWriter
from .cache.eviction import Sweeper
from .cache.failures import FailureCache
from .cache.leases import Follow, FollowLost, Lead, LeaseBoard
from .cache.memory import MemoryCacheStore
from .cache.sources import SourceFileCache
from .cluster.s3store import make_store_client, s3_store
from .cluster.store import SharedStoreError
from .cluster.tier import SharedTier, WriteThrough, remaining_ttl
from .concurrency.budget import AdaptiveChunks, ByteBudget, LoopLag
from .concurrency.coalescing import Subscription, Work, WorkRegistry
from .concurrency.groups import unwrap_single_exception
from .concurrency.heap import HeapTrimmer, find_malloc_trim
from .config import Config
from .errors import (
    Forbidden,
    NoOriginMatched,
    OriginFailed,
    OriginTimeout,
    ResizerError,
    ServiceUnavailable,
    SourceNotFound,
    SourceTooLarge,
    TransformFailed,
)
from .hls import render_playlist
from .hls.runs import SegmentRuns
from .metrics import Metrics
from .options import Mode, OutputFormat, TransformOptions
from .purge import PurgeLog, commit_unless_purged, on_cluster_purge, purge_shared_key
from .responsive import policy_from_config
from .scheduling.claims import Claim, Scheduler, SlotRequest, Snapshot
from .scheduling.queue import Priority
from .scheduling.rules import classes_from_config, open_scheduler, request_kind
from .sources.http import HttpSource, make_http_client
from .sources.origins import Origins, Resolved
from .sources.range_proxy import RangeProxy, RangeSource
from .sources.security import AddressPolicy, ListeningAddresses
from .targets import Target, check_remote_allowed, sheet_url
from .transform.argv import EncoderSettings
from .transform.base import LoopbackUrl, MediaInfo, MediaInput, Transformer
from .transform.checks import SourceLimits, check_options, check_source
from .transform.runner import FfmpegTransformer, resolve_ffmpeg
from .transform.vtt import build_thumbnail_vtt
from .units import SECONDS

if TYPE_CHECKING:  # coredis costs ~180 ms and MBs to import: only with [cluster] redis_url
    from .cluster.leases import Leases

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    """Everything a Work needs to produce one cache entry."""

    key: str
    source: Resolved
    options: TransformOptions
    # What was asked for, for outputs that link to other variants (a VTT track's
    # spritesheet, a playlist's segments) in the request's URL form.
    target: Target | None = None


@dataclass
class Lookup:
    """What ``Service.lookup_or_resolve`` found: an entry, or (on a miss) the source."""

    key: str
    entry: EntryMeta | None = None
    resolved: Resolved | None = None
    error: ResizerError | None = None
    # The entry is expired, answered within stale_while_revalidate or stale_if_error.
    stale: bool = False


class Service:
    def __init__(
        self,
        config: Config,
        *,
        cache: CacheStore,
        origins: Origins,
        transformer: Transformer,
        registry: WorkRegistry,
        metrics: Metrics,
        remote: HttpSource | None = None,
        listening: ListeningAddresses | None = None,
        scheduler: Scheduler | None = None,
        shared: SharedTier | None = None,
        cluster: Leases | None = None,
    ) -> None:
        self.config = config
        self.cache = cache
        self.origins = origins
        self.transformer = transformer
        self.registry = registry
        self.metrics = metrics
        self.remote = remote
        # Set when the cache is a disk folder other processes may share (see cache/leases.py).
        self.disk = cache if isinstance(cache, DiskCacheStore) else None
        self.leases: LeaseBoard | None = None
        coalescing = config.coalescing
        if self.disk is not None and coalescing.enabled and coalescing.cross_process:
            self.leases = self.disk.leases
        limits = config.limits
        # Tokens are held by Work tasks; attaching to a Work never takes one.
        self.origin_limiter = trio.CapacityLimiter(limits.max_concurrent_origins)
        # Every ffmpeg run (probes included) holds one of the machine's slots.
        self.classes = classes_from_config(config)
        # The shared result store ([cluster.s3]): written through, read on a local miss.
        self.shared = shared
        # Leases between instances ([cluster] redis_url): one transcode per key in the cluster.
        self.cluster = cluster
        # Purges seen here (POST /admin/purge, the cluster's channel): see purge.py.
        self.purges = PurgeLog()
        # Revalidation of expired entries (RFC 5861 windows by origin; see revalidate).
        self.stale_windows = {
            o.name: (float(o.stale_while_revalidate), float(o.stale_if_error))
            for o in config.origins
        }
        self.revalidating: set[str] = set()  # keys revalidated in the background now
        self.background: trio.Nursery | None = None  # their service-owned task group
        self.sweeper: Sweeper | None = None  # a disk cache's eviction (open_service)
        # Told of each grant in the task that waited (the web layer notes it in the record
        # of the request that started the Work: its access log line and Server-Timing).
        self.on_slot_granted: Callable[[Claim], None] | None = None
        self.scheduler = scheduler or open_scheduler(
            config, on_change=self._scheduler_changed, on_granted=self._slot_granted
        )
        self.policy = policy_from_config(config)
        self.failures = FailureCache(time.monotonic)
        self.range_proxy = RangeProxy()  # served by open_service
        self.hls = SegmentRuns(self)  # served by open_service
        # Where the server listens (origins may never point there); filled once bound.
        self.listening = listening or ListeningAddresses()
        self.loop_lag = LoopLag()  # served by open_service
        self.heap_trimmer = HeapTrimmer(config.cache.heap_trim_interval, find_malloc_trim())
        self.stream_budget = ByteBudget(
            config.cache.stream_budget,
            patience=config.cache.stream_budget_wait,
            on_change=self._budget_changed,
        )
        self.source_files: SourceFileCache | None = None
        if config.cache.source_files_size > 0:
            self.source_files = SourceFileCache(
                config.resolve_path(config.cache.path) / "source-files",
                config.cache.source_files_size,
            )
            self.source_files.prepare()
        self.source_limits = SourceLimits(
            max_size=config.limits.max_source_size,
            max_duration_ms=round(config.limits.max_source_duration * 1000),
            max_pixels=config.limits.max_source_pixels,
        )

    async def resolve(self, target: Target) -> Resolved:
        """The source ``target`` names: through the origins, or an allowed remote URL."""
        if target.remote:
            check_remote_allowed(target, self.config.security.allowed_remote_hosts)
            if self.remote is None:
                raise Forbidden("remote sources are disabled")
            stat = await self.remote.stat(target.source)
            resolved = Resolved(
                "remote", self.remote, target.source, stat, on_fetched=self.origins.on_fetched
            )
        else:
            resolved = await self.origins.resolve(target.source)
        # Fail fast when the size is known; sources also enforce it while reading.
        if resolved.stat.size > self.source_limits.max_size:
            raise SourceTooLarge(
                f"the source has {resolved.stat.size} bytes; "
                f"the limit is {self.source_limits.max_size}"
            )
        return resolved

    async def lookup_or_resolve(
        self, key: str, target: Target, *, raise_error: bool = True
    ) -> Lookup:
        """The cache entry for ``key``, or else the resolved source of ``target``.

        Both start at once: a hit cancels the resolution (it never waits for an origin), and
        a miss does not pay for the lookup and the origin's answer one after the other.
        Resolution errors (404, 502...) only count on a miss: raised, or left in ``error``.
        A hot entry the cache recalls from memory answers at once, starting no origin check.
        """
        outcome = Lookup(key, self.recall(key))
        if outcome.entry is not None:
            await trio.lowlevel.checkpoint()
            return outcome  # a hot entry: no origin check to start (or to cancel)
        if not self.config.cache.speculative_resolution:
            outcome.entry = await self.lookup(key)
            if outcome.entry is None:
                await self.stale_while_revalidate(outcome, target)
            if outcome.entry is None:
                try:
                    outcome.resolved = await self.resolve(target)
                except ResizerError as exc:
                    outcome.error = exc
                    await self.stale_if_error(outcome, target)
                    if outcome.error is not None and raise_error:
                        raise
            return outcome

        async def resolve() -> None:
            try:
                outcome.resolved = await self.resolve(target)
            except ResizerError as exc:
                outcome.error = exc

        with unwrap_single_exception():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(resolve)
                outcome.entry = await self.lookup(key)
                if outcome.entry is None:
                    await self.stale_while_revalidate(outcome, target)
                if outcome.entry is not None:
                    nursery.cancel_scope.cancel()
        if outcome.entry is None and outcome.error is not None:
            await self.stale_if_error(outcome, target)
        if outcome.entry is not None:
            outcome.error = None
        elif outcome.error is not None and raise_error:
            raise outcome.error
        return outcome

    # Revalidation: an expired entry whose source is unchanged is refreshed, not transcoded.

    def stale_window(self, origin: str, kind: str) -> float:
        """Seconds past expiry an entry of ``origin`` may be served: ``kind`` is "swr"
        (stale_while_revalidate) or "sie" (stale_if_error); 0 for remote sources."""
        windows = self.stale_windows.get(origin)
        return 0.0 if windows is None else windows[0 if kind == "swr" else 1]

    def _origin_of(self, target: Target) -> str:
        if target.remote:
            return ""
        try:
            origin, _ = self.origins.match(target.source)
        except NoOriginMatched:
            return ""
        return origin.name

    async def _stale_entry(self, key: str, origin: str, kind: str) -> EntryMeta | None:
        """The expired entry for ``key`` if it expired less than the window ago."""
        window = self.stale_window(origin, kind)
        if window <= 0:
            return None
        entry = await self.cache.lookup_stale(key)
        if entry is None or not 0 <= entry.stale_for() < window:
            return None
        return entry

    async def stale_while_revalidate(self, outcome: Lookup, target: Target) -> None:
        """On a miss, answer an entry expired by less than stale_while_revalidate (setting
        ``outcome.entry``, ``outcome.stale``) and revalidate it once in the background."""
        entry = await self._stale_entry(outcome.key, self._origin_of(target), "swr")
        if entry is None:
            return
        outcome.entry, outcome.stale = entry, True
        self.metrics.cache_hits.inc()
        if self.background is not None and entry.key not in self.revalidating:
            self.revalidating.add(entry.key)  # one revalidation per key at a time
            self.background.start_soon(self._revalidate_in_background, entry, target)

    async def stale_if_error(self, outcome: Lookup, target: Target) -> None:
        """When the origin failed (5xx: not a 404), answer an entry expired by less than
        stale_if_error instead of the error."""
        if outcome.error is None or outcome.error.status < 500:
            return
        entry = await self._stale_entry(outcome.key, self._origin_of(target), "sie")
        if entry is None:
            return
        self.metrics.revalidations.labels("failed").inc()
        log.warning("serving stale entry", key=outcome.key, error=outcome.error.message)
        outcome.entry, outcome.stale, outcome.error = entry, True, None

    async def _revalidate_in_background(self, entry: EntryMeta, target: Target) -> None:
        """Stat the source and refresh ``entry`` if it is unchanged; a changed source's
        entry is deleted, so the next request produces it again (at its own priority)."""
        try:
            try:
                resolved = await self.resolve(target)
            except ResizerError as exc:
                self.metrics.revalidations.labels("failed").inc()
                log.warning("background revalidation failed", key=entry.key, error=exc.message)
                return
            if await self.revalidate(entry, resolved) is None:
                await self.cache.delete(entry.key)
        except Exception:
            log.exception("background revalidation crashed", key=entry.key)
        finally:
            self.revalidating.discard(entry.key)

    async def revalidate(self, entry: EntryMeta, resolved: Resolved) -> EntryMeta | None:
        """The refreshed entry (new expiry, same bytes and ETag) when ``resolved`` still has
        the validators ``entry`` recorded; None when they changed (or were not recorded)."""
        if not entry.validators or entry.validators != validators_of(resolved):
            self.metrics.revalidations.labels("changed").inc()
            return None
        refreshed = await self.cache.refresh(entry)
        if refreshed is not None:
            self.metrics.revalidations.labels("refreshed").inc()
            log.info("entry refreshed", key=entry.key, expires=refreshed.expires)
        return refreshed

    def _finish_with(self, work: Work, entry: EntryMeta) -> bool:
        """Serve ``work`` from the published ``entry``; False if it vanished meanwhile."""
        try:
            spool = (
                self.disk.open_spool(entry)
                if self.disk is not None
                else PublishedSpool(self.cache, entry)
            )
        except KeyError:
            return False
        work.spool_from(spool)
        work.advance(entry.size)
        work.finish(entry)
        return True

    async def revalidate_or_transcode(self, work: Work, job: Job, lead: Lead | None = None) -> None:
        """``_transcode``, unless the expired entry of ``job.key`` is still valid for the
        source the request resolved (then refreshed in place: no ffmpeg); an entry expired by
        less than stale_if_error is served when producing it again fails before any byte."""
        stale = await self.cache.lookup_stale(job.key)
        if stale is not None and stale.validators:
            refreshed = await self.revalidate(stale, job.source)
            if refreshed is not None and self._finish_with(work, refreshed):
                return
        try:
            await self._transcode(work, job, lead)
        except ResizerError as exc:
            window = self.stale_window(job.source.origin, "sie")
            if stale is None or work.current.produced or not 0 <= stale.stale_for() < window:
                raise
            if not self._finish_with(work, stale):
                raise
            self.metrics.revalidations.labels("failed").inc()
            log.warning("serving stale entry", key=job.key, error=exc.message)

    def _budget_changed(self, budget: ByteBudget) -> None:
        self.metrics.budget_changed(budget)
        self.heap_trimmer.wanted()  # streams allocate and free chunks: trim soon

    def adaptive_chunks(self) -> AdaptiveChunks:
        """A new stream's chunk sizer, drawing on the process-wide stream budget."""
        cache = self.config.cache
        return AdaptiveChunks(
            self.stream_budget,
            start=cache.read_chunk,
            minimum=cache.min_read_chunk,
            maximum=cache.max_read_chunk,
            lag=self.loop_lag,
        )

    def ttl_for(self, target: Target) -> Mapping[str, float]:
        """The TTL by response class of the origin ``target`` matches ({} for none)."""
        if target.remote:
            return {}
        try:
            origin, _ = self.origins.match(target.source)
        except NoOriginMatched:
            return {}
        return origin.ttl

    def recall(self, key: str) -> EntryMeta | None:
        """A hot entry for ``key`` the cache knows without I/O (counted as a hit), or None."""
        entry = self.cache.recall(key)
        if entry is not None:
            self.metrics.cache_hits.inc()
        return entry

    async def lookup(self, key: str) -> EntryMeta | None:
        entry = self.recall(key)
        if entry is not None:
            await trio.lowlevel.checkpoint()
            return entry
        entry = await self.cache.lookup(key)
        (self.metrics.cache_hits if entry else self.metrics.cache_misses).inc()
        return entry

    def subscribe(self, job: Job, *, kind: str | None = None, client: str = "") -> Subscription:
        """Attach to the in-flight Work for ``job.key``, starting it if there is none.

        ``kind`` is what the client asks for (``scheduling.rules.request_kind``; by default
        from the options): it sets the class of a new Work and raises a joined one's.
        """
        priority = self.classes.of(kind or request_kind(job.options))
        subscription = self.registry.attach(job.key, lambda work: self._produce(work, job))
        work = subscription.work
        if subscription.joined:
            self.metrics.coalesced.inc()
            work.raise_priority(priority)
        else:
            work.priority, work.client = priority, client
        return subscription

    def _scheduler_changed(self, snapshot: Snapshot) -> None:
        for priority, waiting in snapshot.waiting.items():
            self.metrics.set_queue_depth(priority.label, waiting)

    def _slot_granted(self, claim: Claim) -> None:
        self.metrics.observe_queue_wait(claim.priority.label, claim.waited or 0.0)
        if self.on_slot_granted is not None:
            self.on_slot_granted(claim)

    def _unattended(self, work: Work) -> None:
        """Its last client left and it goes on (finish_without_clients): nobody waits now."""
        work.reclass(self.classes.of("detached"))

    @asynccontextmanager
    async def run_slot(self, work: Work, job: Job, kind: str | None = None) -> AsyncIterator[Claim]:
        """One of the machine's ffmpeg slots for a run of ``work``, in the Work's claims
        while it waits or runs: in the Work's class, or the better one of ``kind``."""
        priority = work.priority
        if kind is not None and priority is not Priority.LOW:
            # A probe is high when someone waits; a low Work's (prefetch) stays low.
            priority = min(priority, self.classes.of(kind))
        source = f"{job.source.origin}:{job.source.path}"
        claim = self.scheduler.claim(
            SlotRequest(priority, kind or request_kind(job.options), source, work.client)
        )
        work.claims.add(claim)
        try:
            async with claim:
                work.queued_seconds += claim.waited or 0.0
                yield claim
        finally:
            work.claims.discard(claim)

    async def _produce(self, work: Work, job: Job) -> None:
        """Fetch, transform and spool into the cache; runs in the service nursery."""
        self.metrics.inflight_works.inc()
        try:
            if job.options.segment is not None:
                await self.hls.produce(work, job)  # an HLS segment comes from a segment run
                return
            if self.leases is None:
                if await self.finish_from_cache(work, job.key):
                    return
                if await self.finish_from_shared(work, job):
                    return
                await self.revalidate_or_transcode(work, job)
                return
            while True:
                # Synchronous: no cancellation between taking a lease and owning it.
                lease = self.leases.acquire(job.key)
                if isinstance(lease, Lead):
                    try:
                        await self._lead(work, job, lease)
                    finally:
                        lease.release()
                    return
                try:
                    if await self._follow(work, job, lease):
                        return
                finally:
                    lease.release()
                # The leader stopped before anyone here saw a byte: produce it ourselves.
        finally:
            self.metrics.inflight_works.dec()

    async def _lead(self, work: Work, job: Job, lead: Lead) -> None:
        """Produce ``job`` holding its cross-process lease; others may tail the output."""
        # The previous leader may have published just before we took the lease.
        if await self.finish_from_cache(work, job.key):
            return
        if await self.finish_from_shared(work, job):
            return
        with unwrap_single_exception():
            async with trio.open_nursery() as nursery:
                work.followed_elsewhere = lead.followed
                # Our clients may all leave while other processes still follow: then this
                # watcher ends the Work once they have left too.
                nursery.start_soon(self._abandon_when_unfollowed, work)
                await self.revalidate_or_transcode(work, job, lead)
                nursery.cancel_scope.cancel()

    async def _transcode(self, work: Work, job: Job, lead: Lead | None = None) -> None:
        """Produce ``job`` in this process, unless another instance of the cluster leads
        it: then wait for it and serve the entry it published to the shared store.

        Without Redis (none configured, or unreachable) this instance goes alone. A leader
        that loses its lease (it stalled past the TTL and another took over) has its Work
        cancelled, and its clients fail visibly (``LeaseLost``, 503).
        """
        cluster = self.cluster
        while True:
            if cluster is None:
                async with self.origin_slot():
                    await self._fetch_transform_spool(work, job, lead)
                return
            async with cluster.hold(job.key) as outcome:
                if outcome is not None:  # our lease, or LOCAL_ONLY (Redis unreachable)
                    async with self.origin_slot():
                        await self._fetch_transform_spool(work, job, lead)
                    return
            self.metrics.cluster_follows.inc()
            await cluster.wait_released(job.key)
            if await self.finish_from_shared(work, job):
                return
            # The leader stopped without publishing (it failed, or died): lead it ourselves.

    async def finish_from_cache(self, work: Work, key: str) -> bool:
        """Serve ``work`` from an entry published since its clients looked (True), if any.

        A request whose lookup missed just before another Work published cannot join that
        Work any more (it left the registry when it finished): its new Work lands here.
        """
        entry = await self.cache.lookup(key)
        # False when replaced or deleted meanwhile: produce it again.
        return entry is not None and self._finish_with(work, entry)

    async def finish_from_shared(self, work: Work, job: Job) -> bool:
        """Serve ``work`` from the shared store, filling the local cache once (True), if
        the store has the entry; False on a shared miss, or when the store fails before any
        byte went out (the caller transcodes then)."""
        if self.shared is None:
            return False
        since = self.purges.generation  # a purge from now on voids what the store has
        shared = await self.shared.lookup(job.key)
        if shared is None:
            return False
        meta = shared.meta
        try:
            async with self.cache.open_writer(
                job.key,
                content_type=meta.content_type,
                ttl=remaining_ttl(meta, time.time()),
                options=meta.options,
                source=meta.source,
                validators=meta.validators,
            ) as writer:
                work.spool_into(writer)
                work.tier = "shared"
                async with self.shared.store.read(shared, 0, shared.size) as chunks:
                    async for data in chunks:
                        await writer.write(data)
                        work.advance(writer.bytes_written)
                entry = await commit_unless_purged(self, writer, job.key, since)
        except SharedStoreError as exc:
            if work.current.produced:
                raise TransformFailed(f"the shared store failed mid-entry: {exc}") from exc
            log.warning("shared store read failed; transcoding", key=job.key, error=exc.message)
            work.tier = None
            return False
        work.finish(entry)
        self.metrics.shared_hits.inc()
        return True

    async def _abandon_when_unfollowed(self, work: Work) -> None:
        # Polls only once no client here needs the Work: followers cannot signal leaving.
        await work.kept_for_followers.wait()
        while True:
            await trio.sleep(self.config.coalescing.lease_poll_interval)
            if self.registry.abandon_if_unwanted(work):
                return

    async def _follow(self, work: Work, job: Job, follow: Follow) -> bool:
        """Tail another process's output for ``job`` until it ends.

        True when it published the entry (the Work is finished); False when it stopped before
        this process delivered anything, so the caller may produce the output itself. Raises
        when it stopped after bytes went out: they cannot be continued from another run.
        """
        assert self.disk is not None
        self.metrics.lease_follows.inc()
        poll = self.config.coalescing.lease_poll_interval
        while True:
            try:
                tail = follow.poll()
            except FollowLost as exc:
                if work.current.produced:
                    raise TransformFailed(f"lost the output of another process: {exc}") from exc
                return False
            if follow.attached and work.spool is None:
                work.spool_from(DiskSpoolReader(follow.partial_fd()))
            if tail.size > work.current.produced:
                work.advance(tail.size)
            if not tail.leader_alive:
                break
            await trio.sleep(poll)
        entry = await self.cache.lookup(job.key)
        produced = work.current.produced
        if entry is not None and produced == 0:
            try:
                work.spool_from(self.disk.open_spool(entry))
            except KeyError:
                return False
            work.advance(entry.size)
        if entry is not None and entry.size == work.current.produced:
            work.finish(entry)
            return True
        if produced == 0:
            return False
        raise TransformFailed("the process producing this output stopped before it finished")

    @asynccontextmanager
    async def origin_slot(self) -> AsyncIterator[None]:
        """One of max_concurrent_origins slots, waiting at most origin_queue_timeout."""
        timeout = self.config.limits.origin_queue_timeout
        acquired = False
        with trio.move_on_after(timeout):
            await self.origin_limiter.acquire()
            acquired = True
        if not acquired:
            raise ServiceUnavailable(
                f"{self.origin_limiter.total_tokens:g} transformations are in flight; retry later",
                retry_after=max(1.0, timeout),
            )
        try:
            yield
        finally:
            self.origin_limiter.release()

    @asynccontextmanager
    async def open_input(self, job: Job) -> AsyncIterator[tuple[MediaInput, int]]:
        """What ffmpeg reads, and its size: a local file, or a seekable loopback URL.

        A frame or a VTT track needs only part of a large remote file (the index and one
        keyframe's neighbourhood); when its origin serves ranges, ffmpeg seeks through the
        range proxy instead of waiting for the whole download.
        """
        resolved = job.source
        stat = resolved.stat
        seek_over = self.config.transform.seek_remote_over
        if (
            seek_over
            and stat.ranges
            and stat.size >= seek_over
            and (job.options.mode is Mode.FRAME or job.options.format is OutputFormat.VTT)
            and isinstance(resolved.source, RangeSource)
            and not (
                self.source_files and self.source_files.holds(resolved.source, resolved.path, stat)
            )
        ):
            # The proxy's connections for this URL end with the block (ffmpeg done or killed).
            async with self.range_proxy.expose(resolved.source, resolved.path, stat.size) as url:
                yield LoopbackUrl(url), stat.size
            return
        # A source that answered the existence check can still fail the download: fall
        # over to the next one (its breaker has counted the failure).
        failed: set[int] = set()
        async with AsyncExitStack() as stack:
            while True:
                try:
                    local = await stack.enter_async_context(resolved.open(self.source_files))
                    break
                except (OriginFailed, OriginTimeout) as exc:
                    if not resolved.request_path:
                        raise
                    failed.add(id(resolved.source))
                    try:
                        resolved = await self.origins.resolve(
                            resolved.request_path, exclude=frozenset(failed)
                        )
                    except SourceNotFound:
                        raise exc from None  # nobody else has it: the real problem is this
            yield local.path, local.size

    async def _fetch_transform_spool(self, work: Work, job: Job, lead: Lead | None = None) -> None:
        since = self.purges.generation  # before the source is fetched (purge.py)
        async with self.open_write_through(job.key) as through:
            entry = await self._transform_into_cache(work, job, through, lead, since)
            work.finish(entry)  # its clients are done; the shared upload completes below
            if self.purges.purged_since(job.key, since):
                return  # purged while in flight: leaving uncommitted discards the upload
            await through.commit(entry)
            if through.committed and self.purges.purged_since(job.key, since):
                await purge_shared_key(self, job.key)  # purged while the manifest was written
        log.info("work done", key=job.key, size=entry.size, shared=through.committed)

    @asynccontextmanager
    async def open_write_through(self, key: str) -> AsyncIterator[WriteThrough]:
        """The shared store's upload of ``key`` (a no-op without a shared store)."""
        if self.shared is None:
            yield WriteThrough()
            return
        async with self.shared.write_through(key) as through:
            yield through

    async def _transform_into_cache(
        self, work: Work, job: Job, through: WriteThrough, lead: Lead | None, since: int
    ) -> EntryMeta:
        """Fetch, probe, transform (or compute a text output) into the local cache and
        through to the shared store; the committed local entry (none if a purge after
        generation ``since`` matched it: purge.py)."""
        chunk = self.config.cache.read_chunk
        async with (
            self.cache.open_writer(
                job.key,
                content_type=job.options.content_type,
                ttl=(job.source.ttl or {}).get("ok", self.config.cache.ttl),
                options=job.options.canonical(),
                source=f"{job.source.origin}:{job.source.source.kind}",
                validators=validators_of(job.source),
            ) as writer,
            self.open_input(job) as (media, size),
        ):
            work.spool_into(writer)
            if lead is not None:
                assert isinstance(writer, DiskWriter)  # leases exist for disk caches only
                lead.announce(writer.partial_path)
            self.metrics.origin_fetches.inc()
            async with self.run_slot(work, job, "probe"):
                info = await self.transformer.probe(media)
            check_source(info, size, self.source_limits)
            check_options(job.options, info)
            text = self._text_from_probe(job, info)
            if text is not None:
                # A thumbnail track or a playlist is text computed from the probe: no ffmpeg.
                await writer.write(text.encode())
                await through.write(text.encode())
                work.advance(writer.bytes_written)
                return await commit_unless_purged(self, writer, job.key, since)
            async with self.run_slot(work, job):
                self.metrics.transforms.inc()
                self.metrics.transforms_running.inc()
                try:
                    async with self.transformer.open_output(media, info, job.options) as out:
                        while data := await out.receive_some(chunk):
                            await writer.write(data)
                            work.advance(writer.bytes_written)
                            await through.write(data)  # waits while its parts are all busy
                finally:
                    self.metrics.transforms_running.dec()
            if writer.bytes_written == 0:
                raise TransformFailed("ffmpeg succeeded but produced no output")
            return await commit_unless_purged(self, writer, job.key, since)

    def _text_from_probe(self, job: Job, info: MediaInfo) -> str | None:
        """The output of ``job`` when it is a document about the source, else None."""
        options, target = job.options, job.target
        max_output = self.config.limits.max_duration
        if options.format is OutputFormat.VTT:
            assert target is not None
            return build_thumbnail_vtt(sheet_url(target, options), options, info, max_output)
        if options.format is OutputFormat.HLS:
            assert target is not None
            return render_playlist(options, target, info, self.policy, max_output)
        return None


def validators_of(resolved: Resolved) -> str:
    """The validators of a resolved source, as entries record them."""
    stat = resolved.stat
    return source_validators(stat.size, stat.mtime)  # sources report no ETag yet


def build_cache(config: Config) -> CacheStore:
    if config.cache.backend == "memory":
        return MemoryCacheStore()
    store = DiskCacheStore(config.resolve_path(config.cache.path), fsync=config.cache.fsync)
    store.prepare()
    return store


@asynccontextmanager
async def open_service(
    config: Config,
    *,
    cache: CacheStore | None = None,
    transformer: Transformer | None = None,
    origins: Origins | None = None,
    shared: SharedTier | None = None,
    cluster: Leases | None = None,
) -> AsyncIterator[Service]:
    """Build the service and run its nursery for the duration of the block.

    Parts can be injected (tests pass fakes); by default they come from ``config``.
    """
    if transformer is None:
        transformer = FfmpegTransformer(
            resolve_ffmpeg(config.transform.ffmpeg or None),
            settings=EncoderSettings(max_output_seconds=config.limits.max_duration),
            timeout=config.transform.timeout,
            probe_timeout=config.transform.probe_timeout,
            kill_grace=config.transform.kill_grace,
        )
    cache = cache if cache is not None else build_cache(config)
    spill_dir = config.resolve_path(config.cache.path) / "sources"
    spill_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics()
    async with (
        make_http_client(connect_timeout=5 * SECONDS) as client,
        # Outside the nurseries: the works that use them end before their clients close.
        _open_cluster(config, metrics, shared, cluster) as (shared, cluster),
        trio.open_nursery() as services,  # long-lived helpers (the range proxy)
        trio.open_nursery() as nursery,  # in-flight works only
    ):
        listening = ListeningAddresses()  # the server fills it in once bound
        if origins is None:
            origins = Origins.from_config(
                config,
                client=client,
                spill_dir=spill_dir,
                on_breaker_change=metrics.breaker_changed,
                listening=listening,
            )
        metrics.track_breakers(origins.breakers)
        security = config.security
        registry = WorkRegistry(
            nursery,
            finish_without_clients=config.coalescing.finish_without_clients,
            coalesce=config.coalescing.enabled,
        )
        service = Service(
            config,
            cache=cache,
            origins=origins,
            transformer=transformer,
            registry=registry,
            metrics=metrics,
            remote=HttpSource(
                client,
                spill_dir=spill_dir,
                max_size=config.limits.max_source_size,
                address_policy=AddressPolicy.from_config(config, listening),
                redirect_hosts=frozenset(security.allowed_remote_hosts),
            ),
            listening=listening,
            shared=shared,
            cluster=cluster,
        )
        registry.on_unattended = service._unattended
        await services.start(service.scheduler.serve)
        await services.start(service.range_proxy.serve)
        await services.start(service.hls.serve)
        await services.start(service.loop_lag.serve)
        await services.start(service.heap_trimmer.serve)
        service.background = services  # background revalidations (stale_while_revalidate)
        if service.cluster is not None:  # purges other instances publish (purge.py)
            await services.start(service.cluster.serve_purges, partial(on_cluster_purge, service))
        if service.disk is not None:  # bounded by [cache] max_size (cache/eviction.py)
            service.sweeper = Sweeper.from_config(config, service.disk, metrics)
            await services.start(service.sweeper.serve)
        yield service
        # Leaving the block ends every in-flight work (shutdown): their cleanup is shielded.
        nursery.cancel_scope.cancel()
        services.cancel_scope.cancel()


@asynccontextmanager
async def _open_cluster(
    config: Config, metrics: Metrics, shared: SharedTier | None, cluster: Leases | None
) -> AsyncIterator[tuple[SharedTier | None, Leases | None]]:
    """The shared store and the leases ``[cluster]`` names (unless injected), open for the
    block: their clients close when it ends."""
    async with AsyncExitStack() as stack:
        if shared is None and config.cluster.s3.bucket:
            client = await stack.enter_async_context(make_store_client(config.cluster.s3))
            shared = SharedTier(s3_store(config.cluster.s3, client, os.environ))
        if shared is not None and shared.errors is None:
            shared.errors = metrics.shared_store_errors
        if cluster is None and config.cluster.redis_url:
            from .cluster.leases import open_redis_leases  # imports coredis (see the top)

            cluster = await stack.enter_async_context(
                open_redis_leases(
                    config.cluster.redis_url, ttl=config.cluster.lease_ttl, metrics=metrics
                )
            )
        yield shared, cluster
