"""FfmpegTransformer against the real bundled ffmpeg on generated clips, plus stand-in
"ffmpeg" shell scripts for the behaviours real ffmpeg cannot be made to show on demand
(floods of stderr, ignoring SIGTERM)."""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from resizer.errors import (
    ConfigError,
    TransformFailed,
    TransformTimeout,
    UndecodableSource,
    UnsupportedMedia,
)
from resizer.options import Fit, Mode, OutputFormat, TransformOptions
from resizer.transform.base import MediaInfo
from resizer.transform.probe import parse_probe_output
from resizer.transform.runner import ENV_FFMPEG, FfmpegTransformer, resolve_ffmpeg
from tests.media import ffmpeg_banner, ffmpeg_exe, make_test_video

GRACE = 0.2  # short kill grace so the escalation tests stay fast


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    garbage = folder / "garbage.mp4"
    garbage.write_text("this is a text file, renamed .mp4\n" * 20)
    audio_only = folder / "tone.m4a"
    subprocess.run(
        [
            *(ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi"),
            *("-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(audio_only)),
        ],
        check=True,
    )
    fifo = folder / "never-written.mp4"
    os.mkfifo(fifo)  # opening it for reading blocks forever: a deterministic stall
    return {
        "av": make_test_video(folder / "av.mp4", 320, 240, 2, True),
        "silent": make_test_video(folder / "silent.mp4", 320, 240, 2, False),
        "long": make_test_video(folder / "long.mp4", 640, 360, 4, True),
        "rotated": make_test_video(folder / "rotated.mp4", 320, 240, 1, False, rotation=90),
        "garbage": garbage,
        "audio_only": audio_only,
        "fifo": fifo,
    }


@pytest.fixture(scope="module")
def ffmpeg() -> str:
    return resolve_ffmpeg(None)


@pytest.fixture
def transformer(ffmpeg: str) -> FfmpegTransformer:
    return FfmpegTransformer(ffmpeg, kill_grace=GRACE)


def children() -> list[int]:
    """Live (non-zombie) child processes of this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                state, parent = stat.read().rsplit(") ", 1)[1].split()[:2]
        except OSError:
            continue
        if parent == str(os.getpid()) and state != "Z":
            found.append(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    yield
    assert children() == []


def assert_reaped(pid: int) -> None:
    """The process has exited *and* been waited for (kill(0) fails on a reaped pid)."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def transform(
    transformer: FfmpegTransformer, source: Path, options: TransformOptions
) -> bytes:
    info = await transformer.probe(source)
    async with transformer.open_output(source, info, options) as output:
        return await read_all(output)


def top_level_boxes(mp4: bytes) -> list[str]:
    boxes, offset = [], 0
    while offset + 8 <= len(mp4):
        size, kind = struct.unpack(">I4s", mp4[offset : offset + 8])
        if size == 1:
            size = struct.unpack(">Q", mp4[offset + 8 : offset + 16])[0]
        boxes.append(kind.decode("latin-1"))
        offset += size if size else len(mp4)
    return boxes


def decode_back(tmp_path: Path, data: bytes, name: str) -> MediaInfo:
    path = tmp_path / name
    path.write_bytes(data)
    return parse_probe_output(ffmpeg_banner(path))


def jpeg_size_and_sof(data: bytes) -> tuple[int, int, int]:
    """(width, height, SOF marker) of a JPEG; 0xC0 is baseline DCT."""
    offset = 2
    while offset < len(data):
        marker, length = data[offset + 1], struct.unpack(">H", data[offset + 2 : offset + 4])[0]
        if 0xC0 <= marker <= 0xC3:
            height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
            return width, height, marker
        offset += 2 + length
    raise AssertionError("no SOF marker")


def png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def fake_ffmpeg(tmp_path: Path, body: str) -> str:
    """An executable shell script standing in for ffmpeg (it ignores its arguments)."""
    script = tmp_path / "fake-ffmpeg"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


# --- probe ----------------------------------------------------------------------------------


async def test_probe_reads_generated_clips(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """The probe of real files reports size, codec, fps, audio presence and rotation."""
    assert await transformer.probe(clips["av"]) == MediaInfo(
        2000, 320, 240, has_audio=True, video_codec="h264", fps=25.0
    )
    assert (await transformer.probe(clips["silent"])).has_audio is False
    rotated = await transformer.probe(clips["rotated"])
    assert (rotated.rotation, rotated.display_width, rotated.display_height) == (90, 240, 320)


async def test_probe_refuses_a_text_file(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """A text file named .mp4 is UndecodableSource (422)."""
    with pytest.raises(UndecodableSource):
        await transformer.probe(clips["garbage"])


async def test_probe_refuses_audio_only(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """An audio-only file is UnsupportedMedia (415)."""
    with pytest.raises(UnsupportedMedia):
        await transformer.probe(clips["audio_only"])


async def test_concat_script_cannot_read_other_files(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """An ffconcat script posing as .mp4 (it would pull in another local file) is refused."""
    script = tmp_path / "sneaky.mp4"
    script.write_text(f"ffconcat version 1.0\nfile '{clips['av']}'\n")
    with pytest.raises(UndecodableSource, match="container format"):
        await transformer.probe(script)


async def test_probe_timeout(ffmpeg: str, clips: dict[str, Path]) -> None:
    """A probe that never completes (ffmpeg blocked opening a FIFO) is TransformTimeout."""
    stalled = FfmpegTransformer(ffmpeg, probe_timeout=0.3, kill_grace=GRACE)
    with pytest.raises(TransformTimeout):
        await stalled.probe(clips["fifo"])


# --- mode=video -----------------------------------------------------------------------------


async def test_video_is_fragmented_and_streams_before_ffmpeg_exits(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """The first chunk (ftyp+moov) arrives while ffmpeg runs; the output is moof/mdat pairs
    that decode back as even-sized H.264 with AAC."""
    source = clips["long"]
    info = await transformer.probe(source)
    async with transformer.open_output(source, info, TransformOptions(width=320)) as output:
        first = bytes(await output.receive_some())
        # Output (~hundreds of KiB) exceeds the pipe, so ffmpeg cannot have finished yet.
        assert output.returncode is None
        data = first + await read_all(output)
        assert output.returncode == 0
    assert first[4:8] == b"ftyp"
    boxes = top_level_boxes(data)
    assert boxes[:2] == ["ftyp", "moov"]
    assert boxes.count("moof") >= 2  # 4 s at a 2 s GOP: fragments, not one big mdat
    assert boxes.count("moof") == boxes.count("mdat")
    result = decode_back(tmp_path, data, "out.mp4")
    assert (result.video_codec, result.width, result.height, result.has_audio) == (
        "h264",
        320,
        180,
        True,
    )


async def test_video_without_audio_stays_silent(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """A silent source yields a video without an audio track."""
    data = await transform(transformer, clips["silent"], TransformOptions())
    result = decode_back(tmp_path, data, "silent.mp4")
    assert (result.has_audio, result.width, result.height) == (False, 320, 240)


async def test_audio_false_drops_the_track(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """audio=false removes the audio track of a source that has one."""
    data = await transform(transformer, clips["av"], TransformOptions(audio=False))
    assert decode_back(tmp_path, data, "muted.mp4").has_audio is False


@pytest.mark.parametrize(
    ("width", "height", "fit", "size"),
    [(161, None, Fit.CONTAIN, (160, 120)), (100, 100, Fit.COVER, (100, 100))],
)
async def test_video_dimensions_are_even(
    transformer: FfmpegTransformer,
    clips: dict[str, Path],
    tmp_path: Path,
    width: int,
    height: int | None,
    fit: Fit,
    size: tuple[int, int],
) -> None:
    """Odd requests still produce even H.264 dimensions; cover fills the box exactly."""
    options = TransformOptions(width=width, height=height, fit=fit)
    result = decode_back(tmp_path, await transform(transformer, clips["av"], options), "s.mp4")
    assert (result.width, result.height) == size


async def test_rotated_source_comes_out_upright(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """A 90-degree phone clip is rotated into its pixels: 240x320, no display matrix left."""
    data = await transform(transformer, clips["rotated"], TransformOptions())
    result = decode_back(tmp_path, data, "upright.mp4")
    assert (result.width, result.height, result.rotation) == (240, 320, 0)


# --- mode=frame -----------------------------------------------------------------------------


async def test_jpeg_frame_is_baseline_and_sized(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """A jpg frame is a baseline (SOF0) JPEG of the requested size (odd allowed)."""
    options = TransformOptions(mode=Mode.FRAME, format=OutputFormat.JPG, time_ms=500, width=161)
    data = await transform(transformer, clips["av"], options)
    assert data[:3] == b"\xff\xd8\xff"
    assert jpeg_size_and_sof(data) == (161, 121, 0xC0)


async def test_png_frame(transformer: FfmpegTransformer, clips: dict[str, Path]) -> None:
    """A png frame has the PNG signature and the source size when none is asked."""
    options = TransformOptions(mode=Mode.FRAME, format=OutputFormat.PNG, time_ms=1000)
    data = await transform(transformer, clips["av"], options)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_size(data) == (320, 240)


@pytest.mark.parametrize("time_ms", [2000, 1990, 60_000])
async def test_frame_at_or_past_the_end_is_the_last_frame(
    transformer: FfmpegTransformer, clips: dict[str, Path], time_ms: int
) -> None:
    """At, just before, or long after the end, the last frame comes back (not nothing)."""
    last = TransformOptions(mode=Mode.FRAME, format=OutputFormat.PNG, time_ms=time_ms)
    reference = TransformOptions(mode=Mode.FRAME, format=OutputFormat.PNG, time_ms=1960)
    data = await transform(transformer, clips["av"], last)
    assert data[:4] == b"\x89PNG"
    assert data == await transform(transformer, clips["av"], reference)  # frame 49 of 50


# --- failures -------------------------------------------------------------------------------


async def test_failing_transform_raises_instead_of_eof(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """ffmpeg failing (an audio map on a silent file) is TransformFailed with its stderr
    tail, raised again on every later read, and the source path is not disclosed."""
    wrong = MediaInfo(2000, 320, 240, has_audio=True, video_codec="h264", fps=25.0)
    async with transformer.open_output(clips["silent"], wrong, TransformOptions()) as output:
        with pytest.raises(TransformFailed, match="matches no streams") as caught:
            await read_all(output)
        with pytest.raises(TransformFailed):
            await output.receive_some()
    assert str(clips["silent"]) not in caught.value.message


async def test_no_frame_is_a_failure_not_an_empty_image(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """A seek past the end with an unknown duration (no tail logic) gives no bytes and exit 0:
    reported as TransformFailed, never as an empty image."""
    unknown = MediaInfo(None, 320, 240, has_audio=True, video_codec="h264", fps=25.0)
    options = TransformOptions(mode=Mode.FRAME, format=OutputFormat.JPG, time_ms=60_000)
    async with transformer.open_output(clips["av"], unknown, options) as output:
        with pytest.raises(TransformFailed, match="no output"):
            await read_all(output)


async def test_missing_binary_is_transform_failed(clips: dict[str, Path], tmp_path: Path) -> None:
    """An ffmpeg that cannot be started surfaces as TransformFailed, not OSError."""
    broken = FfmpegTransformer(str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(TransformFailed):
        await broken.probe(clips["av"])
    info = MediaInfo(2000, 320, 240, has_audio=True, video_codec="h264", fps=25.0)
    with pytest.raises(TransformFailed):
        async with broken.open_output(clips["av"], info, TransformOptions()):
            pass


async def test_stderr_flood_does_not_stall_and_tail_is_bounded(tmp_path: Path) -> None:
    """1 MB of stderr before any output cannot block the child (it is drained concurrently),
    and the failure message carries only a trimmed tail of it."""
    script = fake_ffmpeg(
        tmp_path, "head -c 1000000 /dev/zero | tr '\\0' 'e' >&2\necho 'fatal: boom' >&2\nexit 3"
    )
    info = MediaInfo(1000, 320, 240, has_audio=False, video_codec="h264")
    async with FfmpegTransformer(script).open_output(tmp_path, info, TransformOptions()) as out:
        with pytest.raises(TransformFailed, match="status 3") as caught:
            await read_all(out)
    assert caught.value.message.endswith("fatal: boom")
    assert len(caught.value.message) < 1100


async def test_clean_exit_with_output_is_eof(tmp_path: Path) -> None:
    """Exit status 0 after output is a clean end of stream, repeatable."""
    script = fake_ffmpeg(tmp_path, "printf 'some output'\necho 'warning' >&2\nexit 0")
    info = MediaInfo(1000, 320, 240, has_audio=False, video_codec="h264")
    async with FfmpegTransformer(script).open_output(tmp_path, info, TransformOptions()) as out:
        assert await read_all(out) == b"some output"
        assert await out.receive_some() == b""


# --- leaving the block ----------------------------------------------------------------------


async def test_break_after_first_chunk_kills_ffmpeg(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """Leaving the block after one chunk ends and reaps ffmpeg before the block returns."""
    info = await transformer.probe(clips["long"])
    async with transformer.open_output(clips["long"], info, TransformOptions()) as output:
        await output.receive_some()
        pid = output.pid
    assert_reaped(pid)


async def test_cancellation_kills_ffmpeg_and_stays_plain_cancelled(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """An outer cancel reaches the caller as a bare trio.Cancelled (no ExceptionGroup), and
    ffmpeg is reaped anyway."""
    info = await transformer.probe(clips["long"])
    seen: BaseException | None = None
    pid = 0
    with trio.CancelScope() as scope:
        try:
            async with transformer.open_output(clips["long"], info, TransformOptions()) as out:
                pid = out.pid
                await out.receive_some()
                scope.cancel()
                await trio.sleep_forever()
        except BaseException as exc:
            seen = exc
            raise
    assert scope.cancelled_caught
    assert type(seen) is trio.Cancelled
    assert_reaped(pid)


async def test_body_exception_propagates_unwrapped(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """An exception raised in the block comes out as itself, not inside an ExceptionGroup."""
    info = await transformer.probe(clips["long"])
    pids: list[int] = []

    async def buggy_consumer() -> None:
        async with transformer.open_output(clips["long"], info, TransformOptions()) as out:
            pids.append(out.pid)
            raise KeyError("consumer bug")

    with pytest.raises(KeyError) as caught:
        await buggy_consumer()
    assert caught.value.args == ("consumer bug",)
    assert_reaped(pids[0])


async def test_transform_failed_from_body_is_not_wrapped(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """TransformFailed raised by receive_some and not caught leaves the block bare."""
    wrong = MediaInfo(2000, 320, 240, has_audio=True, video_codec="h264", fps=25.0)
    with pytest.raises(TransformFailed):
        async with transformer.open_output(clips["silent"], wrong, TransformOptions()) as out:
            await read_all(out)


async def test_sigterm_ignored_escalates_to_sigkill(tmp_path: Path) -> None:
    """A child ignoring SIGTERM is SIGKILLed after the grace and reaped."""
    script = fake_ffmpeg(tmp_path, "trap '' TERM\nprintf x\nexec sleep 30")
    info = MediaInfo(1000, 320, 240, has_audio=False, video_codec="h264")
    transformer = FfmpegTransformer(script, kill_grace=GRACE)
    async with transformer.open_output(tmp_path, info, TransformOptions()) as out:
        assert await out.receive_some() == b"x"
        pid = out.pid
        started = trio.current_time()
    assert trio.current_time() - started >= GRACE
    assert_reaped(pid)


# --- timeouts -------------------------------------------------------------------------------


async def test_wall_clock_timeout_on_a_stalled_ffmpeg(ffmpeg: str, clips: dict[str, Path]) -> None:
    """ffmpeg stuck (blocked opening a FIFO) -> TransformTimeout at the deadline, sticky,
    and the process (deaf to SIGTERM while blocked) is still killed."""
    stalled = FfmpegTransformer(ffmpeg, timeout=0.3, kill_grace=GRACE)
    info = MediaInfo(2000, 320, 240, has_audio=False, video_codec="h264", fps=25.0)
    async with stalled.open_output(clips["fifo"], info, TransformOptions()) as output:
        with pytest.raises(TransformTimeout):
            await output.receive_some()
        with pytest.raises(TransformTimeout):
            await output.receive_some()
        pid = output.pid
    assert_reaped(pid)


async def test_expired_deadline_fails_the_next_read(ffmpeg: str, clips: dict[str, Path]) -> None:
    """With the deadline already past, even available data is refused with TransformTimeout."""
    expired = FfmpegTransformer(ffmpeg, timeout=0)
    info = await expired.probe(clips["av"])
    async with expired.open_output(clips["av"], info, TransformOptions()) as output:
        with pytest.raises(TransformTimeout):
            await output.receive_some()


# --- resolve_ffmpeg -------------------------------------------------------------------------


def test_resolve_prefers_configuration_then_env_then_bundled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Explicit value beats $RESIZER_FFMPEG, which beats the bundled binary."""
    other = fake_ffmpeg(tmp_path, "exit 0")
    monkeypatch.setenv(ENV_FFMPEG, other)
    assert resolve_ffmpeg(ffmpeg_exe()) == ffmpeg_exe()
    assert resolve_ffmpeg(None) == other
    monkeypatch.delenv(ENV_FFMPEG)
    assert resolve_ffmpeg(None) == ffmpeg_exe()
    assert resolve_ffmpeg("") == ffmpeg_exe()


def test_resolve_looks_bare_names_up_on_path() -> None:
    """A bare command name is found on PATH."""
    assert Path(resolve_ffmpeg("sh")).name == "sh"


def test_resolve_rejects_missing_and_non_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A missing or non-executable binary is a ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=r"transform\.ffmpeg.*not found"):
        resolve_ffmpeg(str(tmp_path / "nope"))
    plain = tmp_path / "ffmpeg"
    plain.write_text("not executable")
    monkeypatch.setenv(ENV_FFMPEG, str(plain))
    with pytest.raises(ConfigError, match=rf"{ENV_FFMPEG}.*not executable"):
        resolve_ffmpeg(None)
