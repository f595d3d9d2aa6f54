"""Pure HTTP range and conditional-request logic (RFC 9110 sections 13 and 14).

Quart's own Range handling fails on suffix ranges and buffers generator bodies, so resizer
decides ranges here and streams the selected bytes itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime

from ..errors import PreconditionFailed, RangeNotSatisfiable


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int  # first byte, inclusive
    stop: int  # one past the last byte

    @property
    def length(self) -> int:
        return self.stop - self.start

    def content_range(self, size: int | None) -> str:
        total = "*" if size is None else str(size)
        return f"bytes {self.start}-{self.stop - 1}/{total}"


_RANGE_SPEC_RE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range_spec(header: str | None) -> tuple[int | None, int | None] | None:
    """(first, last) of a single well-formed byte range, either may be None (``a-``,
    ``-n`` gives (None, n)); None when the header is absent, malformed or multiple."""
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _RANGE_SPEC_RE.match(spec)
    if match is None or not (match[1] or match[2]):
        return None
    first = int(match[1]) if match[1] else None
    last = int(match[2]) if match[2] else None
    if first is not None and last is not None and last < first:
        return None  # invalid syntax per RFC 9110 14.1.1: ignore the header
    return first, last


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range ``header`` selects from a representation of ``size`` bytes.

    Returns None when the whole representation should be sent (no header, a malformed
    header, another unit, or several ranges, which a server may ignore); raises
    ``RangeNotSatisfiable`` when the range is well-formed but selects no byte.
    """
    spec = parse_range_spec(header)
    if spec is None:
        return None
    first, last = spec
    if first is None:  # suffix range: the last N bytes
        assert last is not None
        if last == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - last), size)
    if first >= size:
        raise RangeNotSatisfiable(size)
    stop = size if last is None else min(last + 1, size)
    return ByteRange(first, stop)


def parse_http_date(value: str | None) -> float | None:
    """The POSIX time an HTTP-date names; None when absent or not a date (then ignored)."""
    if value is None:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000": still UTC, not local time
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def etag_matches(header: str, etag: str | None, *, strong: bool = False) -> bool:
    """Whether an If-Match / If-None-Match field matches ``etag``.

    '*' matches any current representation. ``etag`` None is a representation whose tag is
    not known yet (a miss), which no listed tag matches. The weak comparison (If-None-Match)
    ignores ``W/``; the strong one (If-Match) never matches a weak tag.
    """
    if header.strip() == "*":
        return True
    if etag is None:
        return False
    tags = [tag.strip() for tag in header.split(",")]
    if strong:
        return not etag.startswith("W/") and etag in tags
    ours = etag.removeprefix("W/")
    return any(tag.removeprefix("W/") == ours for tag in tags)


def not_modified(
    *,
    if_none_match: str | None,
    if_modified_since: str | None,
    etag: str | None,
    last_modified: float | None,
) -> bool:
    """Whether a GET/HEAD should answer 304 (If-None-Match takes precedence, RFC 9110 13.2.2)."""
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    since = parse_http_date(if_modified_since)
    return since is not None and last_modified is not None and int(last_modified) <= since


def check_preconditions(
    headers: Mapping[str, str], etag: str | None, last_modified: float | None
) -> bool:
    """Steps 1-4 of RFC 9110 13.2.2 for a GET or HEAD of a representation that exists.

    ``headers`` has lower-case names. ``etag`` and ``last_modified`` are None while unknown
    (a miss: the output has neither until it is complete). Raises PreconditionFailed (412);
    returns True when the answer is 304 Not Modified.
    """
    if_match = headers.get("if-match")
    if if_match is not None:
        if not etag_matches(if_match, etag, strong=True):
            raise PreconditionFailed("If-Match: no listed entity tag is the current one")
    else:  # If-Unmodified-Since counts only without If-Match, and only against a date
        since = parse_http_date(headers.get("if-unmodified-since"))
        if since is not None and last_modified is not None and int(last_modified) > since:
            raise PreconditionFailed("If-Unmodified-Since: modified since that date")
    return not_modified(
        if_none_match=headers.get("if-none-match"),
        if_modified_since=headers.get("if-modified-since"),
        etag=etag,
        last_modified=last_modified,
    )


def if_range_allows(header: str | None, etag: str | None, last_modified: float | None) -> bool:
    """If-Range (RFC 9110 13.1.5): honour Range only when the validator is the current one.

    An entity tag must match strongly. An HTTP-date must equal Last-Modified, as strong as
    the ETag here (8.8.2.2): a published entry's bytes never change, so only a key published
    twice within one second could fool it. Unknown validators (a miss) match nothing: the
    whole representation is sent.
    """
    if header is None:
        return True
    value = header.strip()
    if value.startswith(('"', "W/")):
        return etag is not None and not value.startswith("W/") and value == etag
    date = parse_http_date(value)
    return date is not None and last_modified is not None and date == int(last_modified)


def http_date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)
