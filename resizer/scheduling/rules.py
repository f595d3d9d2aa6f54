"""Which class a run is in, and the queue's rules, from ``[scheduling]`` (pure)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..options import Mode, TransformOptions
from .claims import Observer, Scheduler, Snapshot
from .coordinator import SOCKET_ENV, CoordinatedScheduler
from .local import LocalScheduler
from .queue import RUN_KINDS, Priority, Rules

__all__ = [
    "RUN_KINDS",
    "Classes",
    "classes_from_config",
    "is_prefetch",
    "open_scheduler",
    "request_kind",
    "rules_from_config",
]


@dataclass(frozen=True, slots=True)
class Classes:
    high: frozenset[str]
    low: frozenset[str]
    ordered: bool = True  # False: every run is medium (priority scheduling switched off)

    def of(self, kind: str) -> Priority:
        if not self.ordered:
            return Priority.MEDIUM
        if kind in self.high:
            return Priority.HIGH
        if kind in self.low:
            return Priority.LOW
        return Priority.MEDIUM


def slot_count(config: Config) -> int:
    return config.limits.max_concurrent_transforms or os.cpu_count() or 1


def rules_from_config(config: Config) -> Rules:
    scheduling = config.scheduling
    slots = slot_count(config)
    return Rules(
        slots=slots,
        aging=float(scheduling.aging),
        max_queue=scheduling.max_queue,
        # Every slot but one by default: one source cannot take them all.
        max_per_source=scheduling.max_per_source or max(1, slots - 1),
        max_per_client=scheduling.max_per_client,
        reserved_high=min(scheduling.reserved_high, slots - 1),
        ordered=scheduling.enabled,
    )


def classes_from_config(config: Config) -> Classes:
    scheduling = config.scheduling
    return Classes(frozenset(scheduling.high), frozenset(scheduling.low), scheduling.enabled)


def is_prefetch(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a request says it is a prefetch (``Sec-Purpose``, or the older ``Purpose``
    and ``X-Moz``): nobody watches it yet, so it waits behind those somebody watches."""
    return any(
        name.lower() in _PREFETCH_HEADERS and "prefetch" in value.lower() for name, value in headers
    )


_PREFETCH_HEADERS = frozenset({"sec-purpose", "purpose", "x-moz"})


def request_kind(options: TransformOptions, *, prefetch: bool = False) -> str:
    """The kind of run a request for ``options`` asks for."""
    if prefetch:
        return "prefetch"
    if options.segment is not None:
        return "segment"
    return {
        Mode.FRAME: "frame",
        Mode.SPRITESHEET: "spritesheet",
        Mode.AUDIO: "audio",
    }.get(options.mode, "video")


def open_scheduler(
    config: Config,
    *,
    on_change: Callable[[Snapshot], None] | None = None,
    on_granted: Observer | None = None,
) -> Scheduler:
    """The machine's coordinator when the supervisor runs one (several workers), else a
    scheduler of this process; its ``serve`` must run in a service nursery."""
    rules = rules_from_config(config)
    path = os.environ.get(SOCKET_ENV)
    if path:
        return CoordinatedScheduler(Path(path), rules, on_change=on_change, on_granted=on_granted)
    return LocalScheduler(rules, on_change=on_change, on_granted=on_granted)
