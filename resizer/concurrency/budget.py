"""Adaptive chunk sizes for streamed bodies under a process-wide byte budget.

Fixed chunks force a bad choice: small ones cost throughput (one thread hop and one send per
chunk), large ones cost memory when many slow clients each hold one. Instead every stream
starts at ``start`` bytes, doubles its chunk while the client drains each one quickly and
halves it while sends block, between ``minimum`` and ``maximum``. All streams draw their
chunks from one ``ByteBudget``; a stream that finds the budget spent gets what is left, and
never less than ``minimum`` (so every stream progresses and no one waits: the worst case is
the budget plus ``minimum`` per stream).

Everything is synchronous bookkeeping between a read and its send: no locks, no waiting.
"""

from __future__ import annotations

from ..units import KiB, MiB

FAST_SEND = 0.005  # seconds: the send went straight into the socket buffer
SLOW_SEND = 0.050  # seconds: the client (or the network) is the bottleneck


class ByteBudget:
    """Bytes of response bodies held in memory at once, across all streams."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.peak = 0

    def take(self, wanted: int, floor: int) -> int:
        """Reserve up to ``wanted`` bytes (at least ``floor``, even over budget)."""
        granted = max(floor, min(wanted, self.total - self.used))
        self.used += granted
        self.peak = max(self.peak, self.used)
        return granted

    def give_back(self, amount: int) -> None:
        self.used -= amount


class AdaptiveChunks:
    """One stream's chunk size; ``next_size`` before a read, ``sent`` after its send."""

    def __init__(
        self,
        budget: ByteBudget,
        *,
        start: int = 64 * KiB,
        minimum: int = 16 * KiB,
        maximum: int = 1 * MiB,
    ) -> None:
        self.budget = budget
        self.minimum = minimum
        self.maximum = max(minimum, maximum)
        self.size = min(max(start, minimum), self.maximum)
        self._held = 0

    def next_size(self) -> int:
        """The size of the next read, reserved from the budget until ``sent``."""
        self.release()
        self._held = self.budget.take(self.size, self.minimum)
        return self._held

    def sent(self, seconds: float) -> None:
        """The chunk reached the socket after ``seconds``: adapt, and free its bytes."""
        if seconds < FAST_SEND:
            self.size = min(self.maximum, self.size * 2)
        elif seconds > SLOW_SEND:
            self.size = max(self.minimum, self.size // 2)
        self.release()

    def release(self) -> None:
        """Give the reserved bytes back (idempotent; also when the stream ends early)."""
        if self._held:
            self.budget.give_back(self._held)
            self._held = 0
