"""Which network addresses an origin fetch may connect to.

A remote URL (or a redirect, or a DNS answer) must not turn resizer into a proxy for the
internal network: addresses in loopback, private, link-local and other special ranges are
refused unless the configuration names that IP literally (a source's ``base_url`` or
``endpoint_url``, or ``[security] allowed_remote_hosts``) or lists its network in
``[security] allowed_private_networks``.

The check resolves the host itself before the request; httpx resolves again when it
connects, so a DNS server answering differently the second time (rebinding) is not covered.

Nor may a fetch point back at resizer's own listening sockets, named or allowed or not: a
request that makes resizer fetch itself is a loop an attacker can multiply.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
import trio

from ..config import Config
from ..errors import Forbidden, OriginFailed
from ..targets import split_host_port

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def is_public(address: IPAddress) -> bool:
    return address.is_global and not address.is_multicast


def is_local(address: IPAddress) -> bool:
    """Whether ``address`` belongs to this machine (one bind, no traffic)."""
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


class ListeningAddresses:
    """Where this server accepts connections, once bound (``add_binds``)."""

    def __init__(self) -> None:
        self._bound: list[tuple[IPAddress, int]] = []

    def add_binds(self, urls: Iterable[str]) -> None:
        """Hypercorn's bind URLs: ``http://127.0.0.1:8080``, ``http://[::]:8080``."""
        for url in urls:
            try:
                parsed = httpx.URL(url)
            except httpx.InvalidURL:
                continue
            ip = parse_ip(parsed.host)
            if ip is not None and parsed.port:
                self._bound.append((ip, parsed.port))

    def includes(self, address: IPAddress, port: int) -> bool:
        for bound, bound_port in self._bound:
            if port != bound_port:
                continue
            if address == bound or (bound.is_unspecified and is_local(address)):
                return True
        return False


@dataclass(frozen=True)
class AddressPolicy:
    named: frozenset[IPAddress] = frozenset()  # IPs the configuration names literally
    networks: tuple[IPNetwork, ...] = ()
    # Refused whatever the rest allows (filled in once the server has bound).
    listening: ListeningAddresses = field(default_factory=ListeningAddresses, compare=False)

    @classmethod
    def from_config(
        cls, config: Config, listening: ListeningAddresses | None = None
    ) -> AddressPolicy:
        hosts: list[str] = []
        for entry in config.security.allowed_remote_hosts:
            try:
                hosts.append(split_host_port(entry)[0])
            except ValueError:
                continue  # the configuration check reports it
        for origin in config.origins:
            for source in origin.sources:
                for url in (source.base_url, source.endpoint_url):
                    if url:
                        try:
                            hosts.append(httpx.URL(url).host)
                        except httpx.InvalidURL:
                            continue
        return cls.of(hosts, config.security.allowed_private_networks, listening)

    @classmethod
    def of(
        cls,
        hosts: Iterable[str],
        networks: Iterable[str] = (),
        listening: ListeningAddresses | None = None,
    ) -> AddressPolicy:
        named = frozenset(ip for ip in map(parse_ip, hosts) if ip is not None)
        return cls(
            named,
            tuple(ipaddress.ip_network(n, strict=False) for n in networks),
            listening or ListeningAddresses(),
        )

    def allows(self, address: IPAddress) -> bool:
        return (
            is_public(address)
            or address in self.named
            or any(address in network for network in self.networks)
        )

    async def check(self, host: str, port: int) -> None:
        """Raise Forbidden unless every address ``host`` resolves to is allowed."""
        literal = parse_ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
            except OSError as exc:
                raise OriginFailed(f"cannot resolve {host!r}") from exc
            addresses = [ip for ip in (parse_ip(str(info[4][0])) for info in infos) if ip]
        if any(self.listening.includes(ip, port) for ip in addresses):
            raise Forbidden(f"{host}:{port} is this server itself")
        refused = [str(ip) for ip in addresses if not self.allows(ip)]
        if refused or not addresses:
            raise Forbidden(f"{host!r} resolves to an address origins may not use")
