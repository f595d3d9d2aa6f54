"""Option parsing and cache-key canonicalisation (pure)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resizer.errors import InvalidOption
from resizer.options import (
    Limits,
    Mode,
    OutputFormat,
    TransformOptions,
    cache_key,
    format_ms,
    key_digest,
    normalize_params,
    parse_options,
    parse_time_ms,
)


def test_defaults_are_a_video_at_source_size() -> None:
    """No parameters means an MP4 at the source's size."""
    options = parse_options({})
    assert options == TransformOptions()
    assert (options.mode, options.width, options.height, options.format) == (
        Mode.VIDEO,
        None,
        None,
        OutputFormat.MP4,
    )


def test_width_and_height_parse_within_bounds() -> None:
    """Width and height accept integers 10-2000 inclusive."""
    assert parse_options({"width": "10", "height": "2000"}).width == 10
    assert parse_options({"width": "10", "height": "2000"}).height == 2000


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("width", "9"),
        ("width", "2001"),
        ("width", "abc"),
        ("width", "-5"),
        ("width", "3.5"),
        ("width", ""),
        ("width", "\u0661\u0660\u0660"),  # non-ASCII digits must not sneak through isdigit()
        ("height", "0"),
        ("mode", "gif"),
        ("format", "gif"),
        ("fit", "stretch"),
        ("quality", "ultra"),
        ("compression", "max"),
        ("fps", "0"),
        ("fps", "61"),
        ("audio", "maybe"),
        ("duration", "0.5s"),
        ("duration", "6m"),
        ("time", "11m"),
        ("imageCount", "5"),  # applies to spritesheets only
        ("filename", "my file"),
        ("filename", "x" * 121),
    ],
)
def test_invalid_values_name_the_parameter(param: str, value: str) -> None:
    """Every invalid value raises InvalidOption naming the parameter."""
    with pytest.raises(InvalidOption) as info:
        parse_options({param: value})
    assert info.value.param == param
    assert info.value.status == 400
    assert param in info.value.message


def test_error_message_lists_what_is_allowed() -> None:
    """The message tells the client what to send instead."""
    with pytest.raises(InvalidOption, match="allowed: video, frame, spritesheet, audio"):
        parse_options({"mode": "gif"})
    with pytest.raises(InvalidOption, match="10-2000"):
        parse_options({"width": "5000"})


def test_configured_limits_lower_the_ceiling() -> None:
    """[limits] max_width is enforced by the parser."""
    with pytest.raises(InvalidOption, match="10-640"):
        parse_options({"width": "641"}, Limits(max_width=640, max_height=640))
    with pytest.raises(InvalidOption, match="60s"):
        parse_options({"duration": "90s"}, Limits(max_duration_ms=60_000))


def test_frame_mode_defaults_to_jpg_at_zero() -> None:
    """mode=frame without time or format is a JPEG of the first frame."""
    options = parse_options({"mode": "frame"})
    assert (options.format, options.time_ms, options.content_type) == (
        OutputFormat.JPG,
        0,
        "image/jpeg",
    )


@pytest.mark.parametrize(
    ("raw", "ms"),
    [("2s", 2000), ("2.5s", 2500), ("2", 2000), ("1m", 60_000), ("1500ms", 1500), (".5s", 500)],
)
def test_time_spellings(raw: str, ms: int) -> None:
    """Times accept seconds, minutes and milliseconds."""
    assert parse_time_ms("time", raw) == ms


@pytest.mark.parametrize("raw", ["abc", "-1s", "2h", "11m", "1e3s", "", "nan", "inf"])
def test_bad_times_are_rejected(raw: str) -> None:
    """Malformed or out-of-range times are a 400."""
    with pytest.raises(InvalidOption):
        parse_time_ms("time", raw)


def test_equivalent_spellings_share_a_key() -> None:
    """2s and 2.0s, jpeg and jpg, defaults written out: one cache key."""
    a = parse_options({"mode": "frame", "time": "2s", "format": "jpeg"})
    b = parse_options({"mode": "FRAME", "time": "2.0s", "format": "jpg", "utm_source": "x"})
    assert cache_key("/v/a.mp4", a) == cache_key("/v/a.mp4", b)
    assert cache_key("/v/a.mp4", parse_options({})) == cache_key(
        "/v/a.mp4", parse_options({"mode": "video", "format": "mp4"})
    )


def test_different_outputs_have_different_keys() -> None:
    """Parameters that change the bytes change the key; so does the path."""
    keys = {
        cache_key("/v/a.mp4", parse_options({"width": "320", "fit": "cover"})),
        cache_key("/v/a.mp4", parse_options({"width": "320", "audio": "false"})),
        cache_key("/v/a.mp4", parse_options({"width": "320", "quality": "high"})),
        cache_key("/v/a.mp4", parse_options({"width": "320", "time": "1s"})),
        cache_key("/v/a.mp4", parse_options({"width": "320"})),
        cache_key("/v/a.mp4", parse_options({"width": "640"})),
        cache_key("/v/a.mp4", parse_options({"height": "320"})),
        cache_key("/v/b.mp4", parse_options({"width": "320"})),
        cache_key("/v/a.mp4", parse_options({"mode": "frame", "width": "320"})),
        cache_key("/v/a.mp4", parse_options({"mode": "frame", "format": "png"})),
    }
    assert len(keys) == 10


def test_key_format_is_documented_shape() -> None:
    """The key reads v1:<path>?<canonical options>."""
    key = cache_key("/videos/a.mp4", parse_options({"width": "320"}))
    assert key == (
        "v1:/videos/a.mp4?mode=video&width=320&fit=contain&time=0s&audio=true"
        "&quality=auto&compression=auto&format=mp4"
    )
    assert len(key_digest(key)) == 64


@pytest.mark.parametrize(("ms", "text"), [(0, "0s"), (2000, "2s"), (1500, "1.5s"), (1, "0.001s")])
def test_format_ms_is_minimal(ms: int, text: str) -> None:
    """Canonical times have one spelling."""
    assert format_ms(ms) == text


VALUE_SAMPLES = (
    *("video", "frame", "spritesheet", "audio", "jpg", "png", "webp", "vtt", "m4a", "mp4"),
    *("2s", "1.5m", "jpeg", "true", "false", "cover", "crop", "fill", "scale-down", "high"),
)
NAME_SAMPLES = (
    *("width", "height", "mode", "time", "format", "junk", "fit", "duration", "audio"),
    *("quality", "compression", "fps", "imageCount", "filename", "w", "h", "obj-fit"),
    *("mute", "q", "f", "start", "dur", "WIDTH", "ImageCount"),
)
query_values = st.one_of(
    st.text(max_size=12),
    st.integers(-10, 5000).map(str),
    st.sampled_from(VALUE_SAMPLES),
)
queries = st.dictionaries(
    st.sampled_from(NAME_SAMPLES),
    query_values,
)


@given(queries)
def test_parser_raises_only_validation_errors(query: dict[str, str]) -> None:
    """No input makes the parser raise anything but InvalidOption."""
    with contextlib.suppress(InvalidOption):
        parse_options(query)


@given(queries)
def test_canonical_key_is_idempotent(query: dict[str, str]) -> None:
    """Parsing the canonical form again gives the same options and key."""
    try:
        options = parse_options(query)
    except InvalidOption:
        return
    canonical = dict(part.split("=", 1) for part in options.canonical().split("&"))
    again = parse_options(canonical)
    assert again == options
    assert cache_key("/p", again) == cache_key("/p", options)


@pytest.mark.parametrize(
    ("alias_query", "canonical_query"),
    [
        ({"w": "320", "h": "240"}, {"width": "320", "height": "240"}),
        (
            {"obj-fit": "crop", "w": "100", "h": "100"},
            {"fit": "cover", "width": "100", "height": "100"},
        ),
        ({"obj-fit": "fill", "w": "100"}, {"fit": "contain", "width": "100"}),
        ({"mute": "true"}, {"audio": "false"}),
        ({"q": "high", "f": "mp4"}, {"quality": "high", "format": "mp4"}),
        ({"start": "2s", "dur": "3s"}, {"time": "2s", "duration": "3s"}),
        ({"WIDTH": "320"}, {"width": "320"}),
    ],
)
def test_aliases_share_the_canonical_key(
    alias_query: dict[str, str], canonical_query: dict[str, str]
) -> None:
    """Akamai-style aliases parse to exactly the options of the documented names."""
    assert parse_options(alias_query) == parse_options(canonical_query)
    assert cache_key("/p", parse_options(alias_query)) == cache_key(
        "/p", parse_options(canonical_query)
    )


def test_conflicting_spellings_are_refused() -> None:
    """w=100&width=200 is ambiguous: 400 naming width."""
    with pytest.raises(InvalidOption, match="width"):
        parse_options({"w": "100", "width": "200"})
    assert parse_options({"w": "100", "width": "100"}).width == 100


def test_format_implies_mode() -> None:
    """format=m4a alone means mode=audio; image formats mean frame; vtt means spritesheet."""
    assert parse_options({"format": "m4a"}).mode is Mode.AUDIO
    assert parse_options({"format": "webp"}).mode is Mode.FRAME
    sheet = parse_options({"format": "vtt", "width": "160", "height": "90"})
    assert sheet.mode is Mode.SPRITESHEET


@pytest.mark.parametrize("param", ["width", "height", "fit"])
def test_audio_mode_refuses_picture_options(param: str) -> None:
    """width, height or fit with mode=audio is a 400 naming the parameter."""
    with pytest.raises(InvalidOption) as info:
        parse_options({"mode": "audio", param: "100" if param != "fit" else "cover"})
    assert info.value.param == param


def test_audio_mode_refuses_muting() -> None:
    """audio=false or mute=true contradicts mode=audio."""
    for query in ({"mode": "audio", "audio": "false"}, {"mode": "audio", "mute": "true"}):
        with pytest.raises(InvalidOption, match="audio"):
            parse_options(query)


def test_spritesheet_needs_a_tile_size() -> None:
    """mode=spritesheet without width or height is a 400 saying which is missing."""
    with pytest.raises(InvalidOption, match="height"):
        parse_options({"mode": "spritesheet", "width": "160"})
    sheet = parse_options({"mode": "spritesheet", "width": "160", "height": "90"})
    assert (sheet.image_count, sheet.format) == (16, OutputFormat.JPG)


def test_filename_is_lowercased_and_not_in_the_key() -> None:
    """filename only names the download: it never splits the cache."""
    named = parse_options({"filename": "My-Clip_1"})
    assert named.filename == "my-clip_1"
    assert cache_key("/p", named) == cache_key("/p", parse_options({}))


def test_default_duration_comes_from_the_limits() -> None:
    """Without duration, the configured default applies (None: the rest of the source)."""
    assert parse_options({}).duration_ms is None
    limited = parse_options({}, Limits(default_duration_ms=30_000))
    assert limited.duration_ms == 30_000
    assert parse_options({"mode": "frame"}, Limits(default_duration_ms=30_000)).duration_ms is None


ALIAS_OF = {"width": "w", "height": "h", "fit": "obj-fit", "quality": "q", "format": "f"}
ALIAS_OF |= {"time": "start", "duration": "dur"}


@given(queries, st.data())
def test_canonical_key_is_alias_invariant(query: dict[str, str], data: st.DataObject) -> None:
    """Renaming any parameter to its alias (or changing its case) never changes the key."""
    try:
        options = parse_options(query)
    except InvalidOption:
        return
    renamed: dict[str, str] = {}
    for name, value in normalize_params(query).items():
        spelling = data.draw(st.sampled_from([name, name.upper(), ALIAS_OF.get(name, name)]))
        renamed[spelling] = value
    assert cache_key("/p", parse_options(renamed)) == cache_key("/p", options)
