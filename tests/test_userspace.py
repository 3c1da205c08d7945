"""The user-space packet path (stacktrans.userspace), with no kernel.

A real HidTable and Dataplane, and a recording stand-in for the kernel maps. The
HID table is set the way IHMP would set it (tests/ihmp_double.py); packets are built with scapy and
results compared byte for byte with the packet scapy builds from scratch with the
expected addresses (so addresses, payload and every checksum are checked at once),
and re-parsed with scapy with their checksums recomputed.

Names: ``l_old``/``l_new`` are this host's identifier and its locator after it
moved; ``p_old``/``p_new`` the peer's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP
from scapy.layers.inet import TCP as ScapyTCP
from scapy.layers.inet import UDP as ScapyUDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6PacketTooBig, IPv6
from scapy.packet import Packet, Raw

from ihmp.addr import IPAddress
from ihmp.hosts import FlowOrigin, HidState, HidTable
from ihmp.states import Trigger
from stacktrans.family import complete
from stacktrans.nfqueue import DROP
from stacktrans.socket_table import TCP, UDP, FlowKey, SocketEntry
from stacktrans.userspace import UserspacePath
from tests.ihmp_double import IhmpDouble

A = ip_address


@dataclass(frozen=True)
class Net:
    family: int
    l_old: IPAddress
    l_new: IPAddress
    p_old: IPAddress
    p_new: IPAddress
    p_3: IPAddress
    router: IPAddress


NET4 = Net(
    4,
    A("192.0.2.1"),
    A("192.0.2.129"),
    A("198.51.100.2"),
    A("203.0.113.2"),
    A("203.0.113.77"),
    A("198.51.100.254"),
)
NET6 = Net(
    6,
    A("2001:db8:c1::1"),
    A("2001:db8:c2::1"),
    A("2001:db8:1::2"),
    A("2001:db8:2::2"),
    A("2001:db8:3::2"),
    A("2001:db8:2::fe"),
)


@pytest.fixture(params=[NET4, NET6], ids=["v4", "v6"])
def net(request: pytest.FixtureRequest) -> Net:
    return request.param  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the node


class KernelStub:
    """What the Dataplane calls on NftTable, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def _flows(self, name: str, entries: Any) -> None:
        self.calls.append((name, [e.key for e in entries]))

    def add_flows(self, entries: Iterable[SocketEntry]) -> None:
        self._flows("add_flows", entries)

    def remove_flows(self, entries: Iterable[SocketEntry]) -> None:
        self._flows("remove_flows", entries)

    def kill_flows(self, entries: Iterable[SocketEntry]) -> None:
        self._flows("kill_flows", entries)

    def forget_dead(self, entries: Iterable[SocketEntry]) -> None:
        self._flows("forget_dead", entries)

    def update_hid(self, new: Any, hid: int) -> None:
        self.calls.append(("update_hid", (hid, new)))

    def set_wire(self, entry: SocketEntry, old: Any) -> None:
        self.calls.append(("set_wire", (entry.key, entry.wire, old)))

    def set_via(self, entry: SocketEntry, old: Any) -> None:
        self.calls.append(("set_via", (entry.key, entry.via, old)))

    def set_cross(self, pairs: Any, inbound: Any, old_pairs: Any, old_inbound: Any) -> None:
        self.calls.append(("set_cross", (set(pairs), set(inbound))))

    def flush(self) -> None:
        self.calls.append(("flush", None))

    def named(self, name: str) -> list[Any]:
        return [arg for n, arg in self.calls if n == name]


@dataclass
class Node:
    net: Net
    ihmp: IhmpDouble = field(default_factory=IhmpDouble)
    kernel: KernelStub = field(default_factory=KernelStub)
    now: float = 100.0

    def __post_init__(self) -> None:
        self.table: HidTable = self.ihmp.table
        self.new_hids = self.ihmp.new_hids
        self.tr = self.ihmp.attach(self.kernel)
        self.tr.set_local_addresses({self.net.l_old})
        self.path = UserspacePath(self.tr, lambda: self.now)

    def hid(self, addr: IPAddress) -> int:
        host = self.table.lookup(addr)
        assert host is not None, addr
        return host.hid

    # What IHMP leaves in the table -------------------------------------------------

    def established(self, hid: int) -> None:
        """HELLO/ACK done: the peer reaches us at our identifier."""
        self.table.transition(hid, Trigger.HELLO_ACKED)
        self.table.add_local(hid, self.net.l_old)

    def peer_moves(self, hid: int, old: IPAddress, new: IPAddress) -> None:
        """A HANDOFF from the peer: the new address first, then the old one goes."""
        self.table.add_active(hid, new, prefer=True)
        self.table.remove_address(hid, old)

    def we_move(self, hid: int) -> None:
        """This host went from l_old to l_new, and the peer acknowledged it."""
        self.tr.set_local_addresses({self.net.l_new})
        self.table.add_local(hid, self.net.l_new, prefer=True)
        self.table.remove_local(hid, self.net.l_old)


def node_with_flow(net: Net, proto: int = TCP, lport: int = 40000, rport: int = 80) -> Node:
    """A node whose socket opened l_old:lport -> p_old:rport, HELLO/ACK done."""
    node = Node(net)
    assert node.path.outbound(pkt(net, proto, net.l_old, net.p_old, lport, rport, "S")) is None
    node.established(node.hid(net.p_old))
    return node


# --------------------------------------------------------------------------- packets


def ip_layer(src: IPAddress, dst: IPAddress) -> Packet:
    if src.version == 4:
        return IP(src=str(src), dst=str(dst), id=77, ttl=61)
    return IPv6(src=str(src), dst=str(dst), hlim=61)


def pkt(
    net: Net,
    proto: int,
    src: IPAddress,
    dst: IPAddress,
    sport: int,
    dport: int,
    flags: str = "PA",
    payload: bytes = b"some application bytes",
) -> bytes:
    l4 = (
        ScapyTCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=2000 if "A" in flags else 0)
        if proto == TCP
        else ScapyUDP(sport=sport, dport=dport)
    )
    return bytes(ip_layer(src, dst) / l4 / Raw(payload))


# ICMP errors: name -> (family, flow protocol, ICMP header)
ERRORS: dict[str, tuple[int, int, Any]] = {
    "port-unreachable4": (4, UDP, lambda: ICMP(type=3, code=3)),
    "frag-needed4": (4, TCP, lambda: ICMP(type=3, code=4, nexthopmtu=1280)),
    "port-unreachable6": (6, UDP, lambda: ICMPv6DestUnreach(code=4)),
    "packet-too-big6": (6, TCP, lambda: ICMPv6PacketTooBig(mtu=1280)),
}


def icmp_error(kind: str, src: IPAddress, dst: IPAddress, quote: bytes) -> bytes:
    return bytes(ip_layer(src, dst) / ERRORS[kind][2]() / Raw(quote))


def errors_of(net: Net) -> list[str]:
    return [k for k, v in ERRORS.items() if v[0] == net.family]


def _is_icmp_error(data: bytes, hl: int) -> bool:
    if data[0] >> 4 == 4:
        return data[9] == 1 and data[hl] in (3, 4, 5, 11, 12)
    return data[6] == 58 and data[hl] in (1, 2, 3, 4)


def rebuilt(data: bytes) -> bytes:
    """``data`` re-parsed by scapy and rebuilt with every checksum recomputed.

    An ICMP error's quote (a whole packet in these tests) is rebuilt the same way
    before the outer ICMP checksum is.
    """
    v4 = data[0] >> 4 == 4
    hl = (data[0] & 0x0F) * 4 if v4 else 40
    p: Packet = IP(data) if v4 else IPv6(data)
    l4 = p.payload
    if _is_icmp_error(data, hl):
        quote = data[hl + 8 :]
        l4.remove_payload()
        l4.add_payload(Raw(rebuilt(quote)))
    for name in ("chksum", "cksum"):
        if name in l4.fields:
            delattr(l4, name)
    if v4:
        del p.chksum
    return bytes(p)


def assert_valid(data: bytes) -> None:
    assert rebuilt(data).hex() == data.hex()


def assert_translated(out: bytes | None, expected: bytes) -> None:
    assert out is not None, "packet not translated"
    assert_valid(out)
    assert out.hex() == expected.hex()


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_first_outbound_packet_learns_the_flow_and_its_hid(net: Net, proto: int) -> None:
    node = Node(net)
    syn = pkt(net, proto, net.l_old, net.p_old, 40000, 80, "S")
    assert node.path.outbound(syn) is None  # nothing to translate yet: passed unchanged
    key = FlowKey(proto, net.l_old, 40000, net.p_old, 80)
    entry = node.tr.sockets.get(key)
    assert entry is not None and entry.created == entry.last_seen == 100.0
    host = node.table.lookup(net.p_old)
    assert host is not None and host.state is HidState.HELLO_PENDING
    assert host.active == [net.p_old] and entry.hid == host.hid
    assert node.new_hids == [(host.hid, net.l_old)]  # one HELLO prompted
    assert node.kernel.named("add_flows") == [[key]]
    assert [hid for hid, _ in node.kernel.named("update_hid")] == [host.hid]

    # Later packets of the flow, both ways: nothing new, only last_seen moves.
    node.now = 105.0
    assert node.path.outbound(pkt(net, proto, net.l_old, net.p_old, 40000, 80)) is None
    node.now = 106.0
    assert node.path.inbound(pkt(net, proto, net.p_old, net.l_old, 80, 40000)) is None
    assert len(node.tr.sockets) == 1 and len(node.table) == 1
    assert node.new_hids == [(host.hid, net.l_old)]
    assert node.kernel.named("add_flows") == [[key]]
    assert entry.last_seen == 106.0


def test_a_second_flow_to_the_same_host_shares_its_hid(net: Net) -> None:
    node = node_with_flow(net)
    assert node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40001, 443, "S")) is None
    assert len(node.table) == 1
    assert {e.hid for e in node.tr.sockets} == {node.hid(net.p_old)}
    assert len(node.new_hids) == 1


@pytest.mark.parametrize("flags", ["R", "RA", "F", "FA"])
@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_reset_or_fin_of_an_unknown_flow_creates_nothing(
    net: Net, flags: str, direction: str
) -> None:
    node = Node(net)
    if direction == "outbound":
        out = node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40000, 80, flags))
    else:
        out = node.path.inbound(pkt(net, TCP, net.p_old, net.l_old, 80, 40000, flags))
    assert out is None
    assert len(node.tr.sockets) == 0 and len(node.table) == 0
    assert node.new_hids == [] and node.kernel.calls == []


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_first_inbound_packet_learns_the_flow_with_local_and_remote_swapped(
    net: Net, proto: int
) -> None:
    node = Node(net)
    assert node.path.inbound(pkt(net, proto, net.p_old, net.l_old, 5555, 22, "S")) is None
    key = FlowKey(proto, net.l_old, 22, net.p_old, 5555)
    entry = node.tr.sockets.get(key)
    assert entry is not None
    assert [e.key for e in node.tr.sockets] == [key]
    assert node.new_hids == [(node.hid(net.p_old), net.l_old)]
    assert node.kernel.named("add_flows") == [[key]]
    # Our answer belongs to the same flow.
    assert node.path.outbound(pkt(net, proto, net.l_old, net.p_old, 22, 5555, "SA")) is None
    assert len(node.tr.sockets) == 1 and len(node.new_hids) == 1


@pytest.mark.parametrize("opener", ["active", "passive"])
def test_the_handshake_gives_the_flow_both_isns(net: Net, opener: str) -> None:
    """What rto_revert needs to name snd_una and rcv_nxt: the seq of the SYN or SYN-ACK
    each side sent (pkt() always sends seq 1000; the peer's here is 7777)."""
    node = Node(net)
    theirs = bytearray(pkt(net, TCP, net.p_old, net.l_old, 5555, 22, "S"))
    if opener == "active":
        node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40000, 80, "S"))
        key = FlowKey(TCP, net.l_old, 40000, net.p_old, 80)
        theirs = bytearray(pkt(net, TCP, net.p_old, net.l_old, 80, 40000, "SA"))
    else:
        key = FlowKey(TCP, net.l_old, 22, net.p_old, 5555)
    hl = 20 if net.family == 4 else 40
    theirs[hl + 4 : hl + 8] = (7777).to_bytes(4, "big")
    node.path.inbound(bytes(rebuilt(bytes(theirs))))
    if opener == "passive":
        node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 22, 5555, "SA"))
    entry = node.tr.sockets.get(key)
    # A socket that answered the SYN does not count its SYN in tcpi_bytes_acked: the
    # table holds where that count starts (acked_from).
    ours = 1000 if opener == "active" else 1001
    assert entry is not None and (entry.isn, entry.peer_isn) == (ours, 7777)
    # Later segments (their seq is 1000 too) change neither.
    node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, key.lport, key.rport, "PA"))
    node.path.inbound(pkt(net, TCP, net.p_old, net.l_old, key.rport, key.lport, "PA"))
    assert (entry.isn, entry.peer_isn) == (ours, 7777)


def test_traffic_dime_leaves_alone_creates_nothing(net: Net) -> None:
    node = Node(net)
    loop = A("127.0.0.1") if net.family == 4 else A("::1")
    multi = A("224.0.0.251") if net.family == 4 else A("ff02::fb")
    assert node.path.outbound(pkt(net, UDP, net.l_old, multi, 5353, 5353)) is None
    assert node.path.outbound(pkt(net, UDP, loop, loop, 5000, 5001)) is None
    assert node.path.inbound(pkt(net, UDP, net.l_old, net.l_old, 5000, 5001)) is None
    assert len(node.tr.sockets) == 0 and len(node.table) == 0 and node.new_hids == []


# --------------------------------------------------------------------------- moves


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_remote_host_moved(net: Net, proto: int) -> None:
    node = node_with_flow(net, proto)
    hid = node.hid(net.p_old)
    node.peer_moves(hid, net.p_old, net.p_new)
    assert node.tr.translation(hid).remote == {net.p_old: net.p_new}  # type: ignore[union-attr]

    out = node.path.outbound(pkt(net, proto, net.l_old, net.p_old, 40000, 80))
    assert_translated(out, pkt(net, proto, net.l_old, net.p_new, 40000, 80))
    back = node.path.inbound(pkt(net, proto, net.p_new, net.l_old, 80, 40000))
    assert_translated(back, pkt(net, proto, net.p_old, net.l_old, 80, 40000))
    assert node.path.translated == 2
    assert len(node.table) == 1 and len(node.tr.sockets) == 1 and len(node.new_hids) == 1


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_this_host_moved(net: Net, proto: int) -> None:
    node = node_with_flow(net, proto)
    hid = node.hid(net.p_old)
    node.we_move(hid)
    assert node.tr.translation(hid).local == {(net.l_old, net.p_old): net.l_new}  # type: ignore[union-attr]
    assert node.tr.ghosts_needed() == {net.l_old}

    out = node.path.outbound(pkt(net, proto, net.l_old, net.p_old, 40000, 80))
    assert_translated(out, pkt(net, proto, net.l_new, net.p_old, 40000, 80))
    back = node.path.inbound(pkt(net, proto, net.p_old, net.l_new, 80, 40000))
    assert_translated(back, pkt(net, proto, net.p_old, net.l_old, 80, 40000))


def test_both_moved(net: Net) -> None:
    node = node_with_flow(net)
    hid = node.hid(net.p_old)
    node.we_move(hid)
    node.peer_moves(hid, net.p_old, net.p_new)
    out = node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40000, 80))
    assert_translated(out, pkt(net, TCP, net.l_new, net.p_new, 40000, 80))
    back = node.path.inbound(pkt(net, TCP, net.p_new, net.l_new, 80, 40000))
    assert_translated(back, pkt(net, TCP, net.p_old, net.l_old, 80, 40000))


def test_no_translation_before_any_move(net: Net) -> None:
    node = node_with_flow(net)
    assert node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40000, 80)) is None
    assert node.path.inbound(pkt(net, TCP, net.p_old, net.l_old, 80, 40000)) is None
    assert node.path.translated == 0


def test_s1_s2_each_flow_gets_its_own_identifier_back(net: Net) -> None:
    """s1 knows the peer by p_old, s2 (opened after its move) by p_new; then the
    peer moves again to p_3: one locator on the wire, two identifiers restored."""
    node = node_with_flow(net, TCP, lport=40001, rport=80)  # s1
    hid = node.hid(net.p_old)
    node.peer_moves(hid, net.p_old, net.p_new)
    assert node.path.outbound(pkt(net, TCP, net.l_old, net.p_new, 40002, 80, "S")) is None  # s2
    assert {e.hid for e in node.tr.sockets} == {hid} and len(node.new_hids) == 1

    # From the current locator p_new: s1's packets get p_old back, s2's stay.
    back1 = node.path.inbound(pkt(net, TCP, net.p_new, net.l_old, 80, 40001))
    assert_translated(back1, pkt(net, TCP, net.p_old, net.l_old, 80, 40001))
    assert node.path.inbound(pkt(net, TCP, net.p_new, net.l_old, 80, 40002)) is None
    out1 = node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40001, 80))
    assert_translated(out1, pkt(net, TCP, net.l_old, net.p_new, 40001, 80))
    assert node.path.outbound(pkt(net, TCP, net.l_old, net.p_new, 40002, 80)) is None

    node.peer_moves(hid, net.p_new, net.p_3)
    for lport, ident in ((40001, net.p_old), (40002, net.p_new)):
        out = node.path.outbound(pkt(net, TCP, net.l_old, ident, lport, 80))
        assert_translated(out, pkt(net, TCP, net.l_old, net.p_3, lport, 80))
        back = node.path.inbound(pkt(net, TCP, net.p_3, net.l_old, 80, lport))
        assert_translated(back, pkt(net, TCP, ident, net.l_old, 80, lport))


def test_legacy_host_is_never_rewritten(net: Net) -> None:
    node = Node(net)
    assert node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40000, 80, "S")) is None
    hid = node.hid(net.p_old)
    node.table.transition(hid, Trigger.HELLO_UNANSWERED)
    node.table.add_local(hid, net.l_old)
    node.we_move(hid)  # even if the table said the peer knew our new address
    assert node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40000, 80)) is None
    assert node.path.inbound(pkt(net, TCP, net.p_old, net.l_old, 80, 40000)) is None
    node.table.add_active(hid, net.p_new, prefer=True)
    assert node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40000, 80)) is None
    quote = pkt(net, TCP, net.l_old, net.p_old, 40000, 80)
    kind = errors_of(net)[0]
    err = icmp_error(kind, net.p_old, net.l_old, quote)
    assert node.path.inbound(err) is None
    assert node.path.translated == 0


# --------------------------------------------------------------------------- ICMP errors


MOVES = ["peer", "us", "both"]


def moved_node(net: Net, proto: int, who: str) -> tuple[Node, IPAddress, IPAddress]:
    """A node with one flow l_old:40000 -> p_old:80 after ``who`` moved.

    Returns it with the flow's wire addresses (local locator, remote locator).
    """
    node = node_with_flow(net, proto)
    hid = node.hid(net.p_old)
    lw, pw = net.l_old, net.p_old
    if who in ("us", "both"):
        node.we_move(hid)
        lw = net.l_new
    if who in ("peer", "both"):
        node.peer_moves(hid, net.p_old, net.p_new)
        pw = net.p_new
    return node, lw, pw


@pytest.mark.parametrize("who", MOVES)
@pytest.mark.parametrize("kind", list(ERRORS))
def test_inbound_icmp_error_from_the_peer(kind: str, who: str) -> None:
    """The peer complains about our packet as it was on the wire (locators)."""
    family, proto, _ = ERRORS[kind]
    net = NET4 if family == 4 else NET6
    node, lw, pw = moved_node(net, proto, who)
    wire_quote = pkt(net, proto, lw, pw, 40000, 80)
    err = icmp_error(kind, pw, lw, wire_quote)
    out = node.path.inbound(err)
    ident_quote = pkt(net, proto, net.l_old, net.p_old, 40000, 80)
    assert_translated(out, icmp_error(kind, net.p_old, net.l_old, ident_quote))
    assert len(node.tr.sockets) == 1  # an ICMP error never creates a flow


@pytest.mark.parametrize("who", MOVES)
@pytest.mark.parametrize("kind", list(ERRORS))
def test_inbound_icmp_error_from_a_router(kind: str, who: str) -> None:
    """A router on the path complains: its address is no host's and stays."""
    family, proto, _ = ERRORS[kind]
    net = NET4 if family == 4 else NET6
    node, lw, pw = moved_node(net, proto, who)
    err = icmp_error(kind, net.router, lw, pkt(net, proto, lw, pw, 40000, 80))
    out = node.path.inbound(err)
    ident_quote = pkt(net, proto, net.l_old, net.p_old, 40000, 80)
    assert_translated(out, icmp_error(kind, net.router, net.l_old, ident_quote))


@pytest.mark.parametrize("who", MOVES)
def test_outbound_icmp_error_about_a_received_packet(net: Net, who: str) -> None:
    """Our stack rejects a datagram of the flow; it quotes it as the socket layer
    saw it (identifiers). The peer must get it in wire addresses."""
    kind = f"port-unreachable{net.family}"
    node, lw, pw = moved_node(net, UDP, who)
    received = pkt(net, UDP, net.p_old, net.l_old, 80, 40000)
    out = node.path.outbound(icmp_error(kind, net.l_old, net.p_old, received))
    wire = pkt(net, UDP, pw, lw, 80, 40000)
    assert_translated(out, icmp_error(kind, lw, pw, wire))


def test_outbound_icmp_error_from_another_local_address(net: Net) -> None:
    """Only the outer address that is the flow's identifier is translated."""
    kind = f"port-unreachable{net.family}"
    node, lw, pw = moved_node(net, UDP, "both")
    other = net.l_new  # e.g. the kernel picked the current address as the source
    received = pkt(net, UDP, net.p_old, net.l_old, 80, 40000)
    out = node.path.outbound(icmp_error(kind, other, net.p_old, received))
    assert_translated(out, icmp_error(kind, other, pw, pkt(net, UDP, pw, lw, 80, 40000)))


def test_icmp_error_without_translation_due_is_left_alone(net: Net) -> None:
    node = node_with_flow(net, UDP)
    kind = f"port-unreachable{net.family}"
    err_in = icmp_error(kind, net.p_old, net.l_old, pkt(net, UDP, net.l_old, net.p_old, 40000, 80))
    assert node.path.inbound(err_in) is None
    received = pkt(net, UDP, net.p_old, net.l_old, 80, 40000)
    assert node.path.outbound(icmp_error(kind, net.l_old, net.p_old, received)) is None


def test_icmp_error_about_an_unknown_flow(net: Net) -> None:
    node, lw, pw = moved_node(net, UDP, "both")
    before = len(node.tr.sockets), len(node.table), list(node.new_hids)
    for kind in errors_of(net):
        proto = ERRORS[kind][1]
        cases = [
            pkt(net, proto, lw, pw, 40000, 81),  # other remote port
            pkt(net, proto, lw, pw, 40999, 80),  # other local port
            pkt(net, proto, lw, net.p_3, 40000, 80),  # a host we know nothing of
        ]
        if proto == TCP:
            cases.append(pkt(net, proto, lw, pw, 40000, 80))  # the flow is UDP
        for quote in cases:
            assert node.path.inbound(icmp_error(kind, pw, lw, quote)) is None
            assert node.path.inbound(icmp_error(kind, net.router, lw, quote)) is None
    kind = f"port-unreachable{net.family}"
    for received in (
        pkt(net, UDP, net.p_old, net.l_old, 80, 40001),
        pkt(net, UDP, net.p_3, net.l_old, 80, 40000),
        pkt(net, TCP, net.p_old, net.l_old, 80, 40000),
    ):
        assert node.path.outbound(icmp_error(kind, net.l_old, net.p_old, received)) is None
    assert (len(node.tr.sockets), len(node.table), node.new_hids) == before


def test_icmp_error_with_a_cut_quote_is_translated(net: Net) -> None:
    """Routers may quote only the IP header and 8 bytes: the addresses still change."""
    kind = "frag-needed4" if net.family == 4 else "packet-too-big6"
    node, lw, pw = moved_node(net, TCP, "both")
    hl = 20 if net.family == 4 else 40
    quote = pkt(net, TCP, lw, pw, 40000, 80)[: hl + 8]
    out = node.path.inbound(icmp_error(kind, net.router, lw, quote))
    assert out is not None
    expected_quote = pkt(net, TCP, net.l_old, net.p_old, 40000, 80)[: hl + 8]
    assert out == icmp_error(kind, net.router, net.l_old, expected_quote)


# --------------------------------------------------------------------------- dual stack


class RecordingCarrier:
    """What the user-space path would put back into the kernel (nothing is sent)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Any]] = []

    def out(self, packet: bytes, dst: Any, key: Any, seq: Any) -> None:
        self.sent.append(("out", packet, dst))

    def into(self, packet: bytes, dst: Any) -> None:
        self.sent.append(("into", packet, dst))

    def mtu_heard(self, dst: Any, mtu: int, key: Any, seq: Any) -> None:
        self.sent.append(("mtu", (mtu, key, seq), dst))

    def error(self, key: Any, seq: Any, kind: int, code: int) -> None:
        self.sent.append(("error", (kind, code, seq), key))


def test_dual_stack_peer_packets_of_the_other_family_with_a_flows_ports() -> None:
    """A dual-stack peer has one HID for its IPv4 and IPv6 addresses. A v6 segment
    from it with the ports of a v4 flow is that flow's, carried across by the peer
    (before our translation followed): it goes into our stack as the v4 flow's. A v6
    SYN is a new flow; ICMP errors are left alone (it used to raise RewriteError)."""
    node = node_with_flow(NET4)
    carrier = RecordingCarrier()
    node.path.carrier = carrier  # type: ignore[assignment]
    hid = node.hid(NET4.p_old)
    node.tr.set_local_addresses({NET4.l_old, NET6.l_old})
    node.table.add_active(hid, NET6.p_old)
    node.peer_moves(hid, NET4.p_old, NET4.p_new)  # the v4 flow is translated
    v6 = pkt(NET6, TCP, NET6.p_old, NET6.l_old, 80, 40000)
    assert node.path.inbound(v6) == DROP
    [(way, packet, dst)] = carrier.sent
    assert (way, dst) == ("into", NET4.l_old)
    packet = complete(packet)  # (left partial for the kernel: complete it as it would)
    assert_valid(packet)
    want = IP(pkt(NET4, TCP, NET4.p_old, NET4.l_old, 80, 40000))
    got = IP(packet)
    assert (got.src, got.dst) == (str(NET4.p_old), str(NET4.l_old))
    assert bytes(got[ScapyTCP]) == bytes(want[ScapyTCP])  # the segment, checksum included
    syn = bytearray(pkt(NET6, TCP, NET6.p_old, NET6.l_old, 80, 40001))
    syn[40 + 13] = 0x02
    assert node.path.inbound(bytes(syn)) != DROP and len(carrier.sent) == 1
    err = icmp_error(
        "packet-too-big6", NET6.p_old, NET6.l_old, pkt(NET6, TCP, NET6.l_old, NET6.p_old, 40000, 80)
    )
    assert node.path.inbound(err) is None
    # The v4 flow is still translated both ways.
    back = node.path.inbound(pkt(NET4, TCP, NET4.p_new, NET4.l_old, 80, 40000))
    assert_translated(back, pkt(NET4, TCP, NET4.p_old, NET4.l_old, 80, 40000))
    out = node.path.outbound(pkt(NET4, TCP, NET4.l_old, NET4.p_old, 40000, 80))
    assert_translated(out, pkt(NET4, TCP, NET4.l_old, NET4.p_new, 40000, 80))


# --------------------------------------------------------------------------- garbage


GARBAGE = [
    b"",
    b"\x00",
    b"\x45",
    b"\x45" + b"\x00" * 18,  # a truncated IPv4 header
    b"\x60" + b"\x00" * 30,  # a truncated IPv6 header
    b"\x70" + b"\x00" * 60,  # IP version 7
    b"\xff" * 100,
    bytes(IP(src="192.0.2.1", dst="198.51.100.2", len=400) / ScapyTCP()),  # claims 400 bytes
    bytes(IP(src="192.0.2.1", dst="198.51.100.2") / ScapyTCP())[:30],  # a cut TCP header
    bytes(IPv6(src="2001:db8:c1::1", dst="2001:db8:1::2") / ScapyUDP())[:44],
    bytes(IP(src="192.0.2.1", dst="198.51.100.2", proto=6, ihl=15) / Raw(b"\x00" * 8)),
    # ICMP errors whose quote is garbage
    bytes(IP(src="198.51.100.2", dst="192.0.2.1") / ICMP(type=3, code=3) / Raw(b"\x99" * 30)),
    bytes(IPv6(src="2001:db8:1::2", dst="2001:db8:c1::1") / ICMPv6PacketTooBig() / Raw(b"")),
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_passed_unchanged(data: bytes) -> None:
    for net in (NET4, NET6):
        node, _, _ = moved_node(net, TCP, "both")
        assert node.path.outbound(data) is None
        assert node.path.inbound(data) is None
        assert len(node.tr.sockets) == 1


def _samples() -> list[bytes]:
    out = []
    for net in (NET4, NET6):
        for proto in (TCP, UDP):
            out.append(pkt(net, proto, net.l_old, net.p_old, 40000, 80))
            out.append(pkt(net, proto, net.p_new, net.l_new, 80, 40000))
        for kind in errors_of(net):
            proto = ERRORS[kind][1]
            out.append(
                icmp_error(
                    kind, net.p_new, net.l_new, pkt(net, proto, net.l_new, net.p_new, 40000, 80)
                )
            )
            out.append(
                icmp_error(
                    kind, net.l_old, net.p_old, pkt(net, proto, net.p_old, net.l_old, 80, 40000)
                )
            )
    return out


SAMPLES = _samples()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(SAMPLES),
    cut=st.integers(min_value=0, max_value=2000),
    flips=st.lists(st.tuples(st.integers(0, 1999), st.integers(0, 255)), max_size=4),
)
def test_mangled_packets_never_raise(sample: bytes, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(sample[:cut])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    for net in (NET4, NET6):
        node, _, _ = moved_node(net, TCP, "both")
        for result in (node.path.outbound(bytes(data)), node.path.inbound(bytes(data))):
            assert result is None or isinstance(result, bytes)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data: bytes) -> None:
    for net in (NET4, NET6):
        node, _, _ = moved_node(net, UDP, "both")
        for result in (node.path.outbound(data), node.path.inbound(data)):
            assert result is None or isinstance(result, bytes)


def test_a_packet_this_host_sends_itself_is_no_flow(net: Net) -> None:
    """dime's own prompts (rto_revert) are addressed to a flow's local identifier, as
    from the peer; before the identifier is back on lo as a ghost they may pass the
    output hook. Neither they nor anything else to this host's own addresses may make
    a flow, or a host for the address (it would be told HELLO)."""
    node = Node(net)
    node.path.outbound(pkt(net, TCP, net.l_old, net.p_old, 40000, 80, "S"))  # a live flow
    node.tr.set_local_addresses({net.l_new})  # we moved: l_old is only an identifier
    flows, hids = len(node.tr.sockets), list(node.new_hids)
    assert node.path.outbound(pkt(net, TCP, net.p_old, net.l_old, 80, 40000, "A")) is None
    assert node.path.outbound(pkt(net, UDP, net.p_old, net.l_new, 53, 5353)) is None
    assert len(node.tr.sockets) == flows and node.new_hids == hids


# --------------------------------------------------------------------------- notices


def test_notices_learn_flows_both_ways_with_their_isns(net: Net) -> None:
    """nft mode: the kernel passed the packets already and sends copies of their
    heads (cut at the log's snap length): the flows are learned as their sockets see
    them, and each side's ISN from the SYN and SYN-ACK it sent."""
    node = Node(net)
    snap = 80
    ours = pkt(net, TCP, net.l_old, net.p_old, 40000, 80, "S")
    node.path.observe(ours[:snap], outbound=True)
    theirs = bytearray(pkt(net, TCP, net.p_old, net.l_old, 80, 40000, "SA"))
    hl = 20 if net.family == 4 else 40
    theirs[hl + 4 : hl + 8] = (7777).to_bytes(4, "big")
    theirs[hl + 8 : hl + 12] = (1001).to_bytes(4, "big")  # it acknowledges our SYN
    node.path.observe(bytes(theirs)[:snap], outbound=False)
    key = FlowKey(TCP, net.l_old, 40000, net.p_old, 80)
    entry = node.tr.sockets.get(key)
    assert entry is not None and (entry.isn, entry.peer_isn) == (1000, 7777)
    assert node.new_hids == [(node.hid(net.p_old), net.l_old)]  # a new host is greeted
    # A flow the peer opened, told by its SYN arriving.
    node.path.observe(pkt(net, UDP, net.p_old, net.l_old, 5555, 53)[:snap], outbound=False)
    assert node.tr.sockets.get(FlowKey(UDP, net.l_old, 53, net.p_old, 5555)) is not None
    assert len(node.new_hids) == 1 and node.path.notices == 3


@pytest.mark.parametrize("opener", ["we", "they"])
def test_a_syn_ack_alone_tells_the_flow_both_isns_and_who_opened_it(net: Net, opener: str) -> None:
    """The kernel logs no SYN: the SYN-ACK is a TCP connection's one notice at each
    end. IHMP is told who opened it: only a connection we opened makes it say HELLO
    to a new host (a SYN's source may be spoofed)."""
    node = Node(net)
    hl = 20 if net.family == 4 else 40
    if opener == "we":
        syn_ack = bytearray(pkt(net, TCP, net.p_old, net.l_old, 80, 40000, "SA"))
        key = FlowKey(TCP, net.l_old, 40000, net.p_old, 80)
        isns = (4321, 7777)
    else:
        syn_ack = bytearray(pkt(net, TCP, net.l_old, net.p_old, 22, 5555, "SA"))
        key = FlowKey(TCP, net.l_old, 22, net.p_old, 5555)
        isns = (7778, 4321)  # we answered: our byte count starts after our SYN-ACK
    syn_ack[hl + 4 : hl + 8] = (7777).to_bytes(4, "big")  # the SYN-ACK's sender's
    syn_ack[hl + 8 : hl + 12] = (4322).to_bytes(4, "big")  # the SYN's, acknowledged
    node.path.observe(bytes(syn_ack), outbound=opener == "they")
    entry = node.tr.sockets.get(key)
    assert entry is not None and (entry.isn, entry.peer_isn) == isns
    want = FlowOrigin.OUTBOUND if opener == "we" else FlowOrigin.INBOUND
    assert node.ihmp.origins == [want]


def test_notices_of_resets_and_garbage_learn_nothing(net: Net) -> None:
    node = Node(net)
    node.path.observe(pkt(net, TCP, net.l_old, net.p_old, 40000, 80, "R"), outbound=True)
    # (A packet cut short, or claiming more bytes than it has, is what a notice is.)
    for data in GARBAGE[:7]:
        node.path.observe(data, outbound=True)
        node.path.observe(data, outbound=False)
    assert len(node.tr.sockets) == 0 and node.path.notices == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_notices_never_raise(data: bytes, outbound: bool) -> None:
    Node(NET4).path.observe(data, outbound)
