"""FakeTransformer: deterministic output, chunking, stalls, failures and run accounting."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from resizer.errors import TransformFailed, TransformTimeout, UndecodableSource, UnsupportedMedia
from resizer.options import Mode, OutputFormat, TransformOptions
from resizer.transform.base import MediaInfo, Transformer
from resizer.transform.fake import DEFAULT_INFO, FakeTransformer, fake_output

SOURCE = Path("/nowhere/clip.mp4")
VIDEO = TransformOptions(width=320)
FRAME = TransformOptions(mode=Mode.FRAME, format=OutputFormat.PNG, time_ms=1000)


async def read_all(stream: trio.abc.ReceiveStream, max_bytes: int | None = None) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(max_bytes):
        data += chunk
    return bytes(data)


async def run(fake: FakeTransformer, options: TransformOptions = VIDEO) -> bytes:
    async with fake.open_output(SOURCE, fake.info, options) as output:
        return await read_all(output)


def test_satisfies_the_protocol() -> None:
    """FakeTransformer is usable wherever a Transformer is expected (checked by mypy too)."""
    transformer: Transformer = FakeTransformer()
    assert transformer is not None


def test_default_output_is_deterministic_per_options() -> None:
    """Same options, same bytes; different options, different bytes; exact length."""
    assert fake_output(VIDEO, 5000) == fake_output(VIDEO, 5000)
    assert fake_output(VIDEO, 5000) != fake_output(FRAME, 5000)
    assert len(fake_output(VIDEO, 12_345)) == 12_345
    assert fake_output(VIDEO, 100).startswith(f"FAKE {VIDEO.canonical()}".encode())


async def test_probe_returns_configured_info_and_counts() -> None:
    """probe() returns the configured MediaInfo and counts calls."""
    info = MediaInfo(500, 64, 48, has_audio=False, video_codec="vp9")
    fake = FakeTransformer(info=info)
    assert await fake.probe(SOURCE) == info
    assert await FakeTransformer().probe(SOURCE) == DEFAULT_INFO
    assert fake.probes == 1


@pytest.mark.parametrize("error", [UndecodableSource("bad"), UnsupportedMedia("audio only")])
async def test_probe_error(error: Exception) -> None:
    """probe_error is raised by probe(), and no run starts."""
    fake = FakeTransformer(probe_error=error)  # type: ignore[arg-type]
    with pytest.raises(type(error)):
        await fake.probe(SOURCE)
    assert fake.runs_started == 0


async def test_output_in_chunks_then_clean_eof() -> None:
    """Output comes in chunk_size pieces (capped by max_bytes), then b'' repeatedly."""
    fake = FakeTransformer(size=2500, chunk_size=1000)
    async with fake.open_output(SOURCE, fake.info, VIDEO) as output:
        sizes = [len(await output.receive_some()) for _ in range(3)]
        assert sizes == [1000, 1000, 500]
        assert await output.receive_some() == b""
        assert await output.receive_some() == b""
    assert (fake.runs_started, fake.runs_finished, fake.running) == (1, 1, 0)
    fake = FakeTransformer(size=2500, chunk_size=1000)
    async with fake.open_output(SOURCE, fake.info, VIDEO) as output:
        assert len(await output.receive_some(300)) == 300
        assert await read_all(output) == fake.output_for(VIDEO)[300:]


async def test_configured_output() -> None:
    """output may be fixed bytes or a function of the options."""
    assert await run(FakeTransformer(output=b"fixed bytes")) == b"fixed bytes"
    per_options = FakeTransformer(output=lambda options: options.canonical().encode())
    assert await run(per_options, FRAME) == FRAME.canonical().encode()


async def test_fail_after_n_bytes() -> None:
    """Exactly fail_after bytes arrive, then TransformFailed, again on every later read."""
    fake = FakeTransformer(size=5000, chunk_size=1000, fail_after=2500)
    async with fake.open_output(SOURCE, fake.info, VIDEO) as output:
        received = bytearray()

        async def read_until_failure() -> None:
            while True:
                received.extend(await output.receive_some())

        with pytest.raises(TransformFailed, match="fake transform failed"):
            await read_until_failure()
        assert bytes(received) == fake.output_for(VIDEO)[:2500]
        with pytest.raises(TransformFailed, match="fake transform failed"):
            await output.receive_some()
    assert (fake.runs_failed, fake.runs_finished, fake.runs_abandoned) == (1, 0, 0)


async def test_custom_failure() -> None:
    """failure() chooses the error, e.g. a timeout."""
    fake = FakeTransformer(fail_after=0, failure=lambda: TransformTimeout("slow"))
    with pytest.raises(TransformTimeout):
        await run(fake)


async def test_open_error_starts_no_run() -> None:
    """open_error is raised on entering the block; nothing counts as started."""
    fake = FakeTransformer(open_error=UnsupportedMedia("no"))
    with pytest.raises(UnsupportedMedia):
        await run(fake)
    assert (fake.runs_started, fake.running) == (0, 0)


async def test_gate_stalls_until_set() -> None:
    """With a gate, no chunk is delivered until the test sets it; running counts the stall."""
    gate = trio.Event()
    fake = FakeTransformer(gate=gate, size=3000)
    results: list[bytes] = []

    async def consume() -> None:
        results.append(await run(fake))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await fake.wait_started()
        await trio.testing.wait_all_tasks_blocked()
        assert (fake.running, results) == (1, [])
        gate.set()
    assert results == [fake.output_for(VIDEO)]
    assert fake.running == 0


async def test_before_chunk_hook_sees_each_index() -> None:
    """before_chunk is awaited with 0, 1, 2, ... before each read."""
    indexes: list[int] = []

    async def hook(index: int) -> None:
        indexes.append(index)
        await trio.lowlevel.checkpoint()

    await run(FakeTransformer(size=2500, chunk_size=1000, before_chunk=hook))
    assert indexes == [0, 1, 2, 3]  # the fourth read is the one returning b""


async def test_delay_uses_trio_time(autojump_clock: trio.testing.MockClock) -> None:
    """delay sleeps in trio time between chunks (instant under an autojump clock)."""
    start = trio.current_time()
    await run(FakeTransformer(size=3000, chunk_size=1000, delay=2.0))
    assert trio.current_time() - start == pytest.approx(8.0)  # 3 chunks + the EOF read


async def test_abandoned_run_is_counted() -> None:
    """Leaving the block before EOF counts as abandoned, whether by break or cancellation."""
    fake = FakeTransformer(size=5000)
    async with fake.open_output(SOURCE, fake.info, VIDEO) as output:
        await output.receive_some()
    with trio.CancelScope() as scope:
        async with fake.open_output(SOURCE, fake.info, VIDEO) as output:
            scope.cancel()
            await output.receive_some()
    assert (fake.runs_started, fake.runs_abandoned, fake.running) == (2, 2, 0)


async def test_wait_started_counts_total_runs() -> None:
    """wait_started(n) returns once n runs have started, and records their options."""
    fake = FakeTransformer(gate=trio.Event())
    async with trio.open_nursery() as nursery:
        for options in (VIDEO, FRAME):
            nursery.start_soon(run, fake, options)
        await fake.wait_started(2)
        assert fake.started == [VIDEO, FRAME] or fake.started == [FRAME, VIDEO]
        assert fake.running == 2
        assert fake.gate is not None
        fake.gate.set()
    assert fake.runs_finished == 2


async def test_closed_stream_refuses_reads() -> None:
    """After aclose, receive_some raises ClosedResourceError."""
    fake = FakeTransformer()
    async with fake.open_output(SOURCE, fake.info, VIDEO) as output:
        await output.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await output.receive_some()
