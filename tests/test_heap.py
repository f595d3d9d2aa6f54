"""The heap trimmer: freed memory goes back to the OS after streaming, at a bounded rate."""

from __future__ import annotations

import trio
import trio.testing

from resizer.concurrency.heap import HeapTrimmer, find_malloc_trim


async def test_trims_once_per_interval_after_streams_asked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No trim until asked; many asks within the interval make one trim, after the interval."""
    calls: list[int] = []

    def trim(pad: int) -> int:  # runs in a worker thread
        calls.append(pad)
        return 1

    trimmer = HeapTrimmer(1.0, trim)
    async with trio.open_nursery() as nursery:
        await nursery.start(trimmer.serve)
        await trio.sleep(10)
        assert calls == []  # idle: never wakes
        for _ in range(5):
            trimmer.wanted()
            await trio.sleep(0.1)
        assert calls == []  # 0.5 s: within the interval
        await trimmed(trimmer, 1)
        await trio.sleep(5)
        assert calls == [0]  # five asks, one trim
        trimmer.wanted()
        await trimmed(trimmer, 2)
        assert calls == [0, 0]
        nursery.cancel_scope.cancel()


async def trimmed(trimmer: HeapTrimmer, count: int) -> None:
    # The trim runs in a thread, which the mock clock does not wait for: poll for it.
    for _ in range(10_000):
        if trimmer.trims >= count:
            return
        await trio.sleep(0.01)
    raise AssertionError(f"only {trimmer.trims} trims")


async def test_without_malloc_trim_the_service_just_returns() -> None:
    """Where the C library has no malloc_trim (or the interval is 0) nothing runs."""
    with trio.fail_after(1):
        await HeapTrimmer(1.0, None).serve()
        await HeapTrimmer(0, lambda pad: 0).serve()


def test_glibc_malloc_trim_is_found_and_callable() -> None:
    """On this (glibc) platform the real function is found and returns 0 or 1."""
    trim = find_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)
