"""One slot queue per machine: the supervisor's coordinator, and the workers' client of it.

With ``[server] workers`` > 1, every worker's ffmpeg runs share the machine's
``max_concurrent_transforms`` slots. The supervisor (web/workers.py) serves a ``SlotQueue``
on a Unix socket in a private folder and hands its path to the workers
(``RESIZER_SCHEDULER_SOCKET``). A worker keeps one connection and speaks newline-delimited
JSON over it:

    worker -> coordinator   {"op": "submit", "id": 7, "class": 1, "source": "...", "client": "..."}
                            {"op": "withdraw", "id": 7}
                            {"op": "promote", "id": 7, "class": 0}   (raise only)
                            {"op": "reclass", "id": 7, "class": 2}   (up or down)
    coordinator -> worker   {"op": "granted", "id": 7}
                            {"op": "refused", "id": 7, "class": 1, "retry_after": 10}
                            {"op": "state", "slots": 2, "running": 2, "waiting": [0, 3, 1]}

A connection that closes (the worker exited or was killed) gives back every slot it held
and every place it had, so a crashed worker never leaks a slot. A worker that loses the
coordinator refuses the runs that were waiting (503, retry) and schedules on its own from
then on, with the same rules, rather than stop transforming.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Callable
from contextlib import suppress
from itertools import count
from pathlib import Path
from typing import Any

import structlog
import trio

from .claims import Claim, Decision, Observer, SlotRequest, Snapshot
from .local import LocalBackend, LocalScheduler
from .queue import Priority, QueueFull, Rules

log = structlog.get_logger(__name__)

SOCKET_ENV = "RESIZER_SCHEDULER_SOCKET"
# State broadcasts to the workers are batched: at most one per this interval.
_STATE_INTERVAL = 0.05
_MAX_LINE = 64 * 1024


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    """The JSON messages of ``stream``, one per line, until it closes."""
    buffer = bytearray()
    while True:
        data = await stream.receive_some(_MAX_LINE)
        if not data:
            return
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            raw, buffer = bytes(buffer[:end]), buffer[end + 1 :]
            yield json.loads(raw)
        if len(buffer) > _MAX_LINE:
            raise ValueError("a scheduler message is too long")


async def _write_all(
    stream: trio.abc.SendStream, outgoing: trio.MemoryReceiveChannel[bytes]
) -> None:
    async for data in outgoing:
        await stream.send_all(data)


class Coordinator:
    """The machine's slot queue, served to the workers' connections."""

    def __init__(self, rules: Rules) -> None:
        self.backend = LocalBackend(rules, trio.current_time, self._changed)
        self._ids = count(1)
        self._outboxes: set[trio.MemorySendChannel[bytes]] = set()
        self._state_wanted = trio.Event()

    async def serve(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept workers on the Unix socket ``path`` until cancelled."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._broadcast_state)
            await nursery.start(trio.serve_listeners, self._handle, [listener])
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        outbox, outgoing = trio.open_memory_channel[bytes](math.inf)
        mine: dict[int, int] = {}  # the worker's ticket id -> the queue's
        self._outboxes.add(outbox)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write_all, stream, outgoing)
                outbox.send_nowait(_line(self._state()))
                async for message in _lines(stream):
                    self._receive(message, mine, outbox)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, ValueError) as exc:
            log.warning("scheduler connection dropped", error=str(exc))
        finally:
            # Synchronous: the worker's slots and places are free before anything else runs.
            self._outboxes.discard(outbox)
            for ticket in mine.values():
                self.backend.withdraw_nowait(ticket)
            with trio.CancelScope(shield=True), suppress(trio.BrokenResourceError):
                await stream.aclose()

    def _receive(
        self, message: dict[str, Any], mine: dict[int, int], outbox: trio.MemorySendChannel[bytes]
    ) -> None:
        op, theirs = message.get("op"), int(message.get("id", 0))
        if op == "submit":
            ticket = next(self._ids)
            mine[theirs] = ticket
            request = SlotRequest(
                Priority(int(message["class"])),
                str(message.get("kind", "")),
                str(message.get("source", "")),
                str(message.get("client", "")),
            )

            def decided(refusal: QueueFull | None) -> None:
                if refusal is None:
                    outbox.send_nowait(_line({"op": "granted", "id": theirs}))
                    return
                mine.pop(theirs, None)
                refused = {"op": "refused", "id": theirs, "class": int(refusal.priority)}
                outbox.send_nowait(_line({**refused, "retry_after": refusal.retry_after}))

            self.backend.submit_nowait(ticket, request, decided)
        elif op == "withdraw":
            if (gone := mine.pop(theirs, None)) is not None:
                self.backend.withdraw_nowait(gone)
        elif op in ("promote", "reclass") and (known := mine.get(theirs)) is not None:
            priority = Priority(int(message["class"]))
            if op == "promote":
                self.backend.promote_nowait(known, priority)
            else:
                self.backend.reclass_nowait(known, priority)

    def _state(self) -> dict[str, Any]:
        snapshot = self.backend.snapshot()
        waiting = [snapshot.waiting[p] for p in Priority]
        return {
            "op": "state",
            "slots": snapshot.slots,
            "running": snapshot.running,
            "waiting": waiting,
        }

    def _changed(self) -> None:
        self._state_wanted.set()

    async def _broadcast_state(self) -> None:
        while True:
            await self._state_wanted.wait()
            self._state_wanted = trio.Event()
            line = _line(self._state())
            for outbox in list(self._outboxes):
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    outbox.send_nowait(line)
            await trio.sleep(_STATE_INTERVAL)


class CoordinatedScheduler:
    """``Scheduler`` of a worker: the machine's coordinator decides (see the module doc)."""

    def __init__(
        self,
        path: Path,
        rules: Rules,
        *,
        on_change: Callable[[Snapshot], None] | None = None,
        on_granted: Observer | None = None,
    ) -> None:
        self.path = path
        self.rules = rules
        self._ids = count(1)
        self._pending: dict[int, tuple[Decision, Priority]] = {}
        self._outbox: trio.MemorySendChannel[bytes] | None = None
        self._state = Snapshot(rules.slots, 0, {p: 0 for p in Priority})
        self._on_change = on_change
        self._on_granted = on_granted
        # Set once the coordinator is gone: this worker schedules alone from then on.
        self.fallback: LocalScheduler | None = None

    def claim(self, request: SlotRequest) -> Claim:
        if self.fallback is not None:
            return self.fallback.claim(request)
        return Claim(self, next(self._ids), request, on_granted=self._on_granted)

    def snapshot(self) -> Snapshot:
        return self.fallback.snapshot() if self.fallback is not None else self._state

    def overloaded(self) -> bool:
        return self.snapshot().waiting[Priority.HIGH] >= self.rules.max_queue

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            stream = await trio.open_unix_socket(str(self.path))
        except OSError as exc:
            log.warning("no scheduler coordinator; scheduling per worker", error=str(exc))
            self._fall_back()
            task_status.started()
            await trio.sleep_forever()
        outbox, outgoing = trio.open_memory_channel[bytes](math.inf)
        self._outbox = outbox
        task_status.started()
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(_write_all, stream, outgoing)
                async for message in _lines(stream):
                    self._receive(message)
                nursery.cancel_scope.cancel()
            log.warning("the scheduler coordinator closed; scheduling per worker")
        except (trio.BrokenResourceError, ValueError) as exc:
            log.warning("lost the scheduler coordinator; scheduling per worker", error=str(exc))
        finally:
            self._outbox = None
            outbox.close()
            self._fall_back()
        await trio.sleep_forever()

    # Backend: what this worker's claims call.
    def submit_nowait(self, ticket_id: int, request: SlotRequest, decided: Decision) -> None:
        self._pending[ticket_id] = (decided, request.priority)
        message = {"op": "submit", "id": ticket_id, "class": int(request.priority)}
        if not self._send({**message, "kind": request.kind, "source": request.source,
                           "client": request.client}):  # fmt: skip
            self._refuse(ticket_id)

    def withdraw_nowait(self, ticket_id: int) -> None:
        self._pending.pop(ticket_id, None)
        self._send({"op": "withdraw", "id": ticket_id})

    def promote_nowait(self, ticket_id: int, priority: Priority) -> None:
        self._send({"op": "promote", "id": ticket_id, "class": int(priority)})

    def reclass_nowait(self, ticket_id: int, priority: Priority) -> None:
        self._send({"op": "reclass", "id": ticket_id, "class": int(priority)})

    def _send(self, message: dict[str, Any]) -> bool:
        if self._outbox is None:
            return False
        try:
            self._outbox.send_nowait(_line(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def _receive(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "granted":
            if (pending := self._pending.pop(int(message["id"]), None)) is not None:
                pending[0](None)
        elif op == "refused":
            if (pending := self._pending.pop(int(message["id"]), None)) is not None:
                retry_after = float(message.get("retry_after", 1.0))
                pending[0](QueueFull(Priority(int(message["class"])), retry_after))
        elif op == "state":
            waiting = dict(zip(Priority, (int(n) for n in message["waiting"]), strict=True))
            self._state = Snapshot(int(message["slots"]), int(message["running"]), waiting)
            if self._on_change is not None:
                self._on_change(self._state)

    def _refuse(self, ticket_id: int) -> None:
        if (pending := self._pending.pop(ticket_id, None)) is not None:
            pending[0](QueueFull(pending[1], 1.0))

    def _fall_back(self) -> None:
        """Refuse what waited on the coordinator; schedule alone from now on."""
        if self.fallback is None:
            self.fallback = LocalScheduler(
                self.rules, on_change=self._on_change, on_granted=self._on_granted
            )
        for ticket_id in list(self._pending):
            self._refuse(ticket_id)
