"""Range and conditional-request decisions (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resizer.errors import RangeNotSatisfiable
from resizer.web.ranges import (
    ByteRange,
    etag_matches,
    http_date,
    if_range_allows,
    not_modified,
    parse_range,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", ByteRange(0, 100)),
        ("bytes=0-0", ByteRange(0, 1)),
        ("bytes=100-", ByteRange(100, 1000)),
        ("bytes=-500", ByteRange(500, 1000)),
        ("bytes=-5000", ByteRange(0, 1000)),
        ("bytes=900-5000", ByteRange(900, 1000)),
        ("BYTES = 1-2", ByteRange(1, 3)),
        ("bytes=999-", ByteRange(999, 1000)),
    ],
)
def test_satisfiable_ranges(header: str, expected: ByteRange) -> None:
    """Closed, open and suffix ranges select the right bytes, clamped to the size."""
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize(
    "header",
    [None, "", "bytes", "items=0-1", "bytes=a-b", "bytes=5-1", "bytes=-", "bytes=0-1,5-6", "0-1"],
)
def test_ignored_ranges(header: str | None) -> None:
    """Absent, malformed, foreign-unit or multiple ranges mean: send everything (200)."""
    assert parse_range(header, 1000) is None


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-2000", "bytes=-0", "bytes=5000-"])
def test_unsatisfiable_ranges(header: str) -> None:
    """Ranges that select no byte raise 416 with Content-Range: bytes */size."""
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 1000)
    assert info.value.status == 416
    assert info.value.headers() == {"Content-Range": "bytes */1000"}


def test_empty_representation_cannot_satisfy_any_range() -> None:
    """A zero-byte body satisfies no range, suffix ones included."""
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-10", 0)


def test_content_range_header() -> None:
    """Content-Range names the inclusive last byte and the total (or * while unknown)."""
    assert ByteRange(0, 100).content_range(1000) == "bytes 0-99/1000"
    assert ByteRange(5, 6).content_range(None) == "bytes 5-5/*"


@given(
    size=st.integers(0, 10_000),
    first=st.one_of(st.none(), st.integers(0, 20_000)),
    last=st.one_of(st.none(), st.integers(0, 20_000)),
)
def test_any_range_lies_within_the_body(size: int, first: int | None, last: int | None) -> None:
    """Whatever the header, a selected range is non-empty and inside the representation."""
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    try:
        selected = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if selected is not None:
        assert 0 <= selected.start < selected.stop <= size


def test_etag_comparison_is_weak_for_if_none_match() -> None:
    """If-None-Match matches lists, '*' and W/ variants."""
    assert etag_matches('"a", "b"', '"b"')
    assert etag_matches("*", '"b"')
    assert etag_matches('W/"b"', '"b"')
    assert not etag_matches('"c"', '"b"')


def test_not_modified_prefers_if_none_match() -> None:
    """A non-matching If-None-Match wins over a satisfied If-Modified-Since."""
    date = http_date(2_000_000_000)
    assert not not_modified(
        if_none_match='"x"', if_modified_since=date, etag='"y"', last_modified=1_000_000_000
    )
    assert not_modified(
        if_none_match=None, if_modified_since=date, etag='"y"', last_modified=1_000_000_000
    )
    assert not not_modified(
        if_none_match=None, if_modified_since="garbage", etag='"y"', last_modified=1
    )


def test_if_range_needs_a_strong_match() -> None:
    """If-Range honours Range only for the same strong ETag."""
    assert if_range_allows(None, '"a"')
    assert if_range_allows('"a"', '"a"')
    assert not if_range_allows('W/"a"', '"a"')
    assert not if_range_allows('"b"', '"a"')
