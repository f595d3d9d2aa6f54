"""A run's claim on a slot, and the ``Scheduler`` protocol both schedulers implement.

A producer wraps each ffmpeg run in ``async with scheduler.claim(request) as claim``: the
block starts once a slot is granted and gives it back when it ends, however it ends. A
claim cancelled while it waits gives its place back in the same step (nothing else runs in
between). ``claim.promote`` raises its class while it waits or runs (priority inheritance);
a Work keeps its live claims so that a joiner of a higher class reaches them.

The decisions are made by a ``Backend``: the slot queue of this process (``LocalScheduler``)
or the machine's coordinator in the supervisor (``CoordinatedScheduler``). Backend calls are
synchronous (``*_nowait``): cleanup never has to await to give a slot back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import trio

from ..errors import ServiceUnavailable
from .queue import Priority, QueueFull


@dataclass(frozen=True, slots=True)
class SlotRequest:
    """What a run asks for: its class, its kind (for logs and metrics) and whose it is."""

    priority: Priority
    kind: str  # probe, frame, video, segment, prefetch... (see rules.RUN_KINDS)
    source: str = ""  # the input it reads, for the per-source share
    client: str = ""  # the first client's address, for the per-client share


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A scheduler's state: runs holding slots, and waiting runs by class (their class now)."""

    slots: int
    running: int
    waiting: dict[Priority, int]

    @property
    def busy(self) -> int:
        return self.running + sum(self.waiting.values())


Decision = Callable[[QueueFull | None], None]


class Backend(Protocol):
    def submit_nowait(self, ticket_id: int, request: SlotRequest, decided: Decision) -> None:
        """Queue a ticket; ``decided`` is called once: None when granted, or the refusal."""

    def withdraw_nowait(self, ticket_id: int) -> None:
        """Forget a ticket, waiting or granted (idempotent)."""

    def promote_nowait(self, ticket_id: int, priority: Priority) -> None:
        """Raise a waiting or granted ticket's class (never lowers it, aging counted)."""

    def reclass_nowait(self, ticket_id: int, priority: Priority) -> None:
        """Set a waiting or granted ticket's class, up or down; its aging starts again."""


class Scheduler(Protocol):
    def claim(self, request: SlotRequest) -> Claim:
        """A claim to enter (``async with``) around one ffmpeg run."""

    def snapshot(self) -> Snapshot: ...

    def overloaded(self) -> bool:
        """True while the high queue is at its bound (new high runs would be refused)."""

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run whatever the scheduler needs (a connection to the coordinator) until cancelled."""


Observer = Callable[["Claim"], None]


class Claim:
    """One run's claim on a slot; see the module doc."""

    def __init__(
        self,
        backend: Backend,
        ticket_id: int,
        request: SlotRequest,
        *,
        on_granted: Observer | None = None,
    ) -> None:
        self._backend = backend
        self.id = ticket_id
        self.request = request
        self.priority = request.priority
        self.waited: float | None = None  # seconds from asking to the grant
        self._on_granted = on_granted
        self._decided = trio.Event()
        self._refusal: QueueFull | None = None
        self._live = False  # submitted and not yet withdrawn

    def promote(self, priority: Priority) -> None:
        """Raise the claim's class (never lowers it); takes effect at once if it waits."""
        if priority < self.priority:
            self.priority = priority
            if self._live:
                self._backend.promote_nowait(self.id, priority)

    def reclass(self, priority: Priority) -> None:
        """Set the claim's class, up or down (a Work left by its clients goes on as low)."""
        if priority != self.priority:
            self.priority = priority
            if self._live:
                self._backend.reclass_nowait(self.id, priority)

    def _decide(self, refusal: QueueFull | None) -> None:
        self._refusal = refusal
        if refusal is not None:
            self._live = False  # never queued: nothing to withdraw
        self._decided.set()

    async def __aenter__(self) -> Claim:
        asked = trio.current_time()
        self._live = True
        request = self.request
        if self.priority != request.priority:  # promoted before it was submitted
            request = SlotRequest(self.priority, request.kind, request.source, request.client)
        self._backend.submit_nowait(self.id, request, self._decide)
        granted = False
        try:
            await self._decided.wait()
            granted = self._refusal is None
        finally:
            if not granted:
                self._withdraw()
        if self._refusal is not None:
            raise ServiceUnavailable(
                f"too many transformations are waiting ({self._refusal}); retry later",
                retry_after=self._refusal.retry_after,
            )
        self.waited = trio.current_time() - asked
        if self._on_granted is not None:
            self._on_granted(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Give the slot (or the place in the queue) back; idempotent, never blocks."""
        self._withdraw()

    def _withdraw(self) -> None:
        if self._live:
            self._live = False
            self._backend.withdraw_nowait(self.id)
