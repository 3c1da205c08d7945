"""Carried packets handed to a link whole (stacktrans.link_send) and the carrier's
choice between that and raw sockets (stacktrans.carry). Nothing is sent: the
sockets are fakes (the real path is tests/test_crossfamily_netns.py)."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from stacktrans import link_send, rtnl
from stacktrans.carry import Carrier
from stacktrans.family import complete, to_ipv4, to_ipv6
from stacktrans.link_send import VNET_HDR, LinkSender, Way, vnet_header
from stacktrans.netlink import attr
from stacktrans.packet import checksum
from stacktrans.socket_table import FlowKey

L4, P4 = IPv4Address("198.51.100.2"), IPv4Address("192.0.2.1")
L6, P6 = IPv6Address("2001:db8:1::2"), IPv6Address("2001:db8:2::1")
TS = [("Timestamp", (1, 2))]  # 12 bytes of options: a 32-byte TCP header


def v4_segment(size: int, flags: str = "A") -> bytes:
    seg = TCP(sport=40000, dport=5001, seq=7, flags=flags, options=TS) / Raw(b"x" * size)
    return bytes(IP(src=str(L4), dst=str(P4), flags="DF") / seg)


def test_a_partial_checksum_is_the_pseudo_headers_sum_and_completes_to_the_full_one() -> None:
    packet = v4_segment(3000)
    partial = to_ipv6(packet, L6, P6, partial=True)
    full = to_ipv6(packet, L6, P6)
    assert partial is not None and full is not None and partial != full
    pseudo = L6.packed + P6.packed + struct.pack("!IxxxB", len(partial) - 40, 6)
    assert int.from_bytes(partial[56:58], "big") == ~checksum(pseudo) & 0xFFFF
    assert complete(partial) == full
    rebuilt = IPv6(full)
    del rebuilt[TCP].chksum
    assert bytes(rebuilt) == full  # scapy agrees
    back = to_ipv4(full, L4, P4, partial=True)
    assert back is not None and complete(back) == to_ipv4(full, L4, P4)


def test_udp_is_always_summed_in_full() -> None:
    dgram = bytes(IP(src=str(L4), dst=str(P4)) / UDP(sport=1, dport=2) / Raw(b"q" * 50))
    assert to_ipv6(dgram, L6, P6, partial=True) == to_ipv6(dgram, L6, P6)


def test_the_virtio_header_asks_for_segments_that_fit_and_a_checksum() -> None:
    packet = to_ipv6(v4_segment(20000), L6, P6, partial=True)
    assert packet is not None
    head = vnet_header(packet, 1500)
    assert head is not None
    flags, gso, hdr_len, gso_size, start, offset = VNET_HDR.unpack(head)
    assert (flags, gso) == (link_send.NEEDS_CSUM, link_send.GSO_TCPV6)
    assert (hdr_len, gso_size, start, offset) == (14 + 40 + 32, 1428, 14 + 40, 16)
    # Data that fits one segment: no GSO; IPv4 gets its own type; CWR asks for ECN.
    small = to_ipv6(v4_segment(100), L6, P6, partial=True)
    assert small is not None and VNET_HDR.unpack(vnet_header(small, 1500) or b"")[1] == 0
    v4 = to_ipv4(bytes(IPv6(src=str(L6), dst=str(P6)) / IP(v4_segment(9000))[TCP]), L4, P4)
    assert v4 is not None and VNET_HDR.unpack(vnet_header(v4, 1500) or b"")[1] == 1
    cwr = to_ipv6(v4_segment(9000, "AC"), L6, P6, partial=True)
    assert cwr is not None
    assert VNET_HDR.unpack(vnet_header(cwr, 1500) or b"")[1] == 4 | link_send.GSO_ECN
    udp = bytes(IPv6(src=str(L6), dst=str(P6)) / UDP(sport=1, dport=2) / Raw(b"q"))
    assert VNET_HDR.unpack(vnet_header(udp, 1400) or b"")[1:] == (0, 14 + 40, 0, 14 + 40, 6)
    assert vnet_header(udp, 40) is None  # larger than the MTU, and not TCP: not cut here
    assert VNET_HDR.unpack(vnet_header(packet, None) or b"")[1] == 0  # whole (lo)
    icmp = bytearray(udp)
    icmp[6] = 58
    assert vnet_header(bytes(icmp), 1400) is None


class FakePacketSocket:
    def __init__(self, fail: bool = False) -> None:
        self.frames: list[tuple[bytes, Any]] = []
        self.fail = fail

    def sendto(self, frame: bytes, addr: Any) -> int:
        if self.fail:
            raise OSError(100, "Network is down")
        self.frames.append((frame, addr))
        return len(frame)

    def close(self) -> None:
        pass


def sender(monkeypatch: pytest.MonkeyPatch, way: Way | None, fail: bool = False) -> LinkSender:
    found: list[tuple[bytes, bytes]] = []

    def find(src: bytes, dst: bytes, family: int) -> Way | None:
        found.append((src, dst))
        return way

    monkeypatch.setattr(link_send, "_find_way", find)
    link = LinkSender(clock=lambda: 0.0)
    link._sock = FakePacketSocket(fail)  # type: ignore[assignment]
    link.found = found  # type: ignore[attr-defined]
    return link


MACS = bytes.fromhex("02000000000102000000000a")


def test_out_goes_onto_the_routes_link_with_the_next_hops_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = sender(monkeypatch, Way("m1", MACS))
    packet = to_ipv6(v4_segment(20000), L6, P6, partial=True)
    assert packet is not None and link.out(packet, 1500)
    assert link.out(packet, 1500)  # the way is kept: looked up once
    assert link.found == [(L6.packed, P6.packed)]  # type: ignore[attr-defined]
    frame, addr = link._sock.frames[0]  # type: ignore[union-attr]
    assert addr == ("m1", 0x86DD)
    assert frame[10:] == MACS + b"\x86\xdd" + packet
    assert VNET_HDR.unpack(frame[:10])[3] == 1500 - 40 - 32  # segments fit the path


def test_out_refuses_without_a_way_or_when_the_link_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    packet = to_ipv6(v4_segment(20000), L6, P6, partial=True)
    assert packet is not None
    assert not sender(monkeypatch, None).out(packet, 1500)
    failing = sender(monkeypatch, Way("m1", MACS), fail=True)
    assert not failing.out(packet, 1500)
    assert not failing._ways  # forgotten: looked up again next time
    big_udp = bytes(IPv6(src=str(L6), dst=str(P6)) / UDP(sport=1, dport=2) / Raw(b"q" * 3000))
    assert not sender(monkeypatch, Way("m1", MACS)).out(big_udp, 1500)  # only TCP is cut


def test_into_goes_through_lo_unless_ipv4_reverse_path_filtering_is_strict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    link = sender(monkeypatch, None)
    packet = to_ipv4(bytes(IPv6(src=str(P6), dst=str(L6)) / IP(v4_segment(9000))[TCP]), P4, L4)
    assert packet is not None
    monkeypatch.setattr(link_send, "_strict_rp_filter", lambda: True)
    assert not link.into(packet)
    v6 = to_ipv6(v4_segment(9000), P6, L6, partial=True)
    assert v6 is not None and link.into(v6)  # (IPv6 has no reverse-path filter)
    frame, addr = link._sock.frames[-1]  # type: ignore[union-attr]
    assert addr == ("lo", 0x86DD) and frame[10:] == bytes(12) + b"\x86\xdd" + v6
    assert VNET_HDR.unpack(frame[:10])[1] == 0  # delivered whole, not cut
    loose = sender(monkeypatch, None)
    monkeypatch.setattr(link_send, "_strict_rp_filter", lambda: False)
    assert loose.into(packet)


class FakeLink:
    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.packets: list[bytes] = []

    def out(self, packet: bytes, mtu: int) -> bool:
        self.packets.append(packet)
        return self.ok

    def into(self, packet: bytes) -> bool:
        self.packets.append(packet)
        return self.ok

    def close(self) -> None:
        pass


def carrier(ok: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Carrier, list[bytes]]:
    raw: list[bytes] = []
    c = Carrier(FakeLink(ok))  # type: ignore[arg-type]
    monkeypatch.setattr(c, "path_mtu", lambda dst: 1500)
    monkeypatch.setattr(c, "_send", lambda packet, dst: raw.append(packet))
    return c, raw


def test_the_carrier_falls_back_to_raw_sockets_with_complete_segments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = FlowKey(6, ip_address(str(L4)), 40000, ip_address(str(P4)), 5001)
    packet = to_ipv6(v4_segment(20000), L6, P6, partial=True)
    assert packet is not None
    whole, raw = carrier(True, monkeypatch)
    whole.out(packet, P6, key, 7)
    whole.into(packet, L6)
    assert (whole.whole, whole.sent, raw) == (2, 2, [])
    c, raw = carrier(False, monkeypatch)
    c.out(packet, P6, key, 7)
    assert len(raw) == 15 and all(len(p) <= 1500 for p in raw)  # (20000 / 1428 bytes)
    for part in raw:  # each summed in full, as a raw socket must send it
        rebuilt = IPv6(part)
        del rebuilt[TCP].chksum
        assert bytes(rebuilt) == part
    raw.clear()
    c.into(packet, L6)
    assert raw == [complete(packet)] and c.whole == 0


def _neigh_msg(state: int, lladdr: bytes) -> bytes:
    body = struct.pack("=BxxxiHBB", socket.AF_INET6, 4, state, 0, 1)
    body += attr(rtnl.NDA_DST, IPv6Address("fe80::1").packed) + attr(rtnl.NDA_LLADDR, lladdr)
    return body


def test_neighbour_and_link_messages_decode() -> None:
    msg = rtnl.decode(rtnl.RTM_NEWNEIGH, memoryview(_neigh_msg(0x02, b"\x02\0\0\0\0\x01")))
    assert msg == {"event": "RTM_NEWNEIGH", "family": socket.AF_INET6, "index": 4,
                   "state": 0x02, "NDA_DST": "fe80::1",
                   "NDA_LLADDR": "02:00:00:00:00:01"}  # fmt: skip
    link = struct.pack("=BxHiII", 0, 1, 9, 0, 0) + attr(rtnl.IFLA_ADDRESS, b"\x02\0\0\0\0\x0a")
    got = rtnl.decode(rtnl.RTM_NEWLINK, memoryview(link))
    assert got is not None and (got["type"], got["IFLA_ADDRESS"]) == (1, "02:00:00:00:00:0a")
    assert rtnl.decode(rtnl.RTM_NEWNEIGH, memoryview(b"\0" * 4)) is None


def test_reads_the_loopback_links_type_and_an_unknown_neighbour() -> None:
    lo = socket.if_nametoindex("lo")
    with rtnl.Rtnl() as r:
        assert r.link(lo)["type"] == 772  # ARPHRD_LOOPBACK
        assert r.neighbour(lo, "192.0.2.77") is None
        assert r.route_get("127.0.0.1", "127.0.0.1")["RTA_OIF"] == lo


def test_a_heard_path_mtu_lowers_the_carriers_and_prompts_the_flow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, _ = carrier(True, monkeypatch)
    mtus: dict[Any, int] = {}
    monkeypatch.setattr(c, "path_mtu", lambda dst: mtus.get(dst, 1500))
    c._mtu = mtus  # type: ignore[assignment]
    prompts: list[tuple[Any, int, int]] = []
    monkeypatch.setattr(c, "_prompt_mtu", lambda key, seq, mtu: prompts.append((key, seq, mtu)))
    key = FlowKey(6, ip_address(str(L4)), 40000, ip_address(str(P4)), 5001)
    c.mtu_heard(P6, 1400, key, 77)
    assert mtus[P6] == 1400 and prompts == [(key, 77, 1400)]
    c.mtu_heard(P6, 1450, key, 78)  # not lower: nothing
    c.mtu_heard(P6, 600, key, 79)  # below IPv6's minimum: the minimum
    assert mtus[P6] == 1280 and prompts[-1] == (key, 79, 1280) and c.mtu_heard_count == 2
