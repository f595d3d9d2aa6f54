"""The transform stage: probe parsing and argv building (pure), and the real ffmpeg runner."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from resizer.errors import TransformFailed, TransformTimeout, UndecodableSource, UnsupportedMedia
from resizer.options import Fit, Level, Mode, OutputFormat, TransformOptions
from resizer.transform.argv import (
    EncoderSettings,
    SizePlan,
    build_argv,
    output_span_ms,
    plan_size,
    sheet_layout,
    sprite_times,
    video_scale_filter,
)
from resizer.transform.base import MediaInfo
from resizer.transform.fake import FakeTransformer
from resizer.transform.probe import parse_probe_output
from resizer.transform.runner import FfmpegTransformer, resolve_ffmpeg
from resizer.transform.vtt import build_thumbnail_vtt, vtt_timestamp
from tests.avsync import (
    AUDIO_FRAME,
    audio_start,
    beep_time,
    flash_time,
    init_segment,
    make_event_clip,
    top_level_boxes,
    video_frames,
)
from tests.media import ffmpeg_banner, ffmpeg_exe, make_test_video

BANNERS = Path(__file__).parent / "banners"
SETTINGS = EncoderSettings()
HD = MediaInfo(
    duration_ms=5310, width=1280, height=720, has_audio=True, video_codec="h264", fps=25.0
)
SILENT = MediaInfo(duration_ms=2000, width=640, height=272, has_audio=False, video_codec="h264")


def banner(name: str) -> str:
    return (BANNERS / f"{name}.txt").read_text()


# --- probe (pure) -------------------------------------------------------------------------


def test_probe_reads_real_footage_with_surround_audio() -> None:
    """Big Buck Bunny: 1280x720 h264 at 25 fps, 5.31 s, with audio."""
    info = parse_probe_output(banner("bigbuckbunny"))
    assert info == MediaInfo(5310, 1280, 720, True, "h264", 25.0, 0)


def test_probe_reads_footage_without_audio() -> None:
    """bikes.mp4 has no audio stream."""
    info = parse_probe_output(banner("bikes"))
    assert (info.width, info.height, info.has_audio, info.duration_ms) == (640, 272, False, 10_000)


def test_probe_reads_phone_rotation() -> None:
    """A display matrix of -90 degrees is a clockwise rotation of 90: width and height swap."""
    info = parse_probe_output(banner("rotated-phone"))
    assert info.rotation == 90
    assert (info.display_width, info.display_height) == (240, 320)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("text-file", UndecodableSource),
        ("audio-only", UnsupportedMedia),
        ("png-image", UnsupportedMedia),
    ],
)
def test_probe_refuses_what_is_not_a_video(name: str, error: type[Exception]) -> None:
    """Garbage is 422 (undecodable); audio-only files and still images are 415."""
    with pytest.raises(error):
        parse_probe_output(banner(name))


def test_probe_ignores_cover_art_as_video() -> None:
    """An attached picture is not a video stream."""
    text = banner("audio-only").replace(
        "  Stream #0:0: Audio",
        "  Stream #0:1: Video: mjpeg, yuvj420p, 500x500, 90k tbn (attached pic)\n"
        "  Stream #0:0: Audio",
    )
    with pytest.raises(UnsupportedMedia):
        parse_probe_output(text)


@given(st.text(max_size=400))
def test_probe_never_crashes_on_arbitrary_text(text: str) -> None:
    """No banner text raises anything but the two ResizerErrors (files may be hostile)."""
    with contextlib.suppress(UndecodableSource, UnsupportedMedia):
        parse_probe_output(text)


@given(st.integers(0, 5000), st.text(alphabet="0123456789x:, ", max_size=40))
def test_probe_survives_mangled_real_banners(cut: int, junk: str) -> None:
    """Truncated or spliced real banners are parsed or refused, never a crash."""
    text = banner("bigbuckbunny")
    with contextlib.suppress(UndecodableSource, UnsupportedMedia):
        parse_probe_output(text[:cut] + junk + text[cut:])


# --- argv (pure) --------------------------------------------------------------------------


def argv_for(info: MediaInfo, **options: Any) -> list[str]:
    source = Path("/media/in.mp4")
    return build_argv("ffmpeg", source, info, TransformOptions(**options), SETTINGS)


def value_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"width": 320},
        {"mode": Mode.FRAME, "format": OutputFormat.JPG},
        {"mode": Mode.FRAME, "format": OutputFormat.PNG, "time_ms": 99_000},
    ],
)
def test_source_is_read_only_through_the_whitelists(options: dict[str, object]) -> None:
    """Every command restricts protocols and demuxers before -i, and writes to stdout."""
    argv = argv_for(HD, **options)
    source_at = argv.index("-i")
    assert argv.index("-protocol_whitelist") < source_at
    assert value_after(argv, "-protocol_whitelist") == "file,pipe"
    assert argv.index("-format_whitelist") < source_at
    assert argv[source_at + 1] == "file:/media/in.mp4"
    assert argv[-1] == "pipe:1"
    assert "-nostdin" in argv


def test_video_is_fragmented_h264_and_aac() -> None:
    """Video output: H.264 yuv420p + AAC stereo in fragmented MP4 to a pipe."""
    argv = argv_for(HD, width=320)
    assert value_after(argv, "-c:v") == "libx264"
    assert value_after(argv, "-pix_fmt") == "yuv420p"
    assert value_after(argv, "-c:a") == "aac"
    assert value_after(argv, "-ac") == "2"
    assert "frag_keyframe" in value_after(argv, "-movflags")
    assert "empty_moov" in value_after(argv, "-movflags")
    assert value_after(argv, "-f") == "mp4"


def test_no_audio_map_without_audio() -> None:
    """A source without audio gets no audio mapping or encoder."""
    argv = argv_for(SILENT)
    assert "0:a:0" not in argv
    assert "-c:a" not in argv
    assert "0:a:0" in argv_for(HD)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (320, None, "scale=320:-2"),
        (321, None, "scale=320:-2"),
        (None, 101, "scale=-2:100"),
        (None, None, "scale=trunc(iw/2)*2:trunc(ih/2)*2"),
        (300, 300, "scale=300:300:force_original_aspect_ratio=decrease:force_divisible_by=2"),
    ],
)
def test_video_dimensions_are_always_even(
    width: int | None, height: int | None, expected: str
) -> None:
    """H.264 4:2:0 needs even sizes: odd requests round down, free sides use -2."""
    assert video_scale_filter(width, height, "lanczos") == f"{expected}:flags=lanczos"


def test_frame_seeks_before_the_input_and_takes_one_frame() -> None:
    """A frame at 2 s: -ss 2 before -i (fast seek), one frame, no audio, JPEG."""
    argv = argv_for(HD, mode=Mode.FRAME, format=OutputFormat.JPG, time_ms=2000)
    assert argv.index("-ss") < argv.index("-i")
    assert value_after(argv, "-ss") == "2.000"
    assert value_after(argv, "-frames:v") == "1"
    assert "-an" in argv
    assert value_after(argv, "-c:v") == "mjpeg"


def test_frame_past_the_end_reads_the_tail() -> None:
    """A frame time past the end seeks into the last half second instead of past the end."""
    argv = argv_for(HD, mode=Mode.FRAME, format=OutputFormat.PNG, time_ms=60_000)
    assert float(value_after(argv, "-ss")) == pytest.approx(5.31 - 0.5)
    assert "reverse" in value_after(argv, "-vf")
    assert value_after(argv, "-c:v") == "png"


# --- runner (real ffmpeg) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    garbage = folder / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video\x00" * 100)
    return {
        "short": make_test_video(folder / "short.mp4", 320, 240, seconds=2, audio=True),
        "long": make_test_video(folder / "long.mp4", 640, 360, seconds=30, audio=True),
        "garbage": garbage,
    }


async def drain(output: trio.abc.ReceiveStream) -> None:
    while await output.receive_some(65536):
        pass


@pytest.fixture
def transformer() -> FfmpegTransformer:
    return FfmpegTransformer(resolve_ffmpeg(None), kill_grace=1.0)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it has exited, which is what matters.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1].startswith("Z")


def ffmpeg_children() -> Iterator[int]:
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().split(") ", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                is_ffmpeg = b"ffmpeg" in cmd.read()
        except OSError:
            continue
        if fields[1] == me and is_ffmpeg and fields[0] != "Z":
            yield int(entry)


async def test_probe_runs_ffmpeg_on_a_real_file(
    transformer: FfmpegTransformer, clips: dict[str, Path]
) -> None:
    """The probe reads size, duration and audio from the generated clip."""
    info = await transformer.probe(clips["short"])
    assert (info.width, info.height, info.has_audio) == (320, 240, True)
    with pytest.raises(UndecodableSource):
        await transformer.probe(clips["garbage"])


async def test_video_streams_before_ffmpeg_finishes(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """The first fragment arrives while ffmpeg still runs; the result decodes as H.264+AAC."""
    info = await transformer.probe(clips["long"])
    options = TransformOptions(width=320)
    received = bytearray()
    async with transformer.open_output(clips["long"], info, options) as output:
        received += await output.receive_some(65536)
        assert output.returncode is None  # 30 s of video is far from done
        while chunk := await output.receive_some(65536):
            received += chunk
        assert output.returncode == 0
    assert bytes(received[4:8]) == b"ftyp"
    out = tmp_path / "out.mp4"
    out.write_bytes(received)
    result = parse_probe_output(ffmpeg_banner(out))
    assert (result.video_codec, result.width, result.height, result.has_audio) == (
        "h264",
        320,
        180,
        True,
    )


@pytest.mark.parametrize("how", ["break", "cancel", "error"])
async def test_leaving_early_kills_ffmpeg(
    transformer: FfmpegTransformer, clips: dict[str, Path], how: str
) -> None:
    """Breaking off, cancellation or an error in the consumer leaves no ffmpeg behind."""
    info = await transformer.probe(clips["long"])
    pid = None

    class Stop(Exception):
        pass

    with trio.CancelScope() as scope:
        try:
            async with transformer.open_output(clips["long"], info, TransformOptions()) as out:
                pid = out.pid
                await out.receive_some(65536)
                if how == "cancel":
                    scope.cancel()
                    await trio.sleep_forever()
                if how == "error":
                    raise Stop
        except Stop:
            pass
    assert pid is not None
    assert process_gone(pid)
    assert not list(ffmpeg_children())


async def test_failure_is_an_error_not_an_end_of_stream(
    clips: dict[str, Path],
) -> None:
    """When ffmpeg exits non-zero, receive_some raises TransformFailed instead of b''."""
    broken = FfmpegTransformer(resolve_ffmpeg(None), EncoderSettings(video_codec="no-such-codec"))
    info = await broken.probe(clips["short"])
    async with broken.open_output(clips["short"], info, TransformOptions()) as output:
        with pytest.raises(TransformFailed, match=r"no-such-codec|Unknown encoder"):
            await drain(output)


async def test_wall_clock_timeout(clips: dict[str, Path]) -> None:
    """A transform running past its timeout raises TransformTimeout and is killed."""
    slow = FfmpegTransformer(resolve_ffmpeg(None), timeout=0.3)
    info = await slow.probe(clips["long"])
    async with slow.open_output(clips["long"], info, TransformOptions(width=1280)) as output:
        with pytest.raises(TransformTimeout):
            await drain(output)
        pid = output.pid
    assert process_gone(pid)


def test_resolve_ffmpeg_prefers_configuration(tmp_path: Path) -> None:
    """An explicit path wins; a missing one is a configuration error naming the key."""
    assert resolve_ffmpeg(ffmpeg_exe()) == ffmpeg_exe()
    with pytest.raises(Exception, match=r"transform\.ffmpeg"):
        resolve_ffmpeg(str(tmp_path / "nope"))


async def test_fake_transformer_counts_runs_and_fails_on_request() -> None:
    """The fake delivers deterministic bytes, counts runs and fails after N bytes."""
    fake = FakeTransformer(size=2500, chunk_size=1000, fail_after=1500)
    async with fake.open_output(Path("x"), fake.info, TransformOptions()) as output:
        assert len(await output.receive_some()) == 1000
        assert len(await output.receive_some()) == 500
        with pytest.raises(TransformFailed):
            await output.receive_some()
    assert (fake.runs_started, fake.runs_failed, fake.running) == (1, 1, 0)


# --- sizes, spans and all modes (pure) ------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "fit", "expected"),
    [
        (160, None, Fit.CONTAIN, SizePlan((160, 90))),
        (None, 90, Fit.CONTAIN, SizePlan((160, 90))),
        (300, 300, Fit.CONTAIN, SizePlan((300, 168))),
        (300, 300, Fit.COVER, SizePlan((534, 300), crop=(300, 300))),
        (2000, 2000, Fit.SCALE_DOWN, SizePlan((1280, 720))),
        (2000, None, Fit.CONTAIN, SizePlan((2000, 1124))),
        (161, None, Fit.CONTAIN, SizePlan((160, 90))),
        (None, None, Fit.COVER, SizePlan((1280, 720))),
    ],
)
def test_plan_size_for_video(
    width: int | None, height: int | None, fit: Fit, expected: SizePlan
) -> None:
    """contain fits inside, cover fills and crops, scale-down never upscales; all even."""
    plan = plan_size((1280, 720), width, height, fit, even=True)
    assert plan == expected
    assert all(v % 2 == 0 for v in plan.output)


@given(
    st.integers(16, 4000),
    st.integers(16, 4000),
    st.integers(10, 2000),
    st.integers(10, 2000),
    st.sampled_from(list(Fit)),
)
def test_tiles_are_always_exactly_the_box(
    src_w: int, src_h: int, width: int, height: int, fit: Fit
) -> None:
    """Spritesheet tiles are exactly width x height for every source shape and fit."""
    plan = plan_size((src_w, src_h), width, height, fit, exact_box=True)
    assert plan.output == (width, height)
    if fit is Fit.COVER:
        assert plan.scale[0] >= width
        assert plan.scale[1] >= height
    else:
        assert plan.scale[0] <= width
        assert plan.scale[1] <= height
    if fit is Fit.SCALE_DOWN:
        assert plan.scale[0] <= src_w
        assert plan.scale[1] <= src_h


def test_video_argv_for_every_video_option() -> None:
    """time/duration/fps/audio/quality/compression map to -ss/-t/fps/-an/-crf/-preset."""
    argv = argv_for(
        HD,
        time_ms=1500,
        duration_ms=2000,
        fps=10,
        audio=False,
        quality=Level.HIGH,
        compression=Level.HIGH,
        width=640,
        height=640,
        fit=Fit.COVER,
    )
    assert argv.index("-ss") < argv.index("-i")
    assert value_after(argv, "-ss") == "1.500"
    assert value_after(argv, "-t") == "2.000"
    assert value_after(argv, "-vf").startswith(
        "tpad=stop_mode=clone:stop_duration=0.5,fps=10:start_time=0,scale=1138:640"
    )
    assert "crop=640:640" in value_after(argv, "-vf")
    assert "-an" in argv
    assert "0:a:0" not in argv
    assert (value_after(argv, "-crf"), value_after(argv, "-preset")) == ("19", "medium")
    assert value_after(argv, "-g") == "20"


def test_output_never_exceeds_the_maximum_duration() -> None:
    """Without duration the output runs to the end, capped at max_output_seconds."""
    long = MediaInfo(3_600_000, 1280, 720, True, "h264", 25.0)
    assert output_span_ms(TransformOptions(), long, 300) == 300_000
    assert output_span_ms(TransformOptions(time_ms=5000), HD, 300) == 310
    assert output_span_ms(TransformOptions(duration_ms=2000), HD, 300) == 2000


def test_audio_argv_and_silent_sources() -> None:
    """mode=audio maps the first audio stream to fragmented AAC; no audio track -> 415."""
    argv = argv_for(HD, mode=Mode.AUDIO, format=OutputFormat.M4A, quality=Level.LOW)
    assert "-vn" in argv
    assert value_after(argv, "-map") == "0:a:0"
    assert value_after(argv, "-b:a") == "96k"
    assert value_after(argv, "-frag_duration") == "1000000"
    with pytest.raises(UnsupportedMedia):
        argv_for(SILENT, mode=Mode.AUDIO, format=OutputFormat.M4A)


def test_frame_formats_and_quality() -> None:
    """webp uses libwebp at the quality's level; jpg uses -q:v."""
    webp = argv_for(HD, mode=Mode.FRAME, format=OutputFormat.WEBP, quality=Level.HIGH)
    assert (value_after(webp, "-c:v"), value_after(webp, "-quality")) == ("libwebp", "90")
    jpg = argv_for(HD, mode=Mode.FRAME, format=OutputFormat.JPG, quality=Level.LOW)
    assert value_after(jpg, "-q:v") == "8"


def test_spritesheet_argv_samples_n_frames_into_a_grid() -> None:
    """16 tiles of 160x90 from 2 s: fps=16000/2000, at most 16 frames, a 4x4 tile grid."""
    argv = argv_for(
        HD,
        mode=Mode.SPRITESHEET,
        format=OutputFormat.JPG,
        width=160,
        height=90,
        time_ms=1000,
        duration_ms=2000,
    )
    graph = value_after(argv, "-vf")
    assert graph.startswith("fps=16000/2000,trim=end_frame=16,scale=160:90")
    assert graph.endswith("tile=4x4:nb_frames=16")
    assert value_after(argv, "-frames:v") == "1"
    with pytest.raises(ValueError, match="WebVTT"):
        argv_for(HD, mode=Mode.SPRITESHEET, format=OutputFormat.VTT, width=160, height=90)


@pytest.mark.parametrize(
    ("count", "layout"), [(1, (1, 1)), (2, (2, 1)), (9, (3, 3)), (10, (4, 3)), (100, (10, 10))]
)
def test_sheet_layout(count: int, layout: tuple[int, int]) -> None:
    """ceil(sqrt(n)) columns and as many rows as needed."""
    assert sheet_layout(count) == layout


def vtt_ms(stamp: str) -> int:
    hours, minutes, rest = stamp.split(":")
    seconds, millis = rest.split(".")
    return ((int(hours) * 60 + int(minutes)) * 60 + int(seconds)) * 1000 + int(millis)


@given(
    st.integers(1, 100),
    st.integers(0, 600_000),
    st.integers(1, 400_000),
    st.integers(10, 2000),
    st.integers(10, 2000),
)
def test_vtt_cues_tile_the_span_and_the_sheet(
    count: int, start: int, span: int, width: int, height: int
) -> None:
    """Cues are contiguous over [start, start+span] (span capped at the maximum) and their
    rectangles tile the cols x rows grid without overlap, inside the sheet."""
    info = MediaInfo(start + span, 1280, 720, True, "h264", 25.0)
    options = TransformOptions(
        mode=Mode.SPRITESHEET, width=width, height=height, time_ms=start, image_count=count,
        format=OutputFormat.VTT,
    )  # fmt: skip
    text = build_thumbnail_vtt("/s.jpg?a=1&b=2", options, info, 300)
    assert text.startswith("WEBVTT\n\n")
    pattern = r"(\S+) --> (\S+)\n/s\.jpg\?a=1&b=2#xywh=(\d+),(\d+),(\d+),(\d+)\n"
    cues = re.findall(pattern, text)
    assert len(cues) == count
    assert text.count(" --> ") == count
    columns, rows = sheet_layout(count)
    spots = set()
    for _, _, x, y, w, h in cues:
        assert (int(w), int(h)) == (width, height)
        assert int(x) % width == 0
        assert int(y) % height == 0
        assert int(x) + width <= columns * width
        assert int(y) + height <= rows * height
        spots.add((int(x), int(y)))
    assert len(spots) == count  # same-size grid-aligned cells: distinct means no overlap
    times = [(vtt_ms(a), vtt_ms(b)) for a, b, *_ in cues]
    assert all(begin <= end for begin, end in times)
    for previous, current in itertools.pairwise(times):
        assert previous[1] == current[0]  # contiguous, no overlap
    assert times[0][0] == start
    assert times[-1][1] == start + min(span, 300_000)
    assert [begin for begin, _ in times] == sprite_times(start, min(span, 300_000), count)


def test_vtt_timestamps() -> None:
    """Cue times are HH:MM:SS.mmm, hours included (WebVTT allows omitting them, players vary)."""
    assert vtt_timestamp(0) == "00:00:00.000"
    assert vtt_timestamp(3_723_004) == "01:02:03.004"


# --- every mode, pure: exact filters and the documented tables ------------------------------

SMALL = MediaInfo(2000, 320, 240, has_audio=True, video_codec="h264", fps=25.0)


@pytest.mark.parametrize(
    ("width", "height", "fit", "graph"),
    [
        (640, 480, Fit.CONTAIN, "scale=640:480:flags=lanczos,setsar=1"),
        (640, 480, Fit.SCALE_DOWN, "scale=320:240:flags=lanczos,setsar=1"),
        (640, None, Fit.SCALE_DOWN, "scale=320:240:flags=lanczos,setsar=1"),
        (160, 160, Fit.SCALE_DOWN, "scale=160:120:flags=lanczos,setsar=1"),
        (640, 360, Fit.COVER, "scale=640:480:flags=lanczos,crop=640:360,setsar=1"),
        (101, 101, Fit.COVER, "scale=134:100:flags=lanczos,crop=100:100,setsar=1"),
        (None, 100, Fit.COVER, "scale=132:100:flags=lanczos,setsar=1"),
    ],
)
def test_video_fit_filters(width: int | None, height: int | None, fit: Fit, graph: str) -> None:
    """Video fits from a 320x240 source: scale-down never upscales, cover scales up then
    crops to the (even) box, one side keeps the aspect."""
    filters = value_after(argv_for(SMALL, width=width, height=height, fit=fit), "-vf")
    assert filters.split(",", 2)[2] == graph  # after tpad and fps (test_transform_argv.py)


@pytest.mark.parametrize(
    ("level", "crf", "bitrate", "qscale", "webp"),
    [
        (Level.LOW, "28", "96k", "8", "50"),
        (Level.MEDIUM, "23", "128k", "4", "75"),
        (Level.HIGH, "19", "160k", "2", "90"),
        (Level.AUTO, "23", "128k", "3", "80"),
    ],
)
def test_quality_table(level: Level, crf: str, bitrate: str, qscale: str, webp: str) -> None:
    """quality picks the documented CRF, AAC bitrate, JPEG -q:v and WebP quality."""
    mp4 = argv_for(HD, quality=level)
    assert (value_after(mp4, "-crf"), value_after(mp4, "-b:a")) == (crf, bitrate)
    m4a = argv_for(HD, mode=Mode.AUDIO, format=OutputFormat.M4A, quality=level)
    assert value_after(m4a, "-b:a") == bitrate
    jpg = argv_for(HD, mode=Mode.FRAME, format=OutputFormat.JPG, quality=level)
    assert value_after(jpg, "-q:v") == qscale
    sheet = argv_for(
        HD, mode=Mode.SPRITESHEET, format=OutputFormat.JPG, width=80, height=60, quality=level
    )
    assert value_after(sheet, "-q:v") == qscale
    still = argv_for(HD, mode=Mode.FRAME, format=OutputFormat.WEBP, quality=level)
    assert value_after(still, "-quality") == webp


@pytest.mark.parametrize(
    ("level", "preset"),
    [
        (Level.LOW, "ultrafast"),
        (Level.MEDIUM, "veryfast"),
        (Level.HIGH, "medium"),
        (Level.AUTO, "veryfast"),
    ],
)
def test_compression_table(level: Level, preset: str) -> None:
    """compression picks the documented x264 preset (auto favours latency)."""
    assert value_after(argv_for(HD, compression=level), "-preset") == preset


def test_clip_is_capped_by_the_configured_maximum() -> None:
    """-t is min(duration or rest of the source, max_output_seconds), for video and audio."""
    long = MediaInfo(3_600_000, 1280, 720, True, "h264", 25.0)
    short = EncoderSettings(max_output_seconds=60)
    source = Path("/media/in.mp4")
    for mode, fmt in [(Mode.VIDEO, OutputFormat.MP4), (Mode.AUDIO, OutputFormat.M4A)]:
        rest = build_argv("ffmpeg", source, long, TransformOptions(mode=mode, format=fmt), short)
        assert value_after(rest, "-t") == "60.000"
        asked = TransformOptions(mode=mode, format=fmt, time_ms=10_000, duration_ms=5000)
        assert value_after(build_argv("ffmpeg", source, long, asked, short), "-t") == "5.000"
        assert "-ss" not in rest  # no seek at all from the start


def test_audio_mode_is_fragmented_aac_without_video() -> None:
    """m4a: only the first audio stream, stereo AAC, time-cut fragments, MP4 to the pipe."""
    argv = argv_for(HD, mode=Mode.AUDIO, format=OutputFormat.M4A, time_ms=1000, duration_ms=2000)
    assert argv.index("-ss") < argv.index("-i")
    assert (value_after(argv, "-ss"), value_after(argv, "-t")) == ("1.000", "2.000")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-map"] == ["0:a:0"]
    assert {"-vn", "-sn", "-dn"} <= set(argv)
    assert (value_after(argv, "-c:a"), value_after(argv, "-ac")) == ("aac", "2")
    assert value_after(argv, "-movflags") == "frag_keyframe+empty_moov+default_base_moof"
    assert argv[-3:] == ["-f", "mp4", "pipe:1"]
    with pytest.raises(UnsupportedMedia, match="no audio"):
        argv_for(SILENT, mode=Mode.AUDIO, format=OutputFormat.M4A)


@pytest.mark.parametrize("fmt", [OutputFormat.JPG, OutputFormat.WEBP])
def test_odd_cover_images_crop_in_full_chroma(fmt: OutputFormat) -> None:
    """4:2:0 crop would round 101x77 down to 100x76, so jpg/webp crop in yuv444p."""
    argv = argv_for(SMALL, mode=Mode.FRAME, format=fmt, width=101, height=77, fit=Fit.COVER)
    graph = "scale=103:77:flags=lanczos,format=yuv444p,crop=101:77,setsar=1"
    assert value_after(argv, "-vf") == graph


LETTERBOX = "scale=90:51:flags=lanczos,format=yuv444p,pad=90:90:(ow-iw)/2:(oh-ih)/2:black"


@pytest.mark.parametrize(
    ("fit", "tile"),
    [
        (Fit.CONTAIN, LETTERBOX),
        (Fit.SCALE_DOWN, LETTERBOX),
        (Fit.COVER, "scale=160:90:flags=lanczos,format=yuv444p,crop=90:90"),
    ],
)
def test_spritesheet_tiles_are_padded_or_cropped_to_the_box(fit: Fit, tile: str) -> None:
    """Square tiles from 16:9: contain/scale-down letterbox in black, cover centre-crops."""
    argv = argv_for(
        HD, mode=Mode.SPRITESHEET, format=OutputFormat.JPG, width=90, height=90, fit=fit,
        image_count=5,
    )  # fmt: skip
    assert (
        value_after(argv, "-vf")
        == f"fps=5000/5310,trim=end_frame=5,{tile},setsar=1,tile=3x2:nb_frames=5"
    )
    assert value_after(argv, "-t") == "5.310"
    assert "-ss" not in argv


@given(st.integers(1, 100), st.integers(0, 600_000), st.integers(1, 300_000))
def test_sprite_times_are_evenly_spread(count: int, start: int, span: int) -> None:
    """n ascending instants from start, gaps of floor/ceil(span/n), all before start+span."""
    times = sprite_times(start, span, count)
    assert len(times) == count
    assert times[0] == start
    gaps = [b - a for a, b in itertools.pairwise([*times, start + span])]
    assert all(span // count <= gap <= -(-span // count) for gap in gaps)


# --- every mode, real ffmpeg: what comes out decodes as asked ------------------------------

_SIZE_RE = re.compile(r"Video: .*?, (\d+)x(\d+)")
_DURATION_RE = re.compile(r"Duration: (\d+):(\d+):(\d+\.\d+)")


async def render(
    transformer: FfmpegTransformer, source: Path, tmp_path: Path, **options: Any
) -> Path:
    """Run one transformation to completion and write its bytes to a file."""
    info = await transformer.probe(source)
    wanted = TransformOptions(**options)
    received = bytearray()
    async with transformer.open_output(source, info, wanted) as output:
        while chunk := await output.receive_some(65536):
            received += chunk
    path = tmp_path / f"out.{wanted.extension}"
    path.write_bytes(received)
    return path


def image_size(path: Path) -> tuple[int, int]:
    match = _SIZE_RE.search(ffmpeg_banner(path))
    assert match is not None
    return int(match[1]), int(match[2])


def banner_seconds(path: Path) -> float:
    match = _DURATION_RE.search(ffmpeg_banner(path))
    assert match is not None
    return int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3])


def video_frame_count(path: Path) -> int:
    """Frames actually decoded (the container duration includes the B-frame start delay)."""
    argv = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path)]
    result = subprocess.run(
        [*argv, "-map", "0:v:0", "-f", "framecrc", "-"], capture_output=True, check=True
    )
    return sum(1 for line in result.stdout.splitlines() if line and not line.startswith(b"#"))


def gray_pixels(path: Path) -> bytes:
    argv = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path)]
    argv += ["-f", "rawvideo", "-pix_fmt", "gray", "-"]
    return subprocess.run(argv, capture_output=True, check=True).stdout


async def test_video_clip_has_the_asked_length_and_rate(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """time=0.5s&duration=1s&fps=10 gives 1 s (10 frames at 10 fps) with audio."""
    out = await render(transformer, clips["short"], tmp_path, time_ms=500, duration_ms=1000, fps=10)
    info = parse_probe_output(ffmpeg_banner(out))
    assert (info.fps, info.has_audio) == (10.0, True)
    assert abs(video_frame_count(out) / 10 - 1.0) <= 0.2


async def test_video_without_audio_when_asked(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """audio=false drops the source's audio stream."""
    out = await render(transformer, clips["short"], tmp_path, audio=False, width=160)
    info = parse_probe_output(ffmpeg_banner(out))
    assert (info.width, info.height, info.has_audio) == (160, 120, False)


@pytest.mark.parametrize(
    ("width", "height", "fit", "size"),
    [
        (100, 100, Fit.COVER, (100, 100)),
        (640, 480, Fit.SCALE_DOWN, (320, 240)),
    ],
)
async def test_video_fit_sizes(
    transformer: FfmpegTransformer,
    clips: dict[str, Path],
    tmp_path: Path,
    width: int,
    height: int,
    fit: Fit,
    size: tuple[int, int],
) -> None:
    """cover fills the box exactly; scale-down leaves a 320x240 source at 320x240."""
    out = await render(transformer, clips["short"], tmp_path, width=width, height=height, fit=fit)
    info = parse_probe_output(ffmpeg_banner(out))
    assert (info.width, info.height, info.video_codec) == (*size, "h264")


@pytest.mark.parametrize(
    ("fmt", "magic"),
    [(OutputFormat.WEBP, b"WEBP"), (OutputFormat.JPG, b"\xff\xd8\xff"), (OutputFormat.PNG, b"PNG")],
)
async def test_frame_formats_keep_odd_cover_sizes(
    transformer: FfmpegTransformer,
    clips: dict[str, Path],
    tmp_path: Path,
    fmt: OutputFormat,
    magic: bytes,
) -> None:
    """A 101x77 cover frame is exactly 101x77 in every image format (webp is RIFF/WEBP)."""
    out = await render(
        transformer, clips["short"], tmp_path, mode=Mode.FRAME, format=fmt, time_ms=1000,
        width=101, height=77, fit=Fit.COVER,
    )  # fmt: skip
    data = out.read_bytes()
    if fmt is OutputFormat.WEBP:
        assert data[:4] == b"RIFF"
        assert data[8:12] == magic
    else:
        assert magic in data[:8]
    assert image_size(out) == (101, 77)


@pytest.mark.parametrize(
    ("count", "width", "height", "fit"),
    [
        (1, 80, 60, Fit.COVER),
        (10, 41, 41, Fit.CONTAIN),  # padded tiles; cells 10 and 11 of the 4x3 grid stay empty
        (16, 81, 61, Fit.SCALE_DOWN),
        (100, 32, 18, Fit.COVER),  # more tiles than the 50 frames of the clip
    ],
)
async def test_spritesheet_has_exactly_n_tiles(
    transformer: FfmpegTransformer,
    clips: dict[str, Path],
    tmp_path: Path,
    count: int,
    width: int,
    height: int,
    fit: Fit,
) -> None:
    """The sheet is (cols*W)x(rows*H) and exactly the first n grid cells hold a picture."""
    out = await render(
        transformer, clips["short"], tmp_path, mode=Mode.SPRITESHEET, format=OutputFormat.JPG,
        width=width, height=height, fit=fit, image_count=count,
    )  # fmt: skip
    columns, rows = sheet_layout(count)
    assert image_size(out) == (columns * width, rows * height)
    pixels = gray_pixels(out)
    stride = columns * width
    for cell in range(columns * rows):
        x0, y0 = (cell % columns) * width, (cell // columns) * height
        # The centre half of the cell: clear of letterboxing and JPEG ringing at the edges.
        values = [
            pixels[y * stride + x]
            for y in range(y0 + height // 4, y0 + 3 * height // 4)
            for x in range(x0 + width // 4, x0 + 3 * width // 4)
        ]
        mean = sum(values) / len(values)
        assert (mean > 30) == (cell < count), f"cell {cell}: mean luma {mean:.0f}"


async def test_audio_mode_decodes_as_aac_only(
    transformer: FfmpegTransformer, clips: dict[str, Path], tmp_path: Path
) -> None:
    """mode=audio with time/duration: an AAC-only MP4 of about the asked length."""
    out = await render(
        transformer, clips["short"], tmp_path, mode=Mode.AUDIO, format=OutputFormat.M4A,
        time_ms=500, duration_ms=1000,
    )  # fmt: skip
    assert out.read_bytes()[4:8] == b"ftyp"
    text = ffmpeg_banner(out)
    assert re.search(r"Audio: aac .*stereo", text)
    assert "Video:" not in text
    assert abs(banner_seconds(out) - 1.0) <= 0.2


# --- A/V sync, the shared init and the last frame (real ffmpeg) -----------------------------

REAL_FOOTAGE = Path("/work/shared/media/bigbuckbunny.mp4")  # 25 fps, 5.31 s, 5.1 AAC
HALF_FRAME = 1 / 50  # the 25 fps event clips' frames land on a grid that starts at the instant


@pytest.fixture(scope="module")
def event_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    folder = tmp_path_factory.mktemp("events")
    return {delay: make_event_clip(folder / f"late{delay}.mp4", delay) for delay in (0.0, 0.1)}


@pytest.mark.parametrize("time_ms", [0, 480, 500])
@pytest.mark.parametrize("audio_delay", [0.0, 0.1], ids=["together", "audio-later"])
async def test_video_tracks_start_at_the_instant_and_stay_in_step(
    transformer: FfmpegTransformer,
    event_clips: dict[float, Path],
    tmp_path: Path,
    audio_delay: float,
    time_ms: int,
) -> None:
    """Both tracks start at 0 (no B-frame delay before the video), the flash is where it was
    in the source, and the beep is as far from it as in the source, within one AAC frame
    (where the source's audio starts later, the output keeps that offset, as silence)."""
    source = event_clips[audio_delay]
    out = await render(transformer, source, tmp_path, time_ms=time_ms, width=160)
    start = time_ms / 1000
    assert video_frames(out)[0][0] == pytest.approx(0, abs=AUDIO_FRAME)
    assert audio_start(out) == pytest.approx(0, abs=AUDIO_FRAME)
    flash, beep = flash_time(out), beep_time(out)
    source_flash, source_beep = flash_time(source), beep_time(source)
    assert flash is not None
    assert beep is not None
    assert source_flash is not None
    assert source_beep is not None
    assert flash == pytest.approx(source_flash - start, abs=HALF_FRAME + 1e-6)
    assert beep - flash == pytest.approx(source_beep - source_flash, abs=AUDIO_FRAME)


async def test_video_init_is_the_same_for_every_start(
    transformer: FfmpegTransformer, event_clips: dict[float, Path], tmp_path: Path
) -> None:
    """ftyp+moov do not depend on time or duration (HLS runs share one init), and hold the
    edit lists that state the video's B-frame delay; no sample is in the moov."""
    source = event_clips[0.1]
    inits = set()
    for time_ms, duration_ms in [(0, None), (500, None), (1300, 400)]:
        out = await render(transformer, source, tmp_path, time_ms=time_ms, duration_ms=duration_ms)
        data = out.read_bytes()
        kinds = [kind for kind, _ in top_level_boxes(data)]
        assert kinds[:3] == [b"ftyp", b"moov", b"moof"]
        assert kinds.count(b"moof") == kinds.count(b"mdat")
        inits.add(init_segment(data))
    (init,) = inits
    assert init.count(b"elst") == 2  # one per track
    assert b"trun" not in init


@pytest.mark.parametrize(("time_ms", "duration_ms"), [(1970, 10), (1999, None), (1961, 1)])
async def test_start_inside_the_last_frame_gives_that_frame(
    transformer: FfmpegTransformer,
    clips: dict[str, Path],
    tmp_path: Path,
    time_ms: int,
    duration_ms: int | None,
) -> None:
    """The 2 s clip's last frame is on screen from 1.96 s: a start inside it is a one-frame
    video at 0, not an output without a frame."""
    out = await render(
        transformer, clips["short"], tmp_path, time_ms=time_ms, duration_ms=duration_ms
    )
    assert [time for time, _ in video_frames(out)] == [0.0]


@pytest.mark.skipif(not REAL_FOOTAGE.exists(), reason="no shared real footage here")
@pytest.mark.parametrize("time_ms", [0, 2000, 5290])
async def test_real_footage_starts_both_tracks_at_the_instant(
    transformer: FfmpegTransformer, tmp_path: Path, time_ms: int
) -> None:
    """Big Buck Bunny (5.1 AAC, B-frames): video and audio start at 0 from any instant; at
    5.29 s, past its last frame's end (5.28 s) but before its audio's, that frame remains."""
    out = await render(transformer, REAL_FOOTAGE, tmp_path, time_ms=time_ms, width=320)
    frames = video_frames(out)
    assert frames, "no video frame"
    assert frames[0][0] == pytest.approx(0, abs=AUDIO_FRAME)
    if time_ms == 5290:
        assert len(frames) == 1
    else:
        assert audio_start(out) == pytest.approx(0, abs=AUDIO_FRAME)
