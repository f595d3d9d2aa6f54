"""A circuit breaker per source: stop asking an origin that keeps failing.

Closed: every request goes through; ``failure_threshold`` consecutive failures open it.
Open: requests are refused (the caller falls over to another source, or answers 503 with
``Retry-After``) until ``reset_timeout`` has passed. Half-open: at most ``half_open_max``
probe requests are admitted at once (not every request, unlike the design notes' sample);
one success closes the breaker, one failure opens it again for another ``reset_timeout``.
``failure_threshold = 0`` switches it off: it admits everything and never opens.

Every method is synchronous, so admission and bookkeeping cannot be split by a checkpoint.
Time comes from ``trio.current_time`` (a MockClock in tests).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import trio


class BreakerState(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 60.0,
        half_open_max: int = 3,
        on_change: Callable[[CircuitBreaker], None] | None = None,
    ) -> None:
        if failure_threshold < 0 or half_open_max < 1:
            raise ValueError("failure_threshold must be 0 (off) or more, half_open_max 1 or more")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.half_open_max = half_open_max
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._probes = 0  # admitted and not yet reported, while half-open
        self.trips = 0

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose timeout passed reads as half-open)."""
        if self._state is BreakerState.OPEN and self.retry_after() == 0:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker admits probes again (0 unless open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_timeout - trio.current_time())

    def admit(self) -> bool:
        """Whether a request may go to the source now; if True, report its outcome once."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probes < self.half_open_max:
            self._probes += 1
            return True
        return False

    def record_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._probes = 0
            self._set(BreakerState.CLOSED)
        self._failures = 0

    def record_failure(self) -> None:
        if self.failure_threshold == 0:
            return  # switched off
        if self._state is BreakerState.HALF_OPEN:
            self._open()
        elif self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()

    def record_abandoned(self) -> None:
        """The admitted request ended without telling anything (e.g. it was cancelled)."""
        if self._state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _open(self) -> None:
        self._opened_at = trio.current_time()
        self._failures = 0
        self._probes = 0
        self.trips += 1
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(self)
