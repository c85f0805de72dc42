"""Where a callback may go: the addresses a caller's URL may make a worker reach.

A callback URL is the caller's, and so is the ``metadata`` in its body: unchecked, a worker
would POST to whatever it can reach, its own Redis and Postgres on 127.0.0.1, a cloud's
metadata service (169.254.169.254), any host of the private network. The rule, as OWASP's
SSRF guidance puts it and Stripe's and Svix's webhook senders apply it: a callback reaches
only addresses that are reachable on the Internet, every address a host resolves to is
checked, and the connection goes to an address that was checked (a second lookup could
answer otherwise: DNS rebinding). An operator allows networks and hosts of its own with
``T2IROUTE_CALLBACK_ALLOWED_NETWORKS`` (an ``AllowList``).

The producer uses this without DNS: an IP literal, in any spelling the resolver reads
(``127.1``, ``2130706433``, ``0x7f000001``), and a name that only means something inside a
network (``localhost``, ``*.internal``, a name without a dot) are refused when the request
is made. The callback sender resolves the host (``checked_addresses``) when it sends."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

__all__ = [
    "Address",
    "AllowList",
    "InternalAddress",
    "checked_addresses",
    "internal_kind",
    "internal_name",
    "literal_address",
    "resolve",
    "split_entries",
]

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

# RFC 6598: carrier-grade NAT space, neither private nor global; named for the refusal.
_SHARED = IPv4Network("100.64.0.0/10")
# RFC 6052: the well-known NAT64 prefix; the IPv4 address is the last 32 bits. A host behind
# DNS64 resolves every IPv4-only name into it, so the IPv4 address decides.
_NAT64 = IPv6Network("64:ff9b::/96")
# RFC 8215: NAT64 prefixes for local use, never global.
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")
# RFC 4291 2.5.5.1: IPv4-compatible addresses, deprecated (:: and ::1 are their own kinds).
_IPV4_COMPATIBLE = IPv6Network("::/96")

# Names only meaningful inside a network: RFC 6761 (localhost), RFC 6762 (local, mDNS),
# RFC 8375 (home.arpa), ICANN's private-use internal (metadata.google.internal, AWS's
# *.ec2.internal), and the localdomain of hosts files.
_INTERNAL_SUFFIXES = ("localhost", "local", "internal", "home.arpa", "localdomain")
# A host name as an allow-list entry: LDH labels; the last one not all digits, so that an
# address that is no address (300.1.1.1) is not read as a name.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"(?:{_LABEL}\.)*(?=[a-z0-9-]*[a-z]){_LABEL}")


def _own_kind(address: Address) -> str | None:
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address in _SHARED:
        return "shared"
    if address.is_private:
        return "private"
    if isinstance(address, IPv6Address) and address.is_site_local:
        return "site-local"
    if not address.is_global:
        return "not global"
    return None


def _embedded(address: IPv6Address) -> tuple[str, tuple[IPv4Address, ...]] | None:
    """The IPv4 addresses an IPv6 address carries, and the form that carries them."""
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", (address.ipv4_mapped,)
    if address in _NAT64:
        return "NAT64", (IPv4Address(address.packed[-4:]),)
    if address.sixtofour is not None:
        return "6to4", (address.sixtofour,)
    if address.teredo is not None:
        return "Teredo", address.teredo
    return None


def internal_kind(address: Address) -> str | None:
    """What makes ``address`` internal (``"loopback"``, ``"private"``, ``"link-local"``...),
    or None for an address reachable on the Internet. An IPv6 address that carries an IPv4
    one (IPv4-mapped, NAT64, 6to4, Teredo) is internal when that address is."""
    if isinstance(address, IPv6Address):
        embedded = _embedded(address)
        if embedded is not None:
            form, inner = embedded
            for ipv4 in inner:
                kind = _own_kind(ipv4)
                if kind is not None:
                    return f"{form} {ipv4}, {kind}"
            if form in ("IPv4-mapped", "NAT64"):
                return None
        if address in _NAT64_LOCAL:
            return "local-use NAT64"
        if address in _IPV4_COMPATIBLE and not (address.is_loopback or address.is_unspecified):
            return "IPv4-compatible"
    return _own_kind(address)


def _name(host: str) -> str:
    return host.lower().removesuffix(".")


def internal_name(host: str) -> bool:
    """True for a name that only means something inside a network: ``localhost`` and the
    suffixes kept for local use, or a single label (``redis``, ``metadata``), which the
    resolver completes with the local network's own domain."""
    name = _name(host)
    if "." not in name:
        return True
    return any(name == suffix or name.endswith("." + suffix) for suffix in _INTERNAL_SUFFIXES)


def literal_address(host: str) -> Address | None:
    """The address ``host`` is when it is an IP literal, in any spelling the resolver reads
    (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``::ffff:127.0.0.1``, with
    or without a final dot), or None for a name. Never looks anything up."""
    try:
        found = socket.getaddrinfo(
            _name(host), None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
        )
    except (OSError, UnicodeError):
        return None
    return ipaddress.ip_address(found[0][4][0])


def resolve(host: str, port: int) -> list[Address]:
    """The addresses ``host`` resolves to, in the order to try them: the system's resolver
    (hosts file, DNS, and IP literals in every spelling it reads). OSError if it does not
    resolve. The one lookup a callback makes, and what a test points elsewhere."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(entry[4][0]) for entry in found))


class InternalAddress(Exception):
    """A host resolved to an address a callback may not reach."""

    def __init__(self, host: str, address: Address, kind: str) -> None:
        super().__init__(f"host {host} resolves to internal address {address} ({kind})")
        self.host = host
        self.address = address
        self.kind = kind


@dataclass(frozen=True)
class AllowList:
    """What an operator allows despite the rule: networks whose addresses a callback may
    reach, and host names it may reach whatever they resolve to."""

    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """The allow-list of ``entries``: networks (``10.0.0.0/8``, ``fd00::/8``, one
        address) and host names (``hooks.corp.example``, ``receiver``). ValueError naming
        the first entry that is neither."""
        networks: list[Network] = []
        hosts: set[str] = set()
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip()))
                continue
            except ValueError as exc:
                refusal = exc
            name = _name(entry.strip())
            if "/" in entry or not _HOST_NAME.fullmatch(name):
                raise ValueError(f"{entry!r} is neither a network nor a host name: {refusal}")
            hosts.add(name)
        return cls(tuple(networks), frozenset(hosts))

    def allows_host(self, host: str) -> bool:
        """True when the operator allows ``host`` by name."""
        return _name(host) in self.hosts

    def refusal(self, address: Address) -> str | None:
        """What makes ``address`` internal, or None when a callback may reach it: it is
        global, or in a network the operator allows (directly or as the IPv4 address of its
        IPv4-mapped form)."""
        kind = internal_kind(address)
        if kind is None:
            return None
        forms = [address]
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        if any(form in network for form in forms for network in self.networks):
            return None
        return kind


def split_entries(text: str) -> list[str]:
    """An allow-list as an environment variable states it: a JSON list of strings, or
    entries separated by commas (spaces around them and empty entries ignored)."""
    if text.lstrip().startswith("["):
        entries = json.loads(text)
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError("must be a JSON list of strings")
        return entries
    return [entry.strip() for entry in text.split(",") if entry.strip()]


def checked_addresses(host: str, port: int, allowed: AllowList) -> list[Address]:
    """Every address ``host`` resolves to (``resolve``), once each is checked: InternalAddress
    when any may not be reached, unless the host itself is allowed; OSError when it does not
    resolve. Connect to one of these, never to the name, which could resolve otherwise."""
    addresses = resolve(host, port)
    if not allowed.allows_host(host):
        for address in addresses:
            kind = allowed.refusal(address)
            if kind is not None:
                raise InternalAddress(host, address, kind)
    return addresses
