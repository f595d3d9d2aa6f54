"""Pure ffmpeg command lines for a probe and for each transformation.

Security: the source is passed as ``file:<path>`` (a name containing ``:`` must not select a
protocol), ``-protocol_whitelist file,pipe`` keeps ffmpeg off the network, and
``-format_whitelist`` limits the demuxers. The latter matters because a file *content*-probed
as an ffconcat script or an HLS playlist makes ffmpeg open other local files, which the
protocol whitelist alone does not stop (``file`` is allowed).

Output sizes are computed here from the probed (display, i.e. rotated) size rather than left
to ffmpeg expressions, so fit rules are exact and testable. Scaling uses lanczos: sharper
than bicubic when downscaling, and its cost is small next to the H.264 encode. ffmpeg
auto-rotates by the display matrix before our filters run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import InvalidOption, UnsupportedMedia
from ..options import FORMATS_BY_MODE, Fit, Level, Mode, OutputFormat, TransformOptions
from .base import LoopbackUrl, MediaInfo, MediaInput
from .h264 import level_for, level_option

# Demuxers a source may be read with: common video containers, plus audio and still-image
# demuxers so those are recognised (and refused as 415 by the probe) rather than failing
# as 422. Deliberately absent: concat, hls, dash, image sequences' globbing, tty, lavfi, ...
DEFAULT_INPUT_FORMATS: tuple[str, ...] = (
    # video
    "mov",  # mp4, m4v, m4a, 3gp, 3g2, mj2, mov
    "matroska",  # mkv, webm
    "avi",
    "flv",
    "mpegts",
    "mpeg",
    "mpegvideo",
    "m4v",
    "h264",
    "hevc",
    "asf",  # wmv
    "ogg",
    "mxf",
    "gif",
    "ivf",
    "dv",
    "yuv4mpegpipe",
    # audio only (-> 415)
    "mp3",
    "wav",
    "aac",
    "flac",
    # still images (-> 415)
    "image2",
    "png_pipe",
    "jpeg_pipe",
    "webp_pipe",
    "bmp_pipe",
    "tiff_pipe",
)

FRAGMENTED_MP4_FLAGS = "frag_keyframe+empty_moov+default_base_moof"
# mode=video adds delay_moov: the moov (still sample-free, still before any fragment) is
# written once the first fragment is cut, so its edit lists can state the B-frame delay (the
# first frame's composition offset) instead of the whole video starting that late; and
# frag_discont: a track's first timestamp goes into its first tfdt, not into the edit list
# (an empty edit) nor a stretched first sample (where players put the sample at 0). The edit
# lists then hold only the encoder's reordering delay, and the init is the same for every
# start, including a run whose timestamps are offset with -output_ts_offset.
VIDEO_MP4_FLAGS = FRAGMENTED_MP4_FLAGS + "+delay_moov+frag_discont"

# quality -> encoder settings (docs/api.md cites these tables).
VIDEO_CRF = {Level.LOW: 28, Level.MEDIUM: 23, Level.HIGH: 19, Level.AUTO: 23}
AUDIO_BITRATE = {Level.LOW: "96k", Level.MEDIUM: "128k", Level.HIGH: "160k", Level.AUTO: "128k"}
JPEG_QSCALE = {Level.LOW: 8, Level.MEDIUM: 4, Level.HIGH: 2, Level.AUTO: 3}  # 2 best .. 31
WEBP_QUALITY = {Level.LOW: 50, Level.MEDIUM: 75, Level.HIGH: 90, Level.AUTO: 80}
# compression -> x264 preset: more effort, smaller file. auto favours latency.
X264_PRESET = {
    Level.LOW: "ultrafast",
    Level.MEDIUM: "veryfast",
    Level.HIGH: "medium",
    Level.AUTO: "veryfast",
}


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """Encoder knobs that are deployment choices rather than request options."""

    video_codec: str = "libx264"
    audio_codec: str = "aac"
    audio_channels: int = 2
    # Samples the audio encoder emits before the first one it is given (AAC-LC: 1024).
    audio_priming: int = 1024
    threads: int = 0  # 0: let the encoder choose
    # A keyframe (and so a new MP4 fragment) every this many seconds: bounds the time to the
    # first media fragment and the seek granularity of the streamed output.
    gop_seconds: float = 2.0
    scale_flags: str = "lanczos"
    # A frame requested within this many seconds of the end is taken from the last frames
    # decoded, because a plain seek past the last frame yields no frame at all.
    tail_seconds: float = 0.5
    # No output (video, audio, spritesheet span) is longer than this ([limits] max_duration).
    max_output_seconds: float = 300.0
    # Empty: no demuxer restriction (not recommended, see the module docstring).
    input_formats: tuple[str, ...] = DEFAULT_INPUT_FORMATS


def input_args(source: MediaInput, settings: EncoderSettings) -> list[str]:
    """The options that precede and include ``-i``: whitelists, then the source."""
    if isinstance(source, LoopbackUrl):
        # Only resizer's own range proxy on 127.0.0.1; it never redirects.
        args = ["-protocol_whitelist", "http,tcp", "-seekable", "1", "-multiple_requests", "0"]
    else:
        args = ["-protocol_whitelist", "file,pipe"]
    if settings.input_formats:
        args += ["-format_whitelist", ",".join(settings.input_formats)]
    target = str(source) if isinstance(source, LoopbackUrl) else f"file:{source}"
    return [*args, "-i", target]


def probe_argv(ffmpeg: str, source: MediaInput, settings: EncoderSettings) -> list[str]:
    """``ffmpeg -i FILE`` without an output: prints the banner (exit status 1 is expected)."""
    return [ffmpeg, "-hide_banner", "-nostdin", *input_args(source, settings)]


# --- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SizePlan:
    """Scale to ``scale``, then crop to ``crop`` or pad to ``pad`` (centred)."""

    scale: tuple[int, int]
    crop: tuple[int, int] | None = None
    pad: tuple[int, int] | None = None

    @property
    def output(self) -> tuple[int, int]:
        return self.crop or self.pad or self.scale


def _even(value: int) -> int:
    return max(2, value - value % 2)


def plan_size(
    source: tuple[int, int],
    width: int | None,
    height: int | None,
    fit: Fit,
    *,
    even: bool = False,
    exact_box: bool = False,
) -> SizePlan:
    """The output size for ``fit`` (see options.Fit). ``even``: H.264 4:2:0 needs even sizes
    (odd requests round down); ``exact_box``: pad contain/scale-down results to the box
    (spritesheet tiles are all exactly width x height)."""
    src_w, src_h = source
    fix = _even if even else (lambda v: max(1, v))
    if width is None and height is None:
        return SizePlan((fix(src_w), fix(src_h)))
    if width is not None and height is not None:
        box = (fix(width), fix(height))
        if fit is Fit.COVER:
            ratio = max(box[0] / src_w, box[1] / src_h)
            scaled = (max(box[0], math.ceil(src_w * ratio)), max(box[1], math.ceil(src_h * ratio)))
            return SizePlan(scaled, crop=box)
        ratio = min(box[0] / src_w, box[1] / src_h)
    else:
        ratio = (width / src_w) if width is not None else (height or 0) / src_h
        box = None
    if fit is Fit.SCALE_DOWN:
        ratio = min(ratio, 1.0)
    scaled = (fix(round(src_w * ratio)), fix(round(src_h * ratio)))
    if box is not None:  # rounding must never overflow the box
        scaled = (min(scaled[0], box[0]), min(scaled[1], box[1]))
        if exact_box and scaled != box:
            return SizePlan(scaled, pad=box)
    return SizePlan(scaled)


def size_filters(plan: SizePlan, flags: str, *, full_chroma: bool = False) -> list[str]:
    """``full_chroma``: scale into 4:4:4 first. On 4:2:0 frames crop, pad and tile round odd
    sizes and offsets down to the chroma grid, so an odd image size would come out one pixel
    short (images, unlike H.264 video, may be odd)."""
    filters = [f"scale={plan.scale[0]}:{plan.scale[1]}:flags={flags}"]
    if full_chroma:
        filters.append("format=yuv444p")
    if plan.crop:
        filters.append(f"crop={plan.crop[0]}:{plan.crop[1]}")
    if plan.pad:
        filters.append(f"pad={plan.pad[0]}:{plan.pad[1]}:(ow-iw)/2:(oh-ih)/2:black")
    # Square pixels: the output's display size is its pixel size.
    return [*filters, "setsar=1"]


def video_scale_filter(width: int | None, height: int | None, flags: str) -> str:
    """H.264 in 4:2:0 needs even dimensions, so every branch yields even ones (used when the
    source size is unknown; ``plan_size`` is preferred)."""
    width = None if width is None else width - width % 2
    height = None if height is None else height - height % 2
    if width is not None and height is not None:
        size = f"{width}:{height}:force_original_aspect_ratio=decrease:force_divisible_by=2"
    elif width is not None:
        size = f"{width}:-2"
    elif height is not None:
        size = f"-2:{height}"
    else:
        size = "trunc(iw/2)*2:trunc(ih/2)*2"
    return f"scale={size}:flags={flags}"


# --- time ----------------------------------------------------------------------------------


def output_span_ms(options: TransformOptions, info: MediaInfo, max_output_seconds: float) -> int:
    """How long the output lasts: the duration asked for, else the rest of the source,
    never beyond the configured maximum."""
    cap = round(max_output_seconds * 1000)
    rest = None if info.duration_ms is None else max(0, info.duration_ms - options.time_ms)
    wanted = options.duration_ms if options.duration_ms is not None else rest
    span = cap if wanted is None else min(wanted, cap)
    if rest is not None:
        span = min(span, rest)
    return max(1, span)


def sheet_layout(count: int) -> tuple[int, int]:
    """(columns, rows) of a spritesheet of ``count`` tiles: ceil(sqrt(n)) columns."""
    columns = math.ceil(math.sqrt(count))
    return columns, math.ceil(count / columns)


def sprite_times(start_ms: int, span_ms: int, count: int) -> list[int]:
    """When each tile's frame is taken: evenly over [start, start + span). Tile i stands for
    [t_i, t_{i+1}), the last one until start + span."""
    return [start_ms + (span_ms * i) // count for i in range(count)]


# --- command lines -------------------------------------------------------------------------


def build_argv(
    ffmpeg: str,
    source: MediaInput,
    info: MediaInfo,
    options: TransformOptions,
    settings: EncoderSettings,
) -> list[str]:
    """The full command line for one transformation; output goes to ``pipe:1``."""
    if options.format not in FORMATS_BY_MODE[options.mode]:
        allowed = ", ".join(f.value for f in FORMATS_BY_MODE[options.mode])
        raise InvalidOption(
            "format",
            f"{options.format.value!r} is not allowed with mode={options.mode.value}; "
            f"allowed: {allowed}",
        )
    if options.format is OutputFormat.VTT:
        raise ValueError("a WebVTT track is built by transform.vtt, not by ffmpeg")
    common = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y"]
    if options.mode is Mode.FRAME:
        seek, filters = _frame_seek_and_filters(info, options, settings)
        return [
            *common,
            "-ss",  # before -i: a fast keyframe seek, then decoding only up to the instant
            _seconds(seek),
            *input_args(source, settings),
            *_frame_args(filters, options),
        ]
    span = output_span_ms(options, info, settings.max_output_seconds)
    # -ss before -i seeks fast, and re-encoding makes the cut frame-accurate.
    start = ["-ss", _seconds(options.time_ms / 1000)] if options.time_ms else []
    if start and options.mode is Mode.VIDEO:
        # Keep what is decoded from the keyframe on: the video filters start with the frame
        # on screen at the instant, which an accurate seek drops (and with it the only frame
        # of a start inside the last one); the audio filter cuts at the instant's sample.
        start.append("-noaccurate_seek")
    clip = [*start, *input_args(source, settings), "-t", _seconds(span / 1000)]
    if options.mode is Mode.AUDIO:
        return [*common, *clip, *_audio_args(info, options, settings)]
    if options.mode is Mode.SPRITESHEET:
        return [*common, *clip, *_sheet_args(info, options, settings, span)]
    if options.format is OutputFormat.HLS:
        return [*common, *hls_run_args(source, info, options, settings)]
    return [*common, *clip, *_video_args(info, options, settings)]


def hls_run_args(
    source: MediaInput, info: MediaInfo, options: TransformOptions, settings: EncoderSettings
) -> list[str]:
    """An HLS segment run: the rendition's output from segment ``options.segment`` on.

    Its fragments are the segments: a keyframe is forced at every multiple of the segment
    length and no other (no scene-cut keyframes, a GOP cap beyond it), and ``frag_keyframe``
    cuts a fragment at each. A run starting at segment k seeks the source to k segments past
    ``time`` and offsets its timestamps by as much (``frag_discont`` writes them into each
    fragment's tfdt), so runs starting anywhere splice; the container is mode=video's
    (``VIDEO_MP4_FLAGS``: the edit lists hold only the B-frame delay), so the init segment is
    byte-identical for every start but a tiny one (see ``hls.runs``). The H.264 level is set
    to what the master playlist announces (``transform.h264``).
    """
    assert options.segment_ms is not None
    assert options.segment is not None
    seconds = options.segment_ms / 1000
    offset = max(0, options.segment) * seconds
    span = output_span_ms(options, info, settings.max_output_seconds) / 1000
    start = options.time_ms / 1000 + offset
    # As for mode=video: the frame on screen at the instant is the run's first frame.
    seek = ["-ss", _seconds(start), "-noaccurate_seek"] if start else []
    clip = [*seek, *input_args(source, settings)]
    clip += ["-t", _seconds(max(0.001, span - offset))]
    encode = _video_args(info, options, replace(settings, gop_seconds=seconds))
    encode = encode[: encode.index("-movflags")]  # the container is set below
    if "-g" in encode:  # forced keyframes alone decide: the GOP cap must not add any
        at = encode.index("-g")
        encode[at + 1] = str(int(encode[at + 1]) * 2 + 1)
    width, height = video_plan(info, options).output
    level = level_for(width, height, video_fps(info, options))
    return [
        *clip,
        *encode,
        "-sc_threshold",
        "0",
        "-level:v",
        level_option(level),
        "-output_ts_offset",
        _seconds(offset),
        "-movflags",
        VIDEO_MP4_FLAGS,
        "-use_editlist",
        "1",
        "-f",
        "mp4",
        "pipe:1",
    ]


def video_plan(info: MediaInfo, options: TransformOptions) -> SizePlan:
    """How mode=video sizes its output (H.264 4:2:0: even sides)."""
    return plan_size(
        (info.display_width, info.display_height),
        options.width,
        options.height,
        options.fit,
        even=True,
    )


def video_fps(info: MediaInfo, options: TransformOptions) -> float:
    """The frame rate of mode=video output: asked for, else the source's, else ffmpeg's 25."""
    return float(options.fps or info.fps or 25)


def _video_args(info: MediaInfo, options: TransformOptions, settings: EncoderSettings) -> list[str]:
    with_audio = info.has_audio and options.audio
    args = ["-map", "0:V:0"]  # capital V: never an attached picture / cover art
    if with_audio:
        args += ["-map", "0:a:0"]
    args += ["-map_metadata", "-1", "-map_chapters", "-1"]  # don't leak GPS tags etc.
    plan = video_plan(info, options)
    # The last frame stays on screen for the tail window, so an instant inside it, or past it
    # but before the end of a longer audio track, still has a frame (-t cuts what this adds
    # beyond the source's end). Then a constant frame rate (what ffmpeg does for MP4 anyway;
    # 25 is its own fallback), before scaling so fewer frames are scaled, whose first frame is
    # at exactly 0: the one on screen at the instant, or the first one repeated if the video
    # starts later than the audio.
    rate = options.fps or ("source_fps" if info.fps else 25)
    filters = [
        f"tpad=stop_mode=clone:stop_duration={_number(_tail_seconds(info, settings))}",
        f"fps={rate}:start_time=0",
        *size_filters(plan, settings.scale_flags),
    ]
    args += ["-vf", ",".join(filters)]
    args += [
        "-c:v",
        settings.video_codec,
        "-preset",
        X264_PRESET[options.compression],
        "-crf",
        str(VIDEO_CRF[options.quality]),
        "-pix_fmt",
        "yuv420p",  # 8-bit 4:2:0: the only H.264 flavour every browser decodes
        "-threads",
        str(settings.threads),
        # Time-based keyframes work for variable or unknown frame rates; -g caps the GOP too.
        "-force_key_frames",
        f"expr:gte(t,n_forced*{_number(settings.gop_seconds)})",
    ]
    fps = options.fps or info.fps
    if fps:
        args += ["-g", str(max(1, round(fps * settings.gop_seconds)))]
    if with_audio:
        # From exactly 0 too (silence where the source's audio starts later, samples before
        # the instant cut), then the encoder's priming takes the place of the first samples:
        # its first packet is at 0 like the video's first frame, so the audio needs neither
        # an edit list (which ffmpeg can only write with an offset that varies) nor a
        # negative timestamp (which a fragment's tfdt cannot hold).
        resample = "aresample=async=1:first_pts=0"
        args += ["-af", f"{resample},atrim=start_sample={settings.audio_priming}"]
        args += _aac_args(options, settings)
    else:
        args += ["-an"]
    # empty_moov: the header has no samples, the fragments carry them all, so bytes stream
    # while ffmpeg runs; frag_keyframe: one moof+mdat per GOP; default_base_moof: what
    # MSE/browsers expect. See VIDEO_MP4_FLAGS for the rest; -use_editlist makes ffmpeg
    # write the edit lists that fragmented output otherwise leaves out.
    return [*args, "-movflags", VIDEO_MP4_FLAGS, "-use_editlist", "1", "-f", "mp4", "pipe:1"]


def _aac_args(options: TransformOptions, settings: EncoderSettings) -> list[str]:
    return [
        "-c:a",
        settings.audio_codec,
        "-b:a",
        AUDIO_BITRATE[options.quality],
        "-ac",
        str(settings.audio_channels),
    ]


def _audio_args(info: MediaInfo, options: TransformOptions, settings: EncoderSettings) -> list[str]:
    if not info.has_audio:
        raise UnsupportedMedia("the source has no audio track to extract (mode=audio)")
    args = ["-map", "0:a:0", "-vn", "-sn", "-dn", "-map_metadata", "-1"]
    args += _aac_args(options, settings)
    # Audio frames are all keyframes: cut fragments by time (1 s) instead.
    args += ["-movflags", FRAGMENTED_MP4_FLAGS, "-frag_duration", "1000000"]
    return [*args, "-f", "mp4", "pipe:1"]


def _sheet_args(
    info: MediaInfo, options: TransformOptions, settings: EncoderSettings, span_ms: int
) -> list[str]:
    assert options.width is not None  # validated: spritesheets need a tile size
    assert options.height is not None
    count = options.image_count
    columns, rows = sheet_layout(count)
    plan = plan_size(
        (info.display_width, info.display_height),
        options.width,
        options.height,
        options.fit,
        exact_box=True,
    )
    filters = [
        # n frames per span: frame i is the one nearest start + i * span / n (sprite_times).
        f"fps={count * 1000}/{span_ms}",
        f"trim=end_frame={count}",
        *size_filters(plan, settings.scale_flags, full_chroma=True),
        f"tile={columns}x{rows}:nb_frames={count}",
    ]
    return [
        *("-map", "0:V:0", "-an", "-sn", "-dn", "-map_metadata", "-1"),
        *("-vf", ",".join(filters), "-frames:v", "1"),
        *_image_codec(OutputFormat.JPG, options.quality),
        "pipe:1",
    ]


def _frame_seek_and_filters(
    info: MediaInfo, options: TransformOptions, settings: EncoderSettings
) -> tuple[float, list[str]]:
    plan = plan_size(
        (info.display_width, info.display_height), options.width, options.height, options.fit
    )
    # PNG is encoded from rgb24, which the crop already negotiates; jpg and webp are 4:2:0.
    full_chroma = plan.crop is not None and options.format is not OutputFormat.PNG
    resize = (
        size_filters(plan, settings.scale_flags, full_chroma=full_chroma)
        if options.width is not None or options.height is not None
        else []
    )
    requested = options.time_ms / 1000
    tail = _tail_seconds(info, settings)
    if info.duration_ms is None or requested < info.duration_ms / 1000 - tail:
        return requested, resize
    # Near or past the end: decode the tail window and return the last frame shown at or
    # before the requested instant (the very last frame when it is past the end). Seeking
    # straight to it could land after the last frame and produce nothing.
    seek = max(0.0, info.duration_ms / 1000 - tail)
    select = f"select=lte(t\\,{_number(requested - seek)})"  # \, : a comma inside the graph
    # Scale before reverse so the buffered frames (at most the tail window) are small.
    return seek, [select, *resize, "reverse"]


def _tail_seconds(info: MediaInfo, settings: EncoderSettings) -> float:
    # At least two frames even for slideshow-like sources.
    return max(settings.tail_seconds, 2 / info.fps) if info.fps else settings.tail_seconds


def _frame_args(filters: list[str], options: TransformOptions) -> list[str]:
    args = ["-map", "0:V:0", "-frames:v", "1", "-an", "-sn", "-dn", "-map_metadata", "-1"]
    if filters:
        args += ["-vf", ",".join(filters)]
    return [*args, *_image_codec(options.format, options.quality), "pipe:1"]


def _image_codec(fmt: OutputFormat, quality: Level) -> list[str]:
    if fmt is OutputFormat.JPG:
        # mjpeg writes baseline JPEG; yuvj420p makes it full range 4:2:0, what browsers
        # expect (swscale converts the usual limited-range video to it).
        return [
            *("-c:v", "mjpeg", "-q:v", str(JPEG_QSCALE[quality])),
            *("-pix_fmt", "yuvj420p", "-f", "image2pipe"),
        ]
    if fmt is OutputFormat.WEBP:
        return [
            *("-c:v", "libwebp", "-quality", str(WEBP_QUALITY[quality])),
            *("-pix_fmt", "yuv420p", "-f", "webp"),
        ]
    # rgb24 keeps 10-bit sources from producing 16-bit-per-channel PNGs.
    return ["-c:v", "png", "-pix_fmt", "rgb24", "-f", "image2pipe"]


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def _number(value: float) -> str:
    """Shortest exact-enough decimal for a filter expression: 2.0 -> '2', 0.25 -> '0.25'."""
    return f"{value:.3f}".rstrip("0").rstrip(".")
