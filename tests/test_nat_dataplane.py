"""NAT traversal in StackTrans, without a kernel: per-flow NAT ports (knocks and
NAT entries), the kernel elements they make, the packets the user-space path
rewrites, drops or takes out, and the knock and NS packet builders."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest

from ihmp.flows import KNOCK_MAGIC, FlowSpec
from ihmp.hosts import HidTable
from ihmp.states import Trigger
from stacktrans.dataplane import Dataplane
from stacktrans.knock import build
from stacktrans.nfqueue import DROP
from stacktrans.packet import checksum, l4_payload, parse, rewrite_ports, set_udp_payload_bits
from stacktrans.socket_table import TCP, UDP, FlowKey
from stacktrans.userspace import UserspacePath
from tests.test_dataplane import LOCAL, FakeNft, dataplane

A = ip_address
MH, NAT1, NAT2, PRIV1 = A("203.0.113.20"), A("198.51.100.2"), A("198.51.100.3"), A("10.77.1.20")
FLOW = FlowKey(TCP, LOCAL, 5001, MH, 40000)  # as our socket sees it
KNOCK = FlowSpec(TCP, MH, 40000, LOCAL, 5001)  # as the peer's socket sees it


def natted(flows: tuple[FlowKey, ...] = (FLOW,)) -> tuple[Dataplane, HidTable, FakeNft, int]:
    """The peer (MH) moved behind NAT1 (its own address PRIV1 behind it)."""
    nft = FakeNft()
    tr, table, _ = dataplane(nft)
    tr.set_local_addresses({LOCAL})
    for key in flows:
        tr.flow_seen(key, now=0.0)
    entry = table.lookup(MH)
    assert entry is not None
    hid = entry.hid
    table.transition(hid, Trigger.HELLO_ACKED)
    table.add_active(hid, NAT1, prefer=True)
    table.set_nat(hid, NAT1, PRIV1)
    table.remove_address(hid, MH, retire=True)
    nft.batches.clear()
    return tr, table, nft, hid


def _elements(nft: FakeNft) -> str:
    return "\n".join(nft.batches)


def test_behind_a_nat_nothing_goes_host_wide_until_the_flows_knock() -> None:
    tr, _, nft, hid = natted()
    tr_ = tr.translation(hid)
    assert tr_ is not None and tr_.remote == {}  # not to NAT1 at the flow's own port
    entry = tr.bind(hid, KNOCK, NAT1, 61000)
    assert entry is not None and entry.wire == (NAT1, 61000)
    assert entry.bound_to == (NAT1, PRIV1)
    text = _elements(nft)
    assert f"add element inet dime wdst4 {{ tcp . {LOCAL} . 5001 . {MH} . 40000 : {NAT1} }}" in text
    assert (
        f"add element inet dime wport4 {{ tcp . {LOCAL} . 5001 . {NAT1} . 40000 : 61000 }}" in text
    )
    assert f"add element inet dime rport4 {{ {hid} . tcp . 61000 . 5001 : 40000 }}" in text
    assert f"delete element inet dime rid4 {{ {hid} . tcp . 40000 . 5001 }}" in text
    assert f"add element inet dime rid4 {{ {hid} . tcp . 61000 . 5001 : {MH} }}" in text
    assert tr.sockets.inbound(hid, 4, TCP, 61000, 5001) is entry
    assert tr.sockets.inbound(hid, 4, TCP, 40000, 5001) is None
    assert tr.take_effects().moved == {hid}  # its TCP is prompted


def test_a_knock_for_a_flow_we_do_not_have_binds_nothing() -> None:
    tr, _, nft, hid = natted()
    for wrong in (
        FlowSpec(TCP, MH, 40001, LOCAL, 5001),  # another port of the peer's
        FlowSpec(UDP, MH, 40000, LOCAL, 5001),
        FlowSpec(TCP, MH, 40000, A("192.0.2.99"), 5001),  # another address of ours
    ):
        assert tr.bind(hid, wrong, NAT1, 61000) is None
    assert nft.batches == []


def test_the_same_knock_again_changes_nothing_and_a_taken_port_is_refused() -> None:
    other = FlowKey(TCP, LOCAL, 5001, MH, 40001)
    tr, _, nft, hid = natted((FLOW, other))
    assert tr.bind(hid, KNOCK, NAT1, 61000) is not None
    nft.batches.clear()
    assert tr.bind(hid, KNOCK, NAT1, 61000) is not None
    assert nft.batches == []
    # The other flow claims the port the first one has: refused, nothing changed.
    assert tr.bind(hid, FlowSpec(TCP, MH, 40001, LOCAL, 5001), NAT1, 61000) is None
    assert nft.batches == []


def test_moving_on_to_an_own_address_forgets_the_nat_ports() -> None:
    tr, table, nft, hid = natted()
    entry = tr.bind(hid, KNOCK, NAT1, 61000)
    assert entry is not None
    nft.batches.clear()
    public = A("203.0.113.77")
    table.add_active(hid, public, prefer=True)
    table.remove_address(hid, NAT1, retire=True)
    assert entry.wire is None and entry.bound_to is None
    text = _elements(nft)
    assert f"delete element inet dime wdst4 {{ tcp . {LOCAL} . 5001 . {MH} . 40000 }}" in text
    assert f"add element inet dime rid4 {{ {hid} . tcp . 40000 . 5001 : {MH} }}" in text
    tr_ = tr.translation(hid)
    assert tr_ is not None and tr_.remote == {MH: public}


def test_a_new_address_behind_the_same_nat_waits_for_new_knocks() -> None:
    tr, table, _, hid = natted()
    entry = tr.bind(hid, KNOCK, NAT1, 61000)
    assert entry is not None
    assert not tr.awaits_knock(hid, NAT1, TCP, 5001)
    table.set_nat(hid, NAT1, A("10.77.1.21"))  # the NAT's mappings are new ones
    assert tr.awaits_knock(hid, NAT1, TCP, 5001)
    assert not tr.awaits_knock(hid, NAT1, TCP, 5002)  # no flow of its there
    assert not tr.awaits_knock(hid, A("192.0.2.50"), TCP, 5001)  # no NAT of the host
    assert tr.bind(hid, KNOCK, NAT1, 61500) is entry and entry.wire == (NAT1, 61500)
    assert not tr.awaits_knock(hid, NAT1, TCP, 5001)


def test_a_flow_that_moved_ahead_of_our_proof_is_held_from_our_stack() -> None:
    """The peer moved its flows when our challenge to its new address (a NAT that
    chose new ports) reached it: until the answer comes, its TCP segments to our
    flows' ports are dropped (our stack would reset the flow), nothing else is."""
    tr, table, _, hid = natted()
    table.mark_unreachable(hid, NAT2)  # claimed by a HANDOFF, our challenge is out
    assert tr.awaits_knock(hid, NAT2, TCP, 5001)
    assert not tr.awaits_knock(hid, NAT2, TCP, 5002)  # no flow of its there
    assert not tr.awaits_knock(hid, NAT2, UDP, 5001)
    path = UserspacePath(tr, lambda: 0.0)
    assert path.inbound(_tcp(str(NAT2), 61001, str(LOCAL), 5001, b"data")) == DROP
    assert path.inbound(_syn(str(NAT2), 61002, str(LOCAL), 5001)) != DROP  # a new flow
    table.add_active(hid, NAT2, prefer=True)  # proven: now its knock binds it
    table.set_nat(hid, NAT2, A("10.77.2.20"))
    assert tr.awaits_knock(hid, NAT2, TCP, 5001)  # (the NAT's rule, as before)


UFLOW = FlowKey(UDP, LOCAL, 5300, MH, 5400)  # as our socket sees it
UKNOCK = FlowSpec(UDP, MH, 5400, LOCAL, 5300)


def test_a_udp_flow_that_moved_ahead_of_our_proof_is_held_too() -> None:
    """As TCP: its datagrams from an unproven NAT's new port to our flow's port are
    dropped until the proof (taken as a new flow, they would hold the very port
    its knock then names); to a port with no UDP flow of the host, they go on."""
    tr, table, _, hid = natted((FLOW, UFLOW))
    table.mark_unreachable(hid, NAT2)
    assert tr.awaits_knock(hid, NAT2, UDP, 5300)
    assert not tr.awaits_knock(hid, NAT2, UDP, 5301)
    path = UserspacePath(tr, lambda: 0.0)
    assert path.inbound(_udp(str(NAT2), 46459, str(LOCAL), 5300, b"req")) == DROP
    assert path.inbound(_udp(str(NAT2), 46460, str(LOCAL), 5301, b"req")) != DROP
    assert tr.sockets.inbound(hid, 4, UDP, 46459, 5300) is None  # no flow made of it


def test_a_knock_takes_its_port_from_the_flow_its_packets_made_before_it() -> None:
    """The flow's datagrams came through the NAT (proven) before its knock and were
    taken as a new flow of the host, named by the NAT's address and port: the knock
    for that port binds the real flow, and that stand-in goes (counted)."""
    tr, _, nft, hid = natted((FLOW, UFLOW))
    stand_in = tr.flow_seen(FlowKey(UDP, LOCAL, 5300, NAT1, 46459), now=1.0)
    assert stand_in is not None and stand_in.hid == hid
    nft.batches.clear()
    entry = tr.bind(hid, UKNOCK, NAT1, 46459)
    assert entry is not None and entry.key == UFLOW and entry.wire == (NAT1, 46459)
    assert tr.sockets.get(stand_in.key) is None
    assert tr.sockets.inbound(hid, 4, UDP, 46459, 5300) is entry
    assert tr.aliases_dropped == 1
    text = _elements(nft)
    assert f"delete element inet dime flows4 {{ udp . {LOCAL} . 5300 . {NAT1} . 46459 }}" in text
    assert f"add element inet dime rport4 {{ {hid} . udp . 46459 . 5300 : 5400 }}" in text


def test_a_knock_leaves_a_flow_of_another_address_on_its_port_alone() -> None:
    """A port held by a flow the NAT's address and port do not name (here, one the
    peer's own address names) is no stand-in: the knock is refused, nothing goes."""
    other = FlowKey(UDP, LOCAL, 5300, MH, 46459)
    tr, _, _, hid = natted((FLOW, UFLOW, other))
    assert tr.bind(hid, UKNOCK, NAT1, 46459) is None
    assert tr.sockets.get(other) is not None and tr.aliases_dropped == 0


def test_an_aware_nats_entry_binds_by_the_peers_port_and_names_native_flows() -> None:
    native = FlowKey(UDP, LOCAL, 6001, NAT1, 50123)  # started behind NAT1
    tr, _, _, hid = natted()
    assert tr.flow_seen(native, now=0.0) is not None
    assert tr.bind_port(hid, TCP, 40000, NAT1, 61000) == 1
    assert tr.sockets.get(FLOW).wire == (NAT1, 61000)  # type: ignore[union-attr]
    # The NAT's entry for the flow that started behind it: now we know its own port,
    assert tr.bind_port(hid, UDP, 4242, NAT1, 50123) == 0
    entry = tr.sockets.get(native)
    assert entry is not None and entry.peer_port == 4242 and entry.wire is None
    # and its knock after the host moves on (it names that port) finds it.
    moved = tr.bind(hid, FlowSpec(UDP, PRIV1, 4242, LOCAL, 6001), NAT2, 7000)
    assert moved is entry and entry.wire == (NAT2, 7000)


# -- the user-space path ---------------------------------------------------------------


def _tcp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"") -> bytes:
    return build(TCP, A(src), sport, A(dst), dport, payload)  # an ACK segment


def _syn(src: str, sport: int, dst: str, dport: int) -> bytes:
    data = bytearray(build(TCP, A(src), sport, A(dst), dport, b""))
    data[20 + 13] = 0x02
    return bytes(data)


def _udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    return build(UDP, A(src), sport, A(dst), dport, payload)


def test_user_space_takes_knocks_out_and_hands_them_to_ihmp() -> None:
    tr, _, _, _ = natted()
    seen: list[tuple[object, int, bytes]] = []
    path = UserspacePath(tr, lambda: 0.0, lambda a, p, d: seen.append((a, p, d)))
    for packet in (
        _tcp(str(NAT1), 61000, str(LOCAL), 5001, KNOCK_MAGIC + b"bind"),
        _udp(str(NAT1), 61000, str(LOCAL), 6001, KNOCK_MAGIC + b"bind"),
    ):
        assert path.inbound(packet) == DROP
    assert seen == [(NAT1, 61000, b"bind")] * 2 and path.knocks == 2
    # Our own knock, going out, is no new flow.
    assert path.outbound(_udp(str(PRIV1), 40000, str(LOCAL), 5001, KNOCK_MAGIC + b"x")) is None
    assert len(tr.sockets) == 1


def test_user_space_drops_a_flows_packets_that_come_before_its_knock() -> None:
    tr, _, _, hid = natted()
    path = UserspacePath(tr, lambda: 0.0)
    assert path.inbound(_tcp(str(NAT1), 61000, str(LOCAL), 5001, b"data")) == DROP
    # A new connection from the host is no such packet: it goes on.
    assert path.inbound(_syn(str(NAT1), 61001, str(LOCAL), 5001)) != DROP
    tr.bind(hid, KNOCK, NAT1, 61000)
    restored = path.inbound(_tcp(str(NAT1), 61000, str(LOCAL), 5001, b"data"))
    assert restored is not None and restored != DROP
    info = parse(restored)
    assert (A(info.src), info.sport, A(info.dst), info.dport) == (MH, 40000, LOCAL, 5001)
    assert _l4_ok(restored)
    out = path.outbound(_tcp(str(LOCAL), 5001, str(MH), 40000, b"reply"))
    assert out is not None
    info = parse(out)
    assert (A(info.dst), info.dport) == (NAT1, 61000) and _l4_ok(out)


# -- packet builders ---------------------------------------------------------------------


def _l4_ok(packet: bytes) -> bool:
    """Whether the TCP/UDP checksum of an IPv4 ``packet`` is right."""
    info = parse(packet)
    seg = packet[info.l4_offset : info.end]
    pseudo = info.src + info.dst + struct.pack("!BBH", 0, info.proto, len(seg))
    return checksum(pseudo + seg) == 0


@pytest.mark.parametrize("proto", [TCP, UDP])
def test_a_knock_is_a_well_formed_packet_of_the_flow(proto: int) -> None:
    packet = build(proto, PRIV1, 40000, LOCAL, 5001, KNOCK_MAGIC + b"payload", seq=7, ack=9)
    info = parse(packet)
    assert (A(info.src), info.sport, A(info.dst), info.dport) == (PRIV1, 40000, LOCAL, 5001)
    assert checksum(packet[:20]) == 0 and _l4_ok(packet)
    assert l4_payload(packet, info) == KNOCK_MAGIC + b"payload"
    if proto == TCP:
        assert info.tcp_flags == 0x10  # a plain ACK
    v6 = build(proto, A("2001:db8::1"), 1, A("2001:db8::2"), 2, b"x")
    assert parse(v6).version == 6 and l4_payload(v6, parse(v6)) == b"x"


def test_port_rewrites_and_the_ns_bit_keep_checksums_right() -> None:
    packet = bytearray(_udp("10.0.0.1", 4731, "10.0.0.2", 4731, bytes([1, 8, 0x80, 0]) + b"rest"))
    info = parse(bytes(packet))
    assert set_udp_payload_bits(packet, info, 2, 0x01)
    assert packet[28 + 2] == 0x81 and _l4_ok(bytes(packet))
    assert not set_udp_payload_bits(packet, info, 2, 0x01)  # set already
    tcp = bytearray(_tcp("10.0.0.1", 1000, "10.0.0.2", 2000, b"abc"))
    rewrite_ports(tcp, parse(bytes(tcp)), 1234, None)
    assert parse(bytes(tcp)).sport == 1234 and _l4_ok(bytes(tcp))


def test_a_successor_takes_over_the_nat_ports_of_the_flows_it_adopts() -> None:
    tr, _, _, hid = natted()
    assert tr.bind(hid, KNOCK, NAT1, 61000) is not None
    saved = tr.bindings()
    assert saved == [
        {
            "flow": [TCP, str(LOCAL), 5001, str(MH), 40000],
            "wire": [str(NAT1), 61000],
            "bound_to": [str(NAT1), str(PRIV1)],
            "peer_port": None,
        }
    ]
    after, _, nft, hid2 = natted()  # the successor: the same host and flow again
    assert after.restore_bindings([*saved, {"flow": "junk"}, {"flow": [6, "x", 1, "y", 2]}]) == 1
    entry = after.sockets.get(FLOW)
    assert entry is not None and entry.wire == (NAT1, 61000) and entry.bound_to == (NAT1, PRIV1)
    assert f"add element inet dime rport4 {{ {hid2} . tcp . 61000 . 5001 : 40000 }}" in _elements(
        nft
    )
    assert after.bindings_changed


def test_a_flow_started_behind_a_nat_goes_to_its_own_port_once_its_host_is_public() -> None:
    native = FlowKey(TCP, LOCAL, 5001, NAT1, 50123)  # the NAT gave it 50123; its own: 4242
    tr, table, nft, hid = natted()
    assert tr.flow_seen(native, now=0.0) is not None
    tr.bind_port(hid, TCP, 4242, NAT1, 50123)
    public = A("203.0.113.77")
    table.add_active(hid, public, prefer=True)
    table.remove_address(hid, NAT1, retire=True)
    entry = tr.sockets.get(native)
    assert entry is not None and entry.wire == (public, 4242)
    assert f"add element inet dime rport4 {{ {hid} . tcp . 4242 . 5001 : 50123 }}" in _elements(nft)


# -- dime nat's reading of conntrack events ------------------------------------------------


def _ct_event(orig: tuple[str, str, int, int, int], reply: tuple[str, str, int, int, int]) -> bytes:
    """A ctnetlink NEW event as the kernel sends it (pyroute2 encodes it)."""
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    def tup(t: tuple[str, str, int, int, int]) -> dict[str, object]:
        src, dst, proto, sport, dport = t
        ip = [("CTA_IP_V4_SRC", src), ("CTA_IP_V4_DST", dst)]
        ports = [("CTA_PROTO_NUM", proto), ("CTA_PROTO_SRC_PORT", sport)]
        ports.append(("CTA_PROTO_DST_PORT", dport))
        return {"attrs": [("CTA_TUPLE_IP", {"attrs": ip}), ("CTA_TUPLE_PROTO", {"attrs": ports})]}

    msg = nfct_msg()
    msg["header"]["type"] = 1 << 8  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW
    msg["nfgen_family"] = 2
    msg["attrs"] = [("CTA_TUPLE_ORIG", tup(orig)), ("CTA_TUPLE_REPLY", tup(reply))]
    msg.encode()
    return bytes(msg.data)


def test_dime_nat_reads_source_nat_mappings_from_conntrack_events() -> None:
    from ihmp.flows import NatMapping
    from stacktrans.nat_router import mappings

    natted = _ct_event(("10.77.2.20", "198.51.100.10", 6, 40000, 5001),
                       ("198.51.100.10", "198.51.100.3", 6, 5001, 61000))  # fmt: skip
    routed = _ct_event(("203.0.113.20", "198.51.100.10", 17, 5400, 5300),
                       ("198.51.100.10", "203.0.113.20", 17, 5300, 5400))  # fmt: skip
    icmp = _ct_event(("10.77.2.20", "198.51.100.10", 1, 0, 0),
                     ("198.51.100.10", "198.51.100.3", 1, 0, 0))  # fmt: skip
    got = list(mappings(routed + natted + icmp + b"\x00" * 7))  # and a truncated tail
    mapping = NatMapping(6, A("10.77.2.20"), 40000, A("198.51.100.3"), 61000)
    assert got == [(mapping, A("198.51.100.10"), 5001)]


def test_flows_named_by_a_nat_move_only_on_their_own_knock() -> None:
    """Other hosts behind that NAT may have flows named by its address too: when this
    host leaves the NAT, nothing named by the NAT's address follows it host-wide."""
    native = FlowKey(TCP, LOCAL, 5001, NAT1, 40123)  # started behind NAT1, port kept
    tr, table, _, hid = natted()
    assert tr.flow_seen(native, now=0.0) is not None
    public = A("203.0.113.77")
    table.add_active(hid, public, prefer=True)
    table.remove_address(hid, NAT1, retire=True)
    tr_ = tr.translation(hid)
    assert tr_ is not None and NAT1 not in tr_.remote and tr_.remote[MH] == public
    # Another host's packet from the NAT this host left is no late packet of its flows.
    assert not tr.awaits_knock(hid, NAT1, TCP, 5001)
    entry = tr.bind(hid, FlowSpec(TCP, PRIV1, 40123, LOCAL, 5001), public, 40123)
    assert entry is not None and entry.wire == (public, 40123) and entry.bound_to is None
    table.add_local(hid, LOCAL)  # any later change of the host keeps that binding
    assert entry.wire == (public, 40123)


# -- flows started behind a NAT that chose their ports ------------------------------------


def behind_nat2() -> tuple[Dataplane, HidTable, FakeNft, int]:
    """The peer moved on from NAT1 to NAT2 (its address 10.77.2.20 behind it)."""
    tr, table, nft, hid = natted()
    table.add_active(hid, NAT2, prefer=True)
    table.set_nat(hid, NAT2, A("10.77.2.20"))
    nft.batches.clear()
    return tr, table, nft, hid


def test_a_flow_started_behind_a_port_choosing_nat_is_found_by_its_knock() -> None:
    """We know the flow by the NAT's address and port (52000); the knock names the
    host's own port (40123): the one flow of the host to our port 5001 whose own port
    we do not know is it, and now we know that port too."""
    started = FlowKey(TCP, LOCAL, 5001, NAT2, 52000)
    tr, _, _, hid = behind_nat2()
    entry = tr.flow_seen(started, now=0.0)
    assert entry is not None and entry.hid == hid
    assert entry is not None
    bound = tr.bind(hid, FlowSpec(TCP, A("10.77.2.20"), 40123, LOCAL, 5001), NAT2, 53999)
    assert bound is entry and entry.wire == (NAT2, 53999) and entry.peer_port == 40123
    # Its next knock finds it at once.
    assert tr.bind(hid, FlowSpec(TCP, A("10.77.2.20"), 40123, LOCAL, 5001), NAT2, 54000) is entry


def test_two_flows_started_behind_such_a_nat_cannot_be_told_apart() -> None:
    tr, _, nft, hid = behind_nat2()
    for port in (52000, 52001):
        assert tr.flow_seen(FlowKey(TCP, LOCAL, 5001, NAT2, port), now=0.0) is not None
    nft.batches.clear()
    assert tr.bind(hid, FlowSpec(TCP, A("10.77.2.20"), 40123, LOCAL, 5001), NAT2, 53999) is None
    assert nft.batches == []


def test_user_space_sends_a_nat_bound_flow_from_our_new_locator() -> None:
    """We moved too: a flow bound to the NAT's port leaves from our new address (in
    the kernel: lloc has the pair of our identifier and the NAT's address, which
    the nat chain looks up once it has rewritten the destination)."""
    tr, table, nft, hid = natted()
    tr.bind(hid, KNOCK, NAT1, 61000)
    new = A("192.0.2.10")
    tr.set_local_addresses({new})
    table.add_local(hid, new, prefer=True)
    table.remove_local(hid, LOCAL)
    assert f"add element inet dime lloc4 {{ {LOCAL} . {NAT1} : {new} }}" in _elements(nft)
    path = UserspacePath(tr, lambda: 0.0)
    out = path.outbound(_tcp(str(LOCAL), 5001, str(MH), 40000, b"reply"))
    assert out is not None
    info = parse(out)
    assert (A(info.src), A(info.dst), info.dport) == (new, NAT1, 61000) and _l4_ok(out)


def test_a_segment_of_a_flow_started_behind_the_nat_waits_for_its_knock() -> None:
    """After our own move the NAT gives a flow that started behind it (named by the
    NAT's address) another port: its TCP segments from that port are held for its
    knock, not reset by our stack. UDP from an unknown port may be another host's new
    flow, and goes on."""
    tr, _, _, hid = behind_nat2()
    assert tr.flow_seen(FlowKey(TCP, LOCAL, 5001, NAT2, 52000), now=0.0) is not None
    assert tr.flow_seen(FlowKey(UDP, LOCAL, 6001, NAT2, 52001), now=0.0) is not None
    assert tr.awaits_knock(hid, NAT2, TCP, 5001)
    assert not tr.awaits_knock(hid, NAT2, UDP, 6001)
    assert not tr.awaits_knock(hid, NAT2, TCP, 5999)  # no flow of it to that port
