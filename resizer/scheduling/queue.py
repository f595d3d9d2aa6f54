"""The slot queue: which ffmpeg run may start next. Pure state, no I/O, no clock of its own.

Every ffmpeg run (transform or probe) holds one of ``slots`` while it runs. Runs that find no
slot wait here, ordered by class (high, medium, low), then by arrival. A waiting run is
promoted one class per ``aging`` it has waited, so a low run never starves behind a stream
of medium ones; a joiner of a higher class promotes it at once (priority inheritance).

Runs are not preempted, so a slot taken by a long transcode is gone for minutes. Hence what
aging cannot buy: ``reserved_high`` slots only high runs (frames, segments, probes someone
waits for, or runs a high client joined) may take, and shares: no source and no client may
hold more than its share of the slots with medium and low runs, so one of them cannot take
them all. Both go by a run's own class, never by its aged one: under sustained load every
waiting transcode ages to high, and the reserve would be theirs. For the same reason, among
runs that are high now, those high by their own class go first; otherwise the oldest first.
A class whose queue is full refuses new runs (the caller answers 503).

The in-process scheduler (``local.py``) and the machine-wide coordinator
(``coordinator.py``) both drive this one object; times are whatever clock they pass in.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# The kinds of run the rules can name:
#   probe        reading a source's streams and duration (before anything can start)
#   frame, spritesheet, video, audio   a transform of that mode with a client waiting
#   segment      an HLS segment a player waits for
#   prefetch     HLS read-ahead, and requests marked "Sec-Purpose: prefetch"
#   detached     a Work that goes on with no client ([coalescing] finish_without_clients)
RUN_KINDS = frozenset(
    {"probe", "frame", "spritesheet", "video", "audio", "segment", "prefetch", "detached"}
)


class Priority(enum.IntEnum):
    """A run's class; lower values go first."""

    HIGH = 0
    MEDIUM = 1
    LOW = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Priority:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"{text!r} is not a class (high, medium, low)") from None


@dataclass(frozen=True, slots=True)
class Rules:
    """The queue's limits (``[scheduling]`` with the slot count resolved)."""

    slots: int
    aging: float = 10.0  # seconds per class of promotion while waiting; 0: never
    max_queue: int = 100  # waiting runs per class beyond which new ones are refused
    # Slots one source (one input file) or one client may hold with medium and low runs;
    # 0: no limit.
    max_per_source: int = 0
    max_per_client: int = 0
    # Slots medium and low runs never take: a frame never waits for a long transcode.
    reserved_high: int = 0
    ordered: bool = True  # False: first come, first served, classes ignored


@dataclass(eq=False, slots=True)
class Ticket:
    """One run asking for a slot."""

    id: int
    priority: Priority
    source: str = ""  # the origin source it reads ("" for none)
    client: str = ""  # who asked first ("" for nobody: prefetch, finishing alone)
    since: float = 0.0  # when it started waiting in its current class
    queued_at: float = 0.0  # when it started waiting at all
    granted_at: float | None = None

    def effective(self, now: float, aging: float) -> Priority:
        """Its class now, counting one promotion per ``aging`` waited."""
        if aging <= 0 or self.priority is Priority.HIGH:
            return self.priority
        steps = math.floor(max(0.0, now - self.since) / aging)
        return Priority(max(Priority.HIGH, self.priority - steps))


class QueueFull(Exception):
    """The ticket's class has ``max_queue`` runs waiting already."""

    def __init__(self, priority: Priority, retry_after: float) -> None:
        super().__init__(f"the {priority.label} queue is full")
        self.priority = priority
        self.retry_after = retry_after


@dataclass
class SlotQueue:
    rules: Rules
    waiting: dict[int, Ticket] = field(default_factory=dict)  # in arrival order
    running: dict[int, Ticket] = field(default_factory=dict)

    def submit(self, ticket: Ticket, now: float) -> None:
        """Queue ``ticket`` (``grant`` decides whether it runs); raises QueueFull."""
        assert ticket.id not in self.waiting
        assert ticket.id not in self.running
        if self.depth(ticket.priority, now) >= self.rules.max_queue:
            raise QueueFull(ticket.priority, max(1.0, self.rules.aging))
        ticket.since = ticket.queued_at = now
        self.waiting[ticket.id] = ticket

    def withdraw(self, ticket_id: int) -> Ticket | None:
        """Forget a ticket, waiting (its place is given back) or running (its slot is)."""
        return self.waiting.pop(ticket_id, None) or self.running.pop(ticket_id, None)

    def promote(self, ticket_id: int, priority: Priority, now: float) -> bool:
        """Raise a ticket to ``priority`` (never lowers it); True if it changed."""
        ticket = self.waiting.get(ticket_id) or self.running.get(ticket_id)
        if ticket is None:
            return False
        current = ticket.effective(now, self.rules.aging)
        if priority >= current:
            return False
        ticket.priority = priority
        ticket.since = now
        return True

    def reclass(self, ticket_id: int, priority: Priority, now: float) -> bool:
        """Set a ticket's class, up or down, and restart its aging; True if it changed."""
        ticket = self.waiting.get(ticket_id) or self.running.get(ticket_id)
        if ticket is None or ticket.priority is priority:
            return False
        ticket.priority = priority
        ticket.since = now
        return True

    def grant(self, now: float) -> list[Ticket]:
        """Start waiting tickets while slots are free: best class first, then oldest,
        skipping those whose source or client already holds its share."""
        granted: list[Ticket] = []
        free = self.rules.slots - len(self.running)
        if free <= 0 or not self.waiting:
            return granted
        for ticket in self._in_order(now):
            if free <= 0:
                break
            if not self._within_share(ticket, now):
                continue
            del self.waiting[ticket.id]
            ticket.granted_at = now
            self.running[ticket.id] = ticket
            granted.append(ticket)
            free -= 1
        return granted

    def depth(self, priority: Priority, now: float) -> int:
        """Waiting tickets whose class is ``priority`` now."""
        aging = self.rules.aging if self.rules.ordered else 0.0
        return sum(1 for t in self.waiting.values() if t.effective(now, aging) is priority)

    def next_promotion(self, now: float) -> float | None:
        """When the next waiting ticket changes class by aging (None: never)."""
        aging = self.rules.aging
        if aging <= 0 or not self.rules.ordered:
            return None
        times = [
            t.since + (math.floor(max(0.0, now - t.since) / aging) + 1) * aging
            for t in self.waiting.values()
            if t.effective(now, aging) is not Priority.HIGH
        ]
        return min(times, default=None)

    def _in_order(self, now: float) -> list[Ticket]:
        tickets = list(self.waiting.values())  # arrival order: the tie-break
        if self.rules.ordered:
            aging = self.rules.aging
            # Among runs high now, those high by their own class first (frames before aged
            # transcodes); otherwise the oldest: aging lets low overtake newer medium runs.
            tickets.sort(
                key=lambda t: (
                    t.effective(now, aging),
                    t.priority is not Priority.HIGH,
                    t.queued_at,
                )
            )
        return tickets

    def _within_share(self, ticket: Ticket, now: float) -> bool:
        rules = self.rules
        if not rules.ordered or ticket.priority is Priority.HIGH:
            return True
        long_runs = [t for t in self.running.values() if t.priority is not Priority.HIGH]
        if len(long_runs) >= rules.slots - rules.reserved_high:
            return False
        if rules.max_per_source and ticket.source:
            held = sum(1 for t in long_runs if t.source == ticket.source)
            if held >= rules.max_per_source:
                return False
        if rules.max_per_client and ticket.client:
            held = sum(1 for t in long_runs if t.client == ticket.client)
            if held >= rules.max_per_client:
                return False
        return True
