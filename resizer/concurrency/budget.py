"""Adaptive chunk sizes for streamed bodies under a process-wide byte budget.

Fixed chunks force a bad choice: small ones cost throughput (each chunk pays hypercorn's
per-message send path), large ones cost memory when many clients each hold one. Instead
every stream starts at ``start`` bytes, doubles its chunk while the client drains each one
quickly and, when a send blocks, sizes the next to what the client drained meanwhile (at
least halving it), between ``minimum`` and ``maximum``. "Quickly" is
relative to the event loop's own lag (``LoopLag``): with hundreds of streams every send
waits for its turn in the loop, and counting that as a slow client shrank every chunk to the
minimum exactly when the CPU was scarcest (measured: 16 KiB chunks, twice the CPU per
request at 500 clients).

All streams draw their chunks from one ``ByteBudget``, a byte-counting limiter: while it is
spent, a stream waits its turn (FIFO) for bytes others give back. Handing out ever smaller
chunks instead (every stream gets *something* at once) measured half the throughput at 500
clients: the CPU went to per-chunk overhead, not to bytes. Waiting costs nothing there, as the
process is busy with the streams that hold budget. A stream that waited ``patience`` seconds
gets ``minimum`` bytes over budget: clients that stopped reading keep their chunks in
blocked sends, and must not stall everyone else. A stream's first chunk never waits (the
minimum over budget if need be), so a response starts at once. Worst case: the budget plus
``minimum`` per stream that is starting or has waited ``patience``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..units import SECONDS, KiB, MiB

FAST_SEND = 0.005  # seconds: the send went straight into the socket buffer
SLOW_SEND = 0.050  # seconds: the client (or the network) is the bottleneck
DEFAULT_PATIENCE = 1 * SECONDS
# A send that completes at once still waits for the loop to come round once or twice.
LAG_ROUNDS_FAST = 3
LAG_ROUNDS_SLOW = 8


class LoopLag:
    """How late the event loop wakes a sleeping task: the time one scheduling round takes
    under the current load (exponentially smoothed). ``serve`` measures while streams ask
    for it (``wanted``) and sleeps otherwise, so an idle process (or a mock clock) sees no
    periodic wake-ups."""

    def __init__(self, interval: float = 0.01, smoothing: float = 0.2) -> None:
        self.interval = interval
        self.smoothing = smoothing
        self.current = 0.0
        self._wanted = trio.Event()

    def wanted(self) -> None:
        """Ask for a fresh measurement (cheap; called after every chunk sent)."""
        self._wanted.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            wake_at = trio.current_time() + self.interval
            await trio.sleep_until(wake_at)
            self.observe(trio.current_time() - wake_at)

    def observe(self, late: float) -> None:
        self.current += self.smoothing * (late - self.current)


@dataclass(eq=False)
class _Waiter:
    wanted: int
    floor: int
    granted: int = 0
    event: trio.Event = field(default_factory=trio.Event)


class ByteBudget:
    """Bytes of response bodies held in memory at once, across all streams."""

    def __init__(
        self,
        total: int,
        *,
        patience: float = DEFAULT_PATIENCE,
        on_change: Callable[[ByteBudget], None] | None = None,
    ) -> None:
        self.total = total
        self.patience = patience
        self.used = 0
        self.peak = 0
        self.overdrafts = 0  # grants over budget: first chunks, or after ``patience``
        self.streams = 0  # streams drawing on the budget (``AdaptiveChunks`` joined)
        self._waiters: deque[_Waiter] = deque()
        # Told after every change of ``used``, ``waiting`` or ``overdrafts`` (metrics).
        self._on_change = on_change or _ignore

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def overdraw(self, amount: int) -> int:
        """Reserve ``amount`` bytes now, over budget if need be (a stream's first chunk)."""
        if self.total - self.used < amount:
            self.overdrafts += 1
        self.used += amount
        self.peak = max(self.peak, self.used)
        self._on_change(self)
        return amount

    def take_nowait(self, wanted: int, floor: int) -> int | None:
        """Reserve up to ``wanted`` bytes (at least ``floor``) if that needs no waiting."""
        if self._waiters or not self._can_grant(floor):
            return None
        return self._grant(wanted, floor)

    async def take(self, wanted: int, floor: int) -> int:
        """Reserve up to ``wanted`` bytes, at least ``floor``: at once when the budget has
        them and nobody queues, else in turn as bytes come back, else after ``patience``
        seconds ``floor`` bytes over budget."""
        granted = self.take_nowait(wanted, floor)
        if granted is not None:
            try:
                await trio.lowlevel.checkpoint()
            except trio.Cancelled:
                self.give_back(granted)
                raise
            return granted
        waiter = _Waiter(wanted, floor)
        self._waiters.append(waiter)
        self._on_change(self)
        settled = False
        try:
            with trio.move_on_after(self.patience):
                await waiter.event.wait()
            settled = True
        finally:
            if not settled:  # cancelled from outside: leave the queue, return any grant
                self._withdraw(waiter)
        if waiter.granted:  # also when the grant raced the patience deadline
            return waiter.granted
        self._waiters.remove(waiter)
        self.overdrafts += 1
        self.used += floor
        self.peak = max(self.peak, self.used)
        self._on_change(self)
        return floor

    def give_back(self, amount: int) -> None:
        """Return ``amount`` reserved bytes; the first waiters get them (no waiting here)."""
        self.used -= amount
        while self._waiters and self._can_grant(self._waiters[0].floor):
            waiter = self._waiters.popleft()
            waiter.granted = self._grant(waiter.wanted, waiter.floor)
            waiter.event.set()
        self._on_change(self)

    def _can_grant(self, floor: int) -> bool:
        # An empty budget always grants, so a floor above the total cannot wait forever.
        return self.total - self.used >= floor or self.used == 0

    def _grant(self, wanted: int, floor: int) -> int:
        granted = max(floor, min(wanted, self.total - self.used))
        self.used += granted
        self.peak = max(self.peak, self.used)
        self._on_change(self)
        return granted

    def _withdraw(self, waiter: _Waiter) -> None:
        if waiter.granted:
            self.give_back(waiter.granted)
            waiter.granted = 0
        else:
            self._waiters.remove(waiter)
            self._on_change(self)


def _ignore(budget: ByteBudget) -> None:
    pass


class AdaptiveChunks:
    """One stream's chunk size; ``next_size`` before a read, ``sent`` after its send."""

    def __init__(
        self,
        budget: ByteBudget,
        *,
        start: int = 64 * KiB,
        minimum: int = 16 * KiB,
        maximum: int = 1 * MiB,
        lag: LoopLag | None = None,
    ) -> None:
        self.budget = budget
        self.lag = lag or LoopLag()
        self.minimum = minimum
        self.maximum = max(minimum, maximum)
        self.size = min(max(start, minimum), self.maximum)
        self._held = 0
        self._joined = False

    async def next_size(self) -> int:
        """The size of the next read, reserved from the budget until ``sent`` (may wait).

        A stream's first chunk never waits: when the budget is spent (or others queue for
        it) it gets the minimum over budget, so a new response starts at once however many
        slow clients hold chunks. Later chunks wait their turn.
        """
        self._give_back_held()
        if not self._joined:
            self._joined = True
            self.budget.streams += 1
            first = self.budget.take_nowait(self.size, self.minimum)
            self._held = self.budget.overdraw(self.minimum) if first is None else first
            await trio.lowlevel.checkpoint()  # (a cancellation here leaves via release())
            return self._held
        self._held = await self.budget.take(self.size, self.minimum)
        return self._held

    def sent(self, seconds: float) -> None:
        """The chunk reached the socket after ``seconds``: adapt, and free its bytes.

        A quick send doubles the chunk. A slow one sizes it to what this client drains in
        the slow threshold (at least halving it): a player reading 100 KB/s gets the
        minimum at once instead of holding 1 MiB chunks for seconds while halving.
        """
        lag = self.lag.current
        self.lag.wanted()
        slow = SLOW_SEND + LAG_ROUNDS_SLOW * lag
        if seconds < FAST_SEND + LAG_ROUNDS_FAST * lag:
            self.size = min(self.maximum, self.size * 2)
        elif seconds > slow and self._held:
            drains = int(self._held / seconds * slow)
            self.size = max(self.minimum, min(self.size // 2, drains))
        self._give_back_held()

    def release(self) -> None:
        """The stream is over: give back what it holds and leave the budget (idempotent;
        also when the stream ends early)."""
        self._give_back_held()
        if self._joined:
            self._joined = False
            self.budget.streams -= 1

    def _give_back_held(self) -> None:
        if self._held:
            held, self._held = self._held, 0
            self.budget.give_back(held)
