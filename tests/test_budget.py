"""Adaptive chunk sizes under a shared byte budget."""

from __future__ import annotations

from resizer.concurrency.budget import AdaptiveChunks, ByteBudget
from resizer.units import KiB, MiB


def test_fast_clients_grow_to_the_maximum_and_slow_ones_shrink_to_the_minimum() -> None:
    """Quick sends double the chunk up to max; slow sends halve it down to min."""
    chunks = AdaptiveChunks(ByteBudget(64 * MiB), start=64 * KiB, minimum=16 * KiB, maximum=1 * MiB)
    sizes = []
    for _ in range(6):
        sizes.append(chunks.next_size())
        chunks.sent(0.001)
    assert sizes == [64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 1 * MiB]
    for _ in range(8):
        chunks.next_size()
        chunks.sent(0.2)
    assert chunks.next_size() == 16 * KiB
    chunks.sent(0.02)  # in between: unchanged
    assert chunks.next_size() == 16 * KiB


def test_the_budget_bounds_what_all_streams_hold_at_once() -> None:
    """Streams share the budget; beyond it each still gets its minimum, and bytes come back."""
    budget = ByteBudget(1 * MiB)
    streams = [AdaptiveChunks(budget, start=512 * KiB, minimum=16 * KiB) for _ in range(4)]
    granted = [stream.next_size() for stream in streams]
    assert granted == [512 * KiB, 512 * KiB, 16 * KiB, 16 * KiB]
    assert budget.used == 1 * MiB + 32 * KiB
    for stream in streams:
        stream.sent(0.02)
    assert budget.used == 0
    streams[0].next_size()
    streams[0].release()
    streams[0].release()  # idempotent
    assert budget.used == 0
    assert budget.peak == 1 * MiB + 32 * KiB
