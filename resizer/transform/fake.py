"""An in-memory ``Transformer`` for testing the stages around the transform.

Output is deterministic per ``TransformOptions`` (so cache tests can compare bytes), comes in
fixed-size chunks, and can be stalled (``gate``, ``before_chunk``, ``delay``) or made to fail
part-way (``fail_after``). Counters tell how many transforms started, are running, finished,
failed or were abandoned, so a test can assert "exactly one transform ran".
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

from ..errors import ResizerError, TransformFailed
from ..options import OutputFormat, TransformOptions
from .argv import output_span_ms
from .base import MediaInfo, MediaInput

DEFAULT_INFO = MediaInfo(
    duration_ms=2000, width=320, height=240, has_audio=True, video_codec="h264", fps=25.0
)


def fake_output(options: TransformOptions, size: int) -> bytes:
    """``size`` deterministic bytes for ``options``: a readable header, then a hash stream."""
    header = f"FAKE {options.canonical()}\n".encode()
    blocks = [header]
    total = len(header)
    counter = 0
    while total < size:
        block = hashlib.sha256(f"{options.canonical()}#{counter}".encode()).digest()
        blocks.append(block)
        total += len(block)
        counter += 1
    return b"".join(blocks)[:size]


def fake_box(kind: bytes, payload: bytes) -> bytes:
    """One top-level MP4 box."""
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def fake_hls_init(options: TransformOptions) -> bytes:
    """What a fake HLS run writes first: ftyp + moov, the same for every run of a rendition."""
    rendition = replace(options, segment=None).canonical().encode()
    return fake_box(b"ftyp", b"isom") + fake_box(b"moov", b"init " + rendition)


def fake_hls_segment(options: TransformOptions, index: int, size: int = 3_000) -> bytes:
    """Segment ``index`` of a fake HLS rendition: moof + mdat, the same from every run."""
    rendition = replace(options, segment=None)
    moof = fake_box(b"moof", f"segment {index} of ".encode() + rendition.canonical().encode())
    return moof + fake_box(b"mdat", fake_output(replace(rendition, segment=index), size))


def fake_hls_run(
    options: TransformOptions, info: MediaInfo, max_output_seconds: float = 300.0
) -> bytes:
    """A fake run's whole output: the init segment, then segments from ``options.segment``."""
    assert options.segment_ms is not None
    count = -(-output_span_ms(options, info, max_output_seconds) // options.segment_ms)
    first = max(0, options.segment or 0)
    return fake_hls_init(options) + b"".join(
        fake_hls_segment(options, index) for index in range(first, count)
    )


def _default_failure() -> ResizerError:
    return TransformFailed("fake transform failed")


@dataclass
class FakeTransformer:
    """Configure by attribute, before or between runs; every field has a usable default."""

    info: MediaInfo = DEFAULT_INFO
    probe_error: ResizerError | None = None  # raised by probe() instead of returning info
    open_error: ResizerError | None = None  # raised on entering open_output (before a run)
    output: bytes | Callable[[TransformOptions], bytes] | None = None  # None: fake_output()
    size: int = 10_000  # length of the default output
    chunk_size: int = 1_000
    fail_after: int | None = None  # raise failure() once this many bytes were delivered
    failure: Callable[[], ResizerError] = _default_failure
    delay: float = 0.0  # trio.sleep before each chunk (use with an autojump clock)
    gate: trio.Event | None = None  # each chunk waits for it: stall until the test sets it
    before_chunk: Callable[[int], Awaitable[None]] | None = None  # awaited with chunk index

    probes: int = field(default=0, init=False)
    runs_started: int = field(default=0, init=False)
    running: int = field(default=0, init=False)
    runs_finished: int = field(default=0, init=False)  # reached a clean EOF
    runs_failed: int = field(default=0, init=False)  # raised failure() to the consumer
    runs_abandoned: int = field(default=0, init=False)  # left before EOF (break, cancel, error)
    started: list[TransformOptions] = field(default_factory=list, init=False)
    _lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot, init=False)

    async def probe(self, source: MediaInput) -> MediaInfo:
        await trio.lowlevel.checkpoint()
        self.probes += 1
        if self.probe_error is not None:
            raise self.probe_error
        return self.info

    def output_for(self, options: TransformOptions) -> bytes:
        """The complete bytes a successful run with ``options`` delivers."""
        if self.output is None:
            if options.format is OutputFormat.HLS and options.segment is not None:
                return fake_hls_run(options, self.info)
            return fake_output(options, self.size)
        if callable(self.output):
            return self.output(options)
        return self.output

    async def wait_started(self, count: int = 1) -> None:
        """Return once at least ``count`` runs have started in total."""
        while self.runs_started < count:
            await self._lot.park()

    @asynccontextmanager
    async def open_output(
        self, source: MediaInput, info: MediaInfo, options: TransformOptions
    ) -> AsyncIterator[FakeOutput]:
        await trio.lowlevel.checkpoint()
        if self.open_error is not None:
            raise self.open_error
        stream = FakeOutput(self, options)
        self.runs_started += 1
        self.running += 1
        self.started.append(options)
        self._lot.unpark_all()
        try:
            yield stream
        finally:
            self.running -= 1
            if stream.state == "finished":
                self.runs_finished += 1
            elif stream.state == "failed":
                self.runs_failed += 1
            else:
                self.runs_abandoned += 1


class FakeOutput(trio.abc.ReceiveStream):
    """The stream of one fake run; ``state`` is running, finished or failed."""

    def __init__(self, owner: FakeTransformer, options: TransformOptions) -> None:
        self._owner = owner
        self._data = owner.output_for(options)
        self._position = 0
        self._chunk_index = 0
        self._closed = False
        self.state = "running"
        self.pid: int | None = None  # parity with FfmpegOutput; there is no process

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the fake output was closed")
        owner = self._owner
        if self.state == "failed":
            await trio.lowlevel.checkpoint()
            raise owner.failure()
        if owner.delay:
            await trio.sleep(owner.delay)
        if owner.gate is not None:
            await owner.gate.wait()
        if owner.before_chunk is not None:
            await owner.before_chunk(self._chunk_index)
        await trio.lowlevel.checkpoint()
        if owner.fail_after is not None and self._position >= owner.fail_after:
            self.state = "failed"
            raise owner.failure()
        limit = owner.chunk_size if max_bytes is None else min(owner.chunk_size, max_bytes)
        if owner.fail_after is not None:
            limit = min(limit, owner.fail_after - self._position)
        chunk = self._data[self._position : self._position + limit]
        if not chunk:
            self.state = "finished"
            return b""
        self._position += len(chunk)
        self._chunk_index += 1
        return chunk

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()
