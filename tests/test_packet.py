"""Tests for stacktrans.packet: per-packet address rewriting with incremental checksums.

Main oracle: a packet built by scapy with the old addresses, once rewritten, must be byte for
byte the packet scapy builds from scratch with the new addresses (so addresses, payload and
every checksum are checked at once).  On top of that, ``assert_checksums_valid`` re-parses the
result with scapy, deletes the checksum fields, rebuilds and compares.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, fragment
from scapy.layers.inet6 import (
    HAO,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    fragment6,
)
from scapy.packet import Packet, Raw
from scapy.utils import checksum as scapy_checksum

from stacktrans.packet import (
    PacketInfo,
    RewriteError,
    checksum,
    fill_l4_checksum,
    parse,
    rewrite_addresses,
    rewrite_inner_addresses,
)

Builder = Callable[[str, str], bytes]

A4, B4, C4, D4, R4 = "10.0.0.1", "192.0.2.7", "198.51.100.23", "203.0.113.200", "172.16.5.1"
A6, B6, C6, D6, R6 = (
    "2001:db8::1",
    "2001:db8:ffff::2",
    "2001:db8:1234:5678::abcd",
    "fd00::ffff:ffff",
    "2001:db8:aaaa::fe",
)
PAYLOADS = [b"", b"x", b"odd!!", bytes(range(256)) * 5 + b"123"]  # 0, 1, 5, 1283 bytes


def raw_ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def text_ip(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def maybe_raw(text: str | None) -> bytes | None:
    return None if text is None else raw_ip(text)


def do_rewrite(packet: bytes, src: str | None, dst: str | None) -> bytes:
    buf = bytearray(packet)
    rewrite_addresses(buf, parse(buf), maybe_raw(src), maybe_raw(dst))
    return bytes(buf)


def do_rewrite_inner(packet: bytes, src: str | None, dst: str | None) -> bytes:
    buf = bytearray(packet)
    rewrite_inner_addresses(buf, parse(buf), maybe_raw(src), maybe_raw(dst))
    return bytes(buf)


def assert_checksums_valid(packet: bytes, *, l4: bool = True) -> None:
    """Re-parse with scapy, drop every checksum we can recompute, rebuild, compare.

    The L4 checksum of a quoted (truncated) packet cannot be recomputed from the quote, and
    neither can a fragment's; those are covered by the byte-for-byte comparisons.
    """
    pkt: Packet = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    layer: Packet = pkt
    while layer:
        if isinstance(layer, IPerror | IPerror6):
            if isinstance(layer, IPerror):
                del layer.chksum
            break
        # A zero UDP checksum means "none": scapy would fill it in.
        no_udp_checksum = isinstance(layer, UDP) and layer.chksum == 0
        if isinstance(layer, IP) or (l4 and "chksum" in layer.fields and not no_udp_checksum):
            del layer.chksum
        elif l4 and "cksum" in layer.fields:
            del layer.cksum
        layer = layer.payload
    assert bytes(pkt).hex() == packet.hex()


# --------------------------------------------------------------------------- builders


def tcp4(payload: bytes) -> Builder:
    return lambda s, d: bytes(
        IP(src=s, dst=d) / TCP(sport=40000, dport=443, flags="PA", seq=7) / Raw(payload)
    )


def udp4(payload: bytes, chksum: int | None = None) -> Builder:
    return lambda s, d: bytes(
        IP(src=s, dst=d) / UDP(sport=5353, dport=53, chksum=chksum) / Raw(payload)
    )


def icmp4_echo(payload: bytes) -> Builder:
    return lambda s, d: bytes(IP(src=s, dst=d) / ICMP(type=8, id=3, seq=9) / Raw(payload))


def tcp6(payload: bytes) -> Builder:
    return lambda s, d: bytes(
        IPv6(src=s, dst=d) / TCP(sport=40000, dport=443, flags="S") / Raw(payload)
    )


def udp6(payload: bytes, chksum: int | None = None) -> Builder:
    return lambda s, d: bytes(
        IPv6(src=s, dst=d) / UDP(sport=1, dport=65535, chksum=chksum) / Raw(payload)
    )


def icmp6_echo(payload: bytes) -> Builder:
    return lambda s, d: bytes(IPv6(src=s, dst=d) / ICMPv6EchoRequest(id=1, seq=2, data=payload))


def udp6_destopts(payload: bytes) -> Builder:
    return lambda s, d: bytes(
        IPv6(src=s, dst=d) / IPv6ExtHdrDestOpt() / UDP(sport=7, dport=9) / Raw(payload)
    )


def tcp6_ext_chain(payload: bytes) -> Builder:
    """Hop-by-hop, routing (segments left 0, so dst is final) and destination options."""
    return lambda s, d: bytes(
        IPv6(src=s, dst=d)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=[C6], segleft=0)
        / IPv6ExtHdrDestOpt()
        / TCP(sport=22, dport=2222, flags="A")
        / Raw(payload)
    )


def icmp6_echo_destopts(payload: bytes) -> Builder:
    return lambda s, d: bytes(
        IPv6(src=s, dst=d) / IPv6ExtHdrDestOpt() / ICMPv6EchoReply(id=5, data=payload)
    )


V4_BUILDERS = {
    "tcp4": tcp4,
    "udp4": udp4,
    "icmp4": icmp4_echo,
}
V6_BUILDERS = {
    "tcp6": tcp6,
    "udp6": udp6,
    "icmp6": icmp6_echo,
    "udp6-destopts": udp6_destopts,
    "tcp6-hbh-rh-dst": tcp6_ext_chain,
    "icmp6-destopts": icmp6_echo_destopts,
}
WHICH = ["src", "dst", "both"]


def new_addresses(which: str, new_src: str, new_dst: str) -> tuple[str | None, str | None]:
    return (new_src if which != "dst" else None, new_dst if which != "src" else None)


def check_outer(build: Builder, old: tuple[str, str], new: tuple[str | None, str | None]) -> bytes:
    before = build(*old)
    after = do_rewrite(before, *new)
    expected = build(new[0] or old[0], new[1] or old[1])
    assert after.hex() == expected.hex()
    assert after != before
    return after


# --------------------------------------------------------------------------- plain packets


@pytest.mark.parametrize("payload", PAYLOADS, ids=len)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("kind", V4_BUILDERS)
def test_ipv4_rewrite_matches_fresh_build(kind: str, which: str, payload: bytes) -> None:
    after = check_outer(V4_BUILDERS[kind](payload), (A4, B4), new_addresses(which, C4, D4))
    assert_checksums_valid(after)
    assert after.endswith(payload)


@pytest.mark.parametrize("payload", PAYLOADS, ids=len)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("kind", V6_BUILDERS)
def test_ipv6_rewrite_matches_fresh_build(kind: str, which: str, payload: bytes) -> None:
    after = check_outer(V6_BUILDERS[kind](payload), (A6, B6), new_addresses(which, C6, D6))
    assert_checksums_valid(after)
    assert after.endswith(payload)


def test_icmpv4_checksum_untouched_by_address_change() -> None:
    before = icmp4_echo(b"ping")(A4, B4)
    after = do_rewrite(before, C4, D4)
    assert after[20:] == before[20:]  # ICMPv4 has no pseudo-header
    assert after[10:12] != before[10:12]


def test_ipv4_udp_zero_checksum_stays_zero() -> None:
    before = udp4(b"no checksum", chksum=0)(A4, B4)
    after = do_rewrite(before, C4, D4)
    assert after == udp4(b"no checksum", chksum=0)(C4, D4)
    assert after[26:28] == b"\0\0"
    assert_checksums_valid(after)


def test_ipv6_udp_zero_checksum_left_alone() -> None:
    after = do_rewrite(udp6(b"tunnel", chksum=0)(A6, B6), C6, None)
    assert after == udp6(b"tunnel", chksum=0)(C6, B6)
    assert after[46:48] == b"\0\0"


def zeroing_source(build: Builder, src: str, dst: str, csum_at: int) -> str:
    """A source address, differing from ``src`` in its last 16 bits, for which the L4
    checksum computed from scratch is 0 (as a one's complement sum: 0xFFFF for UDP)."""
    packed = raw_ip(src)
    current = int.from_bytes(build(src, dst)[csum_at : csum_at + 2], "big")
    # Adding the checksum value to one summed word brings the total sum to -0.
    low = (int.from_bytes(packed[-2:], "big") + current) % 0xFFFF
    return text_ip(packed[:-2] + low.to_bytes(2, "big"))


@pytest.mark.parametrize(
    ("build", "src", "dst", "csum_at", "zero"),
    [
        (udp4(b"abc"), A4, B4, 26, b"\xff\xff"),
        (tcp4(b"abc"), A4, B4, 36, b"\0\0"),
        (udp6(b"abc"), A6, B6, 46, b"\xff\xff"),
        (tcp6(b"abc"), A6, B6, 56, b"\0\0"),
        (icmp6_echo(b"abc"), A6, B6, 42, b"\0\0"),
    ],
)
def test_checksum_that_becomes_zero(
    build: Builder, src: str, dst: str, csum_at: int, zero: bytes
) -> None:
    new_src = zeroing_source(build, src, dst, csum_at)
    expected = build(new_src, dst)
    assert expected[csum_at : csum_at + 2] == zero  # the construction really hits zero
    after = do_rewrite(build(src, dst), new_src, None)
    assert after.hex() == expected.hex()
    # And back: from a 0xFFFF / 0 checksum to the original packet.
    assert do_rewrite(after, src, None) == build(src, dst)


def test_ipv6_routing_header_with_segments_left_keeps_l4_checksum() -> None:
    def build(s: str, d: str) -> bytes:
        return bytes(
            IPv6(src=s, dst=d)
            / IPv6ExtHdrRouting(addresses=[R6], segleft=1)
            / UDP(sport=1, dport=2)
            / Raw(b"routed")
        )

    before = build(A6, B6)
    info = parse(before)
    assert (info.pseudo_src, info.pseudo_dst) == (True, False)
    after = check_outer(build, (A6, B6), (None, D6))
    assert after[-14:] == before[-14:]  # pseudo-header dst is R6, so the UDP checksum stays
    check_outer(build, (A6, B6), (C6, D6))


def test_ipv6_home_address_option_keeps_l4_checksum_on_source_change() -> None:
    def build(s: str, d: str) -> bytes:
        return bytes(
            IPv6(src=s, dst=d)
            / IPv6ExtHdrDestOpt(options=[HAO(hoa=R6)])
            / UDP(sport=1, dport=2)
            / Raw(b"mobile")
        )

    before = build(A6, B6)
    info = parse(before)
    assert (info.pseudo_src, info.pseudo_dst) == (False, True)
    after = check_outer(build, (A6, B6), (C6, None))
    assert after[-14:] == before[-14:]
    check_outer(build, (A6, B6), (C6, D6))


# --------------------------------------------------------------------------- fragments


@pytest.mark.parametrize("which", WHICH)
def test_ipv4_fragments(which: str) -> None:
    payload = bytes(range(251)) * 5  # 1255 bytes, odd

    def frags(s: str, d: str) -> list[bytes]:
        return [
            bytes(f)
            for f in fragment(
                IP(src=s, dst=d, id=77) / UDP(sport=9, dport=10) / Raw(payload), fragsize=400
            )
        ]

    new = new_addresses(which, C4, D4)
    before, expected = frags(A4, B4), frags(new[0] or A4, new[1] or B4)
    assert len(before) == 4
    infos = [parse(f) for f in before]
    assert infos[0].l4_offset == 20 and infos[0].dport == 10
    assert all(i.l4_offset == -1 and i.sport == i.dport == 0 for i in infos[1:])
    for frag, exp in zip(before, expected, strict=True):
        after = do_rewrite(frag, *new)
        assert after.hex() == exp.hex()
        assert_checksums_valid(after, l4=False)


@pytest.mark.parametrize("which", WHICH)
def test_ipv6_fragments(which: str) -> None:
    payload = bytes(range(256)) * 6 + b"odd"

    def frags(s: str, d: str) -> list[bytes]:
        pkt = IPv6(src=s, dst=d) / IPv6ExtHdrFragment(id=99) / TCP(sport=1, dport=2) / Raw(payload)
        return [bytes(f) for f in fragment6(pkt, 600)]

    new = new_addresses(which, C6, D6)
    before, expected = frags(A6, B6), frags(new[0] or A6, new[1] or B6)
    assert len(before) >= 3
    first = parse(before[0])
    assert (first.proto, first.l4_offset, first.dport) == (6, 48, 2)
    assert all(parse(f).l4_offset == -1 for f in before[1:])
    assert all(parse(f).proto == 6 for f in before[1:])
    for frag, exp in zip(before, expected, strict=True):
        assert do_rewrite(frag, *new).hex() == exp.hex()


# --------------------------------------------------------------------------- ICMP errors


def icmp4_error(kind: Packet, quote_len: int | None) -> Callable[[bytes], Builder]:
    """ICMPv4 error from R4 to the quoted packet's source; quote_len None = whole packet."""
    return lambda quoted: (
        lambda s, d: bytes(IP(src=s, dst=d) / kind.copy() / Raw(quoted[:quote_len]))
    )


def icmp6_error(kind: Packet, quote_len: int | None) -> Callable[[bytes], Builder]:
    return lambda quoted: (
        lambda s, d: bytes(IPv6(src=s, dst=d) / kind.copy() / Raw(quoted[:quote_len]))
    )


ICMP4_ERRORS = {
    "frag-needed": ICMP(type=3, code=4, nexthopmtu=1400),
    "port-unreachable": ICMP(type=3, code=3),
    "time-exceeded": ICMP(type=11, code=0),
}
ICMP6_ERRORS = {
    "too-big": ICMPv6PacketTooBig(mtu=1280),
    "port-unreachable": ICMPv6DestUnreach(code=4),
    "time-exceeded": ICMPv6TimeExceeded(),
}
INNER4 = {
    "tcp": tcp4(b"quoted payload!"),
    "udp": udp4(b"quoted payload!"),
    "udp-nocsum": udp4(b"q", chksum=0),
    "icmp": icmp4_echo(b"q"),
}
INNER6 = {
    "tcp": tcp6(b"quoted payload!"),
    "udp": udp6(b"quoted payload!"),
    "icmp6": icmp6_echo(b"quoted"),
    "udp-destopts": udp6_destopts(b"q"),
}
QUOTE4 = [28, 40, None]  # RFC 792 minimum (no TCP checksum inside), more, whole packet
QUOTE6 = [48, 56, 60, None]


def check_inner(
    outer_kind: Callable[[bytes], Builder],
    inner: Builder,
    outer_addrs: tuple[str, str],
    inner_addrs: tuple[str, str],
    new_outer: tuple[str | None, str | None],
    new_inner: tuple[str | None, str | None],
) -> bytes:
    """Rewrite outer and inner addresses; compare with a fresh build of the new packet."""
    before = outer_kind(inner(*inner_addrs))(*outer_addrs)
    buf = bytearray(before)
    info = parse(buf)
    assert info.inner is not None
    pack = [maybe_raw(a) for a in (*new_outer, *new_inner)]
    rewrite_inner_addresses(buf, info, pack[2], pack[3])
    rewrite_addresses(buf, info, pack[0], pack[1])
    fresh_inner = inner(new_inner[0] or inner_addrs[0], new_inner[1] or inner_addrs[1])
    expected = outer_kind(fresh_inner)(
        new_outer[0] or outer_addrs[0], new_outer[1] or outer_addrs[1]
    )
    assert bytes(buf).hex() == expected.hex()
    assert_checksums_valid(bytes(buf))
    return bytes(buf)


@pytest.mark.parametrize("quote_len", QUOTE4, ids=str)
@pytest.mark.parametrize("inner", INNER4)
@pytest.mark.parametrize("error", ICMP4_ERRORS)
def test_icmpv4_error_inner_rewrite(error: str, inner: str, quote_len: int | None) -> None:
    outer_kind = icmp4_error(ICMP4_ERRORS[error], quote_len)
    # What a mobile host sees: the error comes back to its old address about a packet it
    # sent from there; both become the new address.
    check_inner(outer_kind, INNER4[inner], (R4, A4), (A4, B4), (None, C4), (C4, None))
    check_inner(outer_kind, INNER4[inner], (R4, A4), (A4, B4), (None, None), (None, D4))
    check_inner(outer_kind, INNER4[inner], (R4, A4), (A4, B4), (D4, C4), (C4, D4))


@pytest.mark.parametrize("quote_len", QUOTE6, ids=str)
@pytest.mark.parametrize("inner", INNER6)
@pytest.mark.parametrize("error", ICMP6_ERRORS)
def test_icmpv6_error_inner_rewrite(error: str, inner: str, quote_len: int | None) -> None:
    outer_kind = icmp6_error(ICMP6_ERRORS[error], quote_len)
    check_inner(outer_kind, INNER6[inner], (R6, A6), (A6, B6), (None, C6), (C6, None))
    check_inner(outer_kind, INNER6[inner], (R6, A6), (A6, B6), (None, None), (None, D6))
    check_inner(outer_kind, INNER6[inner], (R6, A6), (A6, B6), (D6, C6), (C6, D6))


def test_icmp_error_parse_fields() -> None:
    quoted = tcp4(b"data")(A4, B4)
    info = parse(icmp4_error(ICMP4_ERRORS["frag-needed"], 28)(quoted)(R4, A4))
    assert (info.proto, info.l4_offset, info.sport, info.dport) == (1, 20, 0, 0)
    inner = info.inner
    assert inner is not None
    assert (inner.version, inner.proto, inner.src, inner.dst) == (4, 6, raw_ip(A4), raw_ip(B4))
    assert (inner.sport, inner.dport, inner.ip_offset, inner.l4_offset) == (40000, 443, 28, 48)
    assert (inner.end, inner.tcp_flags, inner.inner) == (56, 0, None)  # flags not quoted

    info6 = parse(icmp6_error(ICMP6_ERRORS["too-big"], None)(udp6_destopts(b"z")(A6, B6))(R6, A6))
    assert info6.inner is not None
    assert (info6.inner.proto, info6.inner.l4_offset, info6.inner.dport) == (17, 96, 9)


def test_inner_l4_checksum_only_when_quoted() -> None:
    """With an 8-byte TCP quote the TCP checksum is absent: nothing past the quote changes."""
    before = icmp4_error(ICMP4_ERRORS["frag-needed"], 28)(tcp4(b"x")(A4, B4))(R4, A4)
    after = do_rewrite_inner(before, C4, None)
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    # outer ICMP checksum (22-23), inner IP checksum (38-39), inner source (40-43)
    assert set(changed) <= {22, 23, 38, 39, 40, 41, 42, 43}
    assert {40, 41, 42, 43} & set(changed)


def test_quote_cutting_l4_checksum_in_half() -> None:
    """Its remaining byte cannot be updated (the carry from the missing byte is unknown), so
    it is left alone; everything else is rewritten and the outer checksum stays valid."""
    before = icmp4_error(ICMP4_ERRORS["port-unreachable"], 37)(tcp4(b"")(A4, B4))(R4, A4)
    after = do_rewrite_inner(before, C4, D4)
    fresh = tcp4(b"")(C4, D4)
    assert after[28:64] == fresh[:36]  # inner IP header (checksum included) and TCP head
    assert after[64] == before[64]  # first byte of the TCP checksum, alone in the quote
    assert checksum(after[20:]) == 0  # outer ICMP checksum, odd length
    assert_checksums_valid(after)


def test_rfc4884_extension_is_not_taken_for_the_quote() -> None:
    quote = tcp4(b"0123456789abcdef")(A4, B4)[:32]  # TCP checksum (bytes 36-37) not in it
    extension = bytes([0x20, 0, 0, 0]) + bytes(range(40, 80))  # looks like the rest of TCP
    icmp = bytearray(struct.pack("!BBHBBH", 11, 0, 0, 0, len(quote) // 4, 0) + quote + extension)
    icmp[2:4] = scapy_checksum(bytes(icmp)).to_bytes(2, "big")
    before = bytes(IP(src=R4, dst=A4, proto=1) / Raw(bytes(icmp)))
    info = parse(before)
    assert info.inner is not None and info.inner.end == 20 + 8 + 32
    after = do_rewrite_inner(before, C4, None)
    assert after.endswith(extension)
    assert after[28:60] == tcp4(b"0123456789abcdef")(C4, B4)[:32]
    assert checksum(after[20:]) == 0  # outer ICMP checksum still valid


def test_rewrite_inner_without_quote_raises() -> None:
    buf = bytearray(tcp4(b"x")(A4, B4))
    with pytest.raises(RewriteError):
        rewrite_inner_addresses(buf, parse(buf), raw_ip(C4), None)
    short = bytearray(icmp6_error(ICMP6_ERRORS["too-big"], 39)(tcp6(b"")(A6, B6))(R6, A6))
    info = parse(short)
    assert info.inner is None  # quote shorter than an IPv6 header
    with pytest.raises(RewriteError):
        rewrite_inner_addresses(short, info, None, raw_ip(C6))


# --------------------------------------------------------------------------- parse / API


def test_parse_fields_tcp() -> None:
    for data in (
        bytes(tcp4(b"abc")(A4, B4)),
        bytearray(tcp4(b"")(A4, B4)),
        memoryview(tcp4(b"a")(A4, B4)),
    ):
        info = parse(data)
        assert info == PacketInfo(
            4, 6, raw_ip(A4), raw_ip(B4), 40000, 443, 20, 0x18, None, 0, len(data), True, True
        )
    info6 = parse(tcp6_ext_chain(b"")(A6, B6))
    assert (info6.version, info6.proto, info6.l4_offset, info6.tcp_flags) == (
        6,
        6,
        40 + 8 + 24 + 8,
        0x10,
    )
    assert (info6.sport, info6.dport, info6.src, info6.dst) == (22, 2222, raw_ip(A6), raw_ip(B6))


def test_parse_ignores_trailing_padding() -> None:
    packet = udp4(b"pad")(A4, B4) + b"\0" * 6
    assert parse(packet).end == len(packet) - 6
    after = do_rewrite(packet, C4, None)
    assert after == udp4(b"pad")(C4, B4) + b"\0" * 6


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x45",
        b"\x50" + bytes(39),  # version 5
        tcp4(b"")(A4, B4)[:39],  # TCP header cut
        udp4(b"abc")(A4, B4)[:-1],  # shorter than IP total length
        bytes([0x44]) + udp4(b"")(A4, B4)[1:],  # IHL 4
        bytes([0x4F]) + udp4(b"")(A4, B4)[1:],  # IHL 15: options past the end
        tcp6(b"")(A6, B6)[:50],
        udp6_destopts(b"")(A6, B6)[:44],  # inside the extension header
        # consistent lengths, but the destination options claim 88 bytes
        (lambda p: p[:41] + b"\x0a" + p[42:])(udp6_destopts(b"")(A6, B6)),
        bytes(IP(src=A4, dst=B4, proto=6) / Raw(bytes(10))),  # 10-byte TCP header
        bytes(IP(src=A4, dst=B4, proto=17) / Raw(bytes(7))),  # 7-byte UDP header
        bytes(IP(src=A4, dst=B4, proto=1) / Raw(b"\x08\x00\x00")),  # 3-byte ICMP header
        bytes(IPv6(src=A6, dst=B6, nh=58) / Raw(b"\x80\x00\x00")),  # 3-byte ICMPv6 header
    ],
)
def test_malformed_raises_rewrite_error(packet: bytes) -> None:
    with pytest.raises(RewriteError):
        parse(packet)


def test_bad_requests_raise_and_leave_buffer_alone() -> None:
    packet = tcp4(b"x")(A4, B4)
    buf = bytearray(packet)
    info = parse(buf)
    for src, dst in ((raw_ip(A6), None), (None, b"\1\2\3"), (raw_ip(C4), b"")):
        with pytest.raises(RewriteError):
            rewrite_addresses(buf, info, src, dst)
    with pytest.raises(RewriteError):
        rewrite_addresses(bytearray(packet[:30]), info, raw_ip(C4), None)
    with pytest.raises(RewriteError):
        rewrite_addresses(bytearray(tcp6(b"x")(A6, B6)), info, raw_ip(C4), None)
    assert buf == packet
    assert issubclass(RewriteError, ValueError)


def test_same_addresses_is_a_no_op() -> None:
    packet = icmp6_error(ICMP6_ERRORS["too-big"], None)(udp6(b"u")(A6, B6))(R6, A6)
    buf = bytearray(packet)
    info = parse(buf)
    rewrite_addresses(buf, info, raw_ip(R6), raw_ip(A6))
    assert info.inner is not None
    rewrite_inner_addresses(buf, info, raw_ip(A6), raw_ip(B6))
    assert buf == packet


@given(st.binary(max_size=3000))
@settings(max_examples=300, deadline=None)
def test_checksum_matches_scapy(data: bytes) -> None:
    assert checksum(data) == scapy_checksum(data)
    if len(data) % 2 == 0:  # stored in place, the checksum makes the whole sum -0
        assert checksum(data + checksum(data).to_bytes(2, "big")) == 0


# --------------------------------------------------------------------------- property tests

ADDR4 = st.binary(min_size=4, max_size=4).map(text_ip)
ADDR6 = st.binary(min_size=16, max_size=16).map(text_ip)
PORT = st.integers(0, 65535)


@st.composite
def plain_packets(draw: st.DrawFn) -> tuple[Builder, bool]:
    """A random TCP/UDP/ICMP builder over IPv4 or IPv6, and whether it is IPv6."""
    v6 = draw(st.booleans())
    proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    payload = draw(st.binary(max_size=1400))
    sport, dport, ident = draw(PORT), draw(PORT), draw(PORT)
    ip = IPv6 if v6 else IP
    l4: Packet
    if proto == "tcp":
        flags = draw(st.integers(0, 255))
        l4 = TCP(sport=sport, dport=dport, flags=flags, seq=draw(st.integers(0, 2**32 - 1)))
    elif proto == "udp":
        l4 = UDP(sport=sport, dport=dport)
    else:
        l4 = ICMPv6EchoRequest(id=ident, seq=sport) if v6 else ICMP(id=ident, seq=sport)
    ext = draw(st.booleans()) and v6

    def build(s: str, d: str) -> bytes:
        pkt = ip(src=s, dst=d)
        if ext:
            pkt = pkt / IPv6ExtHdrDestOpt()
        return bytes(pkt / l4.copy() / Raw(payload))

    return build, v6


@given(plain_packets(), st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_rewrite_matches_fresh_build(
    packet: tuple[Builder, bool], data: st.DataObject
) -> None:
    build, v6 = packet
    addr = ADDR6 if v6 else ADDR4
    old = (data.draw(addr), data.draw(addr))
    new = (data.draw(st.none() | addr), data.draw(st.none() | addr))
    before = build(*old)
    after = do_rewrite(before, *new)
    assert after.hex() == build(new[0] or old[0], new[1] or old[1]).hex()
    assert_checksums_valid(after)
    assert do_rewrite(after, *old) == before  # and back again, exactly


@given(
    st.booleans(),
    st.sampled_from(["tcp", "udp"]),
    st.binary(max_size=300),
    PORT,
    PORT,
    st.integers(0, 600),
    st.data(),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_icmp_error_rewrite(
    v6: bool,
    proto: str,
    payload: bytes,
    sport: int,
    dport: int,
    quote_len: int,
    data: st.DataObject,
) -> None:
    addr = ADDR6 if v6 else ADDR4
    ip = IPv6 if v6 else IP
    l4 = TCP(sport=sport, dport=dport) if proto == "tcp" else UDP(sport=sport, dport=dport)
    error = ICMPv6PacketTooBig(mtu=1280) if v6 else ICMP(type=3, code=4, nexthopmtu=576)
    header = 40 if v6 else 20
    quote_len = max(quote_len, header)
    if quote_len == header + (17 if proto == "tcp" else 7):
        quote_len += 1  # half a checksum field: see test_quote_cutting_l4_checksum_in_half

    def inner(s: str, d: str) -> bytes:
        return bytes(ip(src=s, dst=d) / l4.copy() / Raw(payload))

    outer_kind = (icmp6_error if v6 else icmp4_error)(error, quote_len)
    outer_addrs = (data.draw(addr), data.draw(addr))
    inner_addrs = (data.draw(addr), data.draw(addr))
    new_outer = (data.draw(st.none() | addr), data.draw(st.none() | addr))
    new_inner = (data.draw(st.none() | addr), data.draw(st.none() | addr))
    check_inner(outer_kind, inner, outer_addrs, inner_addrs, new_outer, new_inner)


# --------------------------------------------------------------------------- robustness

CORPUS = [
    tcp4(b"abc")(A4, B4),
    udp4(b"abcd", chksum=0)(A4, B4),
    icmp4_echo(b"xy")(A4, B4),
    bytes(IP(src=A4, dst=B4, options=b"\x01\x01\x01\x00") / TCP() / Raw(b"opt")),
    tcp6_ext_chain(b"abc")(A6, B6),
    icmp6_echo_destopts(b"abc")(A6, B6),
    bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrRouting(addresses=[R6], segleft=1) / UDP()),
    bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt(options=[HAO(hoa=R6)]) / UDP()),
    bytes(fragment6(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment() / UDP() / Raw(bytes(300)), 200)[1]),
    icmp4_error(ICMP4_ERRORS["port-unreachable"], None)(udp4(b"q")(A4, B4))(R4, A4),
    icmp4_error(ICMP4_ERRORS["frag-needed"], 28)(tcp4(b"q")(A4, B4))(R4, A4),
    icmp6_error(ICMP6_ERRORS["too-big"], None)(tcp6_ext_chain(b"q")(A6, B6))(R6, A6),
    icmp6_error(ICMP6_ERRORS["port-unreachable"], 70)(icmp6_echo(b"q")(A6, B6))(R6, A6),
]


def exercise(packet: bytes) -> None:
    """parse may only raise RewriteError, detected explicitly (not by the safety net); a
    successful parse must rewrite without error, and rewriting to the same addresses must
    change nothing."""
    try:
        info = parse(packet)
    except RewriteError as exc:
        assert exc.__cause__ is None, f"unchecked bound: {exc!r}"
        return
    buf = bytearray(packet)
    rewrite_addresses(buf, info, info.src, info.dst)
    if info.inner is not None:
        rewrite_inner_addresses(buf, info, info.inner.src, info.inner.dst)
    assert buf == packet
    size = len(info.src)
    rewrite_addresses(buf, info, b"\xff" * size, b"\x01" * size)
    if info.inner is not None:
        rewrite_inner_addresses(buf, info, b"\x7f" * size, None)
    assert len(buf) == len(packet)


@given(st.binary(max_size=200))
@settings(max_examples=800, deadline=None)
def test_garbage_only_raises_rewrite_error(packet: bytes) -> None:
    exercise(packet)


@given(st.sampled_from(CORPUS), st.data())
@settings(max_examples=800, deadline=None)
def test_mutated_packets_only_raise_rewrite_error(seed: bytes, data: st.DataObject) -> None:
    packet = bytearray(seed[: data.draw(st.integers(0, len(seed)))])
    for _ in range(data.draw(st.integers(0, 4))):
        if packet:
            packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    exercise(bytes(packet))


def test_corpus_parses() -> None:
    for packet in CORPUS:
        parse(packet)


@pytest.mark.parametrize(
    "build",
    [
        lambda p: IP(src=A4, dst=B4) / TCP(sport=1, dport=2) / Raw(p),
        lambda p: IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / Raw(p),
        lambda p: IPv6(src=A6, dst=B6) / TCP(sport=1, dport=2) / Raw(p),
        lambda p: IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / Raw(p),
        lambda p: IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(data=p),
    ],
    ids=["tcp4", "udp4", "tcp6", "udp6", "icmp6"],
)
@pytest.mark.parametrize("payload", [b"", b"x", b"odd length!", bytes(range(256)) * 5])
def test_fill_l4_checksum_from_any_field_value(
    build: Callable[[bytes], Packet], payload: bytes
) -> None:
    good = bytes(build(payload))
    info = parse(good)
    at = info.l4_offset + {6: 16, 17: 6, 58: 2}[info.proto]
    for junk in (b"\0\0", b"\xff\xff", b"\x12\x34"):
        buf = bytearray(good)
        buf[at : at + 2] = junk  # e.g. a partial checksum (the pseudo-header sum)
        fill_l4_checksum(buf, parse(buf))
        assert bytes(buf) == good


def test_fill_l4_checksum_leaves_what_has_no_pseudo_header_checksum() -> None:
    icmp = bytes(IP(src=A4, dst=B4) / ICMP() / Raw(b"ping"))
    buf = bytearray(icmp)
    fill_l4_checksum(buf, parse(buf))
    assert bytes(buf) == icmp
