"""DIME end to end without a kernel: IHMP and StackTrans in each host, packets through
the kernel maps (or the user-space path), over the simulated network (tests/stack_sim.py).

The hosts and addresses are those of the Fig. 7 testbed the namespace tests use
(testbed/fig7.py): the CH on c1 (later c2), the MH on m1 (later m2). Every scenario
runs in both data-plane modes, and checks the flow both ways before and after, the
maps of both hosts, where every packet went, and when the Dataplane reported a host
as moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface

import pytest

from dime.monitor import Added, Handoff, Removed
from ihmp.addr import IPAddress
from ihmp.engine import EngineConfig
from ihmp.hosts import HidState
from ihmp.wire import MessageType, decode, public_key_bytes
from stacktrans.socket_table import TCP, UDP, FlowKey
from testbed.fig7 import V4, V6, Plan, Subnet
from tests.stack_kernel import Learned, Maps, flow_tuple
from tests.stack_sim import MODES, Flow, StackHost, StackNet, assert_maps, maps_of

GRACE = EngineConfig().path_loss_grace


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ip(sub: Subnet) -> IPAddress:
    return ip_address(sub.host)


@dataclass
class Bed:
    net: StackNet
    ch: StackHost
    mh: StackHost
    plan: Plan
    c1: IPAddress = field(init=False)
    c2: IPAddress = field(init=False)
    m1: IPAddress = field(init=False)
    m2: IPAddress = field(init=False)

    def __post_init__(self) -> None:
        p = self.plan
        self.c1, self.c2, self.m1, self.m2 = (ip(sub) for sub in (p.c1, p.c2, p.m1, p.m2))

    def hard_handoff(self, host: StackHost, old: Subnet, new: Subnet, gap: float) -> float:
        """``host`` loses ``old`` (address and link); ``gap`` s later it gets ``new``.
        Returns when the new address came."""
        self.net.detach(host, old.host_cidr())
        self.net.run(gap)
        self.net.attach(host, new.host_cidr())
        return self.net.now

    def hid(self, host: StackHost, peer: IPAddress) -> int:
        return host.entry_for(str(peer)).hid


def bed(mode: str, plan: Plan = V4, **kw: object) -> Bed:
    net = StackNet()
    ch = net.stack_host("CH", [plan.c1.host_cidr()], seed=1, mode=mode, **kw)
    mh = net.stack_host("MH", [plan.m1.host_cidr()], seed=2, mode=mode, **kw)
    return Bed(net, ch, mh, plan)


def established(b: Bed, flow: Flow) -> tuple[int, int]:
    """Let IHMP's HELLO/ACK happen; the HIDs of the peer in MH and CH."""
    b.net.run(1)
    client, server = flow.client, flow.server
    assert isinstance(client, StackHost) and isinstance(server, StackHost)
    assert client.entry_for(str(flow.key.remote)).state is HidState.ESTABLISHED
    assert server.entry_for(str(flow.key.local)).state is HidState.ESTABLISHED
    return b.hid(b.mh, b.c1), b.hid(b.ch, b.m1)


def no_rejections(*hosts: StackHost) -> None:
    for host in hosts:
        assert host.engine.counters.messages_rejected == {}, host


# -- the MH moves -----------------------------------------------------------------------


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
@pytest.mark.parametrize("gap", [0.0, 2.0], ids=["gap0", "gap2s"])
@pytest.mark.parametrize("plan", [V4, V6], ids=["v4", "v6"])
def test_hard_handoff_of_the_mh(mode: str, plan: Plan, gap: float, proto: int) -> None:
    """The MH's address and link go; ``gap`` s later (0: the monitor's handoff event;
    2 s: longer than the handoff window, so a removal and then an addition) it has
    an address on another subnet. Its flow to the CH lives on under its identifiers."""
    b = bed(mode, plan)
    net, ch, mh, m1, m2, c1 = b.net, b.ch, b.mh, b.m1, b.m2, b.c1
    flow = net.connect(mh, ch, proto, m1, 40000, c1, 5001)
    h_mh, h_ch = established(b, flow)
    net.exchange(flow, "before")
    assert mh.key is not None and ch.entry_for(str(m1)).key == public_key_bytes(mh.key)
    assert_maps(mh, maps_of(h_mh, [flow.key], locators=[c1]))
    assert_maps(ch, maps_of(h_ch, [flow.server_key], locators=[m1]))
    if proto == TCP:
        # The ISNs of both sides, which prompting a stalled flow needs (rto_revert).
        client, server = (
            mh.dataplane.sockets.get(flow.key),
            ch.dataplane.sockets.get(flow.server_key),
        )
        assert client is not None and (client.isn, client.peer_isn) == (1000, 5000)
        # (The server's byte count starts after its SYN-ACK: userspace.acked_from.)
        assert server is not None and (server.isn, server.peer_isn) == (5001, 1000)

    net.detach(mh, plan.m1.host_cidr())
    if gap:
        net.run(gap / 2)
        assert net.send(flow).outcome == "no-source"  # the MH has no address
        assert net.send(flow, from_client=False).outcome == "lost"  # nobody has m1
        net.run(gap / 2)
    net.attach(mh, plan.m2.host_cidr())
    moved_at = net.now
    net.run(5)
    net.exchange(flow, "after")
    old, new = ip_interface(plan.m1.host_cidr()), ip_interface(plan.m2.host_cidr())
    assert mh.address_events == ([Handoff(old, new)] if gap == 0 else [Removed(old), Added(new)])

    assert ch.entry_for(str(m2)).active == [m2]
    assert mh.entry_for(str(c1)).local == [m2]
    assert_maps(mh, maps_of(h_mh, [flow.key], locators=[c1], lloc={(m1, c1): m2}))
    assert_maps(ch, maps_of(h_ch, [flow.server_key], locators=[m2, m1], rloc={m1: m2}))
    assert [e.key for e in ch.dataplane.sockets] == [flow.server_key]  # identifiers kept
    assert mh.ghosts == {m1} and ch.ghosts == set()
    assert ch.routes == {m1: m2} and mh.routes == {}
    # Moved once each, when the HANDOFF was applied (CH) and acknowledged (MH): not
    # when the MH lost its address, which changed no locator.
    assert mh.moved() == [(moved_at, {h_mh})]
    assert ch.moved() == [(moved_at, {h_ch})]
    assert mh.failed() == [] and ch.failed() == []
    if mode == "nft":
        # Nothing waited for user space: the first packets (to a host not known yet)
        # and SYN-ACKs passed, and their copies told the daemons; the kernel maps
        # carried the rest, across the handoff too.
        assert (mh.queued, ch.queued) == (0, 0)
        assert (mh.path.notices, ch.path.notices) == (1, 1)  # the SYN-ACK, or the datagram
    net.assert_clean(flow)
    no_rejections(ch, mh)


def test_soft_handoff_of_the_mh(mode: str) -> None:
    """The new address comes up first (ADDR_UP), the old one goes later (ADDR_DOWN)."""
    b = bed(mode)
    net, ch, mh, m1, m2, c1 = b.net, b.ch, b.mh, b.m1, b.m2, b.c1
    flow = net.connect(mh, ch, TCP, m1, 40000, c1, 5001)
    h_mh, h_ch = established(b, flow)
    net.attach(mh, V4.m2.host_cidr())
    net.run(2)
    net.exchange(flow, "overlap")
    # Both addresses work: nothing is rewritten yet, m2 is only another locator.
    assert ch.entry_for(str(m1)).active == [m1, m2]
    assert_maps(mh, maps_of(h_mh, [flow.key], locators=[c1]))
    assert_maps(ch, maps_of(h_ch, [flow.server_key], locators=[m1, m2]))
    net.detach(mh, V4.m1.host_cidr())
    moved_at = net.now
    net.run(2)
    net.exchange(flow, "after")
    m1_if, m2_if = ip_interface(V4.m1.host_cidr()), ip_interface(V4.m2.host_cidr())
    assert mh.address_events == [Added(m2_if), Removed(m1_if)]
    assert ch.entry_for(str(m2)).active == [m2]
    assert_maps(mh, maps_of(h_mh, [flow.key], locators=[c1], lloc={(m1, c1): m2}))
    assert_maps(ch, maps_of(h_ch, [flow.server_key], locators=[m2, m1], rloc={m1: m2}))
    assert mh.ghosts == {m1}
    # The ADDR_UP moved nothing; the removal of m1 moved both ends.
    assert mh.moved() == [(moved_at, {h_mh})]
    assert ch.moved() == [(moved_at, {h_ch})]
    net.assert_clean(flow)
    no_rejections(ch, mh)


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
@pytest.mark.parametrize("plan", [V4, V6], ids=["v4", "v6"])
def test_flow_opened_by_the_ch_then_the_mh_moves(mode: str, plan: Plan, proto: int) -> None:
    """And when the flow ends, its rewrites, the ghost and the identifier route go."""
    b = bed(mode, plan)
    net, ch, mh, m1, m2, c1 = b.net, b.ch, b.mh, b.m1, b.m2, b.c1
    flow = net.connect(ch, mh, proto, c1, 40000, m1, 5001)
    h_mh, h_ch = established(b, flow)
    net.exchange(flow, "before")
    moved_at = b.hard_handoff(mh, plan.m1, plan.m2, gap=0.5)
    net.run(5)
    net.exchange(flow, "after")
    assert_maps(mh, maps_of(h_mh, [flow.server_key], locators=[c1], lloc={(m1, c1): m2}))
    assert_maps(ch, maps_of(h_ch, [flow.key], locators=[m2, m1], rloc={m1: m2}))
    assert mh.ghosts == {m1} and ch.routes == {m1: m2}
    assert mh.moved() == [(moved_at, {h_mh})] and ch.moved() == [(moved_at, {h_ch})]
    net.close(flow)
    assert_maps(mh, maps_of(h_mh, [], locators=[c1]))
    assert_maps(ch, maps_of(h_ch, [], locators=[m2, m1]))
    assert mh.ghosts == set() and ch.routes == {}
    net.assert_clean()
    no_rejections(ch, mh)


def test_two_identifiers_of_one_host(mode: str) -> None:
    """The paper's s1/s2: s1 knows the MH by m1, s2 (opened after the move) by m2.
    One HID; inbound packets from m2 get each flow's own identifier back."""
    b = bed(mode)
    net, ch, mh, m1, m2, c1 = b.net, b.ch, b.mh, b.m1, b.m2, b.c1
    s1 = net.connect(ch, mh, TCP, c1, 40000, m1, 5001)
    h_mh, h_ch = established(b, s1)
    b.hard_handoff(mh, V4.m1, V4.m2, gap=0.0)
    net.run(5)
    s2 = net.connect(ch, mh, TCP, c1, 40001, m2, 5002)
    net.exchange(s1, "s1")
    net.exchange(s2, "s2")
    assert {e.hid for e in ch.dataplane.sockets} == {h_ch}
    assert_maps(ch, maps_of(h_ch, [s1.key, s2.key], locators=[m2, m1], rloc={m1: m2}))
    assert_maps(
        mh, maps_of(h_mh, [s1.server_key, s2.server_key], locators=[c1], lloc={(m1, c1): m2})
    )
    net.assert_clean(s1, s2)
    no_rejections(ch, mh)


def test_the_mh_returns_to_its_first_address(mode: str) -> None:
    """m1 -> m2 -> m1: back home, the identifier is the locator again, nothing is
    rewritten any more and the ghost of m1 leaves lo."""
    b = bed(mode)
    net, ch, mh, m1, c1 = b.net, b.ch, b.mh, b.m1, b.c1
    flow = net.connect(mh, ch, TCP, m1, 40000, c1, 5001)
    h_mh, h_ch = established(b, flow)
    away = b.hard_handoff(mh, V4.m1, V4.m2, gap=0.0)
    net.run(5)
    net.exchange(flow, "away")
    assert mh.ghosts == {m1}
    back = b.hard_handoff(mh, V4.m2, V4.m1, gap=0.0)
    net.run(5)
    net.exchange(flow, "back")
    assert ch.entry_for(str(m1)).active == [m1]
    assert mh.entry_for(str(c1)).local == [m1]
    assert_maps(mh, maps_of(h_mh, [flow.key], locators=[c1]))
    # m2, withdrawn, still identifies the MH (a packet in flight from it).
    assert_maps(ch, maps_of(h_ch, [flow.server_key], locators=[m1, b.m2]))
    assert mh.ghosts == set() and ch.routes == {}
    assert mh.moved() == [(away, {h_mh}), (back, {h_mh})]
    assert ch.moved() == [(away, {h_ch}), (back, {h_ch})]
    net.assert_clean(flow)
    no_rejections(ch, mh)


def test_flow_adopted_at_dime_up_survives_a_handoff(mode: str) -> None:
    """The connection exists before ``dime up``: StackTrans adopts it (no packet of
    it is ever new to conntrack again) and IHMP says HELLO for it."""
    b = bed(mode, running=False)
    net, ch, mh, m1, m2, c1 = b.net, b.ch, b.mh, b.m1, b.m2, b.c1
    flow = net.connect(mh, ch, TCP, m1, 40000, c1, 5001)
    net.up(ch, mh)
    h_mh, h_ch = established(b, flow)
    net.exchange(flow, "before")
    b.hard_handoff(mh, V4.m1, V4.m2, gap=0.5)
    net.run(5)
    net.exchange(flow, "after")
    assert_maps(mh, maps_of(h_mh, [flow.key], locators=[c1], lloc={(m1, c1): m2}))
    assert_maps(ch, maps_of(h_ch, [flow.server_key], locators=[m2, m1], rloc={m1: m2}))
    if mode == "nft":
        assert mh.queued == ch.queued == 0  # the kernel maps did it all
    adopted = mh.dataplane.sockets.get(flow.key)
    assert adopted is not None and adopted.isn is None  # no SYN seen: never prompted
    net.assert_clean(flow)


def test_without_dime_a_handoff_breaks_the_flow() -> None:
    """Control: the same move with dime down loses the flow both ways, so the
    scenarios above do depend on the translation."""
    b = bed("nft", running=False)
    flow = b.net.connect(b.mh, b.ch, TCP, b.m1, 40000, b.c1, 5001)
    b.hard_handoff(b.mh, V4.m1, V4.m2, gap=0.0)
    b.net.run(5)
    assert b.net.send(flow).outcome == "no-source"
    assert b.net.send(flow, from_client=False).outcome == "lost"
    assert b.net.log == []  # no IHMP either
    b.net.assert_clean(flow)


# -- both move --------------------------------------------------------------------------


def test_both_hosts_move_one_after_the_other(mode: str) -> None:
    both_move(mode)


def both_move(mode: str) -> StackNet:
    b = bed(mode)
    net, ch, mh, m1, m2, c1, c2 = b.net, b.ch, b.mh, b.m1, b.m2, b.c1, b.c2
    flow = net.connect(mh, ch, TCP, m1, 40000, c1, 5001)
    h_mh, h_ch = established(b, flow)
    mh_moved = b.hard_handoff(mh, V4.m1, V4.m2, gap=0.5)
    net.run(2)
    net.exchange(flow, "MH moved")
    ch_moved = b.hard_handoff(ch, V4.c1, V4.c2, gap=0.5)
    net.run(2)
    net.exchange(flow, "both moved")
    assert mh.entry_for(str(c2)).local == [m2]
    assert ch.entry_for(str(m2)).local == [c2]
    assert_maps(
        mh,
        maps_of(h_mh, [flow.key], locators=[c2, c1], rloc={c1: c2}, lloc={(m1, c1): m2}),
    )
    assert_maps(
        ch,
        maps_of(h_ch, [flow.server_key], locators=[m2, m1], rloc={m1: m2}, lloc={(c1, m1): c2}),
    )
    assert mh.ghosts == {m1} and ch.ghosts == {c1}
    assert mh.routes == {c1: c2} and ch.routes == {m1: m2}
    assert mh.moved() == [(mh_moved, {h_mh}), (ch_moved, {h_mh})]
    assert ch.moved() == [(mh_moved, {h_ch}), (ch_moved, {h_ch})]
    net.assert_clean(flow)
    no_rejections(ch, mh)
    return net


def test_packets_from_the_old_address_in_flight_across_a_handoff(mode: str) -> None:
    """Both move: the MH, then the CH. Until the MH's ACK of the CH's HANDOFF arrives,
    the CH's packets still leave from its old address (now a ghost): the MH, which has
    already applied the HANDOFF, must restore them for the flow's socket, not answer
    them with a reset (seen on the real kernel: tests/test_e2e_netns.py)."""
    b = bed(mode)
    net, ch, mh, m1, c1, c2 = b.net, b.ch, b.mh, b.m1, b.c1, b.c2
    flow = net.connect(mh, ch, TCP, m1, 40000, c1, 5001)
    established(b, flow)
    b.hard_handoff(mh, V4.m1, V4.m2, gap=0)
    net.run(2)
    net.exchange(flow, "MH moved")
    net.hold = True  # IHMP datagrams wait in the network
    b.hard_handoff(ch, V4.c1, V4.c2, gap=0)
    handoff = [(h, d) for h, d in net.held if h is ch]
    net.held.clear()
    for host, dgram in handoff:
        net.deliver(host, dgram)  # the MH applies it; its ACK is held
    net.flush()
    assert mh.entry_for(str(c2)).addresses() == {c2}
    trace = net.send(flow, from_client=False)
    assert trace.wire is not None and trace.wire.src == c1  # still the ghost
    assert trace.outcome == "delivered" and trace.socket == flow.key
    net.hold = False
    for host, dgram in net.held:
        net.deliver(host, dgram)
    net.held.clear()
    net.run(2)
    net.exchange(flow, "after the ACK")
    net.assert_clean(flow)


def test_both_modes_put_the_same_packets_on_the_wire() -> None:
    """Kernel maps or user-space path: every packet leaves, travels and arrives the
    same, and IHMP says the same (its signatures aside: keys are random)."""
    nft, nfqueue = both_move("nft"), both_move("nfqueue")

    def packets(net: StackNet) -> list[tuple[object, ...]]:
        return [(t.at, t.sent, t.wire, t.received, t.outcome) for t in net.traces]

    def ihmp(net: StackNet) -> list[tuple[object, ...]]:
        return [
            (s.at, s.datagram.src, s.datagram.dst, decode(s.datagram.data).type, s.delivered)
            for s in net.log
        ]

    assert packets(nft) == packets(nfqueue)
    assert ihmp(nft) == ihmp(nfqueue)


# -- peers that are not (or no longer) there ---------------------------------------------


def test_peer_without_dime_is_never_rewritten(mode: str) -> None:
    """The MH runs no DIME: the CH's HELLO goes unanswered, the host becomes legacy,
    and its flows go untranslated, even when the CH itself moves."""
    net = StackNet()
    ch = net.stack_host("CH", [V4.c1.host_cidr()], seed=1, mode=mode)
    mh = net.legacy_host("MH", [V4.m1.host_cidr()])
    c1, m1 = ip(V4.c1), ip(V4.m1)
    flow = net.connect(ch, mh, TCP, c1, 40000, m1, 5001)
    net.exchange(flow, "hello pending")
    hid = ch.entry_for(str(m1)).hid
    net.run(30)
    assert ch.entry_for(str(m1)).state is HidState.LEGACY
    hellos = net.sent_to(str(m1))
    assert [decode(s.datagram.data).type for s in hellos] == [
        MessageType.HELLO
    ] * EngineConfig().max_attempts
    assert not any(s.delivered for s in hellos)
    net.exchange(flow, "legacy")
    assert_maps(ch, maps_of(hid, [flow.key], locators=[m1]))

    # Nobody to agree a rewrite with: when the CH moves, its flow keeps its identifier
    # on the wire (the ghost is still a local address, so it leaves; the answers to it
    # are lost: the flow dies), and no IHMP message goes to the MH.
    net.detach(ch, V4.c1.host_cidr())
    net.attach(ch, V4.c2.host_cidr())
    net.run(5)
    assert net.sent_to(str(m1)) == hellos
    assert_maps(ch, maps_of(hid, [flow.key], locators=[m1]))
    assert ch.ghosts == {c1}
    assert net.send(flow).outcome == "delivered"
    assert net.send(flow, from_client=False).outcome == "lost"
    assert ch.moved() == []
    net.assert_clean(flow)


def lose_the_peer(mode: str, proto: int) -> tuple[Bed, Flow]:
    """The MH loses its only address and gets none back, past the grace period."""
    b = bed(mode)
    net, ch, mh, m1, c1 = b.net, b.ch, b.mh, b.m1, b.c1
    flow = net.connect(mh, ch, proto, m1, 40000, c1, 5001)
    h_mh, h_ch = established(b, flow)
    net.exchange(flow, "before")
    lost_at = net.now + 1.0 + GRACE  # the handoff window, then the grace period
    net.detach(mh, V4.m1.host_cidr())
    net.run(GRACE)
    assert mh.failed() == []  # still in its grace period
    assert_maps(mh, maps_of(h_mh, [flow.key], locators=[c1]))
    net.run(5)
    assert len(mh.table) == 0 and len(mh.dataplane.sockets) == 0
    assert mh.failed() == [(lost_at, [flow.key])]
    assert_maps(mh, Maps(dead={flow_tuple(flow.key)}))
    assert_maps(ch, maps_of(h_ch, [flow.server_key], locators=[m1]))  # the CH knows nothing
    return b, flow


@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_peer_lost_for_good_fails_its_flows(mode: str, proto: int) -> None:
    """Once the grace period is over the MH's HID for the CH goes, its flows are
    failed (dead set, TCP sockets destroyed) and their next packet is rejected."""
    b, flow = lose_the_peer(mode, proto)
    assert b.mh.ghosts == set()
    assert b.mh.sockets[flow.key].aborted == (proto == TCP)
    assert b.net.send(flow).outcome == "rejected"
    assert b.net.send(flow, from_client=False).outcome == "lost"
    b.net.assert_clean(flow)


@pytest.mark.parametrize("mode", ["nft", "nfqueue"])
@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_next_packet_of_a_dead_flow_changes_nothing(mode: str, proto: int) -> None:
    """The rejected packet neither brings the flow back nor the host it lost; the
    sweep then forgets the flows whose sockets are gone."""
    b, flow = lose_the_peer(mode, proto)
    sent = len(b.net.log)
    assert b.net.send(flow).outcome == "rejected"
    b.net.run(30)
    assert len(b.mh.table) == 0 and len(b.mh.dataplane.sockets) == 0
    assert len(b.net.log) == sent  # no HELLO
    b.mh.sweep()
    # A destroyed TCP socket is gone for good; a UDP socket stays, and so does its
    # entry in the dead set.
    assert_maps(b.mh, Maps() if proto == TCP else Maps(dead={flow_tuple(flow.key)}))


# -- strict mode --------------------------------------------------------------------------


def test_strict_mode_with_keys_configured_beforehand(mode: str) -> None:
    b = bed(mode)
    net, ch, mh, m1, m2, c1 = b.net, b.ch, b.mh, b.m1, b.m2, b.c1
    assert ch.key is not None and mh.key is not None
    ch.engine.trust.trust(public_key_bytes(mh.key), V4.m1.host)
    mh.engine.trust.trust(public_key_bytes(ch.key), V4.c1.host)
    ch.engine.config.strict = mh.engine.config.strict = True
    flow = net.connect(mh, ch, TCP, m1, 40000, c1, 5001)
    h_mh, h_ch = established(b, flow)
    assert ch.entry_for(str(m1)).key == public_key_bytes(mh.key)
    b.hard_handoff(mh, V4.m1, V4.m2, gap=0.5)
    net.run(5)
    net.exchange(flow, "after")
    assert_maps(ch, maps_of(h_ch, [flow.server_key], locators=[m2, m1], rloc={m1: m2}))
    assert_maps(mh, maps_of(h_mh, [flow.key], locators=[c1], lloc={(m1, c1): m2}))
    net.assert_clean(flow)
    no_rejections(ch, mh)


def test_strict_mode_refuses_an_unknown_key_but_data_flows(mode: str) -> None:
    b = bed(mode)
    net, ch, mh, m1, c1 = b.net, b.ch, b.mh, b.m1, b.c1
    ch.engine.config.strict = True  # trusts nobody
    flow = net.connect(mh, ch, TCP, m1, 40000, c1, 5001)
    net.run(30)
    net.exchange(flow, "refused")  # data is never held hostage by IHMP
    assert ch.engine.counters.messages_rejected.get("untrusted", 0) >= 1
    entry = ch.entry_for(str(m1))
    # The MH started the flow: the CH awaits its HELLO (refused) and says none.
    assert entry.key is None and entry.state is HidState.HELLO_PENDING
    assert_maps(ch, maps_of(entry.hid, [flow.server_key], locators=[m1]))
    assert_maps(mh, maps_of(b.hid(mh, c1), [flow.key], locators=[c1]))
    net.assert_clean(flow)


# -- new flows learned by the kernel (nft mode) ------------------------------------------


def test_new_flows_to_a_known_host_never_wait_for_the_daemon() -> None:
    """Once the CH is a known host, the kernel learns each new flow to it at both
    ends by itself (nothing queued) and the daemons hear of it afterwards, before and
    after a move; a flow to an address the CH left is the daemon's to decide
    (queued: IHMP gives it to whoever has that address now)."""
    b = bed("nft")
    net, ch, mh = b.net, b.ch, b.mh
    first = net.connect(mh, ch, TCP, b.m1, 40000, b.c1, 5001)
    h_mh, h_ch = established(b, first)
    flows = [net.connect(mh, ch, TCP, b.m1, 40001 + i, b.c1, 5001) for i in range(5)]
    for flow in flows:
        net.exchange(flow)
    assert (mh.queued, ch.queued) == (0, 0)
    keys = [first.key] + [f.key for f in flows]
    assert_maps(mh, maps_of(h_mh, keys, locators=[b.c1]))
    assert_maps(ch, maps_of(h_ch, [first.server_key] + [f.server_key for f in flows],
                            locators=[b.m1]))  # fmt: skip
    # The daemons know them (from the notices), ISNs included: they can prompt them.
    for flow in flows:
        entry = mh.dataplane.sockets.get(flow.key)
        assert entry is not None and (entry.isn, entry.peer_isn) == (1000, 5000)
    # Their elements are the kernel's own: no daemon added them again (the first
    # flow's host was unknown when it started: that one the daemons added).
    assert mh.dataplane.learned_by_kernel == ch.dataplane.learned_by_kernel == len(flows)
    # The CH moves; its old address is no longer one a new flow is learned at.
    b.hard_handoff(ch, b.plan.c1, b.plan.c2, 0.0)
    net.run(5)
    for flow in [first, *flows]:
        net.exchange(flow, "after")
    late = net.connect(mh, ch, TCP, b.m1, 40100, b.c2, 5001)
    net.exchange(late)
    assert (mh.queued, ch.queued) == (0, 0)
    assert flow_tuple(late.key) in mh.kernel.maps.flows
    assert mh.dataplane.learned_by_kernel == len(flows) + 1
    net.assert_clean(first, *flows, late)
    no_rejections(ch, mh)
    to_old = FlowKey(TCP, b.m1, 40200, b.c1, 5001)
    assert mh.kernel.learn(to_old) is Learned.SYNC
