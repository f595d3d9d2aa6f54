"""HLS pure parts: segmentation, playlists, codec names, box splitting, options."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resizer.config import load_config
from resizer.errors import InvalidOption, TransformFailed
from resizer.hls import render_playlist
from resizer.hls.fmp4 import BoxSplitter, Part
from resizer.hls.playlist import Rendition, Segments, master_playlist, media_playlist
from resizer.options import INIT_SEGMENT, OutputFormat
from resizer.responsive import policy_from_config, resolve_options
from resizer.targets import parse_target
from resizer.transform.base import MediaInfo
from resizer.transform.h264 import codec_string, level_for, level_option

POLICY = policy_from_config(load_config(env={}))
INFO = MediaInfo(
    duration_ms=40_000, width=1920, height=1080, has_audio=True, video_codec="h264", fps=25.0
)


@given(span=st.integers(1, 3_600_000), segment=st.integers(1_000, 30_000))
def test_segments_cover_the_output_exactly(span: int, segment: int) -> None:
    """Segments are full-length but the last; their durations add up to the output."""
    segments = Segments(span, segment)
    durations = [segments.duration_ms(i) for i in range(segments.count)]
    assert sum(durations) == span
    assert all(d == segment for d in durations[:-1])
    assert 0 < durations[-1] <= segment
    assert segments.index_at(span - 1) == segments.count - 1
    assert segments.index_at(0) == 0


def test_a_media_playlist_lists_every_segment_after_its_map() -> None:
    """VOD, EXT-X-MAP first, one EXTINF per segment, durations in seconds, then ENDLIST."""
    text = media_playlist(Segments(10_500, 4_000), lambda i: f"s{i}")
    lines = text.splitlines()
    assert lines[0] == "#EXTM3U"
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in lines
    assert "#EXT-X-TARGETDURATION:4" in lines
    assert f'#EXT-X-MAP:URI="s{INIT_SEGMENT}"' in lines
    assert [line for line in lines if line.startswith("#EXTINF")] == [
        "#EXTINF:4.000,",
        "#EXTINF:4.000,",
        "#EXTINF:2.500,",
    ]
    assert [line for line in lines if line.startswith("s") and "-" not in line] == [
        "s0",
        "s1",
        "s2",
    ]
    assert lines[-1] == "#EXT-X-ENDLIST"


def test_a_master_playlist_lists_renditions_narrowest_first() -> None:
    """STREAM-INF carries BANDWIDTH, RESOLUTION, CODECS and FRAME-RATE; low rates first."""
    wide = Rendition("wide.m3u8", 1280, 720, 25.0, 3_000_000, "avc1.64001f,mp4a.40.2")
    narrow = Rendition("narrow.m3u8", 640, 360, 25.0, 900_000, "avc1.64001e,mp4a.40.2")
    lines = master_playlist([wide, narrow]).splitlines()
    assert lines[3] == (
        "#EXT-X-STREAM-INF:BANDWIDTH=900000,RESOLUTION=640x360,"
        'CODECS="avc1.64001e,mp4a.40.2",FRAME-RATE=25.000'
    )
    assert lines[4] == "narrow.m3u8"
    assert lines[6] == "wide.m3u8"


@pytest.mark.parametrize(
    ("size", "fps", "level"),
    [
        ((640, 360, 25), 25, 30),
        ((854, 480, 30), 30, 31),
        ((1280, 720, 25), 25, 31),
        ((1280, 720, 60), 60, 32),
        ((1920, 1080, 30), 30, 40),
        ((1920, 1080, 60), 60, 42),
    ],
)
def test_h264_levels(size: tuple[int, int, int], fps: int, level: int) -> None:
    """The lowest level of Table A-1 whose frame size and macroblock rate fit."""
    assert level_for(size[0], size[1], fps) == level


def test_codec_strings_follow_the_preset() -> None:
    """ultrafast streams are Constrained Baseline (42C0), the others High (6400)."""
    assert codec_string(640, 360, 25, "ultrafast") == "avc1.42c01e"
    assert codec_string(1280, 720, 25, "veryfast") == "avc1.64001f"
    assert level_option(31) == "3.1"


def test_hls_options_parse_and_round_trip() -> None:
    """format=hls takes segment (init or an index) and ladder; the key names them."""
    playlist = resolve_options({"width": "640", "format": "hls"}, {}, POLICY).options
    assert playlist.format is OutputFormat.HLS
    assert playlist.segment_ms == 4_000
    assert playlist.content_type == "application/vnd.apple.mpegurl"
    segment = resolve_options({"width": "640", "format": "hls", "segment": "3"}, {}, POLICY)
    assert segment.options.segment == 3
    assert segment.options.content_type == "video/mp4"
    assert "&segment=3&" in segment.options.canonical()
    init = resolve_options({"width": "640", "f": "hls", "segment": "INIT"}, {}, POLICY)
    assert init.options.segment == INIT_SEGMENT
    assert "segment=init" in init.options.canonical()
    ladder = resolve_options({"format": "hls", "ladder": "mobile tablet"}, {}, POLICY)
    assert ladder.options.ladder == ("mobile", "tablet")
    assert "ladder=mobile+tablet" in ladder.options.canonical()
    default = resolve_options({"format": "hls", "ladder": ""}, {}, POLICY)
    assert default.options.ladder == ("mobile", "tablet", "desktop")


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"segment": "1"}, "segment"),
        ({"format": "hls", "segment": "-1"}, "segment"),
        ({"format": "hls", "segment": "x"}, "segment"),
        ({"ladder": "mobile"}, "ladder"),
        ({"format": "hls", "ladder": "mobile", "width": "640"}, "ladder"),
        ({"format": "hls", "ladder": "mobile", "segment": "1"}, "ladder"),
        ({"format": "hls", "ladder": "nope"}, "ladder"),
        ({"format": "hls", "ladder": "mobile,mobile"}, "ladder"),
    ],
)
def test_bad_hls_options_are_400(query: dict[str, str], param: str) -> None:
    """segment and ladder only with format=hls, valid values, not together, known names."""
    with pytest.raises(InvalidOption) as caught:
        resolve_options(query, {}, POLICY)
    assert caught.value.param == param


def test_a_media_playlist_links_segments_in_the_request_form() -> None:
    """Segment URLs carry the canonical options, in the query or the /cdn-cgi/media form."""
    options = resolve_options({"width": "640", "format": "hls"}, {}, POLICY).options
    query = render_playlist(options, parse_target("/videos/a b.mp4"), INFO, POLICY, 300)
    assert "/videos/a%20b.mp4?mode=video&width=640&" in query
    assert query.count("&segment=") == 10 + 1  # ten segments and the init segment
    cdn_target = parse_target("/cdn-cgi/media/width=640,format=hls/videos/a.mp4")
    cdn = render_playlist(options, cdn_target, INFO, POLICY, 300)
    assert '#EXT-X-MAP:URI="/cdn-cgi/media/mode=video,width=640,' in cdn
    assert ",segment=init,segmentLength=4s/videos/a.mp4" in cdn


def test_a_master_playlist_names_sizes_and_codecs_from_the_probe() -> None:
    """Each derivative of the ladder becomes a rendition sized from the source."""
    options = resolve_options({"format": "hls", "ladder": "mobile+tablet"}, {}, POLICY).options
    text = render_playlist(options, parse_target("/videos/a.mp4"), INFO, POLICY, 300)
    assert "RESOLUTION=852x480" in text  # 1920x1080 scaled into 854x480, even
    assert "RESOLUTION=1280x720" in text
    assert 'CODECS="avc1.64001f,mp4a.40.2"' in text
    assert "/videos/a.mp4?mode=video&width=854&height=480&fit=scale-down&" in text
    muted = resolve_options(
        {"format": "hls", "ladder": "mobile", "audio": "false"}, {}, POLICY
    ).options
    assert "mp4a" not in render_playlist(muted, parse_target("/a.mp4"), INFO, POLICY, 300)


def box(kind: bytes, payload: bytes, large: bool = False) -> bytes:
    if large:
        return struct.pack(">I4sQ", 1, kind, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


@given(
    segments=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    cuts=st.lists(st.integers(1, 50), min_size=1, max_size=40),
    large=st.booleans(),
)
def test_the_splitter_cuts_init_and_segments_however_the_bytes_arrive(
    segments: list[bytes], cuts: list[int], large: bool
) -> None:
    """Any chunking of ftyp+moov+(moof+mdat)* gives back the init and each segment whole."""
    init = box(b"ftyp", b"isom") + box(b"moov", b"m" * 40)
    media = [box(b"moof", b"f" * 9) + box(b"mdat", payload, large) for payload in segments]
    stream = init + b"".join(media)
    splitter = BoxSplitter()
    got_init, got, current, offset, index = b"", [], b"", 0, 0
    while offset < len(stream):
        size = cuts[index % len(cuts)]
        index += 1
        for piece in splitter.feed(stream[offset : offset + size]):
            if piece.part is Part.INIT:
                got_init += piece.data
            else:
                current += piece.data
                if piece.segment_complete:
                    got.append(current)
                    current = b""
        offset += size
    assert got_init == init
    assert got == media
    assert splitter.idle


def test_the_splitter_refuses_malformed_boxes() -> None:
    """A box shorter than its own header is ffmpeg gone wrong: TransformFailed."""
    with pytest.raises(TransformFailed):
        list(BoxSplitter().feed(struct.pack(">I4s", 4, b"ftyp")))
