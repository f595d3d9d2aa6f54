"""Pure ffmpeg command lines for a probe and for each transformation.

Security: the source is passed as ``file:<path>`` (a name containing ``:`` must not select a
protocol), ``-protocol_whitelist file,pipe`` keeps ffmpeg off the network, and
``-format_whitelist`` limits the demuxers. The latter matters because a file *content*-probed
as an ffconcat script or an HLS playlist makes ffmpeg open other local files, which the
protocol whitelist alone does not stop (``file`` is allowed).

Scaling uses lanczos: sharper than bicubic when downscaling, and its cost is small next to
the H.264 encode. ffmpeg auto-rotates by the display matrix before our filters run, so ``iw``
and ``ih`` in the expressions below are the displayed (upright) size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidOption
from ..options import FORMATS_BY_MODE, Mode, OutputFormat, TransformOptions
from .base import MediaInfo

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


@dataclass(frozen=True, slots=True)
class EncoderSettings:
    """Encoder knobs that are deployment choices rather than request options."""

    video_codec: str = "libx264"
    preset: str = "veryfast"
    crf: int = 23
    audio_codec: str = "aac"
    audio_bitrate: str = "128k"
    audio_channels: int = 2
    threads: int = 0  # 0: let the encoder choose
    # A keyframe (and so a new MP4 fragment) every this many seconds: bounds the time to the
    # first media fragment and the seek granularity of the streamed output.
    gop_seconds: float = 2.0
    scale_flags: str = "lanczos"
    jpeg_quality: int = 3  # mjpeg -q:v, 2 (best) .. 31
    # A frame requested within this many seconds of the end is taken from the last frames
    # decoded, because a plain seek past the last frame yields no frame at all.
    tail_seconds: float = 0.5
    # Empty: no demuxer restriction (not recommended, see the module docstring).
    input_formats: tuple[str, ...] = DEFAULT_INPUT_FORMATS


def input_args(source: Path, settings: EncoderSettings) -> list[str]:
    """The options that precede and include ``-i``: whitelists, then the source."""
    args = ["-protocol_whitelist", "file,pipe"]
    if settings.input_formats:
        args += ["-format_whitelist", ",".join(settings.input_formats)]
    return [*args, "-i", f"file:{source}"]


def probe_argv(ffmpeg: str, source: Path, settings: EncoderSettings) -> list[str]:
    """``ffmpeg -i FILE`` without an output: prints the banner (exit status 1 is expected)."""
    return [ffmpeg, "-hide_banner", "-nostdin", *input_args(source, settings)]


def build_argv(
    ffmpeg: str,
    source: Path,
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
    common = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y"]
    if options.mode is Mode.VIDEO:
        return [*common, *input_args(source, settings), *_video_args(info, options, settings)]
    seek, filters = _frame_seek_and_filters(info, options, settings)
    return [
        *common,
        "-ss",  # before -i: a fast keyframe seek, then decoding only up to the instant
        _seconds(seek),
        *input_args(source, settings),
        *_frame_args(filters, options, settings),
    ]


def _video_args(info: MediaInfo, options: TransformOptions, settings: EncoderSettings) -> list[str]:
    args = ["-map", "0:V:0"]  # capital V: never an attached picture / cover art
    if info.has_audio:
        args += ["-map", "0:a:0"]
    args += ["-map_metadata", "-1", "-map_chapters", "-1"]  # don't leak GPS tags etc.
    args += ["-vf", video_scale_filter(options.width, options.height, settings.scale_flags)]
    args += [
        "-c:v",
        settings.video_codec,
        "-preset",
        settings.preset,
        "-crf",
        str(settings.crf),
        "-pix_fmt",
        "yuv420p",  # 8-bit 4:2:0: the only H.264 flavour every browser decodes
        "-threads",
        str(settings.threads),
        # Time-based keyframes work for variable or unknown frame rates; -g caps the GOP too.
        "-force_key_frames",
        f"expr:gte(t,n_forced*{_number(settings.gop_seconds)})",
    ]
    if info.fps:
        args += ["-g", str(max(1, round(info.fps * settings.gop_seconds)))]
    if info.has_audio:
        args += [
            "-c:a",
            settings.audio_codec,
            "-b:a",
            settings.audio_bitrate,
            "-ac",
            str(settings.audio_channels),
        ]
    # empty_moov: the header is written before any sample, so bytes flow at once;
    # frag_keyframe: one moof+mdat per GOP; default_base_moof: what MSE/browsers expect.
    return [*args, "-movflags", FRAGMENTED_MP4_FLAGS, "-f", "mp4", "pipe:1"]


def video_scale_filter(width: int | None, height: int | None, flags: str) -> str:
    """H.264 in 4:2:0 needs even dimensions, so every branch yields even ones.

    A requested odd size is rounded down to even (161 -> 160); ``-2`` makes ffmpeg pick the
    free side even.
    """
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


def frame_scale_filter(width: int | None, height: int | None, flags: str) -> str | None:
    """Images may have odd dimensions; ``None`` means keep the source size."""
    if width is not None and height is not None:
        size = f"{width}:{height}:force_original_aspect_ratio=decrease"
    elif width is not None:
        size = f"{width}:-1"
    elif height is not None:
        size = f"-1:{height}"
    else:
        return None
    return f"scale={size}:flags={flags}"


def _frame_seek_and_filters(
    info: MediaInfo, options: TransformOptions, settings: EncoderSettings
) -> tuple[float, list[str]]:
    scale = frame_scale_filter(options.width, options.height, settings.scale_flags)
    requested = options.time_ms / 1000
    tail = settings.tail_seconds
    if info.fps:
        tail = max(tail, 2 / info.fps)  # at least two frames even for slideshow-like sources
    if info.duration_ms is None or requested < info.duration_ms / 1000 - tail:
        return requested, [scale] if scale else []
    # Near or past the end: decode the tail window and return the last frame shown at or
    # before the requested instant (the very last frame when it is past the end). Seeking
    # straight to it could land after the last frame and produce nothing.
    seek = max(0.0, info.duration_ms / 1000 - tail)
    select = f"select=lte(t\\,{_number(requested - seek)})"  # \, : a comma inside the graph
    # Scale before reverse so the buffered frames (at most the tail window) are small.
    return seek, [select, *([scale] if scale else []), "reverse"]


def _frame_args(
    filters: list[str], options: TransformOptions, settings: EncoderSettings
) -> list[str]:
    args = ["-map", "0:V:0", "-frames:v", "1", "-an", "-sn", "-dn", "-map_metadata", "-1"]
    if filters:
        args += ["-vf", ",".join(filters)]
    if options.format is OutputFormat.JPG:
        # mjpeg writes baseline JPEG; yuvj420p makes it full range 4:2:0, what browsers expect
        # (swscale converts the usual limited-range video to it).
        args += ["-c:v", "mjpeg", "-q:v", str(settings.jpeg_quality), "-pix_fmt", "yuvj420p"]
    else:
        # rgb24 keeps 10-bit sources from producing 16-bit-per-channel PNGs.
        args += ["-c:v", "png", "-pix_fmt", "rgb24"]
    return [*args, "-f", "image2pipe", "pipe:1"]


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def _number(value: float) -> str:
    """Shortest exact-enough decimal for a filter expression: 2.0 -> '2', 0.25 -> '0.25'."""
    return f"{value:.3f}".rstrip("0").rstrip(".")
