"""A listener that accepts every pending connection at once, not one per scheduling round.

trio's ``SocketListener.accept`` yields to the scheduler after each connection, and
``serve_listeners`` calls it in a loop: under load, with hundreds of streams runnable, that
loop accepts one connection per full round of the run queue. Measured with 1000 clients
connecting at once to a busy server: half of them waited 3 to 31 s to be accepted (the whole
run) while the connections already accepted were served again and again.

``DrainingListener`` waits until the socket is readable, then accepts everything queued (up to
``batch``) and hands the connections out without yielding in between, so a burst of clients
joins the run queue together. hypercorn builds its listeners itself; ``use_draining_listeners``
makes its trio worker build these instead.
"""

from __future__ import annotations

import errno
import socket
import types
from collections import deque
from typing import Any

import trio

# Errors of one incoming connection (it went away while queued): skip it, like trio does.
_IGNORED_ACCEPT_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENOPROTOOPT, errno.ENETDOWN}
)


class DrainingListener(trio.abc.Listener[trio.SocketStream]):
    def __init__(self, listening: trio.socket.SocketType, *, batch: int = 256) -> None:
        self.batch = batch
        self.listening = listening
        # A plain non-blocking duplicate: accept() in a loop without a checkpoint each time.
        self.socket = socket.fromfd(listening.fileno(), listening.family, listening.type)
        self.socket.setblocking(False)
        self._pending: deque[trio.SocketStream] = deque()

    async def accept(self) -> trio.SocketStream:
        if self._pending:
            return self._pending.popleft()  # accepted earlier in this batch: no waiting
        while True:
            await trio.lowlevel.wait_readable(self.socket)
            self._accept_queued()
            if self._pending:
                return self._pending.popleft()

    def _accept_queued(self) -> None:
        for _ in range(self.batch):
            try:
                connection, _ = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _IGNORED_ACCEPT_ERRNOS:
                    continue
                if self._pending:
                    return  # hand out what was accepted; the error comes back next time
                raise
            connection.setblocking(False)
            self._pending.append(trio.SocketStream(trio.socket.from_stdlib_socket(connection)))

    async def aclose(self) -> None:
        self.socket.close()
        self.listening.close()
        while self._pending:
            await trio.aclose_forcefully(self._pending.popleft())
        await trio.lowlevel.checkpoint()


class _TrioBuildingDrainingListeners(types.ModuleType):
    """trio, as hypercorn's trio worker sees it: ``SocketListener`` is ``DrainingListener``."""

    SocketListener = DrainingListener

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def use_draining_listeners() -> None:
    """Make hypercorn's trio worker accept connections in batches (idempotent)."""
    import hypercorn.trio.run as hypercorn_run

    if not isinstance(getattr(hypercorn_run, "trio"), _TrioBuildingDrainingListeners):  # noqa: B009
        setattr(hypercorn_run, "trio", _TrioBuildingDrainingListeners("trio"))  # noqa: B010
