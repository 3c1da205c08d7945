"""IPv4 <-> IPv6 header translation of one TCP or UDP packet (RFC 7915, stateless).

A flow whose identifiers are of one IP version and whose only locators left are of the
other is carried in packets of the locators' version: the sender turns each packet into
the other version, the receiver turns it back. Both ends run dime, so each knows the
whole mapping; the addresses come from the caller (the HID table's), never from the
packet. What the sockets see is exactly what they would have seen: the transport
header and payload go through untouched but for the checksum, which covers a
pseudo-header of the version on the wire.

Mapping (RFC 7915 sections 4.1 and 5.1): TOS <-> traffic class, TTL <-> hop limit,
total length <-> payload length, protocol <-> next header; the flow label is 0; an
IPv4 packet gets DF set (IPv6 routers do not fragment), identification 0 and its
header checksum. Refused (None): IPv4 fragments, IPv4 options (not carried), IPv6
extension headers, and anything but TCP and UDP.

The transport checksum changes by the difference of the two pseudo-headers' sums,
which is the difference of the addresses' sums alone: the length and protocol words
add up to the same in both (RFC 1071 arithmetic, as in :mod:`stacktrans.packet`). An
IPv4 UDP packet without a checksum (0) gets a full one: IPv6 requires it. A packet
whose transport checksum is *partial* (``partial``: the kernel handed over a GSO
packet whose checksum it completes later, so the field holds the folded
pseudo-header sum, not complemented) gets the same difference added uncomplemented.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from stacktrans.packet import Buffer, checksum

TCP, UDP = 6, 17
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV6_HEADER = struct.Struct("!IHBB16s16s")
#: IPv6's header is this much longer than IPv4's (without options): what a flow's
#: path MTU loses when it is carried across (its MSS must be that much smaller).
GROWTH = 20
#: Offset of the checksum field in each transport header.
CSUM_AT = {TCP: 16, UDP: 6}
DF = 0x4000


def _words(data: bytes) -> int:
    """The 16-bit word sum of ``data`` (an even length), modulo 0xFFFF."""
    return int.from_bytes(data, "big") % 0xFFFF


def _adjust(l4: bytearray, proto: int, delta: int, partial: bool) -> None:
    """Add the pseudo-header change ``delta`` to the transport checksum in ``l4``."""
    at = CSUM_AT[proto]
    old = int.from_bytes(l4[at : at + 2], "big")
    if partial:
        # The kernel's own field: the folded pseudo-header sum, not complemented.
        total = old + delta % 0xFFFF
        new = (total & 0xFFFF) + (total >> 16)
        new = new if new != 0xFFFF else 0  # one's complement: 0xFFFF and 0 are both 0
    else:
        total = (~old & 0xFFFF) + delta % 0xFFFF
        total = (total & 0xFFFF) + (total >> 16)
        new = ~total & 0xFFFF
        if proto == UDP and new == 0:
            new = 0xFFFF  # 0 means "no checksum" in UDP
    l4[at : at + 2] = new.to_bytes(2, "big")


def _full_udp_checksum(l4: bytearray, src: bytes, dst: bytes) -> None:
    """Compute a UDP checksum from scratch (an IPv4 datagram that carried none)."""
    l4[6:8] = b"\0\0"
    pseudo = src + dst + struct.pack("!IxxxB", len(l4), UDP)
    value = checksum(pseudo + bytes(l4))
    l4[6:8] = (value or 0xFFFF).to_bytes(2, "big")


def to_ipv6(
    packet: Buffer, src: IPv6Address, dst: IPv6Address, *, partial: bool = False
) -> bytes | None:
    """The IPv4 TCP/UDP ``packet`` as IPv6 from ``src`` to ``dst``; None if refused."""
    data = bytes(packet)
    if len(data) < IPV4_HEADER.size or data[0] != 0x45:
        return None  # not IPv4, or options (not carried across)
    _, tos, total, _, frag, ttl, proto, _, old_src, old_dst = IPV4_HEADER.unpack_from(data)
    if proto not in CSUM_AT or frag & 0x3FFF:
        return None  # not TCP/UDP, or a fragment (MF or an offset)
    if total > len(data) or total < 20 + CSUM_AT[proto] + 2:
        return None  # truncated
    l4 = bytearray(data[20:total])
    new_src, new_dst = src.packed, dst.packed
    if proto == UDP and l4[6:8] == b"\0\0":
        _full_udp_checksum(l4, new_src, new_dst)
    else:
        delta = _words(new_src + new_dst) - _words(old_src + old_dst)
        _adjust(l4, proto, delta, partial)
    head = IPV6_HEADER.pack((6 << 28) | (tos << 20), len(l4), proto, ttl, new_src, new_dst)
    return head + bytes(l4)


def to_ipv4(
    packet: Buffer, src: IPv4Address, dst: IPv4Address, *, partial: bool = False
) -> bytes | None:
    """The IPv6 TCP/UDP ``packet`` as IPv4 from ``src`` to ``dst``; None if refused."""
    data = bytes(packet)
    if len(data) < IPV6_HEADER.size or data[0] >> 4 != 6:
        return None
    first, plen, proto, hops, old_src, old_dst = IPV6_HEADER.unpack_from(data)
    end = IPV6_HEADER.size + plen
    if proto not in CSUM_AT or end > len(data) or plen < CSUM_AT[proto] + 2:
        return None  # an extension header, or truncated
    if 20 + plen > 0xFFFF:
        return None  # (a jumbogram would not fit an IPv4 header)
    l4 = bytearray(data[IPV6_HEADER.size : end])
    new_src, new_dst = src.packed, dst.packed
    delta = _words(new_src + new_dst) - _words(old_src + old_dst)
    _adjust(l4, proto, delta, partial)
    tclass = (first >> 20) & 0xFF
    head = bytearray(
        IPV4_HEADER.pack(0x45, tclass, 20 + plen, 0, DF, hops, proto, 0, new_src, new_dst)
    )
    head[10:12] = checksum(head).to_bytes(2, "big")
    return bytes(head) + bytes(l4)
