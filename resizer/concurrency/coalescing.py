"""Coalescing registry: one in-flight ``Work`` per cache key, shared by every request for it.

A Work runs in the service's nursery, never in a request's, so the first client leaving does
not end it for the others. The registry counts attached subscriptions; when the last one
detaches, the Work's cancel scope is cancelled (unless ``finish_without_clients``). Attach
and detach are synchronous, and a Work leaves the registry in the same step that decides its
end (abandoned, finished or failed), so a request can only ever join a RUNNING Work. One that
comes later starts a new Work, whose producer finds the published entry first.

Subscribers do not get bytes pushed through queues: the Work spools its output into the cache
writer's partial entry, and each subscriber reads that spool at its own pace, waiting on
``progress`` only when it has caught up. A slow client therefore never slows the transcode,
and memory per client stays one read chunk.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import structlog
import trio
from trio_util import AsyncValue

from ..cache.base import CacheWriter, EntryMeta, SpoolReader
from ..errors import ResizerError, TransformFailed
from ..scheduling.queue import Priority

if TYPE_CHECKING:
    from ..scheduling.claims import Claim

log = structlog.get_logger(__name__)


class WorkState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Progress:
    produced: int
    state: WorkState


class WorkAborted(ResizerError):
    """The Work was cancelled (no client left, or shutdown)."""

    status = 503
    code = "aborted"


class Work:
    """The production of one cache entry, observed by its subscribers."""

    def __init__(self, key: str, on_end: Callable[[Work], None] | None = None) -> None:
        self.key = key
        # Called in the very step the Work stops RUNNING (the registry forgets it then).
        self._on_end = on_end
        self.cancel_scope = trio.CancelScope()
        self.progress: AsyncValue[Progress] = AsyncValue(Progress(0, WorkState.RUNNING))
        self.spool: SpoolReader | None = None  # the Work's own reader; subscribers clone it
        self.entry: EntryMeta | None = None
        self.error: ResizerError | None = None
        self.subscribers = 0
        # Set by a Work that leads a cross-process lease: True while another process tails
        # its output, which keeps the Work alive after its own clients left. Returning False
        # is final (see ``Lead.followed``).
        self.followed_elsewhere: Callable[[], bool] | None = None
        self.kept_for_followers = trio.Event()  # set when only other processes need it
        # For /admin/inflight: when it started (trio clock), and the pids of the ffmpeg
        # processes running for it (transform/runner.py records them through current_work).
        self.started_at = trio.current_time()
        self.ffmpeg_pids: set[int] = set()
        # Scheduling (resizer/scheduling/): the Work's class, the best of its clients'
        # (priority inheritance); who asked first; the claims its runs hold or wait on; and
        # how long its runs waited for slots in all.
        self.priority = Priority.MEDIUM
        # "shared": its output comes from the shared store (X-Cache-Status: HIT-SHARED).
        self.tier: str | None = None
        self.client = ""
        self.claims: set[Claim] = set()
        self.queued_seconds = 0.0

    def raise_priority(self, priority: Priority) -> None:
        """A client of a higher class joined: the Work and its live claims move up."""
        if priority < self.priority:
            self.priority = priority
            for claim in self.claims:
                claim.promote(priority)

    def reclass(self, priority: Priority) -> None:
        """Set the Work's class, up or down (its last client left and it goes on)."""
        self.priority = priority
        for claim in self.claims:
            claim.reclass(priority)

    @property
    def state(self) -> WorkState:
        return self.current.state

    @property
    def current(self) -> Progress:
        return cast(Progress, self.progress.value)  # trio_util ships no type hints

    async def wait_progress(self, predicate: Callable[[Progress], bool]) -> Progress:
        return cast(Progress, await self.progress.wait_value(predicate))

    # The calls a producer makes, in order.
    def spool_into(self, writer: CacheWriter) -> None:
        self.spool_from(writer.open_reader())

    def spool_from(self, reader: SpoolReader) -> None:
        """Read the output from ``reader`` (a follower's view, or a published entry).

        Only before anything was produced: subscribers clone the spool once bytes exist.
        """
        assert self.current.produced == 0
        if self.spool is not None:
            self.spool.close()
        self.spool = reader

    def advance(self, produced: int) -> None:
        self.progress.value = Progress(produced, WorkState.RUNNING)

    def finish(self, entry: EntryMeta) -> None:
        self.entry = entry
        self.progress.value = Progress(entry.size, WorkState.DONE)
        self._ended()

    def fail(self, error: ResizerError) -> None:
        if self.state is WorkState.RUNNING:
            self.error = error
            self.progress.value = Progress(self.current.produced, WorkState.FAILED)
            self._ended()

    def _ended(self) -> None:
        if self._on_end is not None:
            self._on_end(self)

    def close_spool_if_idle(self) -> None:
        """The spool lives while the Work runs or anyone still reads it; then it closes."""
        if self.spool is not None and self.subscribers == 0 and self.state is not WorkState.RUNNING:
            self.spool.close()
            self.spool = None


Producer = Callable[[Work], Awaitable[None]]

# The Work whose producer runs in this task (set by WorkRegistry._run; tasks it starts
# inherit it): ffmpeg processes started on its behalf record their pids on it.
current_work: ContextVar[Work | None] = ContextVar("current_work", default=None)


def current_ffmpeg_pids() -> set[int]:
    """The ffmpeg pid set of the current task's Work (a throwaway set outside any Work)."""
    work = current_work.get()
    return work.ffmpeg_pids if work is not None else set()


def _readable_beyond(offset: int) -> Callable[[Progress], bool]:
    """Wake a reader at ``offset`` when there is more to read or nothing more will come."""
    return lambda p: p.produced > offset or p.state is not WorkState.RUNNING


class Subscription:
    """One client's hold on a Work. ``detach`` is synchronous and idempotent."""

    def __init__(self, registry: WorkRegistry, work: Work, joined: bool) -> None:
        self._registry = registry
        self.work = work
        self.joined = joined  # True when it attached to Work another request started
        self._attached = True

    def detach(self) -> None:
        if self._attached:
            self._attached = False
            self._registry._release(self.work)

    async def wait_first_bytes(self) -> Progress:
        """Wait until output exists or the Work ended; raise the Work's error if it failed."""
        progress = await self.work.wait_progress(_readable_beyond(0))
        self._raise_if_failed(progress)
        return progress

    async def wait_for(self, predicate: Callable[[Progress], bool]) -> Progress:
        """Wait until ``predicate`` holds or the Work ended; raise its error if it failed
        before ``predicate`` held (bytes that exist stay readable after a failure)."""
        progress = await self.work.wait_progress(
            lambda p: predicate(p) or p.state is not WorkState.RUNNING
        )
        if not predicate(progress):
            self._raise_if_failed(progress)
        return progress

    def _raise_if_failed(self, progress: Progress) -> None:
        if progress.state is WorkState.FAILED:
            raise self.work.error or WorkAborted("the transformation was aborted")

    async def iter_bytes(
        self, start: int = 0, chunk_size: int = 64 * 1024, stop: int | None = None
    ) -> AsyncIterator[bytes]:
        """The Work's output from ``start`` (to ``stop``), following it live until complete.

        Raises the Work's error if it fails before the bytes asked for exist: a consumer
        that already sent headers must then abort the connection so the truncation is
        visible. A range (``stop``) whose bytes were produced before a failure is served.
        """
        offset = start
        reader: SpoolReader | None = None
        try:
            while stop is None or offset < stop:
                progress = await self.work.wait_progress(_readable_beyond(offset))
                end = progress.produced if stop is None else min(stop, progress.produced)
                if offset >= end or stop is None:
                    # Nothing more will come (woken at the end), or a whole body that can
                    # no longer complete: fail now rather than after more doomed bytes.
                    self._raise_if_failed(progress)
                if offset >= end:
                    return  # DONE and everything read
                if reader is None:
                    # Attached subscribers keep the spool open, and it exists before any
                    # output does; a closed one would be a registry bug, not a client error.
                    assert self.work.spool is not None
                    reader = self.work.spool.clone()
                data = await reader.read_at(offset, min(chunk_size, end - offset))
                if not data:
                    raise TransformFailed("spooled output ended early")
                offset += len(data)
                yield data
        finally:
            if reader is not None:
                reader.close()


class WorkRegistry:
    """Process-wide map from cache key to in-flight Work."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        finish_without_clients: bool = False,
        on_unattended: Callable[[Work], None] | None = None,
        coalesce: bool = True,
    ) -> None:
        self._nursery = nursery
        # By key; with coalescing off ([coalescing] enabled = false), by Work: every
        # request then starts its own Work, never joining another.
        self._works: dict[object, Work] = {}
        self.coalesce = coalesce
        self.finish_without_clients = finish_without_clients
        # Called when the last client of a Work left and it goes on (finish_without_clients).
        self.on_unattended = on_unattended

    def __len__(self) -> int:
        return len(self._works)

    def get(self, key: str) -> Work | None:
        return self._works.get(key)

    def __iter__(self) -> Iterator[Work]:
        """The Works in flight now (a snapshot: safe while Works come and go)."""
        return iter(list(self._works.values()))

    def attach(self, key: str, produce: Producer) -> Subscription:
        """Join the in-flight Work for ``key`` or start it; never awaits."""
        work = self._works.get(key) if self.coalesce else None
        joined = work is not None
        if work is None:
            work = Work(key, on_end=self._forget)
            self._works[self._slot(work)] = work
            self._nursery.start_soon(self._run, work, produce, name=f"work {key}")
        work.subscribers += 1
        return Subscription(self, work, joined)

    def _release(self, work: Work) -> None:
        work.subscribers -= 1
        work.close_spool_if_idle()
        self.abandon_if_unwanted(work)

    def abandon_if_unwanted(self, work: Work) -> bool:
        """Cancel ``work`` if no client here or elsewhere needs it; True if it did.

        Decides and unregisters in one synchronous step: nobody can attach from now on.
        """
        if work.subscribers > 0 or work.state is not WorkState.RUNNING:
            return False
        if self.finish_without_clients:
            if self.on_unattended is not None:
                self.on_unattended(work)
            return False
        if work.followed_elsewhere is not None and work.followed_elsewhere():
            work.kept_for_followers.set()  # the Work's lease watcher asks again later
            return False
        self._forget(work)
        work.cancel_scope.cancel()
        # Its places in the slot queue go back in this very step, not when its task
        # next runs: a slot freed meanwhile must not be granted to a Work nobody wants.
        for claim in list(work.claims):
            claim.release()
        return True

    def _forget(self, work: Work) -> None:
        if self._works.get(self._slot(work)) is work:
            del self._works[self._slot(work)]

    def _slot(self, work: Work) -> object:
        return work.key if self.coalesce else id(work)

    async def _run(self, work: Work, produce: Producer) -> None:
        current_work.set(work)  # this task's own context: nothing to reset
        try:
            with work.cancel_scope:
                await produce(work)
        except ResizerError as exc:
            work.fail(exc)
        except Exception as exc:
            # A bug: keep the service alive, tell the subscribers, keep the traceback in logs.
            log.exception("work crashed", key=work.key)
            work.fail(TransformFailed(f"internal error while producing the output: {exc!r}"))
        finally:
            self._forget(work)
            work.fail(WorkAborted("the transformation was aborted"))  # no-op unless RUNNING
            work.close_spool_if_idle()
