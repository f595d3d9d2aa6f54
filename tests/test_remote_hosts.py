"""Which remote hosts and ports may be fetched (pure), and the server's own addresses."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resizer.config import load_config
from resizer.errors import ConfigError, Forbidden
from resizer.sources.security import AddressPolicy, ListeningAddresses
from resizer.targets import check_remote_allowed, host_allowed, parse_target, split_host_port


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("media.example.com", ("media.example.com", None)),
        ("Media.Example.com:8080", ("media.example.com", 8080)),
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
    ],
)
def test_split_host_port(entry: str, expected: tuple[str, int | None]) -> None:
    """Entries are host, host:port, [v6] or [v6]:port; a bare IPv6 literal is a host."""
    assert split_host_port(entry) == expected


@pytest.mark.parametrize(
    "entry", ["", ":80", "host:0", "host:65536", "host:http", "[::1", "[::1]x"]
)
def test_split_host_port_refuses_malformed_entries(entry: str) -> None:
    """Empty hosts, ports outside 1-65535 and broken brackets are errors."""
    with pytest.raises(ValueError, match=r"."):
        split_host_port(entry)


@given(port=st.integers(1, 65535))
def test_a_bare_host_allows_only_the_web_ports(port: int) -> None:
    """``host`` allows 80 and 443 and nothing else; ``host:port`` allows that port only."""
    assert host_allowed(["media.example.com"], "MEDIA.example.com", port) == (port in (80, 443))
    assert host_allowed([f"media.example.com:{port}"], "media.example.com", port)
    other = port % 65535 + 1
    assert not host_allowed([f"media.example.com:{port}"], "media.example.com", other)
    assert not host_allowed(["other.example.com"], "media.example.com", 443)


def test_remote_targets_are_checked_with_their_port() -> None:
    """The port of the URL (or its scheme's default) must be allowed too."""
    allowed = ("127.0.0.1", "cdn.example.com:8443")
    check_remote_allowed(
        parse_target("/cdn-cgi/media/width=9/http://127.0.0.1/a.mp4", b""), allowed
    )
    check_remote_allowed(
        parse_target("/cdn-cgi/media/width=9/https://cdn.example.com:8443/a.mp4", b""), allowed
    )
    for url in ("http://127.0.0.1:22/a.mp4", "https://cdn.example.com/a.mp4"):
        with pytest.raises(Forbidden, match="port"):
            check_remote_allowed(parse_target(f"/cdn-cgi/media/width=9/{url}", b""), allowed)


ORIGIN = """
[[origins]]
name = "v"
matcher = "^/v/(.+)$"
[[origins.sources]]
type = "filesystem"
root = "."
"""


def security(entries: str) -> str:
    return f"[security]\nallowed_remote_hosts = {entries}\n{ORIGIN}"


def test_malformed_allowed_hosts_are_configuration_errors() -> None:
    """``check-config`` names a bad allowed_remote_hosts entry."""
    with pytest.raises(ConfigError) as caught:
        load_config(text=security('["host:99999"]'), env={})
    assert caught.value.problems[0][0] == "security.allowed_remote_hosts"


def test_an_allowed_host_with_a_port_still_names_its_ip() -> None:
    """``127.0.0.1:9000`` names 127.0.0.1 for the address policy, as ``127.0.0.1`` does."""
    config = load_config(text=security('["127.0.0.1:9000"]'), env={})
    assert AddressPolicy.from_config(config).allows(ipaddress.ip_address("127.0.0.1"))


async def test_the_policy_refuses_the_servers_own_listening_addresses() -> None:
    """Bound to 127.0.0.1:P, any name for 127.0.0.1:P is refused; other ports are not."""
    listening = ListeningAddresses()
    policy = AddressPolicy.of(["127.0.0.1"], listening=listening)
    await policy.check("127.0.0.1", 8080)  # not bound yet
    listening.add_binds(["http://127.0.0.1:8080"])
    with pytest.raises(Forbidden, match="itself"):
        await policy.check("127.0.0.1", 8080)
    await policy.check("127.0.0.1", 8081)


def test_a_wildcard_bind_covers_every_local_address() -> None:
    """Bound to 0.0.0.0:P, loopback and this machine's addresses on P are the server."""
    listening = ListeningAddresses()
    listening.add_binds(["http://0.0.0.0:8080"])
    assert listening.includes(ipaddress.ip_address("127.0.0.2"), 8080)
    assert not listening.includes(ipaddress.ip_address("127.0.0.1"), 8081)
    assert not listening.includes(ipaddress.ip_address("192.0.2.1"), 8080)  # TEST-NET: not ours
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("127.0.0.1", 9))  # no traffic: picks a local source address
        own = ipaddress.ip_address(probe.getsockname()[0])
    assert listening.includes(own, 8080)
