"""The scheduler of one process: a ``SlotQueue`` driven synchronously.

Used when resizer runs as one process, and as the fallback of a worker that lost its
coordinator. Every change (a ticket submitted, withdrawn or promoted) grants what it can in
the same step, so a slot given back is taken by the next waiting run before anything else
runs. Aging needs no timer: classes are computed at the moment of each grant.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count

import trio

from .claims import Claim, Decision, Observer, SlotRequest, Snapshot
from .queue import Priority, QueueFull, Rules, SlotQueue, Ticket

Clock = Callable[[], float]


class LocalBackend:
    """A ``SlotQueue`` with the callbacks of the tickets waiting in it."""

    def __init__(
        self, rules: Rules, clock: Clock, on_change: Callable[[], None] | None = None
    ) -> None:
        self.queue = SlotQueue(rules)
        self._clock = clock
        self._pending: dict[int, Decision] = {}
        self._on_change = on_change

    def submit_nowait(self, ticket_id: int, request: SlotRequest, decided: Decision) -> None:
        ticket = Ticket(ticket_id, request.priority, request.source, request.client)
        try:
            self.queue.submit(ticket, self._clock())
        except QueueFull as refusal:
            decided(refusal)
            return
        self._pending[ticket_id] = decided
        self._grant()

    def withdraw_nowait(self, ticket_id: int) -> None:
        self._pending.pop(ticket_id, None)
        if self.queue.withdraw(ticket_id) is not None:
            self._grant()

    def promote_nowait(self, ticket_id: int, priority: Priority) -> None:
        if self.queue.promote(ticket_id, priority, self._clock()):
            self._changed()

    def reclass_nowait(self, ticket_id: int, priority: Priority) -> None:
        if self.queue.reclass(ticket_id, priority, self._clock()):
            self._changed()

    def snapshot(self) -> Snapshot:
        now = self._clock()
        return Snapshot(
            self.queue.rules.slots,
            len(self.queue.running),
            {p: self.queue.depth(p, now) for p in Priority},
        )

    def _grant(self) -> None:
        for ticket in self.queue.grant(self._clock()):
            self._pending.pop(ticket.id)(None)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


class LocalScheduler:
    """``Scheduler`` for one process."""

    def __init__(
        self,
        rules: Rules,
        *,
        clock: Clock = trio.current_time,
        on_change: Callable[[Snapshot], None] | None = None,
        on_granted: Observer | None = None,
    ) -> None:
        self.rules = rules
        self.backend = LocalBackend(rules, clock, self._report)
        self._ids = count(1)
        self._on_change = on_change
        self._on_granted = on_granted

    def claim(self, request: SlotRequest) -> Claim:
        return Claim(self.backend, next(self._ids), request, on_granted=self._on_granted)

    def snapshot(self) -> Snapshot:
        return self.backend.snapshot()

    def overloaded(self) -> bool:
        return self.snapshot().waiting[Priority.HIGH] >= self.rules.max_queue

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def _report(self) -> None:
        if self._on_change is not None:
            self._on_change(self.backend.snapshot())
