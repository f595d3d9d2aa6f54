"""The one request parser both hit paths share: URL forms, option params, source URLs."""

from __future__ import annotations

from urllib.parse import urlencode

from hypothesis import given
from hypothesis import strategies as st

from resizer.targets import parse_target

CDN = "/cdn-cgi/media/mode=frame,width=100/http://host/bikes.mp4"


def test_query_form_takes_the_first_value_of_each_name() -> None:
    """Repeated option names keep their first value; blank values and decoding as usual."""
    target = parse_target("/videos/a.mp4", b"width=100&mode=frame&width=200&fit=&q=a%20b")
    assert dict(target.params) == {"width": "100", "mode": "frame", "fit": "", "q": "a b"}
    assert (target.source, target.remote, target.cdn_form) == ("/videos/a.mp4", False, False)


def test_remote_source_keeps_its_query_string_as_sent() -> None:
    """A remote URL's query string is the source's own: order, repeats and escapes kept."""
    for raw in (b"b=2&a=1", b"a=1&b=2", b"a=1&a=2", b"sig=x%2Fy%3D&t=", b"flag"):
        target = parse_target(CDN, raw)
        assert target.source == "http://host/bikes.mp4?" + raw.decode()
        assert dict(target.params) == {"mode": "frame", "width": "100"}
    assert parse_target(CDN, b"").source == "http://host/bikes.mp4"


def test_reordered_remote_queries_are_different_sources() -> None:
    """?b=2&a=1 and ?a=1&b=2 name two URLs (the origin may answer differently): two keys."""
    assert parse_target(CDN, b"b=2&a=1").source != parse_target(CDN, b"a=1&b=2").source


pairs = st.lists(
    st.tuples(st.sampled_from(["a", "b", "width", "x y", "é"]), st.text(max_size=5)),
    max_size=6,
)


@given(pairs=pairs)
def test_remote_query_round_trips(pairs: list[tuple[str, str]]) -> None:
    """Whatever the remote query holds, the source URL ends with exactly those bytes."""
    raw = urlencode(pairs).encode()
    source = parse_target(CDN, raw).source
    assert source == "http://host/bikes.mp4" + ("?" + raw.decode() if raw else "")


@given(pairs=pairs)
def test_query_form_params_are_the_first_of_each_name(pairs: list[tuple[str, str]]) -> None:
    """For any query, each option name maps to its first value, in any order of names."""
    first: dict[str, str] = {}
    for name, value in pairs:
        first.setdefault(name, value)
    assert dict(parse_target("/videos/a.mp4", urlencode(pairs).encode()).params) == first
