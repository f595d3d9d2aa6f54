"""The real transformer: ffmpeg as a subprocess, its stdout streamed to the caller.

Invariants: ffmpeg never outlives the ``open_output`` block (it is killed under a shielded
scope with its own deadline, whatever ends the block); its stderr is always drained, so it
can never block on a full pipe; and a consumer only sees end-of-stream after ffmpeg exited
with status 0 having produced output. Everything else surfaces as ``TransformFailed`` or
``TransformTimeout`` from ``receive_some``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import NoReturn

import imageio_ffmpeg
import trio

from ..concurrency.coalescing import current_ffmpeg_pids
from ..concurrency.groups import unwrap_single_exception
from ..errors import ConfigError, ResizerError, TransformFailed, TransformTimeout
from ..options import TransformOptions
from ..units import MINUTES, SECONDS, KiB
from .argv import EncoderSettings, build_argv, probe_argv
from .base import MediaInfo, MediaInput
from .probe import parse_probe_output

ENV_FFMPEG = "RESIZER_FFMPEG"
STDERR_TAIL_BYTES = 8 * KiB
MESSAGE_TAIL_CHARS = 1000
# After SIGKILL the kernel reaps at once; this only bounds a process stuck in the kernel.
KILL_WAIT = 5 * SECONDS
_ADDRESS_RE = re.compile(r" @ 0x[0-9a-f]+")


def resolve_ffmpeg(configured: str | None) -> str:
    """The ffmpeg to run: ``configured``, else ``$RESIZER_FFMPEG``, else the bundled binary.

    A bare name (``ffmpeg``) is looked up on ``PATH``. Raises ``ConfigError`` unless the
    result is an executable file, so a bad setting fails at startup, not on the first request.
    """
    if configured:
        key, candidate = "transform.ffmpeg", configured
    elif os.environ.get(ENV_FFMPEG):
        key, candidate = ENV_FFMPEG, os.environ[ENV_FFMPEG]
    else:
        key = "transform.ffmpeg"
        try:
            candidate = imageio_ffmpeg.get_ffmpeg_exe()
        except RuntimeError as err:
            raise ConfigError([(key, f"no ffmpeg configured and none bundled: {err}")]) from err
    if os.sep not in candidate:
        candidate = shutil.which(candidate) or candidate
    path = Path(candidate)
    if not path.is_file():
        raise ConfigError([(key, f"ffmpeg not found at {candidate!r}")])
    if not os.access(path, os.X_OK):
        raise ConfigError([(key, f"ffmpeg at {candidate!r} is not executable")])
    return str(path)


class _Tail:
    """The last ``limit`` bytes written to it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()

    def add(self, chunk: bytes | bytearray) -> None:
        self._data += chunk
        if len(self._data) > self._limit:
            del self._data[: -self._limit]

    def text(self) -> str:
        return self._data.decode("utf-8", errors="replace")


class FfmpegOutput(trio.abc.ReceiveStream):
    """ffmpeg's stdout. EOF (``b""``) only after a clean exit; failures raise, repeatedly."""

    def __init__(
        self,
        process: trio.Process,
        stdout: trio.abc.ReceiveStream,
        deadline: float,
        timeout: float,
        stderr_tail: _Tail,
        stderr_done: trio.Event,
        source: MediaInput,
        on_first_output: Callable[[float], None] | None = None,
    ) -> None:
        self.pid: int = process.pid
        self.started = trio.current_time()
        self._on_first_output = on_first_output
        self.bytes_received = 0
        self._process = process
        self._stdout = stdout
        self._deadline = deadline
        self._timeout = timeout
        self._stderr_tail = stderr_tail
        self._stderr_done = stderr_done
        self._source = source
        self._eof = False
        self._closed = False
        self._error: tuple[type[ResizerError], str] | None = None

    @property
    def returncode(self) -> int | None:
        """ffmpeg's exit status, or ``None`` while it runs."""
        return self._process.returncode

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._closed:
            raise trio.ClosedResourceError("the transform output was closed")
        if self._error is not None:
            await trio.lowlevel.checkpoint()
            self._raise()
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        if trio.current_time() >= self._deadline:
            await trio.lowlevel.checkpoint()
            self._fail(TransformTimeout, self._timeout_message())
        with trio.move_on_at(self._deadline):
            data = await self._stdout.receive_some(max_bytes)
            if data:
                if not self.bytes_received and self._on_first_output is not None:
                    self._on_first_output(trio.current_time() - self.started)
                self.bytes_received += len(data)
                return data
            # stdout closed: the exit status decides between EOF and failure. The stderr
            # drain finishes right after the exit, and the message needs its last words.
            returncode = await self._process.wait()
            await self._stderr_done.wait()
            if returncode != 0:
                self._fail(TransformFailed, self._failure_message(returncode))
            if self.bytes_received == 0:
                self._fail(
                    TransformFailed,
                    "ffmpeg exited cleanly but produced no output"
                    " (for a frame: no frame at the requested time)",
                )
            self._eof = True
            return b""
        self._fail(TransformTimeout, self._timeout_message())

    async def aclose(self) -> None:
        self._closed = True
        await self._stdout.aclose()

    def _fail(self, kind: type[ResizerError], message: str) -> NoReturn:
        self._error = (kind, message)
        self._raise()

    def _raise(self) -> NoReturn:
        assert self._error is not None
        kind, message = self._error
        raise kind(message)  # a fresh instance each time: tracebacks don't pile up

    def _timeout_message(self) -> str:
        return f"ffmpeg did not finish within {self._timeout:g} s"

    def _failure_message(self, returncode: int) -> str:
        if returncode < 0:
            status = f"was killed by signal {-returncode}"
        else:
            status = f"exited with status {returncode}"
        tail = self._stderr_tail.text().replace(str(self._source), "<source>")
        tail = _ADDRESS_RE.sub("", tail).strip()[-MESSAGE_TAIL_CHARS:]
        return f"ffmpeg {status}: {tail}" if tail else f"ffmpeg {status}"


def run_mode(options: TransformOptions) -> str:
    """What an ffmpeg run produces, for metrics: hls (segments), or the option's mode."""
    return "hls" if options.segment is not None else options.mode.value


class FfmpegTransformer:
    """``Transformer`` backed by an ffmpeg binary (see ``resolve_ffmpeg``).

    ``on_run(mode, seconds)`` hears of every ffmpeg process when it ends ("probe" for
    probes, else ``run_mode``), and ``on_first_output(seconds)`` when a transformation's
    first output byte arrives, that long after its start (the web layer sets both).
    """

    def __init__(
        self,
        ffmpeg: str,
        settings: EncoderSettings | None = None,
        timeout: float = 10 * MINUTES,
        probe_timeout: float = 20 * SECONDS,
        kill_grace: float = 1 * SECONDS,
        *,
        on_run: Callable[[str, float], None] | None = None,
        on_first_output: Callable[[float], None] | None = None,
    ) -> None:
        self.ffmpeg = ffmpeg
        self.settings = settings or EncoderSettings()
        self.timeout = timeout
        self.probe_timeout = probe_timeout
        self.kill_grace = kill_grace
        self.on_run = on_run
        self.on_first_output = on_first_output

    async def probe(self, source: MediaInput) -> MediaInfo:
        argv = probe_argv(self.ffmpeg, source, self.settings)
        started = trio.current_time()
        with trio.move_on_after(self.probe_timeout) as scope:
            try:
                result = await trio.run_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    capture_stderr=True,
                    check=False,  # without an output file ffmpeg always exits 1
                    deliver_cancel=self._deliver_cancel,
                )
            except OSError as err:
                raise TransformFailed(f"cannot run ffmpeg: {err.strerror or err}") from err
            finally:
                if self.on_run is not None:
                    self.on_run("probe", trio.current_time() - started)
        if scope.cancelled_caught:
            raise TransformTimeout(f"probing the source took over {self.probe_timeout:g} s")
        return parse_probe_output(result.stderr.decode("utf-8", errors="replace"))

    @asynccontextmanager
    async def open_output(
        self, source: MediaInput, info: MediaInfo, options: TransformOptions
    ) -> AsyncIterator[FfmpegOutput]:
        argv = build_argv(self.ffmpeg, source, info, options, self.settings)
        deadline = trio.current_time() + self.timeout
        try:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as err:
            raise TransformFailed(f"cannot start ffmpeg: {err.strerror or err}") from err
        assert process.stdout is not None
        assert process.stderr is not None
        stdout, stderr = process.stdout, process.stderr
        tail = _Tail(STDERR_TAIL_BYTES)
        stderr_done = trio.Event()
        # Shielded so an outer cancellation reaches only the caller's body: the drainer then
        # never adds a second Cancelled to the nursery's group. We stop it ourselves.
        drain_scope = trio.CancelScope(shield=True)
        output = FfmpegOutput(
            process, stdout, deadline, self.timeout, tail, stderr_done, source, self.on_first_output
        )
        pids = current_ffmpeg_pids()  # the Work's, shown by /admin/inflight
        pids.add(process.pid)

        # The drainer never raises, so only the caller's exception can leave the nursery:
        # unwrap it from trio's group (contextlib then re-raises it unchanged).
        with unwrap_single_exception():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, stderr, tail, stderr_done, drain_scope)
                try:
                    yield output
                finally:
                    await self._terminate(process, stdout)
                    pids.discard(process.pid)
                    drain_scope.cancel()
                    if self.on_run is not None:
                        self.on_run(run_mode(options), trio.current_time() - output.started)

    async def _terminate(self, process: trio.Process, stdout: trio.abc.ReceiveStream) -> None:
        """Make sure ffmpeg is gone: SIGTERM, grace, SIGKILL; immune to outer cancellation."""
        limit = trio.current_time() + self.kill_grace + KILL_WAIT
        with trio.CancelScope(shield=True, deadline=limit):
            # Closing our end first turns ffmpeg's next write into EPIPE (it ignores
            # SIGPIPE), so a SIGTERM'd ffmpeg cannot hang flushing into a full pipe.
            await trio.aclose_forcefully(stdout)
            if process.returncode is not None:
                return
            with suppress(ProcessLookupError):
                process.terminate()
            with trio.move_on_after(self.kill_grace):
                await process.wait()
            if process.returncode is None:
                with suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

    async def _deliver_cancel(self, process: trio.Process) -> None:
        # trio runs this shielded and stops it once the process has exited.
        with suppress(ProcessLookupError):
            process.terminate()
        await trio.sleep(self.kill_grace)
        with suppress(ProcessLookupError):
            process.kill()


async def _drain(
    stderr: trio.abc.ReceiveStream, tail: _Tail, done: trio.Event, scope: trio.CancelScope
) -> None:
    """Keep ffmpeg's stderr flowing (a full pipe would stall it), remembering the tail."""
    try:
        with scope:
            while chunk := await stderr.receive_some(4 * KiB):
                tail.add(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.set()
        # Shielded: unshielded, an outer cancellation would raise a second Cancelled here,
        # next to the caller's, and the nursery would hand back a group of two.
        with trio.CancelScope(shield=True):
            await stderr.aclose()
