"""Which addresses a callback may reach: every form of an internal address is refused, global
ones are not, and the operator's allow-list lets its own networks and hosts through."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from workers import egress
from workers.egress import AllowList, InternalAddress
from workers.settings import Settings

INTERNAL = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("::1", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("10.0.0.5", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("fd00::5", "private"),
    ("100.64.0.1", "shared"),
    ("100.127.255.254", "shared"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("fec0::1", "site-local"),
    ("0.1.2.3", "private"),
    ("192.0.2.1", "private"),
    ("2001:db8::1", "private"),
    ("::ffff:127.0.0.1", "IPv4-mapped 127.0.0.1, loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped 169.254.169.254, link-local"),
    ("::ffff:10.0.0.1", "IPv4-mapped 10.0.0.1, private"),
    ("::ffff:0.0.0.0", "IPv4-mapped 0.0.0.0, unspecified"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("::93.184.216.34", "IPv4-compatible"),
    ("64:ff9b::127.0.0.1", "NAT64 127.0.0.1, loopback"),
    ("64:ff9b::10.0.0.1", "NAT64 10.0.0.1, private"),
    ("64:ff9b:1::93.184.216.34", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 127.0.0.1, loopback"),
    ("2002:a9fe:a9fe::1", "6to4 169.254.169.254, link-local"),
    # Teredo: server 65.54.227.120, client 192.0.2.45 (RFC 4380's example).
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo 192.0.2.45, private"),
]
GLOBAL = [
    "93.184.216.34",
    "1.1.1.1",
    "2606:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:93.184.216.34",
    "64:ff9b::93.184.216.34",
    "2002:5db8:d822::1",
]
SPELLINGS = [
    ("127.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0x7F.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.000.000.001", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("::1", "::1"),
    ("0:0:0:0:0:0:0:1", "::1"),
    ("::ffff:127.0.0.1", "::ffff:7f00:1"),
    ("::ffff:7f00:1", "::ffff:7f00:1"),
]


@pytest.mark.parametrize(("address", "kind"), INTERNAL)
def test_every_internal_address_is_refused_with_its_kind(address: str, kind: str) -> None:
    parsed = ipaddress.ip_address(address)
    assert egress.internal_kind(parsed) == kind
    assert AllowList().refusal(parsed) == kind


@pytest.mark.parametrize("address", GLOBAL)
def test_a_global_address_is_allowed(address: str) -> None:
    parsed = ipaddress.ip_address(address)
    assert egress.internal_kind(parsed) is None
    assert AllowList().refusal(parsed) is None


@pytest.mark.parametrize(("host", "address"), SPELLINGS)
def test_an_ip_literal_is_read_in_every_spelling_the_resolver_reads(
    host: str, address: str
) -> None:
    assert egress.literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "host", ["hooks.example.com", "localhost", "127.0.0.1.example.com", "0x7f000001.nip.io"]
)
def test_a_name_is_no_literal(host: str) -> None:
    assert egress.literal_address(host) is None


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost.",
        "LocalHost",
        "api.localhost",
        "metadata.google.internal",
        "ip-10-0-0-1.ec2.internal",
        "printer.local",
        "router.home.arpa",
        "box.localdomain",
        "redis",
        "metadata",
    ],
)
def test_a_name_only_meaningful_inside_a_network_is_internal(host: str) -> None:
    assert egress.internal_name(host)


@pytest.mark.parametrize(
    "host", ["hooks.example.com", "hooks.example.com.", "localhost.example.com", "internal.io"]
)
def test_a_full_domain_name_is_not_internal(host: str) -> None:
    assert not egress.internal_name(host)


def test_the_allow_list_allows_its_networks_and_their_ipv4_mapped_forms() -> None:
    allowed = AllowList.parse(["127.0.0.0/8", "::1", "10.1.0.0/16", "fd00::/8"])
    for address in ["127.0.0.1", "127.9.9.9", "::1", "10.1.2.3", "::ffff:10.1.2.3", "fd00::5"]:
        assert allowed.refusal(ipaddress.ip_address(address)) is None, address
    for address, kind in [
        ("10.2.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("::ffff:10.2.0.1", "IPv4-mapped 10.2.0.1, private"),
        ("fe80::1", "link-local"),
    ]:
        assert allowed.refusal(ipaddress.ip_address(address)) == kind, address


def test_the_allow_list_allows_its_hosts_by_name() -> None:
    allowed = AllowList.parse(["receiver", "Hooks.Corp.Example."])
    assert allowed.hosts == frozenset({"receiver", "hooks.corp.example"})
    assert allowed.allows_host("RECEIVER")
    assert allowed.allows_host("hooks.corp.example.")
    assert not allowed.allows_host("other.corp.example")
    assert not allowed.allows_host("corp.example")


@pytest.mark.parametrize(
    "entry", ["10.0.0.1/8", "10.0.0.0/33", "300.1.1.1", "hooks_.example", "a b", "", "::1/200"]
)
def test_an_entry_that_is_neither_network_nor_name_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="is neither a network nor a host name"):
        AllowList.parse([entry])


@pytest.mark.parametrize(
    ("variable", "entries"),
    [
        ("127.0.0.0/8,::1", ["127.0.0.0/8", "::1"]),
        (" 10.0.0.0/8 , receiver ,", ["10.0.0.0/8", "receiver"]),
        ('["10.0.0.0/8", "receiver"]', ["10.0.0.0/8", "receiver"]),
        ("", []),
    ],
)
def test_the_setting_reads_a_json_list_or_commas(
    monkeypatch: pytest.MonkeyPatch, variable: str, entries: list[str]
) -> None:
    monkeypatch.setenv("T2IROUTE_CALLBACK_ALLOWED_NETWORKS", variable)
    assert Settings().callback_allowed_networks == entries
    assert Settings().callback_allowed == AllowList.parse(entries)


@pytest.mark.parametrize("variable", ["10.0.0.0/33", '["10.0.0.0/8", 7]', "[not json"])
def test_a_bad_entry_refuses_to_start(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv("T2IROUTE_CALLBACK_ALLOWED_NETWORKS", variable)
    with pytest.raises(ValidationError, match="callback_allowed_networks"):
        Settings()


def test_nothing_internal_is_allowed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("T2IROUTE_CALLBACK_ALLOWED_NETWORKS", raising=False)
    assert Settings().callback_allowed == AllowList()


def _resolving(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> list[str]:
    """Point ``egress.resolve`` at these addresses; the names it was asked for."""
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[egress.Address]:
        asked.append(host)
        return [ipaddress.ip_address(a) for a in addresses]

    monkeypatch.setattr(egress, "resolve", resolve)
    return asked


def test_a_host_is_refused_when_any_of_its_addresses_is_internal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _resolving(monkeypatch, "93.184.216.34", "10.0.0.7")
    with pytest.raises(InternalAddress) as refused:
        egress.checked_addresses("mixed.example", 443, AllowList())
    assert (
        str(refused.value) == "host mixed.example resolves to internal address 10.0.0.7 (private)"
    )
    assert refused.value.address == ipaddress.ip_address("10.0.0.7")


def test_a_host_of_global_addresses_gives_them_all_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked = _resolving(monkeypatch, "2606:4700::1111", "93.184.216.34")
    addresses = egress.checked_addresses("hooks.example", 443, AllowList())
    assert addresses == [
        ipaddress.ip_address("2606:4700::1111"),
        ipaddress.ip_address("93.184.216.34"),
    ]
    assert asked == ["hooks.example"]


def test_an_allowed_network_or_host_lets_an_internal_address_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _resolving(monkeypatch, "10.0.0.7")
    assert egress.checked_addresses("hooks.corp", 80, AllowList.parse(["10.0.0.0/24"]))
    assert egress.checked_addresses("hooks.corp", 80, AllowList.parse(["hooks.corp"]))
    with pytest.raises(InternalAddress):
        egress.checked_addresses("hooks.corp", 80, AllowList.parse(["10.0.1.0/24", "other"]))


def test_the_real_resolver_reads_literals_and_the_hosts_file() -> None:
    assert egress.resolve("2130706433", 80) == [ipaddress.ip_address("127.0.0.1")]
    assert ipaddress.ip_address("127.0.0.1") in egress.resolve("localhost", 80)
    with pytest.raises(InternalAddress, match="loopback"):
        egress.checked_addresses("localhost", 80, AllowList())
