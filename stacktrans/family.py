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

The transport checksum is computed afresh over the new pseudo-header: whatever the
field held (a full checksum, none in an IPv4 UDP datagram, or the partial sum of a
packet the kernel handed over before completing it: a GSO packet). Either in full,
as a packet injected through a raw socket must be, or, for TCP and when asked
(``partial``), just the pseudo-header's sum, for the kernel to complete: summing
64 kB in Python costs ~120 us, the kernel's offload next to nothing
(:mod:`stacktrans.link_send`). A TCP packet larger than the path allows (a GSO
packet) that goes through a raw socket is cut into segments first (:func:`segment`).
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

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


def _l4_checksum(l4: bytearray, proto: int, src: bytes, dst: bytes, partial: bool = False) -> None:
    """Compute the transport checksum in ``l4`` from scratch, for ``src`` -> ``dst``;
    ``partial`` (TCP only): just the pseudo-header's sum, which whoever completes it
    (the kernel's checksum offload) adds the rest to."""
    at = CSUM_AT[proto]
    l4[at : at + 2] = b"\0\0"
    pseudo = src + dst + struct.pack("!IxxxB", len(l4), proto)  # (v4's sums the same)
    if partial and proto == TCP:
        l4[at : at + 2] = (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big")
        return
    value = checksum(pseudo + bytes(l4))
    if proto == UDP and value == 0:
        value = 0xFFFF  # 0 means "no checksum" in UDP
    l4[at : at + 2] = value.to_bytes(2, "big")


def to_ipv6(
    packet: Buffer, src: IPv6Address, dst: IPv6Address, partial: bool = False
) -> bytes | None:
    """The IPv4 TCP/UDP ``packet`` as IPv6 from ``src`` to ``dst``; None if refused.
    ``partial``: a TCP packet's checksum is left partial (:func:`complete`)."""
    data = bytes(packet)
    if len(data) < IPV4_HEADER.size or data[0] != 0x45:
        return None  # not IPv4, or options (not carried across)
    _, tos, total, _, frag, ttl, proto, _, _, _ = IPV4_HEADER.unpack_from(data)
    if proto not in CSUM_AT or frag & 0x3FFF:
        return None  # not TCP/UDP, or a fragment (MF or an offset)
    if total > len(data) or total < 20 + CSUM_AT[proto] + 2:
        return None  # truncated
    l4 = bytearray(data[20:total])
    _l4_checksum(l4, proto, src.packed, dst.packed, partial)
    head = IPV6_HEADER.pack((6 << 28) | (tos << 20), len(l4), proto, ttl, src.packed, dst.packed)
    return head + bytes(l4)


def to_ipv4(
    packet: Buffer, src: IPv4Address, dst: IPv4Address, partial: bool = False
) -> bytes | None:
    """The IPv6 TCP/UDP ``packet`` as IPv4 from ``src`` to ``dst``; None if refused.
    ``partial``: a TCP packet's checksum is left partial (:func:`complete`)."""
    data = bytes(packet)
    if len(data) < IPV6_HEADER.size or data[0] >> 4 != 6:
        return None
    first, plen, proto, hops, _, _ = IPV6_HEADER.unpack_from(data)
    end = IPV6_HEADER.size + plen
    if proto not in CSUM_AT or end > len(data) or plen < CSUM_AT[proto] + 2:
        return None  # an extension header, or truncated
    if 20 + plen > 0xFFFF:
        return None  # (a jumbogram would not fit an IPv4 header)
    l4 = bytearray(data[IPV6_HEADER.size : end])
    _l4_checksum(l4, proto, src.packed, dst.packed, partial)
    tclass = (first >> 20) & 0xFF
    head = bytearray(
        IPV4_HEADER.pack(0x45, tclass, 20 + plen, 0, DF, hops, proto, 0, src.packed, dst.packed)
    )
    head[10:12] = checksum(head).to_bytes(2, "big")
    return bytes(head) + bytes(l4)


#: ICMP errors a flow's socket acts on, (type, code) on the wire -> the flow's own
#: version's: destination unreachable and time exceeded (RFC 7915 sections 4.2 and
#: 5.2; path MTU errors are the carrier's, parameter problems are not carried).
ICMP6_TO_ICMP4 = {(1, 0): (3, 1), (1, 1): (3, 10), (1, 2): (3, 1), (1, 3): (3, 1),
                  (1, 4): (3, 3), (3, 0): (11, 0), (3, 1): (11, 1)}  # fmt: skip
ICMP4_TO_ICMP6 = {(3, c): (1, 0) for c in (0, 1, 5, 6, 7, 8, 11, 12)}
ICMP4_TO_ICMP6 |= {(3, 3): (1, 4), (11, 0): (3, 0), (11, 1): (3, 1)}
ICMP4_TO_ICMP6 |= {(3, c): (1, 1) for c in (9, 10, 13, 15)}


def icmp_across(version: int, kind: int, code: int) -> tuple[int, int] | None:
    """The ICMP error of the other IP version for ``kind``/``code`` of ``version``
    (the wire's), or None where it has none a socket acts on."""
    table = ICMP6_TO_ICMP4 if version == 6 else ICMP4_TO_ICMP6
    return table.get((kind, code))


class Layout(NamedTuple):
    """Where things are in a packet this module builds (no IPv4 options, no IPv6
    extension headers)."""

    v6: bool
    ip_len: int  # the IP header's length: where the transport header starts
    proto: int
    src: bytes
    dst: bytes


def layout(packet: bytes) -> Layout:
    """The :class:`Layout` of ``packet`` (as this module builds them)."""
    if packet[0] >> 4 == 6:
        return Layout(True, IPV6_HEADER.size, packet[6], packet[8:24], packet[24:40])
    return Layout(False, 20, packet[9], packet[12:16], packet[16:20])


def complete(packet: bytes) -> bytes:
    """``packet`` (as this module builds them) with its transport checksum computed
    in full, as a packet sent through a raw socket must have it."""
    _, ip_len, proto, src, dst = layout(packet)
    if proto not in CSUM_AT:
        return packet
    l4 = bytearray(packet[ip_len:])
    _l4_checksum(l4, proto, src, dst)
    return packet[:ip_len] + bytes(l4)


def segment(packet: bytes, mtu: int) -> list[bytes]:
    """``packet`` (IPv4 without options, or IPv6 without extension headers, as this
    module builds them) as packets of at most ``mtu`` bytes: a TCP packet's data is
    cut into segments (sequence numbers advanced; FIN and PSH on the last only, CWR
    on the first only; checksums computed), as the kernel's GSO would have done.
    Anything else comes back whole, however large."""
    v6, ip_len, proto, src, dst = layout(packet)
    if len(packet) <= mtu or proto != TCP:
        return [packet]
    head_len = ip_len + (packet[ip_len + 12] >> 4) * 4
    room = mtu - head_len
    if room <= 0:
        return [packet]
    seq = int.from_bytes(packet[ip_len + 4 : ip_len + 8], "big")
    flags = packet[ip_len + 13]
    data = packet[head_len:]
    out = []
    for start in range(0, len(data), room):
        chunk = data[start : start + room]
        last = start + room >= len(data)
        l4 = bytearray(packet[ip_len:head_len]) + chunk
        l4[4:8] = ((seq + start) & 0xFFFFFFFF).to_bytes(4, "big")
        l4[13] = flags & ~(0x01 | 0x08 if not last else 0) & ~(0x80 if start else 0)
        _l4_checksum(l4, TCP, src, dst)
        ip = bytearray(packet[:ip_len])
        if v6:
            ip[4:6] = len(l4).to_bytes(2, "big")
        else:
            ip[2:4] = (ip_len + len(l4)).to_bytes(2, "big")
            ip[10:12] = b"\0\0"
            ip[10:12] = checksum(ip).to_bytes(2, "big")
        out.append(bytes(ip) + bytes(l4))
    return out
