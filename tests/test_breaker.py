"""The circuit breaker's transitions, under a mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from resizer.concurrency.breaker import BreakerState, CircuitBreaker


def tripped(*, reset_timeout: float = 60, half_open_max: int = 3) -> CircuitBreaker:
    """A breaker (threshold 3) that has just opened."""
    threshold = 3
    breaker = CircuitBreaker(
        "s",
        failure_threshold=threshold,
        reset_timeout=reset_timeout,
        half_open_max=half_open_max,
    )
    for _ in range(threshold):
        assert breaker.admit()
        breaker.record_failure()
    return breaker


async def test_consecutive_failures_open_it(autojump_clock: trio.testing.MockClock) -> None:
    """Threshold consecutive failures open the breaker; a success in between resets the count."""
    breaker = CircuitBreaker("s", failure_threshold=3)
    for _ in range(2):
        breaker.record_failure()
    breaker.record_success()
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert (breaker.admit(), breaker.trips, breaker.retry_after() > 0) == (False, 1, True)


async def test_open_refuses_until_the_reset_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While open nothing is admitted and retry_after counts down to the half-open moment."""
    breaker = tripped(reset_timeout=60)
    assert breaker.retry_after() == pytest.approx(60)
    await trio.sleep(59)
    assert not breaker.admit()
    assert breaker.retry_after() == pytest.approx(1)
    await trio.sleep(1)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.retry_after() == 0


async def test_half_open_admits_at_most_half_open_max_probes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Half-open lets exactly half_open_max requests through at once, not every request."""
    breaker = tripped(reset_timeout=10, half_open_max=3)
    await trio.sleep(10)
    assert [breaker.admit() for _ in range(5)] == [True, True, True, False, False]
    breaker.record_abandoned()  # a probe that was cancelled frees its place
    assert breaker.admit()
    assert not breaker.admit()


async def test_a_probe_success_closes_it(autojump_clock: trio.testing.MockClock) -> None:
    """One successful probe closes the breaker; then everything is admitted again."""
    changes: list[BreakerState] = []
    breaker = tripped(reset_timeout=10)
    breaker._on_change = lambda b: changes.append(b._state)
    await trio.sleep(10)
    assert breaker.admit()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.admit() for _ in range(10))
    assert changes == [BreakerState.HALF_OPEN, BreakerState.CLOSED]


async def test_a_probe_failure_reopens_it(autojump_clock: trio.testing.MockClock) -> None:
    """A failed probe opens the breaker for a whole new reset_timeout."""
    breaker = tripped(reset_timeout=10)
    await trio.sleep(10)
    assert breaker.admit()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after() == pytest.approx(10)
    assert breaker.trips == 2


async def test_a_threshold_of_zero_switches_the_breaker_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """failure_threshold = 0: a thousand failures in a row, and every request is admitted."""
    breaker = CircuitBreaker("s", failure_threshold=0)
    for _ in range(1000):
        assert breaker.admit()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.trips == 0
