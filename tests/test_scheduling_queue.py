"""The slot queue (resizer/scheduling/queue.py): order, aging, shares, bounds; pure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resizer.scheduling.queue import Priority, QueueFull, Rules, SlotQueue, Ticket

HIGH, MEDIUM, LOW = Priority.HIGH, Priority.MEDIUM, Priority.LOW


def ticket(id: int, priority: Priority, source: str = "", client: str = "") -> Ticket:
    return Ticket(id, priority, source, client)


def test_classes_go_first_then_arrival_order() -> None:
    """With one slot, the high ticket starts before older medium and low ones; ties by age."""
    queue = SlotQueue(Rules(slots=1, aging=0))
    queue.submit(ticket(1, MEDIUM), 0.0)
    assert [t.id for t in queue.grant(0.0)] == [1]
    for id, priority in [(2, LOW), (3, MEDIUM), (4, HIGH), (5, MEDIUM)]:
        queue.submit(ticket(id, priority), float(id))
    order = []
    while queue.running:
        queue.withdraw(next(iter(queue.running)))
        order += [t.id for t in queue.grant(10.0)]
    assert order == [4, 3, 5, 2]


def test_aging_promotes_one_class_per_period() -> None:
    """A low ticket waiting one aging period counts as medium, two as high, and then goes
    before a medium ticket that arrived later."""
    queue = SlotQueue(Rules(slots=1, aging=10))
    low = ticket(1, LOW)
    queue.submit(ticket(0, HIGH), 0.0)
    queue.grant(0.0)
    queue.submit(low, 0.0)
    assert low.effective(9.9, 10) is LOW
    assert low.effective(10.0, 10) is MEDIUM
    assert low.effective(25.0, 10) is HIGH
    assert queue.depth(MEDIUM, 12.0) == 1
    assert queue.next_promotion(12.0) == 20.0
    queue.submit(ticket(2, MEDIUM), 12.0)
    queue.withdraw(0)
    assert [t.id for t in queue.grant(12.0)] == [1]  # both medium now: the older first


def test_without_aging_low_waits_behind_every_later_medium() -> None:
    """aging = 0 never promotes: the control for the test above."""
    queue = SlotQueue(Rules(slots=1, aging=0))
    queue.submit(ticket(0, HIGH), 0.0)
    queue.grant(0.0)
    queue.submit(ticket(1, LOW), 0.0)
    queue.submit(ticket(2, MEDIUM), 100.0)
    queue.withdraw(0)
    assert [t.id for t in queue.grant(100.0)] == [2]
    assert queue.next_promotion(100.0) is None


def test_promote_raises_and_never_lowers() -> None:
    """Priority inheritance: a waiting low ticket promoted to high goes first; promoting it
    to low again changes nothing; reclass may lower."""
    queue = SlotQueue(Rules(slots=1, aging=0))
    queue.submit(ticket(0, HIGH), 0.0)
    queue.grant(0.0)
    queue.submit(ticket(1, MEDIUM), 1.0)
    queue.submit(ticket(2, LOW), 2.0)
    assert queue.promote(2, HIGH, 3.0)
    assert not queue.promote(2, LOW, 3.0)
    queue.withdraw(0)
    assert [t.id for t in queue.grant(3.0)] == [2]
    assert queue.reclass(2, LOW, 4.0)
    assert queue.running[2].priority is LOW


def test_a_full_class_refuses_new_tickets_with_a_retry_delay() -> None:
    """max_queue waiting tickets of a class: the next one of that class is refused; another
    class still queues."""
    queue = SlotQueue(Rules(slots=1, aging=10, max_queue=2))
    queue.submit(ticket(0, MEDIUM), 0.0)
    queue.grant(0.0)
    queue.submit(ticket(1, MEDIUM), 0.0)
    queue.submit(ticket(2, MEDIUM), 0.0)
    with pytest.raises(QueueFull) as refused:
        queue.submit(ticket(3, MEDIUM), 0.0)
    assert refused.value.priority is MEDIUM
    assert refused.value.retry_after == 10
    queue.submit(ticket(4, HIGH), 0.0)
    assert 3 not in queue.waiting


def test_one_source_cannot_take_every_slot_but_high_runs_pass() -> None:
    """max_per_source 1 of 2 slots: a second medium run of the same source waits while
    another source's run takes the free slot; a high run of the same source is not held."""
    queue = SlotQueue(Rules(slots=3, aging=0, max_per_source=1))
    queue.submit(ticket(1, MEDIUM, source="a"), 0.0)
    queue.submit(ticket(2, MEDIUM, source="a"), 1.0)
    queue.submit(ticket(3, MEDIUM, source="b"), 2.0)
    assert [t.id for t in queue.grant(2.0)] == [1, 3]
    queue.submit(ticket(4, HIGH, source="a"), 3.0)
    assert [t.id for t in queue.grant(3.0)] == [4]
    queue.withdraw(1)
    queue.withdraw(4)
    assert [t.id for t in queue.grant(4.0)] == [2]


def test_the_reserved_slot_is_for_high_runs_only() -> None:
    """reserved_high 1 of 2 slots: a second medium run waits by a free slot, which a high
    run then takes at once; a medium promoted by a high joiner may take it too."""
    queue = SlotQueue(Rules(slots=2, aging=0, reserved_high=1))
    queue.submit(ticket(1, MEDIUM, source="a"), 0.0)
    queue.submit(ticket(2, MEDIUM, source="b"), 0.0)
    assert [t.id for t in queue.grant(0.0)] == [1]
    queue.submit(ticket(3, HIGH, source="c"), 1.0)
    assert [t.id for t in queue.grant(1.0)] == [3]
    queue.withdraw(3)
    assert queue.grant(2.0) == []
    queue.promote(2, HIGH, 2.0)  # a high client joined its Work
    assert [t.id for t in queue.grant(2.0)] == [2]


def test_aged_runs_get_neither_the_reserve_nor_the_frames_turn() -> None:
    """Under sustained load transcodes age to high, yet they still respect the reserve and
    the shares, and a frame arriving later goes before them."""
    queue = SlotQueue(Rules(slots=2, aging=10, reserved_high=1))
    queue.submit(ticket(1, MEDIUM), 0.0)
    queue.grant(0.0)
    queue.submit(ticket(2, MEDIUM), 0.0)
    assert queue.waiting[2].effective(30.0, 10) is HIGH
    assert queue.grant(30.0) == []  # the free slot is the reserved one
    queue.submit(ticket(3, HIGH), 31.0)
    queue.submit(ticket(4, HIGH), 32.0)
    queue.withdraw(1)
    assert [t.id for t in queue.grant(33.0)] == [3, 4]  # frames first, aged transcode after
    queue.withdraw(3)
    assert [t.id for t in queue.grant(34.0)] == [2]


def test_one_client_cannot_take_every_slot() -> None:
    """max_per_client: the same limit by the asking client's address."""
    queue = SlotQueue(Rules(slots=2, aging=0, max_per_client=1))
    queue.submit(ticket(1, LOW, client="x"), 0.0)
    queue.submit(ticket(2, LOW, client="x"), 0.0)
    assert [t.id for t in queue.grant(0.0)] == [1]
    queue.submit(ticket(3, LOW, client="y"), 1.0)
    assert [t.id for t in queue.grant(1.0)] == [3]


def test_first_come_first_served_when_switched_off() -> None:
    """ordered = False: arrival order, whatever the classes."""
    queue = SlotQueue(Rules(slots=1, aging=10, ordered=False))
    queue.submit(ticket(0, MEDIUM), 0.0)
    queue.grant(0.0)
    queue.submit(ticket(1, LOW), 1.0)
    queue.submit(ticket(2, HIGH), 2.0)
    queue.withdraw(0)
    assert [t.id for t in queue.grant(3.0)] == [1]


def test_withdrawing_a_waiting_ticket_gives_its_place_back() -> None:
    """A cancelled waiter is gone at once and never granted."""
    queue = SlotQueue(Rules(slots=1))
    queue.submit(ticket(0, MEDIUM), 0.0)
    queue.grant(0.0)
    queue.submit(ticket(1, MEDIUM), 0.0)
    assert queue.withdraw(1) is not None
    queue.withdraw(0)
    assert queue.grant(1.0) == []
    assert not queue.waiting
    assert not queue.running


operations = st.lists(
    st.tuples(
        st.sampled_from(["submit", "withdraw", "promote", "reclass", "advance"]),
        st.integers(0, 11),  # ticket id
        st.sampled_from(list(Priority)),
        st.sampled_from(["a", "b", "c"]),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=operations,
    slots=st.integers(1, 3),
    share=st.integers(0, 2),
    max_queue=st.integers(1, 4),
    reserve=st.integers(0, 2),
)
def test_invariants_under_any_sequence(
    ops: list[tuple[str, int, Priority, str]], slots: int, share: int, max_queue: int, reserve: int
) -> None:
    """Never more running than slots; a ticket is waiting or running, not both; after each
    grant no waiting ticket could have taken a free slot (nothing idles needlessly); each
    class holds at most max_queue waiting tickets of that class when they arrived."""
    reserve = min(reserve, slots - 1)
    rules = Rules(
        slots=slots, aging=5, max_queue=max_queue, max_per_source=share, reserved_high=reserve
    )
    queue = SlotQueue(rules)
    now = 0.0
    for op, id, priority, source in ops:
        if op == "submit" and id not in queue.waiting and id not in queue.running:
            full = queue.depth(priority, now) >= max_queue
            if full:
                with pytest.raises(QueueFull):
                    queue.submit(Ticket(id, priority, source), now)
            else:
                queue.submit(Ticket(id, priority, source), now)
        elif op == "withdraw":
            queue.withdraw(id)
        elif op == "promote":
            queue.promote(id, priority, now)
        elif op == "reclass":
            queue.reclass(id, priority, now)
        else:
            now += 3.0
        queue.grant(now)
        assert len(queue.running) <= slots
        assert not set(queue.waiting) & set(queue.running)
        if len(queue.running) < slots:
            long_runs = [t for t in queue.running.values() if t.priority is not Priority.HIGH]
            for waiting in queue.waiting.values():
                assert waiting.priority is not Priority.HIGH, "a high ticket waits by a free slot"
                held = sum(1 for t in long_runs if t.source == waiting.source)
                reserved = len(long_runs) >= slots - reserve
                assert reserved or (share and held >= share), "a grantable ticket waits"
