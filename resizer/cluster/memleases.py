"""An in-memory ``Leases`` for tests: several "instances" sharing one ``MemoryLeaseHub``.

It behaves like ``RedisLeases`` (same outcomes, fencing tokens per key, expiry on trio's
clock so ``MockClock`` drives it, purge messages to every subscriber) without a server.
``hub.down = True`` simulates an unreachable Redis: acquire answers ``LOCAL_ONLY``,
publish returns False, subscribers hear nothing, and ``degraded_count`` counts like the
metric does.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from .leases import (
    DEFAULT_POLL_INTERVAL,
    DEFAULT_TTL,
    LOCAL_ONLY,
    Lease,
    LeaseHolding,
    Outcome,
    PurgeCallback,
    _deliver,
)


@dataclass
class _Held:
    value: str
    expires_at: float


@dataclass
class MemoryLeaseHub:
    """The shared state of every ``MemoryLeases`` built on it (what Redis holds)."""

    down: bool = False
    leases: dict[str, _Held] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)
    subscribers: list[trio.MemorySendChannel[str]] = field(default_factory=list)

    def current(self, key: str) -> str | None:
        held = self.leases.get(key)
        if held is None or held.expires_at <= trio.current_time():
            self.leases.pop(key, None)
            return None
        return held.value


class MemoryLeases(LeaseHolding):
    """One instance's view of a ``MemoryLeaseHub``."""

    def __init__(
        self,
        hub: MemoryLeaseHub,
        *,
        ttl: float = DEFAULT_TTL,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.hub = hub
        self.ttl = ttl
        self.poll_interval = poll_interval
        self.degraded_count = 0
        self._instance_id = secrets.token_hex(8)

    @property
    def instance_id(self) -> str:
        return self._instance_id

    async def acquire(self, key: str) -> Outcome:
        await trio.lowlevel.checkpoint()
        if self.hub.down:
            self.degraded_count += 1
            return LOCAL_ONLY
        if self.hub.current(key) is not None:
            return None
        token = self.hub.fences.get(key, 0) + 1
        self.hub.fences[key] = token
        value = f"{self._instance_id}:{token}"
        self.hub.leases[key] = _Held(value, trio.current_time() + self.ttl)
        return Lease(key=key, token=token, value=value)

    async def renew(self, lease: Lease) -> bool:
        await trio.lowlevel.checkpoint()
        if self.hub.down:
            return True  # unreachable is not lost
        current = self.hub.current(lease.key)
        if current not in (None, lease.value):
            return False
        self.hub.leases[lease.key] = _Held(lease.value, trio.current_time() + self.ttl)
        return True

    async def release(self, lease: Lease) -> None:
        await trio.lowlevel.checkpoint()
        if not self.hub.down and self.hub.current(lease.key) == lease.value:
            del self.hub.leases[lease.key]

    async def wait_released(self, key: str) -> None:
        first = None if self.hub.down else self.hub.current(key)
        await trio.lowlevel.checkpoint()
        # Polling, like RedisLeases (expiry happens on the clock, with no event to wait on).
        while first is not None and not self.hub.down and self.hub.current(key) == first:  # noqa: ASYNC110
            await trio.sleep(self.poll_interval)

    async def publish_purge(self, message: dict[str, Any]) -> bool:
        await trio.lowlevel.checkpoint()
        if self.hub.down:
            self.degraded_count += 1
            return False
        payload = json.dumps(message, separators=(",", ":"))
        for send in list(self.hub.subscribers):
            # A subscriber that cannot keep up misses it, as with Redis.
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                send.send_nowait(payload)
        return True

    async def serve_purges(
        self,
        callback: PurgeCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        send, receive = trio.open_memory_channel[str](1000)
        self.hub.subscribers.append(send)
        try:
            task_status.started()
            async for message in receive:
                if not self.hub.down:
                    await _deliver(message, callback)
        finally:
            self.hub.subscribers.remove(send)
        raise AssertionError("unreachable: the channel is never closed")
