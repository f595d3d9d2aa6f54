"""Pure HTTP range and conditional-request logic (RFC 9110 sections 13 and 14).

Quart's own Range handling fails on suffix ranges and buffers generator bodies, so resizer
decides ranges here and streams the selected bytes itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime

from ..errors import RangeNotSatisfiable


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


def etag_matches(header: str, etag: str) -> bool:
    """Weak comparison of an If-None-Match list against ``etag`` ('*' matches anything)."""
    if header.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in header.split(","))


def not_modified(
    *, if_none_match: str | None, if_modified_since: str | None, etag: str, last_modified: float
) -> bool:
    """Whether a GET/HEAD should answer 304 (If-None-Match takes precedence, RFC 9110 13.2.2)."""
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    if if_modified_since is not None:
        try:
            since = parsedate_to_datetime(if_modified_since).timestamp()
        except (TypeError, ValueError, IndexError):
            return False
        return int(last_modified) <= since
    return False


def if_range_allows(header: str | None, etag: str) -> bool:
    """If-Range: honour Range only when the validator still matches (strong comparison)."""
    if header is None:
        return True
    value = header.strip()
    return not value.startswith("W/") and value == etag


def http_date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)
