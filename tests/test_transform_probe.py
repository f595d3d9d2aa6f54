"""parse_probe_output against real ``ffmpeg -hide_banner -i`` banners (FFmpeg 9, captured
from the bundled binary on generated files and on the shared sample clips) and fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resizer.errors import UndecodableSource, UnsupportedMedia
from resizer.transform.base import MediaInfo
from resizer.transform.probe import parse_probe_output

BIGBUCKBUNNY = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:bigbuckbunny.mp4':
  Metadata:
    major_brand     : isom
    minor_version   : 512
    compatible_brands: isomiso2avc1mp41
    creation_time   : 1970-01-01T00:00:00.000000Z
    encoder         : Lavf53.24.2
  Duration: 00:00:05.31, start: 0.000000, bitrate: 1589 kb/s
  Stream #0:0[0x1](und): Video: h264 (Main) (avc1 / 0x31637661), yuv420p(progressive), \
1280x720 [SAR 1:1 DAR 16:9], 1205 kb/s, 25 fps, 25 tbr, 12800 tbn (default)
    Metadata:
      creation_time   : 1970-01-01T00:00:00.000000Z
      handler_name    : VideoHandler
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, 5.1, fltp, \
384 kb/s (default)
    Metadata:
      creation_time   : 1970-01-01T00:00:00.000000Z
      handler_name    : SoundHandler
At least one output file must be specified
"""

BIKES = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:bikes.mp4':
  Metadata:
    major_brand     : isom
    minor_version   : 512
    compatible_brands: isomiso2avc1mp41
    encoder         : Lavf56.40.101
  Duration: 00:00:10.00, start: 0.000000, bitrate: 407 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive), \
640x272 [SAR 1:1 DAR 40:17], 404 kb/s, 25 fps, 25 tbr, 12800 tbn (default)
    Metadata:
      handler_name    : VideoHandler
At least one output file must be specified
"""

# testsrc2 320x240 re-muxed with -display_rotation 90 (i.e. a portrait phone clip).
ROTATED = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:rotm90.mp4':
  Metadata:
    major_brand     : isom
    minor_version   : 512
    compatible_brands: isomiso2avc1mp41
    encoder         : Lavf63.1.102
  Duration: 00:00:02.00, start: 0.000000, bitrate: 701 kb/s
  Stream #0:0[0x1](und): Video: h264 (Constrained Baseline) (avc1 / 0x31637661), \
yuv420p(progressive), 320x240 [SAR 1:1 DAR 4:3], 697 kb/s, 25 fps, 25 tbr, 12800 tbn (default)
    Metadata:
      handler_name    : VideoHandler
      encoder         : Lavc63.1.102 libx264
    Side data:
      Display Matrix: rotation of -90.00 degrees
At least one output file must be specified
"""

# Older FFmpeg (4.x) spelling, hand-written in that format: lower-case side data + rotate tag.
ROTATED_LEGACY = """\
Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'phone.mp4':
  Duration: 00:00:03.50, start: 0.000000, bitrate: 17000 kb/s
    Stream #0:0(eng): Video: h264 (High) (avc1 / 0x31637661), yuvj420p(pc, bt709), \
1920x1080, 16000 kb/s, SAR 1:1 DAR 16:9, 29.97 fps, 29.97 tbr, 90k tbn, 180k tbc (default)
    Metadata:
      rotate          : 270
      handler_name    : VideoHandle
    Side data:
      displaymatrix: rotation of 90.00 degrees
    Stream #0:1(eng): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 96 kb/s
"""

ROTATE_TAG_ONLY = ROTATED_LEGACY.replace("    Side data:\n", "").replace(
    "      displaymatrix: rotation of 90.00 degrees\n", ""
)

WEBM_NTSC = """\
Input #0, matroska,webm, from 'file:v.webm':
  Metadata:
    ENCODER         : Lavf63.1.102
  Duration: 00:00:02.00, start: 0.000000, bitrate: 207 kb/s
  Stream #0:0: Video: vp8, yuv420p(tv, progressive), 320x240, SAR 1:1 DAR 4:3, 29.97 fps, \
29.97 tbr, 1k tbn
    Metadata:
      ENCODER         : Lavc63.1.102 libvpx
      DURATION        : 00:00:02.002000000
At least one output file must be specified
"""

# The codec tag "0x0002" must not be read as a 0x2 frame size.
MPEGTS = """\
Input #0, mpegts, from 'file:v.ts':
  Duration: 00:00:02.01, start: 1.429089, bitrate: 950 kb/s
  Program 1\x20
    Metadata:
      service_name    : Service01
      service_provider: FFmpeg
  Stream #0:0[0x100]: Video: mpeg2video (Main) ([2][0][0][0] / 0x0002), yuv420p(tv, \
progressive), 320x240 [SAR 1:1 DAR 4:3], 25 fps, 25 tbr, 90k tbn, start 1.440000
    Side data:
      CPB properties: bitrate max/min/avg: 0/0/0 buffer size: 49152 vbv_delay: N/A
  Stream #0:1[0x101]: Audio: mp2 (mp3float) ([3][0][0][0] / 0x0003), 44100 Hz, mono, fltp, \
384 kb/s, start 1.429089
At least one output file must be specified
"""

GIF = """\
Input #0, gif, from 'file:anim.gif':
  Duration: 00:00:01.00, start: 0.000000, bitrate: 212 kb/s
  Stream #0:0: Video: gif, bgra, 160x120 [SAR 64:64 DAR 4:3], 10 fps, 10 tbr, 100 tbn
At least one output file must be specified
"""

MP3_WITH_COVER = """\
Input #0, mp3, from 'file:cover.mp3':
  Metadata:
    encoder         : Lavf63.1.102
  Duration: 00:00:02.00, start: 0.025056, bitrate: 75 kb/s
  Stream #0:0: Audio: mp3 (mp3float), 44100 Hz, mono, fltp, 64 kb/s, start 0.025057
  Stream #0:1: Video: png, rgb24(pc, gbr/unknown/unknown), 64x64 [SAR 1:1 DAR 1:1], 90k tbr, \
90k tbn, start 0.025056 (attached pic)
    Metadata:
      comment         : Other
At least one output file must be specified
"""

WAV = """\
[aist#0:0/pcm_s16le @ 0x5581a2c0e100] Guessed Channel Layout: mono
Input #0, wav, from 'file:a.wav':
  Metadata:
    encoder         : Lavf63.1.102
  Duration: 00:00:02.00, bitrate: 705 kb/s
  Stream #0:0: Audio: pcm_s16le ([1][0][0][0] / 0x0001), 44100 Hz, mono, s16, 705 kb/s
At least one output file must be specified
"""

PNG_IMAGE = """\
Input #0, png_pipe, from 'file:cover.png':
  Duration: N/A, bitrate: N/A
  Stream #0:0: Video: png, rgb24(pc, gbr/unknown/unknown), 64x64 [SAR 1:1 DAR 1:1], 25 fps, \
25 tbr, 25 tbn
At least one output file must be specified
"""

JPEG_IMAGE = """\
Input #0, image2, from 'file:out.jpg':
  Duration: 00:00:00.04, start: 0.000000, bitrate: 990 kb/s
  Stream #0:0: Video: mjpeg (Baseline), yuvj420p(pc, bt470bg/unknown/unknown), 160x120 \
[SAR 1:1 DAR 4:3], 25 fps, 25 tbr, 25 tbn
At least one output file must be specified
"""

TEXT_AS_MP4 = """\
[in#0 @ 0x5581a2c0e100] Format mov,mp4,m4a,3gp,3g2,mj2 detected only with low score of 1, \
misdetection possible!
[in#0 @ 0x5581a2c0e100] moov atom not found
[in#0 @ 0x5581a2c0e100] Error opening input: Invalid data found when processing input
Error opening input file file:text.mp4.
Error opening input files: Invalid data found when processing input
"""

TRUNCATED_MP4 = """\
[in#0 @ 0x5581a2c0e100] moov atom not found
[in#0 @ 0x5581a2c0e100] Error opening input: Invalid data found when processing input
Error opening input file file:trunc.mp4.
Error opening input files: Invalid data found when processing input
"""

MISSING_FILE = """\
[in#0 @ 0x55c58938bdc0] Error opening input: No such file or directory
Error opening input file nonexist.mp4.
Error opening input files: No such file or directory
"""

# An ffconcat script saved as .mp4: refused by -format_whitelist before it opens other files.
NOT_ON_WHITELIST = """\
[in#0 @ 0x5581a2c0e100] Format not on whitelist 'mov,matroska,avi,flv,mpegts,mpeg'
[in#0 @ 0x5581a2c0e100] Error opening input: Invalid argument
Error opening input file file:cc.mp4.
Error opening input files: Invalid argument
"""

# An HLS playlist (no whitelist) whose segment could not be analysed: pixel format "none".
UNDECODABLE_STREAM = """\
[in#0 @ 0x555744897100] Opening 'file:v.mp4' for reading
[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55574489a9c0] stream 0, offset 0x30: partial file
[in#0/hls @ 0x555744897100] Could not find codec parameters for stream 0 (Video: h264 (avc1 / \
0x31637661), none, 320x240, 697 kb/s): unspecified pixel format
Input #0, hls, from 'file:pl.m3u8':
  Duration: 00:00:02.00, bitrate: 0 kb/s
  Program 0\x20
    Metadata:
      variant_bitrate : 0
  Stream #0:0: Video: h264 (avc1 / 0x31637661), none, 320x240, 697 kb/s, 25 tbr, 90k tbn
"""


@pytest.mark.parametrize(
    ("banner", "expected"),
    [
        pytest.param(
            BIGBUCKBUNNY,
            MediaInfo(5310, 1280, 720, has_audio=True, video_codec="h264", fps=25.0),
            id="bigbuckbunny-720p-aac51",
        ),
        pytest.param(
            BIKES,
            MediaInfo(10000, 640, 272, has_audio=False, video_codec="h264", fps=25.0),
            id="bikes-no-audio",
        ),
        pytest.param(
            ROTATED,
            MediaInfo(2000, 320, 240, has_audio=False, video_codec="h264", fps=25.0, rotation=90),
            id="display-matrix-minus-90",
        ),
        pytest.param(
            ROTATED_LEGACY,
            MediaInfo(
                3500, 1920, 1080, has_audio=True, video_codec="h264", fps=29.97, rotation=270
            ),
            id="legacy-displaymatrix-wins-over-tag",
        ),
        pytest.param(
            ROTATE_TAG_ONLY,
            MediaInfo(
                3500, 1920, 1080, has_audio=True, video_codec="h264", fps=29.97, rotation=270
            ),
            id="legacy-rotate-tag",
        ),
        pytest.param(
            WEBM_NTSC,
            MediaInfo(2000, 320, 240, has_audio=False, video_codec="vp8", fps=29.97),
            id="webm-vp8",
        ),
        pytest.param(
            MPEGTS,
            MediaInfo(2010, 320, 240, has_audio=True, video_codec="mpeg2video", fps=25.0),
            id="mpegts-hex-tag-not-a-size",
        ),
        pytest.param(
            GIF,
            MediaInfo(1000, 160, 120, has_audio=False, video_codec="gif", fps=10.0),
            id="animated-gif",
        ),
    ],
)
def test_parses_real_banners(banner: str, expected: MediaInfo) -> None:
    """Real banners yield the duration, first video stream size/codec/fps, rotation, audio."""
    assert parse_probe_output(banner) == expected


def test_rotation_swaps_display_size() -> None:
    """A -90 degree display matrix makes the displayed size portrait."""
    info = parse_probe_output(ROTATED)
    assert (info.display_width, info.display_height) == (240, 320)


def test_unknown_duration_is_none() -> None:
    """'Duration: N/A' (a pipe-style input) becomes duration_ms=None, not an error."""
    banner = GIF.replace("Duration: 00:00:01.00, start: 0.000000", "Duration: N/A")
    assert parse_probe_output(banner).duration_ms is None


def test_tbr_is_the_fallback_frame_rate() -> None:
    """Without an 'fps' field the 'tbr' rate is used; with neither, fps is None."""
    assert parse_probe_output(GIF.replace("10 fps, ", "")).fps == 10.0
    assert parse_probe_output(GIF.replace("10 fps, 10 tbr, ", "")).fps is None


def test_kilo_frame_rate() -> None:
    """ffmpeg prints rates of 1000 and up as '1k'."""
    assert parse_probe_output(GIF.replace("10 fps", "1k fps")).fps == 1000.0


@pytest.mark.parametrize(
    "banner",
    [
        pytest.param(TEXT_AS_MP4, id="text-file-named-mp4"),
        pytest.param(TRUNCATED_MP4, id="moov-atom-not-found"),
        pytest.param(MISSING_FILE, id="no-such-file"),
        pytest.param(NOT_ON_WHITELIST, id="format-not-on-whitelist"),
        pytest.param(UNDECODABLE_STREAM, id="pixel-format-none"),
        pytest.param("", id="empty"),
        pytest.param(
            "Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x.mp4':\n  Duration: N/A\n", id="no-streams"
        ),
    ],
)
def test_unreadable_sources_are_undecodable(banner: str) -> None:
    """Banners showing ffmpeg could not open or analyse the input raise UndecodableSource."""
    with pytest.raises(UndecodableSource):
        parse_probe_output(banner)


def test_whitelist_refusal_says_so() -> None:
    """A refused container format is reported as such (helps operators tune the list)."""
    with pytest.raises(UndecodableSource, match="container format"):
        parse_probe_output(NOT_ON_WHITELIST)


@pytest.mark.parametrize(
    ("banner", "message"),
    [
        pytest.param(MP3_WITH_COVER, "no video stream", id="mp3-with-cover-art"),
        pytest.param(WAV, "no video stream", id="wav"),
        pytest.param(PNG_IMAGE, "still image", id="png"),
        pytest.param(JPEG_IMAGE, "still image", id="jpeg"),
    ],
)
def test_sources_without_video_are_unsupported(banner: str, message: str) -> None:
    """Audio-only files, cover art and still images raise UnsupportedMedia (415)."""
    with pytest.raises(UnsupportedMedia, match=message):
        parse_probe_output(banner)


def test_cover_art_is_skipped_for_a_later_real_video_stream() -> None:
    """An attached picture listed first does not hide the real video stream after it."""
    cover = (
        "  Stream #0:0: Video: mjpeg (Baseline), yuvj420p(pc), 600x600, 90k tbr, 90k tbn "
        "(attached pic)\n"
    )
    banner = BIKES.replace("  Stream #0:0[0x1]", cover + "  Stream #0:1[0x1]")
    info = parse_probe_output(banner)
    assert (info.width, info.height, info.video_codec) == (640, 272, "h264")


def test_only_input_zero_streams_count() -> None:
    """Streams of another input/output section (#1) are not mistaken for the source's."""
    banner = WAV + "  Stream #1:0: Video: h264, yuv420p, 320x240, 25 fps\n"
    with pytest.raises(UnsupportedMedia):
        parse_probe_output(banner)


_banner_lines = st.sampled_from(
    [
        line
        for banner in (BIGBUCKBUNNY, ROTATED, MPEGTS, TEXT_AS_MP4)
        for line in banner.splitlines()
    ]
)


@given(st.text())
def test_arbitrary_text_raises_only_resizer_errors(text: str) -> None:
    """No input whatsoever makes the parser raise anything but its two error types."""
    with contextlib.suppress(UndecodableSource, UnsupportedMedia):
        parse_probe_output(text)


@given(st.lists(st.one_of(_banner_lines, st.text(max_size=40)), max_size=30))
def test_shuffled_banner_lines_raise_only_resizer_errors(lines: list[str]) -> None:
    """Recombined real banner lines (closer to the grammar than random text) never crash it."""
    with contextlib.suppress(UndecodableSource, UnsupportedMedia):
        info = parse_probe_output("\n".join(lines))
        assert info.width > 0
        assert info.height > 0


@given(
    st.integers(0, 999_999),
    st.integers(1, 99_999),
    st.integers(1, 99_999),
    st.sampled_from(["h264", "hevc", "vp9", "av1", "prores"]),
    st.booleans(),
)
def test_generated_banners_round_trip(
    millis: int, width: int, height: int, codec: str, audio: bool
) -> None:
    """Any duration/size/codec written in ffmpeg's format is read back exactly."""
    hours, rest = divmod(millis * 10, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = rest / 1000
    banner = (
        "Input #0, matroska,webm, from 'x.mkv':\n"
        f"  Duration: {hours:02d}:{minutes:02d}:{seconds:05.2f}, start: 0.000000\n"
        f"  Stream #0:0: Video: {codec} (Main), yuv420p(tv, progressive), {width}x{height}, "
        "SAR 1:1 DAR 4:3, 25 fps, 25 tbr, 1k tbn\n"
    )
    if audio:
        banner += "  Stream #0:1: Audio: opus, 48000 Hz, stereo, fltp\n"
    info = parse_probe_output(banner)
    assert info == MediaInfo(millis * 10, width, height, audio, codec, fps=25.0)
