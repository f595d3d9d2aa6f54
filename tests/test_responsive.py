"""Derivatives, IMQuery and client-hint sizing (pure), and the two URL forms."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resizer.config import load_config
from resizer.errors import Forbidden, InvalidOption
from resizer.options import Fit, Mode, cache_key, parse_options
from resizer.responsive import (
    Policy,
    derivative_for_width,
    device_class,
    policy_from_config,
    resolve_options,
)
from resizer.targets import check_remote_allowed, parse_target, sheet_url

POLICY = policy_from_config(load_config(env={}))
IPHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"
IPAD = "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15"
ANDROID_TABLET = "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 Chrome/120 Safari"
DESKTOP = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120 Safari/537.36"


def size(query: dict[str, str], headers: dict[str, str] | None = None) -> tuple[object, ...]:
    resolved = resolve_options(query, headers or {}, POLICY)
    return resolved.derivative, resolved.options.width, resolved.options.height


def test_shipped_derivatives() -> None:
    """desktop/tablet/mobile are 1920x1080, 1280x720, 854x480; thumbnail is a 640x360 frame."""
    assert size({"derivative": "desktop"}) == ("desktop", 1920, 1080)
    assert size({"derivative": "tablet"}) == ("tablet", 1280, 720)
    assert size({"derivative": "mobile"}) == ("mobile", 854, 480)
    thumb = resolve_options({"derivative": "thumbnail"}, {}, POLICY).options
    assert (thumb.mode, thumb.width, thumb.height) == (Mode.FRAME, 640, 360)


def test_explicit_parameters_override_the_derivative() -> None:
    """URL parameters win over a derivative's values."""
    options = resolve_options({"derivative": "mobile", "height": "360"}, {}, POLICY).options
    assert (options.width, options.height, options.fit) == (854, 360, Fit.SCALE_DOWN)


def test_unknown_derivative_is_a_400() -> None:
    """An unknown derivative name is refused with the list of defined ones."""
    with pytest.raises(InvalidOption, match="desktop, mobile, tablet, thumbnail"):
        resolve_options({"derivative": "poster"}, {}, POLICY)


@pytest.mark.parametrize(
    ("imwidth", "derivative"),
    [
        ("320", "mobile"),
        ("854", "mobile"),
        ("855", "tablet"),
        ("1280", "tablet"),
        ("1281", "desktop"),
        ("4000", "desktop"),
    ],
)
def test_imwidth_maps_through_the_breakpoints(imwidth: str, derivative: str) -> None:
    """<=854 mobile, 855-1280 tablet, above desktop."""
    assert size({"imwidth": imwidth})[0] == derivative


def test_im_density_scales_the_width() -> None:
    """imwidth is in CSS pixels: at density 2, 600 CSS px need the tablet derivative."""
    assert size({"imwidth": "600", "im-density": "2"})[0] == "tablet"
    assert size({"im-viewwidth": "400"})[0] == "mobile"


def test_imwidth_and_imheight_pick_the_nearest_derivative_or_the_values() -> None:
    """Near a derivative (size and aspect within tolerance) it is used; else the values are."""
    assert size({"imwidth": "1250", "imheight": "700"})[0] == "tablet"
    assert size({"imwidth": "500", "imheight": "500"}) == (None, 500, 500)
    assert size({"imwidth": "5000", "imheight": "2500"}) == (None, 2000, 1000)  # clamped


def test_requests_mapping_to_one_derivative_share_a_key() -> None:
    """imwidth=400, imwidth=800 and derivative=mobile are one cache entry."""
    keys = {
        cache_key("/v.mp4", resolve_options(query, {}, POLICY).options)
        for query in ({"imwidth": "400"}, {"imwidth": "800"}, {"derivative": "mobile"})
    }
    assert len(keys) == 1


def test_imref_alone_changes_nothing() -> None:
    """imref is a reference label, not a size: it neither resizes nor splits the cache."""
    assert resolve_options({"imref": "hero"}, {}, POLICY).options == parse_options({})


@pytest.mark.parametrize(
    ("user_agent", "device"),
    [
        (IPHONE, "mobile"),
        (IPAD, "tablet"),
        (ANDROID_TABLET, "tablet"),
        (DESKTOP, "desktop"),
        ("curl/8.5", None),
        ("Googlebot/2.1", None),
        ("", None),
    ],
)
def test_device_class(user_agent: str, device: str | None) -> None:
    """The User-Agent gives mobile, tablet, desktop or nothing (tools and bots)."""
    assert device_class(user_agent) == device


def test_client_hints_choose_a_derivative_and_vary_on_them() -> None:
    """Viewport width x DPR picks the derivative; Vary names the hints consulted."""
    resolved = resolve_options({}, {"Sec-CH-Viewport-Width": "400", "Sec-CH-DPR": "2"}, POLICY)
    assert resolved.derivative == "mobile"
    assert "Sec-CH-Viewport-Width" in resolved.vary
    assert "Sec-CH-DPR" in resolved.vary
    assert "User-Agent" not in resolved.vary


# Every request header the responsive logic could read, with values that matter to it.
HINT_HEADERS = {
    "Save-Data": st.sampled_from(["on", "off", "ON"]),
    "ECT": st.sampled_from(["slow-2g", "2g", "3g", "4g"]),
    "Sec-CH-Viewport-Width": st.sampled_from(["320", "400", "1024", "1920", "x"]),
    "Viewport-Width": st.sampled_from(["320", "400", "1024", "1920", "x"]),
    "Sec-CH-DPR": st.sampled_from(["1", "2", "3", "x"]),
    "DPR": st.sampled_from(["1", "2", "3", "x"]),
    "User-Agent": st.sampled_from([IPHONE, IPAD, DESKTOP, "curl/8"]),
}
hint_requests = st.fixed_dictionaries({}, optional=HINT_HEADERS)


@given(first=hint_requests, second=hint_requests)
def test_vary_names_every_header_that_could_change_the_variant(
    first: dict[str, str], second: dict[str, str]
) -> None:
    """A request agreeing with another on its Vary headers gets the same options (a shared
    cache may answer it with the stored response)."""
    chosen = resolve_options({}, first, POLICY)
    agreeing = {name: first[name] for name in chosen.vary if name in first}
    others = {k: v for k, v in second.items() if k not in chosen.vary}
    assert resolve_options({}, {**others, **agreeing}, POLICY).options == chosen.options


def test_legacy_dpr_and_viewport_width_are_always_in_vary() -> None:
    """Vary lists DPR and Viewport-Width whether or not this request sent them."""
    for headers in ({}, {"Viewport-Width": "400", "DPR": "3"}, {"User-Agent": IPHONE}):
        vary = resolve_options({}, headers, POLICY).vary
        assert {"Viewport-Width", "DPR", "Sec-CH-DPR", "Sec-CH-Viewport-Width"} <= set(vary)


def test_save_data_and_slow_networks_prefer_small_outputs() -> None:
    """Save-Data: on and ECT 2g give mobile; 3g caps a desktop viewport at tablet."""
    assert size({}, {"Save-Data": "on", "User-Agent": DESKTOP})[0] == "mobile"
    assert size({}, {"ECT": "2g", "User-Agent": DESKTOP})[0] == "mobile"
    assert size({}, {"ECT": "3g", "Sec-CH-Viewport-Width": "1920"})[0] == "tablet"


def test_user_agent_is_the_last_resort() -> None:
    """Without hints the device class decides; unknown clients keep the source size."""
    assert size({}, {"User-Agent": IPHONE})[0] == "mobile"
    resolved = resolve_options({}, {"User-Agent": "curl/8"}, POLICY)
    assert (resolved.derivative, resolved.options.width) == (None, None)
    assert "User-Agent" in resolved.vary


def test_explicit_sizes_skip_responsive_sizing() -> None:
    """Given a width, hints are not consulted and nothing varies."""
    resolved = resolve_options({"width": "320"}, {"User-Agent": IPHONE}, POLICY)
    assert (resolved.derivative, resolved.vary) == (None, ())
    assert resolve_options({"mode": "audio"}, {"User-Agent": IPHONE}, POLICY).vary == ()


def test_responsive_sizing_respects_lowered_limits() -> None:
    """With max_width 1000 the desktop preset is refused at config load, never served."""
    text = "[limits]\nmax_width = 1000\n"
    with pytest.raises(Exception, match=r"derivatives\.desktop\.width"):
        load_config(text=text + _ORIGIN, env={})


_ORIGIN = """
[[origins]]
name = "v"
matcher = "^/(.+)$"
[[origins.sources]]
type = "filesystem"
root = "/srv"
"""


@given(
    st.dictionaries(
        st.sampled_from(
            ["imwidth", "imheight", "im-viewwidth", "im-density", "derivative", "width", "mode"]
        ),
        st.one_of(
            st.text(max_size=6),
            st.integers(-5, 20_000).map(str),
            st.sampled_from(["mobile", "nan", "inf", "2.5"]),
        ),
    ),
    st.dictionaries(
        st.sampled_from(["Sec-CH-Viewport-Width", "Sec-CH-DPR", "ECT", "Save-Data", "User-Agent"]),
        st.text(max_size=12),
    ),
)
def test_resolution_never_crashes(query: dict[str, str], headers: dict[str, str]) -> None:
    """Any parameters and hints give options within the limits or a 400, nothing else."""
    with contextlib.suppress(InvalidOption):
        options = resolve_options(query, headers, POLICY).options
        assert options.width is None or 10 <= options.width <= 2000
        assert options.height is None or 10 <= options.height <= 2000


def test_no_order_dependent_memoisation() -> None:
    """The same request gives the same answer whatever was resolved before."""
    first = resolve_options({"imwidth": "1000"}, {}, POLICY)
    resolve_options({"imwidth": "300"}, {}, POLICY)
    assert resolve_options({"imwidth": "1000"}, {}, POLICY) == first


def test_breakpoint_lookup_is_monotonic() -> None:
    """Wider never maps to a narrower derivative."""
    order = {"mobile": 0, "tablet": 1, "desktop": 2}
    ranks = [order[derivative_for_width(w, POLICY.breakpoints) or ""] for w in range(1, 3000, 7)]
    assert ranks == sorted(ranks)
    assert derivative_for_width(100, {}) is None
    assert isinstance(POLICY, Policy)


# --- URL forms --------------------------------------------------------------------------


def test_cdn_form_splits_options_and_source() -> None:
    """/cdn-cgi/media/<k=v,...>/<path> names an origin path with comma-separated options."""
    target = parse_target("/cdn-cgi/media/width=640,mode=frame/videos/a.mp4")
    assert (target.source, dict(target.params), target.remote) == (
        "/videos/a.mp4",
        {"width": "640", "mode": "frame"},
        False,
    )


def test_both_url_forms_share_a_key() -> None:
    """The query form and the cdn-cgi form of one request have one cache key."""
    a = parse_target("/videos/a.mp4", b"width=640")
    b = parse_target("/cdn-cgi/media/width=640/videos/a.mp4")
    key_a = cache_key(a.source, resolve_options(a.params, {}, POLICY).options)
    key_b = cache_key(b.source, resolve_options(b.params, {}, POLICY).options)
    assert key_a == key_b


@pytest.mark.parametrize(
    "path",
    [
        "/cdn-cgi/media/width=640/https://cdn.example.com/a.mp4",
        "/cdn-cgi/media/width=640/https:/cdn.example.com/a.mp4",
    ],
)
def test_cdn_form_accepts_absolute_urls(path: str) -> None:
    """An absolute source URL survives a merged '//' and is marked remote."""
    target = parse_target(path)
    assert (target.source, target.remote, target.remote_host) == (
        "https://cdn.example.com/a.mp4",
        True,
        "cdn.example.com",
    )


def test_remote_hosts_need_an_allow_list_entry() -> None:
    """Remote sources are 403 unless their host is listed."""
    target = parse_target("/cdn-cgi/media/width=640/https://cdn.example.com/a.mp4")
    with pytest.raises(Forbidden):
        check_remote_allowed(target, ())
    with pytest.raises(Forbidden):
        check_remote_allowed(target, ("example.com",))
    check_remote_allowed(target, ("CDN.example.com",))


@pytest.mark.parametrize(
    "path", ["/cdn-cgi/media/width=640", "/cdn-cgi/media/width=640/", "/cdn-cgi/media/width/a.mp4"]
)
def test_malformed_cdn_urls_are_400(path: str) -> None:
    """A missing source or a non key=value option is a 400."""
    with pytest.raises(InvalidOption):
        parse_target(path)


def test_sheet_url_keeps_the_form_and_the_options() -> None:
    """A VTT's cues point at the same spritesheet as JPEG, in query or cdn-cgi form."""
    options = parse_options(
        {"mode": "spritesheet", "width": "160", "height": "90", "format": "vtt"}
    )
    local = sheet_url(parse_target("/videos/a b.mp4"), options)
    assert local.startswith("/videos/a%20b.mp4?mode=spritesheet&width=160&height=90")
    assert local.endswith("format=jpg")
    remote_target = parse_target("/cdn-cgi/media/mode=spritesheet/https://x.example/a.mp4")
    remote = sheet_url(remote_target, options)
    assert remote.startswith("/cdn-cgi/media/mode=spritesheet,width=160,height=90")
    assert remote.endswith("/https://x.example/a.mp4")
