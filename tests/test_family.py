"""IPv4 <-> IPv6 header translation (stacktrans.family), checked against scapy."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from stacktrans.family import segment, to_ipv4, to_ipv6
from stacktrans.packet import checksum

V4S, V4D = "198.51.100.2", "192.0.2.1"
V6S, V6D = "2001:db8:2::2", "2001:db8:c1::1"
PAYLOAD = bytes(range(256)) * 5 + b"odd"


def l4(proto: str) -> TCP | UDP:
    if proto == "tcp":
        return TCP(sport=40312, dport=5001, seq=123456789, ack=987654321, flags="PA", window=501)
    return UDP(sport=40312, dport=5001)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ipv4_to_ipv6_and_back_is_what_scapy_builds(proto: str) -> None:
    v4 = bytes(IP(src=V4S, dst=V4D, ttl=61, tos=0xB8, flags="DF") / l4(proto) / Raw(PAYLOAD))
    v6 = to_ipv6(v4, IPv6Address(V6S), IPv6Address(V6D))
    want6 = bytes(IPv6(src=V6S, dst=V6D, hlim=61, tc=0xB8) / l4(proto) / Raw(PAYLOAD))
    assert v6 == want6
    back = to_ipv4(v6, IPv4Address(V4S), IPv4Address(V4D))
    assert back is not None
    got = IP(back)
    want = IP(v4)
    assert (got.src, got.dst, got.ttl, got.tos, got.len) == (V4S, V4D, 61, 0xB8, want.len)
    assert bytes(got.payload) == bytes(want.payload)  # transport header and data, checksum too
    assert got.flags == "DF" and got.id == 0
    assert checksum(back[:20]) == 0  # a valid header checksum


def test_an_ipv4_udp_datagram_without_checksum_gets_one() -> None:
    v4 = bytearray(bytes(IP(src=V4S, dst=V4D) / UDP(sport=1, dport=2) / Raw(b"abc")))
    v4[26:28] = b"\0\0"  # no checksum (allowed over IPv4)
    v6 = to_ipv6(v4, IPv6Address(V6S), IPv6Address(V6D))
    assert v6 == bytes(IPv6(src=V6S, dst=V6D, hlim=64) / UDP(sport=1, dport=2) / Raw(b"abc"))


def test_whatever_the_checksum_field_held_the_packet_leaves_complete() -> None:
    """A GSO packet's field holds the folded pseudo-header sum (the kernel completes
    it later): the translated packet carries the full checksum all the same."""
    seg = TCP(sport=1, dport=2, seq=7, flags="A") / Raw(PAYLOAD)
    want = bytes(IPv6(src=V6S, dst=V6D) / seg)
    v4 = bytearray(bytes(IP(src=V4S, dst=V4D) / seg))
    for field in (b"\x12\x34", b"\0\0"):
        v4[36:38] = field
        assert to_ipv6(v4, IPv6Address(V6S), IPv6Address(V6D)) == want


@pytest.mark.parametrize("version", [4, 6])
def test_a_large_tcp_packet_is_cut_into_segments_as_gso_would(version: int) -> None:
    ip = IP(src=V4S, dst=V4D) if version == 4 else IPv6(src=V6S, dst=V6D)
    big = bytes(ip / TCP(sport=1, dport=2, seq=0xFFFFFF00, flags="FPA") / Raw(PAYLOAD))
    parts = segment(big, 600)
    assert all(len(p) <= 600 for p in parts) and len(parts) == 3
    layer = IP if version == 4 else IPv6
    got = [layer(p) for p in parts]
    assert b"".join(bytes(g[TCP].payload) for g in got) == PAYLOAD
    seqs = [g[TCP].seq for g in got]
    assert seqs[0] == 0xFFFFFF00 and seqs[1] == (0xFFFFFF00 + len(got[0][TCP].payload)) % 2**32
    assert [str(g[TCP].flags) for g in got] == ["A", "A", "FPA"]
    for g, raw in zip(got, parts, strict=True):  # each checksum is right (scapy recomputes)
        fresh = g.copy()
        del fresh[TCP].chksum
        if version == 4:
            del fresh[IP].chksum
        assert bytes(layer(bytes(fresh))) == raw
    small = bytes(ip / UDP() / Raw(PAYLOAD))
    assert segment(small, 600) == [small]  # (only TCP is cut)


@pytest.mark.parametrize(
    "packet",
    [
        bytes(IP(src=V4S, dst=V4D, flags="MF") / UDP() / Raw(b"x" * 8)),  # a fragment
        bytes(IP(src=V4S, dst=V4D, options=b"\x01\x01\x01\x01") / TCP()),  # options
        bytes(IP(src=V4S, dst=V4D, proto=47) / Raw(b"x" * 20)),  # not TCP/UDP
        bytes(IP(src=V4S, dst=V4D) / TCP())[:30],  # truncated
        bytes(IPv6(src=V6S, dst=V6D) / TCP()),  # not IPv4
    ],
)
def test_what_is_not_carried_across_is_refused(packet: bytes) -> None:
    assert to_ipv6(packet, IPv6Address(V6S), IPv6Address(V6D)) is None


def test_ipv6_with_an_extension_header_is_refused() -> None:
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt

    packet = bytes(IPv6(src=V6S, dst=V6D) / IPv6ExtHdrDestOpt() / TCP())
    assert to_ipv4(packet, IPv4Address(V4S), IPv4Address(V4D)) is None
    assert to_ipv4(bytes(IP() / TCP()), IPv4Address(V4S), IPv4Address(V4D)) is None
