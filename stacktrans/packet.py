"""Per-packet IP address rewriting for the StackTrans data plane.

This runs once per packet, so it works on raw bytes with ``struct`` / ``int.from_bytes``
only (no scapy).  Checksums are never recomputed from scratch: they are updated
incrementally (RFC 1624, ``HC' = ~(~HC + ~m + m')``), which costs O(1) whatever the packet
size and keeps a corrupted packet corrupted (its receiver still drops it).

API
---
``parse(packet) -> PacketInfo``
    Locate the IP header, the addresses, the L4 header (TCP, UDP, ICMP, ICMPv6) and, for an
    ICMP error, the quoted packet (``PacketInfo.inner``).  Raises ``RewriteError`` (a
    ``ValueError``) for a malformed or truncated packet and never anything else: the caller
    then lets the packet through untouched.
``rewrite_addresses(buf, info, src, dst) -> None``
    Replace, in place, the source and/or destination address (``None`` keeps it) of the
    packet ``info`` describes, updating the IPv4 header checksum and the TCP / UDP / ICMPv6
    checksum (whose pseudo-header holds the addresses; ICMPv4's has none).
``rewrite_inner_addresses(buf, info, src, dst) -> None``
    The same for the packet quoted by an ICMP/ICMPv6 error (``info.inner``): its addresses,
    its IPv4 header checksum, its L4 checksum when the quote reaches it, and the outer ICMP
    checksum, which covers the quoted bytes.  For an ICMP error about a packet we sent, the
    usual pair is ``rewrite_addresses(dst=...)`` plus ``rewrite_inner_addresses(src=...)``;
    the two calls are independent and may come in either order.
``checksum(data) -> int``
    Full Internet checksum (RFC 1071); a reference for tests and edge cases.
``fill_l4_checksum(buf, info) -> None``
    Compute the TCP / UDP / ICMPv6 checksum of the (outer) packet from scratch: for a
    packet whose checksum the kernel left partial (see below), once it is rewritten.

Addresses are raw bytes: 4 for IPv4, 16 for IPv6.

Checksum rules
--------------
* A UDP checksum of 0 means "none sent" (RFC 768): it stays 0.  We also leave a zero UDP
  checksum alone on IPv6, where it is only legal for tunnels (RFC 6935): filling it in would
  invent a value nobody computed.  A checksum that comes out as 0 is sent as 0xFFFF.
* A non-first fragment (IPv4 offset != 0, or an IPv6 Fragment header with offset != 0) has
  no L4 header: ``l4_offset`` is -1 and only the addresses (and IPv4 header checksum) change.
  The L4 checksum, which covers the whole datagram, lives in the first fragment and is
  updated there, so the reassembled datagram is correct as long as every fragment is
  rewritten the same way.
* IPv6 pseudo-header (RFC 8200 section 8.1): with a Routing header whose Segments Left is
  not 0 the pseudo-header uses the final destination (in the Routing header, untouched), and
  with a Home Address option (RFC 6275) it uses the home address; then rewriting the IP
  destination / source does not change the L4 checksum (``pseudo_dst`` / ``pseudo_src``).

Partial checksums
-----------------
A packet of a local sender (GSO super-packets included) may reach user space with
CHECKSUM_PARTIAL (NFQUEUE's ``NFQA_SKB_CSUMNOTREADY``): its L4 checksum field holds
``fold(pseudo-header sum)``, not complemented, and the device (or
``skb_checksum_help``) would later store ``~fold(field + sum of the L4 bytes)``. A
rewrite of the pseudo-header's addresses by ``delta`` would have to *add* ``delta``
to that field (``P' = P + delta``), where the RFC 1624 update of a full checksum
subtracts it (``HC' = ~(~HC + delta)``). But NFQUEUE marks every packet whose payload
user space replaced CHECKSUM_NONE (``nfqnl_mangle``): the packet leaves as is, so a
rewritten partial packet needs its complete checksum, ``fill_l4_checksum``, O(size).

Limits
------
* ``fill_l4_checksum`` takes the pseudo-header from the IP header: with a Routing
  header whose Segments Left is not 0, or a Home Address option, it is wrong (such
  packets are not rewritten correctly when partial).
* IPv6 extension headers followed: Hop-by-Hop, Routing, Destination Options, Fragment.
  Anything else (AH, ESP, ...) is reported as the L4 protocol, with no checksum to update.
* IPv4 source-route options are not looked at: such packets (filtered nearly everywhere)
  would keep a pseudo-header checksum computed over the rewritten destination.
* An outer packet whose L4 header is shorter than its minimum (TCP 20, UDP 8, ICMP 4 bytes),
  e.g. a tiny first fragment, is rejected.  A quoted packet may be cut anywhere after its IP
  header; its L4 checksum is updated only when the quote contains it (the incremental update
  stays exact for a truncated quote, as it only depends on the words that change).  A quote
  ending in the middle of that field keeps its one byte as is: updating it would need the
  carry out of the missing byte.
* A quote that does not parse leaves ``inner`` as None; the outer packet stays rewritable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PacketInfo",
    "RewriteError",
    "checksum",
    "fill_l4_checksum",
    "parse",
    "rewrite_addresses",
    "rewrite_inner_addresses",
]

TCP: Final = 6
UDP: Final = 17
ICMP: Final = 1
ICMPV6: Final = 58

_HOPOPT: Final = 0
_ROUTING: Final = 43
_FRAGMENT: Final = 44
_DSTOPTS: Final = 60
_HOME_ADDRESS_OPTION: Final = 0xC9

_IPV4_HEADER: Final = 20
_IPV6_HEADER: Final = 40
_ICMP_HEADER: Final = 8  # type, code, checksum, 4 type-specific bytes; the quote follows

# total length, flags+fragment offset, protocol
_V4_FIELDS: Final = struct.Struct("!2xH2xHxB")
# payload length, next header
_V6_FIELDS: Final = struct.Struct("!4xHB")
_U16: Final = struct.Struct("!H")
_PORTS: Final = struct.Struct("!HH")

# Smallest L4 header we accept in an outer packet, per (IP version, protocol).
_L4_MIN: Final[dict[tuple[int, int], int]] = {
    (4, TCP): 20,
    (6, TCP): 20,
    (4, UDP): 8,
    (6, UDP): 8,
    (4, ICMP): 4,
    (6, ICMPV6): 4,
}
# Offset of the checksum inside the L4 header, for the checksums whose pseudo-header holds the
# IP addresses (so not ICMPv4).
_PSEUDO_CSUM_AT: Final[dict[tuple[int, int], int]] = {
    (4, TCP): 16,
    (6, TCP): 16,
    (4, UDP): 6,
    (6, UDP): 6,
    (6, ICMPV6): 2,
}
# ICMP error types (they quote the offending packet), per (IP version, protocol).
_ICMP_ERRORS: Final[dict[tuple[int, int], frozenset[int]]] = {
    (4, ICMP): frozenset({3, 4, 5, 11, 12}),  # unreachable, quench, redirect, time, param
    (6, ICMPV6): frozenset({1, 2, 3, 4}),  # unreachable, too big, time exceeded, param
}
# RFC 4884 "length of the original datagram" field: (byte offset in the ICMP header, unit),
# for the error types that define it.  When non-zero, ICMP extensions follow the quote.
_RFC4884_LENGTH: Final[dict[tuple[int, int], tuple[int, int]]] = {
    (4, 3): (5, 4),
    (4, 11): (5, 4),
    (4, 12): (5, 4),
    (6, 1): (4, 8),
    (6, 3): (4, 8),
}


class RewriteError(ValueError):
    """The packet (or the request) cannot be parsed or rewritten; accept it untouched."""


@dataclass(frozen=True, slots=True)
class PacketInfo:
    """Where things are in one IP packet; produced by ``parse``.

    Offsets are absolute in the buffer given to ``parse``.  ``sport``/``dport`` are 0 unless
    TCP/UDP; ``tcp_flags`` is the TCP flags byte (CWR..FIN), else 0; ``l4_offset`` is -1 when
    there is no L4 header (non-first fragment, or a quote cut inside IPv6 extension headers).
    For a quoted packet, ``end`` is where the quote stops, so fields may be missing past it.
    """

    version: int  # 4 or 6
    proto: int  # L4 protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, other)
    src: bytes
    dst: bytes
    sport: int
    dport: int
    l4_offset: int
    tcp_flags: int
    inner: PacketInfo | None  # the packet quoted by an ICMP error, else None
    ip_offset: int  # start of the IP header (0 unless quoted)
    end: int  # one past the last byte of this packet (or quote)
    pseudo_src: bool  # the IP source is the L4 pseudo-header's source
    pseudo_dst: bool  # the IP destination is the L4 pseudo-header's destination


Buffer = bytes | bytearray | memoryview


# --------------------------------------------------------------------------- checksums


def checksum(data: Buffer) -> int:
    """Return the Internet checksum (RFC 1071) of ``data``, zero-padded to an even length.

    The value to store in a checksum field when ``data`` is the covered bytes with that field
    set to 0.  All-zero (or empty) data gives 0xFFFF.
    """
    raw = bytes(data)
    if len(raw) % 2:
        raw += b"\0"
    # 2**16 == 1 (mod 0xFFFF), so the one's complement sum of the 16-bit words is the whole
    # number modulo 0xFFFF; one C-level bignum operation instead of a Python loop.
    total = int.from_bytes(raw, "big") % 0xFFFF
    if total == 0 and any(raw):
        total = 0xFFFF  # the end-around-carry sum of non-zero words is -0, never +0
    return ~total & 0xFFFF


def _put_address(buf: bytearray, pos: int, new: bytes) -> int:
    """Write ``new`` at ``pos``; return the change of its 16-bit word sum, modulo 0xFFFF.

    That is ``~m + m'`` of RFC 1624 for the whole address at once (valid because addresses
    start at even offsets of every checksummed area).
    """
    end = pos + len(new)
    old = int.from_bytes(buf[pos:end], "big")
    buf[pos:end] = new
    return (int.from_bytes(new, "big") - old) % 0xFFFF


def _update_checksum(buf: bytearray, pos: int, delta: int, *, udp: bool = False) -> int:
    """Apply a word-sum change ``delta`` to the checksum field at ``pos``.

    ``HC' = ~(~HC + delta)`` with end-around carry (RFC 1624 eqn. 3, which, unlike eqn. 2,
    gives the same result as a full recomputation).  With ``udp``, a 0 field ("no
    checksum") is left alone and a result of 0 is stored as 0xFFFF.  Returns the change of
    the field itself modulo 0xFFFF, for a checksum that encloses this one.
    """
    old = (buf[pos] << 8) | buf[pos + 1]
    if udp and old == 0:
        return 0
    total = (~old & 0xFFFF) + delta % 0xFFFF
    total = (total & 0xFFFF) + (total >> 16)  # both terms < 0x10000: one carry at most
    new = ~total & 0xFFFF
    if udp and new == 0:
        new = 0xFFFF
    buf[pos] = new >> 8
    buf[pos + 1] = new & 0xFF
    return (new - old) % 0xFFFF


# --------------------------------------------------------------------------- parsing


def parse(packet: Buffer) -> PacketInfo:
    """Describe the IPv4/IPv6 packet in ``packet`` (which is not modified).

    Raises ``RewriteError`` if the packet is not IPv4/IPv6, or is truncated or malformed in
    the IP header, the IPv6 extension headers or the L4 header; never any other exception.
    Bytes past the IP total / payload length (link padding) are ignored.
    """
    try:
        return _parse_ip(packet, 0, len(packet), quoted=False)
    except (struct.error, IndexError) as exc:  # safety net only: bounds are checked first
        raise RewriteError(f"malformed packet: {exc}") from exc


def parse_head(packet: Buffer) -> PacketInfo:
    """Like :func:`parse`, for the head of a packet (a log's copy, cut at its snap
    length): its headers are read as far as they go, never rewritten."""
    try:
        return _parse_ip(packet, 0, len(packet), quoted=True)
    except (struct.error, IndexError) as exc:
        raise RewriteError(f"malformed packet: {exc}") from exc


def _parse_ip(data: Buffer, off: int, limit: int, *, quoted: bool) -> PacketInfo:
    """Parse the IP packet at ``data[off:limit]``; ``quoted`` if it is an ICMP error's quote.

    A quoted packet may be cut short of the length its header claims.
    """
    if off >= limit:
        raise RewriteError("empty packet")
    version = data[off] >> 4
    if version == 4:
        return _parse_ipv4(data, off, limit, quoted=quoted)
    if version == 6:
        return _parse_ipv6(data, off, limit, quoted=quoted)
    raise RewriteError(f"not an IP packet (version {version})")


def _parse_ipv4(data: Buffer, off: int, limit: int, *, quoted: bool) -> PacketInfo:
    if limit - off < _IPV4_HEADER:
        raise RewriteError("truncated IPv4 header")
    header_len = (data[off] & 0x0F) * 4
    total_len, frag, proto = _V4_FIELDS.unpack_from(data, off)
    if header_len < _IPV4_HEADER or total_len < header_len:
        raise RewriteError("bad IPv4 header or total length")
    if off + header_len > limit:
        raise RewriteError("truncated IPv4 options")
    end = off + total_len
    if end > limit:
        if not quoted:
            raise RewriteError("truncated IPv4 packet")
        end = limit
    src = bytes(data[off + 12 : off + 16])
    dst = bytes(data[off + 16 : off + 20])
    if frag & 0x1FFF:  # non-first fragment: its bytes are the middle of the L4 payload
        return PacketInfo(4, proto, src, dst, 0, 0, -1, 0, None, off, end, True, True)
    return _with_l4(data, 4, proto, src, dst, off, off + header_len, end, True, True, quoted)


def _parse_ipv6(data: Buffer, off: int, limit: int, *, quoted: bool) -> PacketInfo:
    if limit - off < _IPV6_HEADER:
        raise RewriteError("truncated IPv6 header")
    payload_len, nh = _V6_FIELDS.unpack_from(data, off)
    end = off + _IPV6_HEADER + payload_len
    if payload_len == 0 and nh == _HOPOPT:
        end = limit  # jumbogram (RFC 2675): the real length is in a Hop-by-Hop option
    if end > limit:
        if not quoted:
            raise RewriteError("truncated IPv6 packet")
        end = limit
    src = bytes(data[off + 8 : off + 24])
    dst = bytes(data[off + 24 : off + 40])
    pos = off + _IPV6_HEADER
    pseudo_src = pseudo_dst = True
    while nh in (_HOPOPT, _ROUTING, _DSTOPTS, _FRAGMENT):
        if pos + 8 > end:  # every extension header is at least 8 bytes
            if not quoted:
                raise RewriteError("truncated IPv6 extension header")
            return PacketInfo(6, nh, src, dst, 0, 0, -1, 0, None, off, end, True, True)
        if nh == _FRAGMENT:
            nh = data[pos]
            first = _U16.unpack_from(data, pos + 2)[0] & 0xFFF8 == 0
            pos += 8
            if not first:
                return PacketInfo(6, nh, src, dst, 0, 0, -1, 0, None, off, end, True, True)
            continue
        size = (data[pos + 1] + 1) * 8
        if pos + size > end:
            if not quoted:
                raise RewriteError("truncated IPv6 extension header")
            return PacketInfo(6, nh, src, dst, 0, 0, -1, 0, None, off, end, True, True)
        if nh == _ROUTING and data[pos + 3] != 0:  # Segments Left: dst is not the final one
            pseudo_dst = False
        elif nh == _DSTOPTS and _has_home_address(data, pos + 2, pos + size):
            pseudo_src = False
        nh = data[pos]
        pos += size
    return _with_l4(data, 6, nh, src, dst, off, pos, end, pseudo_src, pseudo_dst, quoted)


def _has_home_address(data: Buffer, pos: int, end: int) -> bool:
    """Whether the options TLVs in ``data[pos:end]`` hold a Home Address option."""
    while pos < end:
        kind = data[pos]
        if kind == 0:  # Pad1 has no length byte
            pos += 1
            continue
        if kind == _HOME_ADDRESS_OPTION:
            return True
        if pos + 1 >= end:
            return False
        pos += 2 + data[pos + 1]
    return False


def _with_l4(
    data: Buffer,
    version: int,
    proto: int,
    src: bytes,
    dst: bytes,
    ip_offset: int,
    l4: int,
    end: int,
    pseudo_src: bool,
    pseudo_dst: bool,
    quoted: bool,
) -> PacketInfo:
    """Build the PacketInfo of a packet whose L4 header (``proto``) starts at ``l4``."""
    avail = end - l4
    key = (version, proto)
    if not quoted and avail < _L4_MIN.get(key, 0):
        raise RewriteError(f"truncated L4 header (protocol {proto})")
    sport = dport = flags = 0
    if proto in (TCP, UDP) and avail >= 4:
        sport, dport = _PORTS.unpack_from(data, l4)
        if proto == TCP and avail >= 14:
            flags = data[l4 + 13]
    inner = None
    errors = _ICMP_ERRORS.get(key)
    # A quote inside a quote is never rewritten (no ICMP errors about ICMP errors).
    if not quoted and errors is not None and avail >= _ICMP_HEADER and data[l4] in errors:
        inner = _parse_quote(data, version, l4, end)
    return PacketInfo(
        version,
        proto,
        src,
        dst,
        sport,
        dport,
        l4,
        flags,
        inner,
        ip_offset,
        end,
        pseudo_src,
        pseudo_dst,
    )


def _parse_quote(data: Buffer, version: int, icmp: int, end: int) -> PacketInfo | None:
    """Parse the packet quoted by the ICMP error at ``icmp``; None if it does not parse."""
    start = icmp + _ICMP_HEADER
    length_field = _RFC4884_LENGTH.get((version, data[icmp]))
    if length_field is not None and data[icmp + length_field[0]]:
        # ICMP extensions follow the quote: never mistake them for quoted bytes.
        end = min(end, start + data[icmp + length_field[0]] * length_field[1])
    try:
        inner = _parse_ip(data, start, end, quoted=True)
    except RewriteError:
        return None
    return inner if inner.version == version else None


# --------------------------------------------------------------------------- rewriting


def rewrite_addresses(
    buf: bytearray, info: PacketInfo, src: bytes | None, dst: bytes | None
) -> None:
    """Set the source/destination address of the packet ``info`` describes, in place.

    ``info`` must come from ``parse`` of these very bytes (or be a ``.inner`` of it, though
    ``rewrite_inner_addresses`` is what keeps the enclosing ICMP checksum right).  ``None``
    keeps an address.  Updates the IPv4 header checksum and the TCP/UDP/ICMPv6 checksum; the
    payload and every other byte are left alone.  Raises ``RewriteError`` if an address has
    the wrong length or ``buf`` does not match ``info``; ``buf`` is then unchanged.
    """
    _rewrite(buf, info, src, dst)


def rewrite_inner_addresses(
    buf: bytearray, info: PacketInfo, src: bytes | None, dst: bytes | None
) -> None:
    """Set the addresses of the packet quoted by the ICMP error ``info``, in place.

    Fixes the quoted IPv4 header checksum, the quoted L4 checksum if the quote contains it,
    and the outer ICMP/ICMPv6 checksum.  Raises ``RewriteError`` (``buf`` unchanged) if
    ``info.inner`` is None, or for the same reasons as ``rewrite_addresses``.
    """
    if info.inner is None:
        raise RewriteError("not an ICMP error with a parseable quote")
    _check(buf, info, None, None)  # the outer ICMP checksum is written too
    moved = _rewrite(buf, info.inner, src, dst)
    # The outer checksum covers the quote; every word we changed is at an even offset of it.
    _update_checksum(buf, info.l4_offset + 2, moved)


def _check(buf: bytearray, info: PacketInfo, src: bytes | None, dst: bytes | None) -> int:
    """Validate a rewrite request before touching anything; return the address size."""
    size = 4 if info.version == 4 else 16
    if info.version not in (4, 6) or not 0 <= info.ip_offset < info.end <= len(buf):
        raise RewriteError("buffer does not match the PacketInfo")
    if buf[info.ip_offset] >> 4 != info.version:
        raise RewriteError("buffer does not match the PacketInfo")
    for address in (src, dst):
        if address is not None and len(address) != size:
            raise RewriteError(f"IPv{info.version} addresses are {size} bytes")
    return size


def _rewrite(buf: bytearray, info: PacketInfo, src: bytes | None, dst: bytes | None) -> int:
    """Rewrite ``info``'s addresses and checksums; return the net change (mod 0xFFFF) of the
    16-bit words written, so that an enclosing ICMP checksum can follow."""
    size = _check(buf, info, src, dst)
    at = info.ip_offset + (12 if info.version == 4 else 8)
    d_src = 0 if src is None else _put_address(buf, at, src)
    d_dst = 0 if dst is None else _put_address(buf, at + size, dst)
    moved = d_src + d_dst
    if info.version == 4:
        moved += _update_checksum(buf, info.ip_offset + 10, d_src + d_dst)
    csum_at = _PSEUDO_CSUM_AT.get((info.version, info.proto))
    if csum_at is not None and info.l4_offset >= 0:
        pos = info.l4_offset + csum_at
        if pos + 2 <= info.end:  # a quote may stop before the checksum field
            pseudo = (d_src if info.pseudo_src else 0) + (d_dst if info.pseudo_dst else 0)
            moved += _update_checksum(buf, pos, pseudo, udp=info.proto == UDP)
    return moved % 0xFFFF


def rewrite_ports(buf: bytearray, info: PacketInfo, sport: int | None, dport: int | None) -> None:
    """Set the TCP/UDP source/destination port of the (outer) packet ``info`` describes,
    in place, and its L4 checksum (a NAT's mapping, put back or applied). ``None`` keeps
    a port. Raises ``RewriteError`` (``buf`` unchanged) for a packet without ports."""
    if info.proto not in (TCP, UDP) or info.l4_offset < 0 or info.l4_offset + 8 > info.end:
        raise RewriteError("no TCP/UDP ports to rewrite")
    _check(buf, info, None, None)
    delta = 0
    for offset, port in ((0, sport), (2, dport)):
        if port is not None:
            delta += _put_address(buf, info.l4_offset + offset, port.to_bytes(2, "big"))
    pos = info.l4_offset + (16 if info.proto == TCP else 6)
    if pos + 2 <= info.end:
        _update_checksum(buf, pos, delta, udp=info.proto == UDP)


def fill_l4_checksum(buf: bytearray, info: PacketInfo) -> None:
    """Compute the L4 checksum (TCP, UDP, ICMPv6) of the outer packet ``info`` describes
    from scratch and store it, whatever the field held (e.g. a partial checksum). A UDP
    result of 0 is stored as 0xFFFF. No-op for a packet without such a checksum (ICMPv4,
    a non-first fragment, other protocols)."""
    csum_at = _PSEUDO_CSUM_AT.get((info.version, info.proto))
    if csum_at is None or info.l4_offset < 0:
        return
    _check(buf, info, None, None)
    pos = info.l4_offset + csum_at
    if pos + 2 > info.end:
        raise RewriteError("truncated L4 header")
    length = info.end - info.l4_offset
    if info.version == 4:
        pseudo = info.src + info.dst + bytes((0, info.proto)) + length.to_bytes(2, "big")
    else:
        pseudo = info.src + info.dst + length.to_bytes(4, "big") + bytes((0, 0, 0, info.proto))
    buf[pos] = buf[pos + 1] = 0
    body = int.from_bytes(memoryview(buf)[info.l4_offset : info.end], "big")
    if length % 2:
        body <<= 8  # zero-padded to a whole 16-bit word
    total = (int.from_bytes(pseudo, "big") + body) % 0xFFFF
    value = ~total & 0xFFFF if total else 0  # a non-zero sum that is 0 mod 0xFFFF is -0
    if value == 0 and info.proto == UDP:
        value = 0xFFFF
    buf[pos] = value >> 8
    buf[pos + 1] = value & 0xFF


def l4_payload(data: Buffer, info: PacketInfo, limit: int | None = None) -> bytes:
    """The TCP/UDP payload of the (outer) packet ``info`` describes (b"" if none); its
    first ``limit`` bytes only, if given (no copy of the rest)."""
    if info.proto == UDP:
        start = info.l4_offset + 8
    elif info.proto == TCP and info.l4_offset + 13 <= info.end:
        start = info.l4_offset + (data[info.l4_offset + 12] >> 4) * 4
    else:
        return b""
    end = info.end if limit is None else min(info.end, start + limit)
    return bytes(data[start:end]) if start < end else b""


def set_udp_payload_bits(buf: bytearray, info: PacketInfo, offset: int, bits: int) -> bool:
    """OR ``bits`` into byte ``offset`` of the UDP payload of the (outer) packet
    ``info`` describes, in place, with its checksum. False (nothing changed) if the
    payload is shorter or the bits are set already."""
    pos = info.l4_offset + 8 + offset
    if info.proto != UDP or info.l4_offset < 0 or pos >= info.end or buf[pos] & bits == bits:
        return False
    word = pos - (offset % 2)  # the 16-bit word the byte is in (UDP payloads start even)
    old = int.from_bytes(buf[word : word + 2], "big")
    buf[pos] |= bits
    delta = (int.from_bytes(buf[word : word + 2], "big") - old) % 0xFFFF
    _update_checksum(buf, info.l4_offset + 6, delta, udp=True)
    return True
