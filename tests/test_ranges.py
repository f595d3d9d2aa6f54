"""Range and conditional-request decisions (pure)."""

from __future__ import annotations

import contextlib
import itertools
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resizer.errors import PreconditionFailed, RangeNotSatisfiable
from resizer.web.ranges import (
    ByteRange,
    check_preconditions,
    etag_matches,
    http_date,
    if_range_allows,
    not_modified,
    parse_http_date,
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


ETAG = '"0123abcd"'
CREATED = 1_700_000_000.75  # an entry's creation time; Last-Modified says ...000
LAST_MODIFIED = http_date(CREATED)


def test_if_range_needs_a_strong_match() -> None:
    """If-Range honours Range only for the same strong ETag."""
    assert if_range_allows(None, ETAG, CREATED)
    assert if_range_allows(ETAG, ETAG, CREATED)
    assert if_range_allows(f"  {ETAG} ", ETAG, CREATED)
    assert not if_range_allows(f"W/{ETAG}", ETAG, CREATED)
    assert not if_range_allows('"b"', ETAG, CREATED)
    assert not if_range_allows(f"{ETAG}, {ETAG}", ETAG, CREATED)  # one validator, not a list


def test_if_range_date_must_equal_last_modified() -> None:
    """An HTTP-date If-Range holds exactly when it names Last-Modified (RFC 9110 13.1.5)."""
    assert if_range_allows(LAST_MODIFIED, ETAG, CREATED)
    # The same instant in the obsolete RFC 850 form is the same validator.
    rfc850 = datetime.fromtimestamp(int(CREATED), UTC).strftime("%A, %d-%b-%y %H:%M:%S GMT")
    assert if_range_allows(rfc850, ETAG, CREATED)
    assert not if_range_allows(http_date(CREATED - 1), ETAG, CREATED)
    assert not if_range_allows(http_date(CREATED + 1), ETAG, CREATED)
    assert not if_range_allows("yesterday", ETAG, CREATED)


@given(lag=st.integers(-(10**9), 10**9), created=st.floats(0, 4e9))
def test_if_range_date_matches_one_second_only(lag: int, created: float) -> None:
    """Any date If-Range holds for the Last-Modified second and for no other."""
    header = http_date(int(created) + lag)
    assert if_range_allows(header, ETAG, created) == (lag == 0)


@given(header=st.text(max_size=40))
def test_if_range_without_validators_never_holds(header: str) -> None:
    """On a miss (no ETag, no date yet) any If-Range voids the Range: the whole body is sent."""
    assert not if_range_allows(header, None, None)
    assert isinstance(if_range_allows(header, ETAG, CREATED), bool)  # never raises


def test_parse_http_date() -> None:
    """HTTP-dates in all three forms are UTC instants; anything else is None."""
    assert parse_http_date(LAST_MODIFIED) == int(CREATED)
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777
    assert parse_http_date("Sun Nov  6 08:49:37 1994") == 784111777  # asctime: no zone, UTC
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 -0000") == 784111777
    for bad in (None, "", "garbage", "Sun, 06 Nov 1994"):
        assert parse_http_date(bad) is None


def test_if_match_comparison_is_strong() -> None:
    """If-Match matches '*', or a listed tag by strong comparison; never a weak tag."""
    assert etag_matches("*", ETAG, strong=True)
    assert etag_matches(f'"x", {ETAG}', ETAG, strong=True)
    assert not etag_matches(f"W/{ETAG}", ETAG, strong=True)
    assert not etag_matches(ETAG, f"W/{ETAG}", strong=True)
    assert not etag_matches('"x"', ETAG, strong=True)


def test_unknown_etag_matches_only_the_wildcard() -> None:
    """A representation whose tag is not known yet (a miss) matches '*' and nothing else."""
    assert etag_matches("*", None)
    assert etag_matches("*", None, strong=True)
    assert not etag_matches(ETAG, None)
    assert not etag_matches(ETAG, None, strong=True)


# --- RFC 9110 13.2.2, exhaustively over what each header can say ------------------------

TAGS = {  # what an If-Match / If-None-Match field holds
    "absent": None,
    "star": "*",
    "ours": ETAG,
    "ours-weak": f"W/{ETAG}",
    "other": '"other"',
    "list": f'"other", {ETAG}',
}
DATES = {  # what an If-Modified-Since / If-Unmodified-Since field holds
    "absent": None,
    "garbage": "not a date",
    "before": http_date(CREATED - 10),  # earlier than Last-Modified
    "equal": LAST_MODIFIED,
    "after": http_date(CREATED + 10),
}


def expected_outcome(
    if_match: str, unmodified: str, none_match: str, modified: str, known: bool
) -> int:
    """The status RFC 9110 13.2.2 prescribes, written from the abstract cases (200: go on).

    ``known``: the representation's ETag and date are known (a hit); else not yet (a miss).
    """
    if if_match != "absent":  # step 1: If-Match, strong comparison
        holds = if_match == "star" or (known and if_match in ("ours", "list"))
        if not holds:
            return 412
    elif unmodified == "before" and known:  # step 2; a bad date or no date: ignored
        return 412
    if none_match != "absent":  # step 3: If-None-Match, weak comparison
        if none_match == "star" or (known and none_match in ("ours", "ours-weak", "list")):
            return 304
    elif modified in ("equal", "after") and known:  # step 4
        return 304
    return 200


@pytest.mark.parametrize("known", [True, False])
def test_preconditions_follow_rfc_9110_order(known: bool) -> None:
    """Every combination of the four conditional headers gets the RFC's answer, in order:
    If-Match else If-Unmodified-Since (412), then If-None-Match else If-Modified-Since (304)."""
    etag, created = (ETAG, CREATED) if known else (None, None)
    for if_match, unmodified, none_match, modified in itertools.product(TAGS, DATES, TAGS, DATES):
        headers = {
            name: value
            for name, value in (
                ("if-match", TAGS[if_match]),
                ("if-unmodified-since", DATES[unmodified]),
                ("if-none-match", TAGS[none_match]),
                ("if-modified-since", DATES[modified]),
            )
            if value is not None
        }
        try:
            outcome = 304 if check_preconditions(headers, etag, created) else 200
        except PreconditionFailed as exc:
            outcome = exc.status
        expected = expected_outcome(if_match, unmodified, none_match, modified, known)
        assert outcome == expected, headers


@given(since=st.integers(0, 4 * 10**9), created=st.floats(0, 4e9))
def test_dates_compare_to_the_last_modified_second(since: int, created: float) -> None:
    """If-Modified-Since gives 304 and If-Unmodified-Since 412 exactly on each side of the
    Last-Modified second (the sub-second part is never sent, so it never counts)."""
    date = http_date(since)
    assert check_preconditions({"if-modified-since": date}, ETAG, created) == (
        int(created) <= since
    )
    if int(created) > since:
        with pytest.raises(PreconditionFailed):
            check_preconditions({"if-unmodified-since": date}, ETAG, created)
    else:
        assert not check_preconditions({"if-unmodified-since": date}, ETAG, created)


conditional_header = st.sampled_from(
    ["if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range"]
)


@given(headers=st.dictionaries(conditional_header, st.text(max_size=30), max_size=5))
def test_any_header_text_gets_an_answer(headers: dict[str, str]) -> None:
    """Whatever the fields say, the outcome is 200, 304 or 412, never an exception."""
    for etag, created in ((ETAG, CREATED), (None, None)):
        with contextlib.suppress(PreconditionFailed):
            check_preconditions(headers, etag, created)


def test_a_date_in_another_zone_is_the_same_instant() -> None:
    """An If-Modified-Since with a numeric zone compares as the instant it names."""
    moment = datetime.fromtimestamp(int(CREATED), UTC)
    shifted = format_datetime(moment.astimezone(timezone(timedelta(hours=5, minutes=30))))
    assert "+0530" in shifted
    assert check_preconditions({"if-modified-since": shifted}, ETAG, CREATED)
