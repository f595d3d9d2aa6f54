"""build_argv / probe_argv / plan_size: the exact ffmpeg command lines, per mode, format, size
and fit (tests/test_transform.py covers spritesheets, audio and the VTT track)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resizer.errors import InvalidOption
from resizer.options import Fit, Level, Mode, OutputFormat, TransformOptions
from resizer.transform.argv import (
    DEFAULT_INPUT_FORMATS,
    FRAGMENTED_MP4_FLAGS,
    VIDEO_MP4_FLAGS,
    EncoderSettings,
    build_argv,
    plan_size,
    probe_argv,
)
from resizer.transform.base import MediaInfo

FFMPEG = "/opt/ffmpeg"
SOURCE = Path("/srv/cache/src/abc.mp4")
AV = MediaInfo(10_000, 1280, 720, has_audio=True, video_codec="h264", fps=25.0)
SILENT = MediaInfo(10_000, 640, 272, has_audio=False, video_codec="h264", fps=25.0)
PORTRAIT = MediaInfo(10_000, 1280, 720, has_audio=True, video_codec="h264", fps=25.0, rotation=90)
SETTINGS = EncoderSettings()

# Every mode=video graph starts with these (see test_video_timing_filters).
TIMING = "tpad=stop_mode=clone:stop_duration=0.5,fps=source_fps:start_time=0"

SIZES: list[tuple[int | None, int | None]] = [(None, None), (640, None), (None, 360), (640, 640)]
FRAME_FORMATS = [OutputFormat.JPG, OutputFormat.PNG, OutputFormat.WEBP]


def video(
    width: int | None = None, height: int | None = None, fit: Fit = Fit.CONTAIN, **more: object
) -> TransformOptions:
    return TransformOptions(mode=Mode.VIDEO, width=width, height=height, fit=fit, **more)  # type: ignore[arg-type]


def frame(
    time_ms: int = 1000,
    fmt: OutputFormat = OutputFormat.JPG,
    width: int | None = None,
    height: int | None = None,
    fit: Fit = Fit.CONTAIN,
) -> TransformOptions:
    return TransformOptions(
        mode=Mode.FRAME, width=width, height=height, fit=fit, time_ms=time_ms, format=fmt
    )


def argv_of(
    info: MediaInfo, options: TransformOptions, settings: EncoderSettings = SETTINGS
) -> list[str]:
    return build_argv(FFMPEG, SOURCE, info, options, settings)


def value_of(argv: list[str], flag: str) -> str:
    """The argument following the (single) occurrence of ``flag``."""
    assert argv.count(flag) == 1, f"{flag} occurs {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def maps(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "-map"]


def all_options() -> list[TransformOptions]:
    options = [video(w, h, fit) for (w, h), fit in itertools.product(SIZES, Fit)]
    for fmt, (w, h), fit in itertools.product(FRAME_FORMATS, SIZES, Fit):
        options.append(frame(1000, fmt, w, h, fit))
    options += [frame(10_000, fmt) for fmt in FRAME_FORMATS]
    return options


# --- every command ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", all_options(), ids=lambda o: o.canonical())
@pytest.mark.parametrize("info", [AV, SILENT, PORTRAIT], ids=["audio", "silent", "portrait"])
def test_common_prefix_whitelists_and_output(info: MediaInfo, options: TransformOptions) -> None:
    """Every command: quiet flags, both whitelists before -i, source as file:, pipe:1 last."""
    argv = argv_of(info, options)
    assert argv[:7] == [FFMPEG, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y"]
    assert value_of(argv, "-i") == f"file:{SOURCE}"
    source_at = argv.index("-i")
    assert argv.index("-protocol_whitelist") < source_at
    assert value_of(argv, "-protocol_whitelist") == "file,pipe"
    assert argv.index("-format_whitelist") < source_at
    assert value_of(argv, "-format_whitelist") == ",".join(DEFAULT_INPUT_FORMATS)
    assert maps(argv)[0] == "0:V:0"  # capital V: never cover art
    assert value_of(argv, "-map_metadata") == "-1"
    assert argv[-1] == "pipe:1"


def test_whitelist_excludes_file_opening_demuxers() -> None:
    """concat/hls/dash can make ffmpeg open other local files: never allowed by default."""
    assert not {"concat", "hls", "dash", "tty", "lavfi"} & set(DEFAULT_INPUT_FORMATS)


def test_empty_format_list_drops_only_the_format_whitelist() -> None:
    """input_formats=() is an explicit opt-out; the protocol whitelist stays."""
    argv = argv_of(AV, video(), EncoderSettings(input_formats=()))
    assert "-format_whitelist" not in argv
    assert value_of(argv, "-protocol_whitelist") == "file,pipe"


def test_source_with_colon_stays_a_file() -> None:
    """A file named like 'concat:a|b' is read as a file, not interpreted as a protocol."""
    argv = build_argv(FFMPEG, Path("concat:a.mp4|b.mp4"), AV, video(), SETTINGS)
    assert value_of(argv, "-i") == "file:concat:a.mp4|b.mp4"


def test_probe_argv() -> None:
    """The probe is '-i FILE' alone behind the same whitelists (no output: banner only)."""
    assert probe_argv(FFMPEG, SOURCE, SETTINGS) == [
        FFMPEG,
        "-hide_banner",
        "-nostdin",
        "-protocol_whitelist",
        "file,pipe",
        "-format_whitelist",
        ",".join(DEFAULT_INPUT_FORMATS),
        "-i",
        f"file:{SOURCE}",
    ]


@pytest.mark.parametrize(
    "options",
    [
        TransformOptions(mode=Mode.VIDEO, format=OutputFormat.PNG),
        TransformOptions(mode=Mode.FRAME, format=OutputFormat.MP4),
    ],
)
def test_format_must_match_mode(options: TransformOptions) -> None:
    """A mode/format pair option parsing would refuse raises InvalidOption('format')."""
    with pytest.raises(InvalidOption) as caught:
        argv_of(AV, options)
    assert caught.value.param == "format"


# --- mode=video -------------------------------------------------------------------------------


def test_video_with_audio() -> None:
    """H.264 yuv420p veryfast/crf 23, AAC 128k stereo, fragmented MP4, the whole source."""
    argv = argv_of(AV, video())
    assert maps(argv) == ["0:V:0", "0:a:0"]
    assert value_of(argv, "-c:v") == "libx264"
    assert value_of(argv, "-pix_fmt") == "yuv420p"
    assert value_of(argv, "-preset") == "veryfast"
    assert value_of(argv, "-crf") == "23"
    assert value_of(argv, "-threads") == "0"
    assert value_of(argv, "-c:a") == "aac"
    assert value_of(argv, "-b:a") == "128k"
    assert value_of(argv, "-ac") == "2"
    assert value_of(argv, "-movflags") == VIDEO_MP4_FLAGS
    assert value_of(argv, "-use_editlist") == "1"
    assert value_of(argv, "-af") == "aresample=async=1:first_pts=0,atrim=start_sample=1024"
    assert value_of(argv, "-f") == "mp4"
    assert value_of(argv, "-t") == "10.000"
    assert "-ss" not in argv  # time=0: no seek at all
    assert "-frames:v" not in argv


@pytest.mark.parametrize(
    ("info", "options"),
    [(SILENT, video()), (AV, video(audio=False))],
    ids=["silent-source", "audio=false"],
)
def test_video_without_audio_has_no_audio_track(info: MediaInfo, options: TransformOptions) -> None:
    """No audio in the source (or audio=false): no audio map, no AAC options, -an."""
    argv = argv_of(info, options)
    assert maps(argv) == ["0:V:0"]
    assert not {"-c:a", "-b:a", "-ac", "-af"} & set(argv)
    assert "-an" in argv


@pytest.mark.parametrize(
    ("quality", "compression", "crf", "preset", "bitrate"),
    [
        (Level.LOW, Level.LOW, "28", "ultrafast", "96k"),
        (Level.MEDIUM, Level.MEDIUM, "23", "veryfast", "128k"),
        (Level.HIGH, Level.HIGH, "19", "medium", "160k"),
        (Level.AUTO, Level.AUTO, "23", "veryfast", "128k"),
    ],
)
def test_quality_and_compression_pick_encoder_settings(
    quality: Level, compression: Level, crf: str, preset: str, bitrate: str
) -> None:
    """quality -> crf and AAC bitrate; compression -> x264 preset (auto favours latency)."""
    argv = argv_of(AV, video(quality=quality, compression=compression))
    assert (value_of(argv, "-crf"), value_of(argv, "-preset"), value_of(argv, "-b:a")) == (
        crf,
        preset,
        bitrate,
    )


@pytest.mark.parametrize(("fps", "gop"), [(25.0, "50"), (29.97, "60"), (60.0, "120"), (0.4, "1")])
def test_gop_follows_frame_rate(fps: float, gop: str) -> None:
    """-g is gop_seconds of frames; keyframes are also forced by time (regular fragments)."""
    info = MediaInfo(10_000, 640, 360, has_audio=False, video_codec="h264", fps=fps)
    argv = argv_of(info, video())
    assert value_of(argv, "-g") == gop
    assert value_of(argv, "-force_key_frames") == "expr:gte(t,n_forced*2)"


def test_requested_fps_drives_gop_and_filter() -> None:
    """fps=10 resamples before scaling (fewer frames to scale) and sizes the GOP at 10 fps."""
    argv = argv_of(AV, video(fps=10))
    assert value_of(argv, "-vf").split(",")[1:3] == [
        "fps=10:start_time=0",
        "scale=1280:720:flags=lanczos",
    ]
    assert value_of(argv, "-g") == "20"


def test_unknown_frame_rate_relies_on_forced_keyframes() -> None:
    """Without a known fps there is no -g guess; time-based forced keyframes still apply."""
    info = MediaInfo(None, 640, 360, has_audio=False, video_codec="h264", fps=None)
    argv = argv_of(info, video(), EncoderSettings(gop_seconds=1.5))
    assert "-g" not in argv
    assert value_of(argv, "-force_key_frames") == "expr:gte(t,n_forced*1.5)"


def test_clip_seeks_before_input_and_limits_length() -> None:
    """time/duration: -ss before -i (fast seek) keeping the frames decoded before the instant
    (the filters pick the one on screen at it), -t after it for the output length."""
    argv = argv_of(AV, video(time_ms=2000, duration_ms=3000))
    assert argv.index("-ss") < argv.index("-noaccurate_seek") < argv.index("-i") < argv.index("-t")
    assert (value_of(argv, "-ss"), value_of(argv, "-t")) == ("2.000", "3.000")


@pytest.mark.parametrize(
    ("width", "height", "fit", "vf"),
    [
        (None, None, Fit.CONTAIN, "scale=1280:720:flags=lanczos,setsar=1"),
        (640, None, Fit.CONTAIN, "scale=640:360:flags=lanczos,setsar=1"),
        (333, None, Fit.CONTAIN, "scale=332:186:flags=lanczos,setsar=1"),  # odd -> even
        (None, 360, Fit.CONTAIN, "scale=640:360:flags=lanczos,setsar=1"),
        (640, 640, Fit.CONTAIN, "scale=640:360:flags=lanczos,setsar=1"),
        (640, 640, Fit.COVER, "scale=1138:640:flags=lanczos,crop=640:640,setsar=1"),
        (1920, None, Fit.CONTAIN, "scale=1920:1080:flags=lanczos,setsar=1"),
        (1920, None, Fit.SCALE_DOWN, "scale=1280:720:flags=lanczos,setsar=1"),
    ],
)
def test_video_sizes(width: int | None, height: int | None, fit: Fit, vf: str) -> None:
    """Each size/fit combination keeps the aspect ratio with even dimensions."""
    assert value_of(argv_of(AV, video(width, height, fit)), "-vf") == f"{TIMING},{vf}"


def test_video_size_uses_the_displayed_orientation() -> None:
    """A portrait (rotated) source scales by its upright size: width 360 -> 360x640."""
    vf = f"{TIMING},scale=360:640:flags=lanczos,setsar=1"
    assert value_of(argv_of(PORTRAIT, video(360)), "-vf") == vf


def test_video_container_keeps_timing_out_of_the_init() -> None:
    """Fragmented MP4 (sample-free moov, a fragment per keyframe) whose moov waits for the
    first fragment so its edit lists state the B-frame delay; start times go into tfdt."""
    argv = argv_of(AV, video(time_ms=1500))
    flags = value_of(argv, "-movflags").split("+")
    assert flags == [*FRAGMENTED_MP4_FLAGS.split("+"), "delay_moov", "frag_discont"]
    assert {"empty_moov", "frag_keyframe"} <= set(flags)
    assert value_of(argv, "-use_editlist") == "1"
    assert argv[-3:] == ["-f", "mp4", "pipe:1"]
    # Audio (m4a) keeps the plain fragmented flags.
    audio = argv_of(AV, TransformOptions(mode=Mode.AUDIO, format=OutputFormat.M4A))
    assert value_of(audio, "-movflags") == FRAGMENTED_MP4_FLAGS
    assert "-use_editlist" not in audio


@pytest.mark.parametrize(
    ("info", "options", "fps", "tail"),
    [
        (AV, video(), "source_fps", "0.5"),
        (AV, video(fps=12), "12", "0.5"),
        (MediaInfo(10_000, 640, 360, has_audio=False, video_codec="h264"), video(), "25", "0.5"),
        (
            MediaInfo(10_000, 640, 360, has_audio=False, video_codec="h264", fps=1.0),
            video(),
            "source_fps",
            "2",
        ),
    ],
    ids=["source-rate", "asked-rate", "unknown-rate", "slideshow"],
)
def test_video_timing_filters(
    info: MediaInfo, options: TransformOptions, fps: str, tail: str
) -> None:
    """The last frame is held for the tail window (two frames at least), then a constant rate
    (the source's own, the one asked for, or ffmpeg's fallback of 25) starting at exactly 0."""
    filters = value_of(argv_of(info, options), "-vf").split(",")
    assert filters[:2] == [f"tpad=stop_mode=clone:stop_duration={tail}", f"fps={fps}:start_time=0"]


def test_audio_starts_at_zero_with_the_priming_in_place_of_the_first_samples() -> None:
    """Silence before a late audio track, nothing before the instant, then the encoder's
    priming (audio_priming samples) replaces the first samples so its first packet is at 0."""
    argv = argv_of(AV, video(time_ms=700), EncoderSettings(audio_priming=2048))
    assert value_of(argv, "-af") == "aresample=async=1:first_pts=0,atrim=start_sample=2048"
    assert argv.index("-af") < argv.index("-c:a")


@pytest.mark.parametrize(
    "options",
    [
        TransformOptions(mode=Mode.AUDIO, format=OutputFormat.M4A, time_ms=1000),
        TransformOptions(
            mode=Mode.SPRITESHEET, format=OutputFormat.JPG, width=80, height=60, time_ms=1000
        ),
        video(),
    ],
    ids=["audio", "spritesheet", "video-from-the-start"],
)
def test_only_a_video_seek_keeps_the_frames_before_the_instant(options: TransformOptions) -> None:
    """Audio and spritesheets keep ffmpeg's accurate seek (their filters do not trim), and a
    video from the start has no seek at all."""
    assert "-noaccurate_seek" not in argv_of(AV, options)


# --- mode=frame -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FRAME_FORMATS)
def test_frame_seeks_before_input(fmt: OutputFormat) -> None:
    """-ss before -i (fast input seek); one video frame; no audio; no MP4 flags."""
    argv = argv_of(AV, frame(2500, fmt))
    assert value_of(argv, "-ss") == "2.500"
    assert argv.index("-ss") < argv.index("-i")
    assert value_of(argv, "-frames:v") == "1"
    assert "-an" in argv
    assert maps(argv) == ["0:V:0"]
    assert "-movflags" not in argv
    assert "-vf" not in argv  # no size asked: the source size, no filter at all


@pytest.mark.parametrize(
    ("fmt", "codec_args"),
    [
        (
            OutputFormat.JPG,
            ["-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p", "-f", "image2pipe"],
        ),
        (OutputFormat.PNG, ["-c:v", "png", "-pix_fmt", "rgb24", "-f", "image2pipe"]),
        (
            OutputFormat.WEBP,
            ["-c:v", "libwebp", "-quality", "80", "-pix_fmt", "yuv420p", "-f", "webp"],
        ),
    ],
)
def test_frame_encoders(fmt: OutputFormat, codec_args: list[str]) -> None:
    """jpg: baseline full-range mjpeg; png: 8-bit rgb24; webp: libwebp. Then stdout."""
    assert argv_of(AV, frame(fmt=fmt))[-len(codec_args) - 1 :] == [*codec_args, "pipe:1"]


@pytest.mark.parametrize(
    ("width", "height", "fit", "scale", "crop"),
    [
        (333, None, Fit.CONTAIN, "scale=333:187", None),  # odd is fine
        (None, 101, Fit.CONTAIN, "scale=180:101", None),
        (640, 640, Fit.CONTAIN, "scale=640:360", None),
        (333, 333, Fit.COVER, "scale=592:333", "crop=333:333"),
    ],
)
@pytest.mark.parametrize("fmt", FRAME_FORMATS)
def test_frame_sizes_allow_odd(
    fmt: OutputFormat,
    width: int | None,
    height: int | None,
    fit: Fit,
    scale: str,
    crop: str | None,
) -> None:
    """Frames keep the aspect ratio and need not be even (the exact pixel format steps in
    between are argv.py's business; the sizes are pinned here)."""
    filters = value_of(argv_of(AV, frame(1000, fmt, width, height, fit)), "-vf").split(",")
    assert filters[0] == f"{scale}:flags=lanczos"
    assert filters[-1] == "setsar=1"
    assert [f for f in filters if f.startswith("crop=")] == ([crop] if crop else [])


@pytest.mark.parametrize(
    ("time_ms", "seek", "select"),
    [
        (10_000, "9.500", "select=lte(t\\,0.5)"),  # exactly at the end
        (60_000, "9.500", "select=lte(t\\,50.5)"),  # far past it
        (9_800, "9.500", "select=lte(t\\,0.3)"),  # inside the tail window
    ],
)
def test_frame_at_or_after_end_takes_the_last_frame(time_ms: int, seek: str, select: str) -> None:
    """Near/after the end: seek to duration-0.5 s, keep frames up to the instant, reverse."""
    argv = argv_of(AV, frame(time_ms, width=320))
    assert value_of(argv, "-ss") == seek
    assert value_of(argv, "-vf") == f"{select},scale=320:180:flags=lanczos,setsar=1,reverse"
    assert value_of(argv, "-frames:v") == "1"


def test_tail_window_covers_two_frames_of_slow_sources() -> None:
    """At 1 fps the tail window widens to 2 s, so it always holds a frame."""
    info = MediaInfo(10_000, 640, 360, has_audio=False, video_codec="h264", fps=1.0)
    argv = argv_of(info, frame(9_000))
    assert value_of(argv, "-ss") == "8.000"
    assert value_of(argv, "-vf") == "select=lte(t\\,1),reverse"


def test_short_clip_seeks_to_zero() -> None:
    """A clip shorter than the tail window is decoded from the start."""
    info = MediaInfo(300, 640, 360, has_audio=False, video_codec="h264", fps=25.0)
    assert value_of(argv_of(info, frame(5000)), "-ss") == "0.000"


def test_unknown_duration_seeks_plainly() -> None:
    """Without a duration there is no tail logic: a plain seek to the instant."""
    info = MediaInfo(None, 640, 360, has_audio=False, video_codec="h264", fps=25.0)
    argv = argv_of(info, frame(60_000))
    assert value_of(argv, "-ss") == "60.000"
    assert "-vf" not in argv


# --- properties -------------------------------------------------------------------------------

_dimension = st.one_of(st.none(), st.integers(10, 2000))


@given(
    st.integers(1, 8000),
    st.integers(1, 8000),
    _dimension,
    _dimension,
    st.sampled_from(list(Fit)),
    st.booleans(),
)
def test_plan_size_invariants(
    src_w: int, src_h: int, width: int | None, height: int | None, fit: Fit, even: bool
) -> None:
    """Any source and request: positive size, even when asked, never outside a given box."""
    plan = plan_size((src_w, src_h), width, height, fit, even=even)
    out_w, out_h = plan.output
    assert out_w >= 1
    assert out_h >= 1
    if even:
        assert out_w % 2 == 0
        assert out_h % 2 == 0
    if width is not None and height is not None:
        assert out_w <= width
        assert out_h <= height
    if fit is Fit.SCALE_DOWN:
        assert out_w <= max(src_w, 2)
        assert out_h <= max(src_h, 2)


@given(
    st.sampled_from(all_options()),
    st.integers(0, 600_000),
    st.one_of(st.none(), st.integers(1, 3_600_000)),
    st.one_of(st.none(), st.floats(0.1, 240)),
    st.booleans(),
)
def test_argv_invariants(
    options: TransformOptions,
    time_ms: int,
    duration_ms: int | None,
    fps: float | None,
    audio: bool,
) -> None:
    """Any source/options: whitelists before -i, seeks >= 0 and before -i, audio map iff audio."""
    if options.mode is Mode.FRAME:
        options = frame(time_ms, options.format, options.width, options.height, options.fit)
    info = MediaInfo(duration_ms, 640, 360, has_audio=audio, video_codec="h264", fps=fps)
    argv = argv_of(info, options)
    assert argv.index("-protocol_whitelist") < argv.index("-i")
    assert ("0:a:0" in argv) == (audio and options.mode is Mode.VIDEO)
    if "-ss" in argv:
        assert argv.index("-ss") < argv.index("-i")
        assert float(value_of(argv, "-ss")) >= 0
    if "-g" in argv:
        assert int(value_of(argv, "-g")) >= 1
