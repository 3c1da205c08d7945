"""IPv4 <-> IPv6 header translation (stacktrans.family), checked against scapy."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from stacktrans.family import to_ipv4, to_ipv6
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


def test_a_partial_checksum_moves_with_the_pseudo_header() -> None:
    """A GSO packet's field holds the folded pseudo-header sum: completed over the
    payload afterwards, the translated one is what a full checksum over IPv6 gives."""
    seg = TCP(sport=1, dport=2, seq=7, flags="A") / Raw(PAYLOAD)
    full6 = IPv6(bytes(IPv6(src=V6S, dst=V6D) / seg))
    v4 = bytearray(bytes(IP(src=V4S, dst=V4D) / seg))
    pseudo4 = IPv4Address(V4S).packed + IPv4Address(V4D).packed
    pseudo4 += (6).to_bytes(2, "big") + (len(v4) - 20).to_bytes(2, "big")
    folded = (~_csum(pseudo4)) & 0xFFFF  # what the kernel leaves in a partial field
    v4[36:38] = folded.to_bytes(2, "big")
    v6 = bytearray(to_ipv6(v4, IPv6Address(V6S), IPv6Address(V6D), partial=True) or b"")
    # Complete it as the kernel does: the sum from the transport header on, stored ~.
    done = (~_csum_raw(v6[40:])) & 0xFFFF
    assert done == full6[TCP].chksum


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


def _csum_raw(data: bytes | bytearray) -> int:
    """The folded one's complement sum (not complemented)."""
    raw = bytes(data) + (b"\0" if len(data) % 2 else b"")
    total = sum(int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _csum(data: bytes) -> int:
    return (~_csum_raw(data)) & 0xFFFF
