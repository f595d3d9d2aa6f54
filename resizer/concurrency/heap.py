"""Give freed heap memory back to the operating system after bursts of streaming.

Every streamed chunk is a fresh ``bytes`` of 16 KiB to 1 MiB. glibc's malloc keeps what
Python frees in its heap and returns only the top of it, so after a thousand streams the
process kept its peak footprint (measured: RSS 55 MB above the start with no connection left,
and 114 MB peak with 1000 streams read at playback speed under a 16 MiB budget).
``malloc_trim(0)`` hands the free pages back (102 MB peak, 79 MB once the streams ended).

``HeapTrimmer.serve`` trims at most once per ``interval`` and only after streams asked for it
(``wanted``), so an idle process, or a mock clock, sees no periodic wake-ups. The call runs
in a worker thread: it takes ~10 ms when there is much to return, and ctypes releases the GIL.
Where the C library has no ``malloc_trim`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import trio


def find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


class HeapTrimmer:
    def __init__(self, interval: float, trim: Callable[[int], int] | None = None) -> None:
        self.interval = interval
        self.trim = trim
        self.trims = 0
        self._wanted = trio.Event()

    def wanted(self) -> None:
        """Ask for a trim within ``interval`` (cheap; called as streams end)."""
        self._wanted.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.trim is None or self.interval <= 0:
            return
        trim = self.trim
        while True:
            await self._wanted.wait()
            await trio.sleep(self.interval)  # batch the streams ending meanwhile
            self._wanted = trio.Event()
            await trio.to_thread.run_sync(trim, 0)
            self.trims += 1
