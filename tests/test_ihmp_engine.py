"""The IHMP engine, two (or more) engines back to back over an in-memory network.

Fake clock, no sockets, no sleeps. Every exchange of section III-B of the paper,
both directions, plus reliability and security.
"""

from __future__ import annotations

import itertools
import pathlib
import random
import re
from dataclasses import replace
from ipaddress import ip_interface

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ihmp import events as ev
from ihmp.engine import MAX_LOCAL_RETRIES, Datagram, EngineConfig, seq_newer
from ihmp.events import RejectReason
from ihmp.flows import KNOCK_MAGIC, MAX_FLOWS_PER_MOVE, FlowSpec, NatMapping
from ihmp.hosts import HidState
from ihmp.keys import TrustStore
from ihmp.natagent import NatAgent
from ihmp.ratelimit import PerSource
from ihmp.wire import (
    DEFAULT_PORT,
    Flags,
    Message,
    MessageType,
    decode,
    encode,
    public_key_bytes,
    verify,
)
from tests.ihmp_sim import A, Host, Net, assert_events_mirror_table, assert_symmetric

T = MessageType
A1, B1 = "192.0.2.1", "198.51.100.1"


def pair(
    net: Net, a_addrs: list[str] | None = None, b_addrs: list[str] | None = None, **kw: object
) -> tuple[Host, Host]:
    a = net.add(Host("A", a_addrs or [A1 + "/24"], seed=1, **kw))  # type: ignore[arg-type]
    b = net.add(Host("B", b_addrs or [B1 + "/24"], seed=2, **kw))  # type: ignore[arg-type]
    return a, b


def established(net: Net, **kw: object) -> tuple[Host, Host]:
    a, b = pair(net, **kw)  # type: ignore[arg-type]
    a.connect(B1, net.now)
    net.run(1)
    assert a.entry_for(B1).state is HidState.ESTABLISHED
    assert b.entry_for(A1).state is HidState.ESTABLISHED
    return a, b


# -- HELLO / ACK ----------------------------------------------------------------------


def test_hello_ack_builds_symmetric_tables_and_pins_keys() -> None:
    net = Net()
    a, b = established(net)
    assert_symmetric(a, A1, b, B1)
    assert a.entry_for(B1).active == [A(B1)]
    assert a.entry_for(B1).local == [A(A1)]
    assert b.entry_for(A1).key == public_key_bytes(a.key)  # type: ignore[arg-type]
    assert a.entry_for(B1).key == public_key_bytes(b.key)  # type: ignore[arg-type]
    # B had never heard of A's address: a cookie first, then the HELLO is taken in.
    assert net.types_sent() == [T.HELLO, T.ACK, T.HELLO, T.ACK]
    hello, cookie, again, _ = (decode(s.datagram.data) for s in net.log)
    assert cookie.cookie is not None and again.cookie == cookie.cookie
    assert len(net.log[1].datagram.data) <= len(net.log[0].datagram.data)
    assert again.seq == hello.seq and not b.engine.counters.dropped
    assert [type(e) for e in a.events_of(ev.PeerEstablished)] == [ev.PeerEstablished]
    assert a.engine.counters.messages_sent == 2 and b.engine.counters.messages_sent == 2
    assert b.engine.counters.cookies_sent == 1


def test_hello_from_either_side_and_simultaneous_hellos() -> None:
    net = Net()
    a, b = pair(net)
    a.connect(B1, 0)
    b.connect(A1, 0)  # both StackTrans saw the first packet: both say HELLO
    net.run(5)
    assert a.entry_for(B1).state is b.entry_for(A1).state is HidState.ESTABLISHED
    assert len(a.table) == len(b.table) == 1
    assert_symmetric(a, A1, b, B1)
    assert not a.engine.counters.messages_rejected and not b.engine.counters.messages_rejected


def test_every_message_is_signed_with_the_key_of_its_source() -> None:
    net = Net()
    a, b = established(net)
    for sent in net.log:
        msg = decode(sent.datagram.data)
        if msg.cookie is not None and msg.type is T.ACK:
            assert msg.signature is None  # a cookie is checked by its maker alone
            continue
        signer = a if sent.datagram.src == A(A1) else b
        assert verify(msg, public_key_bytes(signer.key))  # type: ignore[arg-type]


def test_set_local_key_per_prefix_picks_the_most_specific() -> None:
    net = Net()
    a, _b = pair(net, a_addrs=[A1 + "/24", "203.0.113.9/24"])
    special = Ed25519PrivateKey.generate()
    a.engine.local_keys.set_local_key(special, "203.0.113.0/24")
    a.engine.flow_started(A(B1), A("203.0.113.9"), 0)
    hello = decode(a.engine.datagrams_to_send(0)[0].data)
    assert hello.public_key == public_key_bytes(special)
    assert verify(hello, public_key_bytes(special))
    assert not verify(hello, public_key_bytes(a.key))  # type: ignore[arg-type]


# -- PATH_PROBE and the three reachability classes ------------------------------------


def probe_setup(b_private: str, site_b: str) -> tuple[Net, Host, Host]:
    net = Net()
    a, b = pair(
        net,
        a_addrs=[A1 + "/24", "10.0.0.1/24", "169.254.7.7/16"],
        b_addrs=[B1 + "/24", b_private + "/24"],
    )
    net.sites.update({A("10.0.0.1"): "X", A(b_private): site_b})
    a.connect(B1, 0)
    net.run(10)
    return net, a, b


def test_hello_advertises_and_passive_host_probes_potentially_reachable() -> None:
    net, a, b = probe_setup("10.0.0.2", "X")
    ea, eb = a.entry_for(B1), b.entry_for(A1)
    assert A("10.0.0.1") in eb.active and A("10.0.0.2") in ea.active
    assert A("169.254.7.7") in eb.unreachable
    # 169.254/16 is clearly unreachable for B (no address there): never probed.
    assert net.sent_to("169.254.7.7") == []
    assert T.PATH_PROBE in net.types_sent()
    assert_symmetric(a, A1, b, B1)
    verified = b.events_of(ev.AddressVerified)
    assert ev.AddressVerified(eb.hid, A("10.0.0.2"), A("10.0.0.1")) in verified


def test_probe_of_same_block_other_site_fails_and_stays_unreachable() -> None:
    net, a, b = probe_setup("10.0.0.2", "Y")  # same 10/8 block, another site
    eb = b.entry_for(A1)
    assert A("10.0.0.1") in eb.unreachable
    assert len(net.sent_to("10.0.0.1")) == EngineConfig().probe_attempts
    assert_symmetric(a, A1, b, B1)


# -- ADDR_UP ---------------------------------------------------------------------------


def test_addr_up_known_reachable() -> None:
    net = Net()
    a, b = established(net)
    a.engine.address_added(ip_interface("203.0.113.5/24"), net.now)
    net.run(5)
    assert A("203.0.113.5") in b.entry_for(A1).active
    assert A("203.0.113.5") in a.entry_for(B1).local
    # B answers, and challenges the new address before it sends anything there.
    assert net.types_sent(since=1) == [T.ADDR_UP, T.PATH_PROBE, T.ACK, T.ACK]
    assert net.log[-4].datagram.src == A("203.0.113.5")  # sent from the new address
    assert net.log[-3].datagram.dst == A("203.0.113.5")
    assert_symmetric(a, A1, b, B1)


def test_addr_up_potential_falls_back_to_unreachable_form() -> None:
    net = Net()
    a, b = established(net, b_addrs=[B1 + "/24", "10.0.0.2/24"])
    net.sites.update({A("10.0.0.2"): "X", A("10.9.0.1"): "Y"})
    # B advertised 10.0.0.2; A's new 10.9.0.1 is in the same block, another site.
    a.engine.address_added(ip_interface("10.9.0.1/24"), net.now)
    net.run(20)
    types = net.types_sent(since=1)
    assert types.count(T.ADDR_UP) == EngineConfig().probe_attempts
    assert T.ADDR_UP_UNREACHABLE in types
    assert A("10.9.0.1") in b.entry_for(A1).unreachable
    assert A("10.9.0.1") not in a.entry_for(B1).local
    assert_symmetric(a, A1, b, B1)


def test_addr_up_known_unreachable_goes_over_the_existing_path() -> None:
    net = Net()
    a, b = established(net)
    t0 = net.now
    a.engine.address_added(ip_interface("2001:db8::5/64"), net.now)  # B has no IPv6
    net.run(5)
    assert net.types_sent(since=t0) == [T.ADDR_UP_UNREACHABLE, T.ACK]
    sent = net.log[-2]
    assert (sent.datagram.src, sent.datagram.dst) == (A(A1), A(B1))
    assert A("2001:db8::5") in b.entry_for(A1).unreachable
    assert_symmetric(a, A1, b, B1)


# -- ADDR_DOWN -------------------------------------------------------------------------


def test_addr_down_and_addr_down_unreachable() -> None:
    net = Net()
    a, b = established(net)
    a.engine.address_added(ip_interface("203.0.113.5/24"), net.now)
    a.engine.address_added(ip_interface("172.16.0.1/24"), net.now)
    net.run(5)
    t0 = net.now
    a.engine.address_removed(ip_interface("203.0.113.5/24"), net.now)
    net.run(5)
    a.engine.address_removed(ip_interface("172.16.0.1/24"), net.now)
    net.run(5)
    assert net.types_sent(since=t0) == [T.ADDR_DOWN, T.ACK, T.ADDR_DOWN_UNREACHABLE, T.ACK]
    eb = b.entry_for(A1)
    assert eb.addresses() == {A(A1)}
    assert_symmetric(a, A1, b, B1)


def test_b_side_events_mirror_a_side() -> None:
    """Both directions: the correspondent host moves, the mobile one follows."""
    net = Net()
    a, b = established(net)
    b.engine.address_added(ip_interface("203.0.113.50/24"), net.now)
    net.run(5)
    b.engine.handoff(ip_interface(B1 + "/24"), ip_interface("203.0.113.60/24"), net.now)
    net.run(5)
    assert a.entry_for("203.0.113.60").active[0] == A("203.0.113.60")
    assert A(B1) not in a.entry_for("203.0.113.60").addresses()
    assert_symmetric(a, A1, b, "203.0.113.60")


# -- HANDOFF ---------------------------------------------------------------------------


def test_soft_handoff() -> None:
    net = Net()
    a, b = established(net)
    a.engine.address_added(ip_interface("192.0.2.77/24"), net.now)
    net.run(5)
    a.engine.address_removed(ip_interface(A1 + "/24"), net.now)
    net.run(5)
    eb = b.entry_for("192.0.2.77")
    assert eb.active == [A("192.0.2.77")]
    assert_symmetric(a, "192.0.2.77", b, B1)


def test_handoff_event_makes_new_address_the_locator() -> None:
    net = Net()
    a, b = established(net)
    t0 = net.now
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.77/24"), net.now)
    net.run(5)
    assert net.types_sent(since=t0) == [T.HANDOFF, T.PATH_PROBE, T.ACK, T.ACK]
    handoff = decode(net.log[-4].datagram.data)
    assert handoff.new_addr == A("192.0.2.77") and handoff.old_addrs == (A(A1),)
    assert not handoff.flags & Flags.OU
    assert b.entry_for("192.0.2.77").active == [A("192.0.2.77")]
    assert a.entry_for(B1).local == [A("192.0.2.77")]
    assert_symmetric(a, "192.0.2.77", b, B1)


def test_hard_handoff_survives_a_gap_shorter_than_the_grace() -> None:
    net = Net()
    a, b = established(net)
    a.engine.address_removed(ip_interface(A1 + "/24"), net.now)
    net.run(5)  # no address at all for 5 s
    a.engine.address_added(ip_interface("192.0.2.77/24"), net.now)
    net.run(5)
    assert not a.events_of(ev.PeerLost)
    assert b.entry_for("192.0.2.77").active == [A("192.0.2.77")]
    assert A(A1) not in b.entry_for("192.0.2.77").addresses()
    assert_symmetric(a, "192.0.2.77", b, B1)
    assert a.engine.get_timer() is None


def test_handoff_unreachable_with_ou_flag() -> None:
    net = Net()
    a, b = established(net)
    a.engine.address_added(ip_interface("2001:db8::9/64"), net.now)  # B cannot reach it
    net.run(5)
    t0 = net.now
    a.engine.handoff(ip_interface("2001:db8::9/64"), ip_interface("2001:db8::10/64"), net.now)
    net.run(5)
    assert net.types_sent(since=t0) == [T.HANDOFF_UNREACHABLE, T.ACK]
    msg = decode(net.log[-2].datagram.data)
    assert msg.flags & Flags.OU
    eb = b.entry_for(A1)
    assert eb.unreachable == {A("2001:db8::10")}
    assert_symmetric(a, A1, b, B1)


def test_handoff_probe_falls_back_to_handoff_unreachable() -> None:
    net = Net()
    a, b = established(net, a_addrs=[A1 + "/24", "203.0.113.1/24"])
    net.run(5)
    # A's new address is private; B is public only: potentially reachable, but no NAT.
    a.engine.handoff(ip_interface("203.0.113.1/24"), ip_interface("10.3.0.1/24"), net.now)
    net.run(30)
    types = net.types_sent(since=1)
    assert T.HANDOFF in types and T.HANDOFF_UNREACHABLE in types
    eb = b.entry_for(A1)
    assert A("10.3.0.1") in eb.unreachable and A("203.0.113.1") not in eb.addresses()
    assert_symmetric(a, A1, b, B1)


def test_losing_the_last_path_removes_the_hid_after_the_grace() -> None:
    net = Net()
    a, _b = established(net)
    hid = a.entry_for(B1).hid
    a.engine.address_removed(ip_interface(A1 + "/24"), net.now)
    net.run(EngineConfig().path_loss_grace + 1)
    assert hid not in a.table
    lost = a.events_of(ev.PeerLost)
    assert lost == [ev.PeerLost(hid, (A(B1),))]
    assert_events_mirror_table(a)


def test_second_handoff_before_first_ack_latest_state_wins() -> None:
    net = Net()
    a, b = established(net)
    net.hold = True
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.2/24"), net.now)
    net.flush()
    first = list(net.held)
    net.held.clear()
    a.engine.handoff(ip_interface("192.0.2.2/24"), ip_interface("192.0.2.3/24"), net.now)
    net.flush()
    second = list(net.held)
    net.held.clear()
    net.hold = False
    # The second arrives first, then the first (reordered in the network, both
    # sent while their source addresses still existed).
    for _, dgram in second + first:
        b.engine.receive_datagram(dgram.data, dgram.src, dgram.dst, net.now)
    net.run(20)
    eb = b.entry_for("192.0.2.3")
    assert eb.active == [A("192.0.2.3")]
    assert eb.addresses() == {A("192.0.2.3")}
    assert_symmetric(a, "192.0.2.3", b, B1)
    second_msg = decode(second[0][1].data)
    assert set(second_msg.old_addrs) == {A(A1), A("192.0.2.2")}
    stale = [e for e in b.events_of(ev.MessageApplied) if e.stale]
    assert len(stale) == 1
    assert_events_mirror_table(b)


# -- routed private blocks: probes, and the evidence of unanswered ones --------------

MH_OLD, MH_NEW, CH_P = "172.16.1.2", "192.168.2.2", "10.0.0.1"  # three private blocks


def private_pair(net: Net, a_addrs: list[str] | None = None) -> tuple[Host, Host]:
    """A at 172.16.1.2, B at 10.0.0.1: one site whose routers join its private blocks
    (192.168.2.2, where A moves, too). Established."""
    a, b = pair(net, a_addrs=a_addrs or [MH_OLD + "/24"], b_addrs=[CH_P + "/24"])
    net.sites.update({A(x): "S" for x in (MH_OLD, MH_NEW, CH_P, "172.16.1.3")})
    a.connect(CH_P, 0)
    net.run(5)
    assert a.entry_for(CH_P).state is HidState.ESTABLISHED
    assert b.entry_for(MH_OLD).state is HidState.ESTABLISHED
    return a, b


def hard_move(net: Net, a: Host, how: str) -> None:
    old, new = ip_interface(MH_OLD + "/24"), ip_interface(MH_NEW + "/24")
    if how == "handoff":
        a.engine.handoff(old, new, net.now)
    else:  # the monitor saw the old address go, then (0.5 s later) the new one come
        a.engine.address_removed(old, net.now)
        net.run(0.5)
        a.engine.address_added(new, net.now)


def assert_moved_to_new_block(net: Net, a: Host, b: Host) -> None:
    eb = b.entry_for(MH_NEW)
    assert eb.active == [A(MH_NEW)] and eb.locator == A(MH_NEW)
    assert eb.addresses() == {A(MH_NEW)}  # 172.16.1.2 withdrawn
    assert a.entry_for(CH_P).local == [A(MH_NEW)]
    assert_symmetric(a, MH_NEW, b, CH_P)
    assert a.events_of(ev.PeerLost) == [] and b.events_of(ev.PeerLost) == []
    assert a.engine.get_timer() is None  # nothing outstanding, no grace running
    assert_events_mirror_table(a)
    assert_events_mirror_table(b)


def failed_exchanges(host: Host, mtype: MessageType) -> list[ev.ExchangeFailed]:
    return [
        e
        for e in host.events_of(ev.ExchangeFailed)
        if isinstance(e, ev.ExchangeFailed) and e.type is mtype
    ]


@pytest.mark.parametrize("how", ["handoff", "removed_then_added"])
def test_hard_handoff_between_private_blocks(how: str) -> None:
    """172.16.1.2 -> 192.168.2.2 with the peer at 10.0.0.1: three private blocks,
    routed within one site. Potentially reachable, probed, and it works."""
    net = Net()
    a, b = private_pair(net)
    t0 = net.now
    hard_move(net, a, how)
    net.run(5)
    assert net.types_sent(since=t0) == [T.HANDOFF, T.PATH_PROBE, T.ACK, T.ACK]
    handoff = next(s for s in net.log if decode(s.datagram.data).type is T.HANDOFF)
    assert (handoff.datagram.src, handoff.datagram.dst) == (A(MH_NEW), A(CH_P))
    msg = decode(handoff.datagram.data)
    assert msg.new_addr == A(MH_NEW) and msg.old_addrs == (A(MH_OLD),)
    assert_moved_to_new_block(net, a, b)


@pytest.mark.parametrize("how", ["handoff", "removed_then_added"])
def test_hard_handoff_with_no_fallback_is_retransmitted_past_the_probe_attempts(
    how: str,
) -> None:
    """With no other address the peer reaches A at, the HANDOFF from the new address is
    the only way left: it is said until the exchange deadline, not probe_attempts
    times. Its first four transmissions are lost; the fifth gets through."""
    net = Net()
    a, b = private_pair(net)
    lost = 4
    assert lost > EngineConfig().probe_attempts
    handoffs: list[Datagram] = []

    def drop(d: Datagram) -> bool:
        if decode(d.data).type is not T.HANDOFF:
            return False
        handoffs.append(d)
        return len(handoffs) <= lost

    net.drop = drop
    t0 = net.now
    hard_move(net, a, how)
    net.run(20)
    assert len(handoffs) == lost + 1
    assert {(d.src, d.dst) for d in handoffs} == {(A(MH_NEW), A(CH_P))}
    sent = [s for s in net.log if decode(s.datagram.data).type is T.HANDOFF]
    assert sent[-1].delivered and sent[-1].at - t0 < 7  # 0.5 + 1 + 2 + 2 s of backoff
    assert T.HANDOFF_UNREACHABLE not in net.types_sent(since=t0)
    assert failed_exchanges(a, T.HANDOFF) == []
    # How many times it was said (the daemon prompts the flows again after a loss).
    assert [e.attempts for e in a.events_of(ev.ExchangeCompleted) if e.type is T.HANDOFF] == [
        lost + 1
    ]
    assert_moved_to_new_block(net, a, b)


def test_handoff_probe_with_a_fallback_gives_up_after_probe_attempts() -> None:
    """The contrast: B also reaches A at 172.16.1.3, so a HANDOFF from an address in a
    site B cannot reach is a probe: probe_attempts tries, then HANDOFF_UNREACHABLE over
    the path that works, and the pair is dead."""
    net = Net()
    a, b = private_pair(net, a_addrs=[MH_OLD + "/24", "172.16.1.3/24"])
    assert set(a.entry_for(CH_P).local) == {A(MH_OLD), A("172.16.1.3")}
    far = "192.168.9.9"
    net.sites[A(far)] = "elsewhere"
    t0 = net.now
    a.engine.handoff(ip_interface(MH_OLD + "/24"), ip_interface(far + "/24"), net.now)
    net.run(20)
    types = net.types_sent(since=t0)
    assert types.count(T.HANDOFF) == EngineConfig().probe_attempts
    assert T.HANDOFF_UNREACHABLE in types
    fallback = next(s for s in net.log if decode(s.datagram.data).type is T.HANDOFF_UNREACHABLE)
    assert (fallback.datagram.src, fallback.datagram.dst) == (A("172.16.1.3"), A(CH_P))
    eb = b.entry_for("172.16.1.3")
    assert eb.active == [A("172.16.1.3")] and eb.unreachable == {A(far)}
    assert_symmetric(a, "172.16.1.3", b, CH_P)
    assert a.events_of(ev.PeerLost) == []
    dead = a.engine._peers[a.entry_for(CH_P).hid].dead  # (no public view of it)
    assert set(dead) == {(A(far), A(CH_P))}


def test_a_dead_path_is_still_tried_when_nothing_else_is_left() -> None:
    """The evidence against a path holds while another path works; once the host has
    lost every other path, the dead one is worth a try (the network may have changed),
    rather than dropping the peer."""
    net = Net()
    a, b = private_pair(net, a_addrs=[MH_OLD + "/24", "172.16.1.3/24"])
    far = "192.168.9.9"
    net.sites[A(far)] = "elsewhere"
    a.engine.handoff(ip_interface(MH_OLD + "/24"), ip_interface(far + "/24"), net.now)
    net.run(20)
    assert (A(far), A(CH_P)) in a.engine._peers[a.entry_for(CH_P).hid].dead
    net.sites[A(far)] = net.sites[A(CH_P)]  # its network now routes to B's
    t0 = net.now
    a.engine.address_removed(ip_interface("172.16.1.3/24"), net.now)
    net.run(10)
    assert net.types_sent(since=t0)[0] is T.HANDOFF
    assert a.events_of(ev.PeerLost) == []
    assert b.entry_for(far).locator == A(far)


def test_unanswered_probes_are_evidence_the_next_hello_does_not_probe_again() -> None:
    """B learns on A's HELLO that A also has 10.0.0.1 (another site): B probes it from
    its likeliest address, 192.168.5.5 (two private blocks), probe_attempts times,
    unanswered. The pair is dead: on the next HELLO B probes the next likeliest path
    instead (from its public address), probe_attempts times too; on the one after,
    none is left to try."""
    net = Net()
    a, b = pair(
        net,
        a_addrs=[A1 + "/24", "10.0.0.1/24"],
        b_addrs=[B1 + "/24", "192.168.5.5/24"],
    )
    net.sites.update({A("10.0.0.1"): "X", A("192.168.5.5"): "Y"})
    attempts = EngineConfig().probe_attempts

    def probes(src: str) -> int:
        return sum(
            s.datagram.src == A(src) and decode(s.datagram.data).type is T.PATH_PROBE
            for s in net.sent_to("10.0.0.1")
        )

    a.connect(B1, 0)
    net.run(10)
    eb = b.entry_for(A1)
    assert eb.state is HidState.ESTABLISHED and eb.unreachable == {A("10.0.0.1")}
    assert probes("192.168.5.5") == attempts and probes(B1) == 0
    assert not any(s.delivered for s in net.sent_to("10.0.0.1"))
    assert len(failed_exchanges(b, T.PATH_PROBE)) == 1

    # A says HELLO again (as after a restart): B takes it in, and probes A's
    # addresses it cannot reach yet, but not along the dead pair.
    a.engine.resume(net.now)
    net.run(10)
    assert len(b.events_of(ev.PeerEstablished)) == 2
    assert probes("192.168.5.5") == attempts  # not one more
    assert probes(B1) == attempts  # the next likeliest pair, itself probed only once

    a.engine.resume(net.now)
    net.run(10)
    assert len(b.events_of(ev.PeerEstablished)) == 3
    assert probes("192.168.5.5") == probes(B1) == attempts  # both dead: nothing more
    assert b.entry_for(A1).unreachable == {A("10.0.0.1")}
    assert_symmetric(a, A1, b, B1)
    assert a.events_of(ev.PeerLost) == [] and b.events_of(ev.PeerLost) == []


def test_a_dead_pair_comes_back_when_a_message_arrives_along_it() -> None:
    """Evidence is only evidence: once B hears from A along a pair it had found dead
    (the sites were joined since), the pair is no longer dead, and A's address there
    is verified."""
    net = Net()
    a, b = pair(
        net,
        a_addrs=[A1 + "/24", "10.0.0.1/24"],
        b_addrs=[B1 + "/24", "10.0.0.2/24"],
    )
    net.sites.update({A("10.0.0.1"): "X", A("10.0.0.2"): "Y"})
    a.connect(B1, 0)
    net.run(10)
    attempts = EngineConfig().probe_attempts
    from_b = [s for s in net.sent_to("10.0.0.1") if s.datagram.src == A("10.0.0.2")]
    assert len(from_b) == attempts and not any(s.delivered for s in from_b)
    pair_ = (A("10.0.0.2"), A("10.0.0.1"))
    dead = b.engine._peers[b.entry_for(A1).hid].dead  # (no public view of it)
    assert pair_ in dead
    # The two sites are joined. B says HELLO (after a restart, say); A, which had not
    # probed B's 10.0.0.2 (it said HELLO first, B answered), does now: B hears A
    # along 10.0.0.1 -> 10.0.0.2, and challenges it there in turn.
    net.sites[A("10.0.0.2")] = "X"
    b.engine.resume(net.now)
    net.run(10)
    assert pair_ not in dead
    assert A("10.0.0.2") in a.entry_for(B1).active
    assert A("10.0.0.1") in b.entry_for(A1).active
    assert_symmetric(a, A1, b, B1)


# -- reliability -------------------------------------------------------------------


def test_hello_unanswered_marks_legacy_and_holds_down() -> None:
    net = Net()
    a = net.add(Host("A", [A1 + "/24"], seed=1))
    hid = a.connect(B1, 0)  # nobody at B1
    net.run(60)
    cfg = EngineConfig()
    assert a.table.get(hid).state is HidState.LEGACY
    assert len(net.sent_to(B1)) == cfg.max_attempts
    assert a.events_of(ev.PeerLegacy) == [ev.PeerLegacy(hid)]
    # A new flow to it during the hold-down: nothing more is sent.
    assert a.engine.flow_started(A(B1), A(A1), net.now) == hid
    assert a.engine.datagrams_to_send(net.now) == []
    net.run(cfg.legacy_hold_down)
    # Hold-down over: the next new flow tries again.
    assert a.engine.flow_started(A(B1), A(A1), net.now) == hid
    assert a.table.get(hid).state is HidState.HELLO_PENDING
    assert [decode(d.data).type for d in a.engine.datagrams_to_send(net.now)] == [MessageType.HELLO]


def test_retransmission_backs_off_exponentially_with_a_cap() -> None:
    net = Net()
    cfg = EngineConfig(max_attempts=7, max_rto=4.0)
    a = net.add(Host("A", [A1 + "/24"], seed=1, config=cfg))
    a.connect(B1, 0)
    net.run(60)
    times = [s.at for s in net.sent_to(B1)]
    gaps = [round(t2 - t1, 3) for t1, t2 in itertools.pairwise(times)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]  # 0.5 s first RTO, doubled, cap 4 s
    assert a.engine.counters.retransmissions == 6


@pytest.mark.parametrize("seed", range(8))
def test_thirty_percent_loss_still_converges(seed: int) -> None:
    cfg = EngineConfig(max_attempts=12, probe_attempts=8)
    net = Net(loss=0.3, seed=seed)
    a, b = pair(
        net,
        a_addrs=[A1 + "/24", "10.0.0.1/24"],
        b_addrs=[B1 + "/24", "10.0.0.2/24"],
        config=cfg,
    )
    net.sites.update({A("10.0.0.1"): "X", A("10.0.0.2"): "X"})
    a.connect(B1, 0)
    net.run(120)
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.9/24"), net.now)
    net.run(120)
    a.engine.address_added(ip_interface("203.0.113.3/24"), net.now)
    net.run(120)
    assert b.entry_for("192.0.2.9").active[0] == A("192.0.2.9")
    assert A("203.0.113.3") in b.entry_for("192.0.2.9").active
    assert A("10.0.0.1") in b.entry_for("192.0.2.9").active
    assert_symmetric(a, "192.0.2.9", b, B1)
    assert_events_mirror_table(a)
    assert_events_mirror_table(b)


def test_duplicates_and_reordering_do_not_corrupt_the_tables() -> None:
    net = Net(duplicate=True, shuffle=True, seed=3)
    a, b = established(net)
    a.engine.address_added(ip_interface("203.0.113.5/24"), net.now)
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.50/24"), net.now)
    a.engine.address_added(ip_interface("203.0.113.6/24"), net.now)
    a.engine.address_removed(ip_interface("203.0.113.5/24"), net.now)
    net.run(30)
    eb = b.entry_for("192.0.2.50")
    assert set(eb.active) == {A("192.0.2.50"), A("203.0.113.6")}
    assert not eb.unreachable
    assert_symmetric(a, "192.0.2.50", b, B1)
    # Duplicates were refused as replays, and changed nothing.
    assert b.engine.counters.messages_rejected.get("replay", 0) > 0


def test_seq_serial_arithmetic_wraps() -> None:
    assert seq_newer(1, 0) and seq_newer(0, 0xFFFF) and not seq_newer(0xFFFF, 0)
    assert not seq_newer(5, 5)


# -- security ----------------------------------------------------------------------


def table_state(host: Host) -> list[object]:
    return host.table.snapshot()


def test_replayed_message_is_rejected_and_changes_nothing() -> None:
    net = Net()
    a, b = established(net)
    a.engine.address_added(ip_interface("203.0.113.5/24"), net.now)
    net.run(2)
    addr_up = next(s for s in net.log if decode(s.datagram.data).type is T.ADDR_UP)
    a.engine.address_removed(ip_interface("203.0.113.5/24"), net.now)
    net.run(2)
    assert A("203.0.113.5") not in b.entry_for(A1).addresses()
    before = table_state(b)
    # Replaying the old ADDR_UP would resurrect the address: it must be refused.
    b.engine.receive_datagram(addr_up.datagram.data, A("203.0.113.5"), A(B1), net.now)
    assert table_state(b) == before
    assert b.engine.counters.messages_rejected == {"replay": 1}
    assert b.engine.datagrams_to_send(net.now) == []


def forged(data: bytes, **changes: object) -> bytes:
    return encode(replace(decode(data), signature=None, **changes), Ed25519PrivateKey.generate())


def test_wrong_key_unsigned_and_unknown_host_id_are_rejected() -> None:
    net = Net()
    a, b = established(net)
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.2/24"), net.now)
    net.hold = True
    net.flush()
    ((_, dgram),) = net.held
    msg = decode(dgram.data)
    before = table_state(b)
    wrong_key = forged(dgram.data, counter=msg.counter + 10)
    unsigned = encode(replace(msg, signature=None, counter=msg.counter + 11))
    unknown = forged(dgram.data, counter=msg.counter + 12, host_id=A("192.0.2.200"))
    with_key = encode(
        replace(
            msg,
            type=T.ACK,
            new_addr=None,
            old_addrs=(),
            signature=None,
            public_key=bytes(32),
            counter=msg.counter + 13,
        ),
        Ed25519PrivateKey.generate(),
    )
    for data in (wrong_key, unsigned, unknown, with_key, b"\x01\x02garbage"):
        b.engine.receive_datagram(data, A("192.0.2.2"), A(B1), net.now)
    assert table_state(b) == before
    assert b.engine.counters.messages_rejected == {
        "bad_signature": 1,
        "unsigned": 1,
        "unknown_host_id": 1,
        "key_mismatch": 1,
        "malformed": 1,
    }
    assert b.engine.datagrams_to_send(net.now) == []
    reasons = {e.reason for e in b.events_of(ev.MessageRejected)}  # type: ignore[attr-defined]
    assert len(reasons) == 5


def test_strict_mode_accepts_only_configured_keys() -> None:
    net = Net()
    trust = TrustStore()
    b = net.add(Host("B", [B1 + "/24"], seed=2, config=EngineConfig(strict=True), trust=trust))
    a = net.add(Host("A", [A1 + "/24"], seed=1))
    a.connect(B1, 0)
    net.run(60)
    assert len(b.table) == 0
    assert b.engine.counters.messages_rejected["untrusted"] >= 1
    # Now the administrator installs A's key a priori.
    trust.trust(public_key_bytes(a.key), A1)  # type: ignore[arg-type]
    a.engine.flow_started(A(B1), A(A1), net.now + 1000)
    net.run(1000)
    assert b.entry_for(A1).key == public_key_bytes(a.key)  # type: ignore[arg-type]
    # An impostor at another address with another key is still refused.
    c = net.add(Host("C", ["192.0.2.66/24"], seed=3))
    trust.trust(public_key_bytes(Ed25519PrivateKey.generate()), "192.0.2.66")
    c.connect(B1, net.now)
    net.run(30)
    assert b.table.lookup(A("192.0.2.66")) is None
    assert b.engine.counters.messages_rejected.get("key_mismatch", 0) >= 1


def test_unsigned_peers_interoperate_until_a_key_is_bound() -> None:
    net = Net()
    a, b = established(net, signed=False)
    assert b.entry_for(A1).key is None
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.2/24"), net.now)
    net.run(5)
    assert b.entry_for("192.0.2.2").active == [A("192.0.2.2")]


# -- NAT ---------------------------------------------------------------------------


def test_hello_through_an_ihmp_unaware_nat_establishes_with_the_nat_as_locator() -> None:
    net = Net(nat={A("10.0.0.1"): A("203.0.113.100")})
    a = net.add(Host("A", ["10.0.0.1/24"], seed=1))
    b = net.add(Host("B", [B1 + "/24"], seed=2))
    a.connect(B1, 0)
    net.run(5)
    assert a.entry_for(B1).state is HidState.ESTABLISHED
    eb = b.entry_for("203.0.113.100")
    assert eb.state is HidState.ESTABLISHED and eb.active == [A("203.0.113.100")]
    assert eb.nat == {A("203.0.113.100"): A("10.0.0.1")}
    ack = decode(net.log[-1].datagram.data)
    assert ack.flags & Flags.ND and not ack.flags & Flags.NF
    assert ack.observed_addr == A("203.0.113.100")
    assert b.events_of(ev.NatDetected) == [
        ev.NatDetected(eb.hid, A("10.0.0.1"), A("203.0.113.100"))
    ]
    # No dead end: A goes on signalling, under its own address as Host ID.
    a.engine.address_added(ip_interface("192.0.2.9/24"), net.now)
    (up,) = a.engine.datagrams_to_send(net.now)
    assert decode(up.data).type is T.ADDR_UP
    assert decode(up.data).host_id == A("10.0.0.1")


def test_addr_up_from_behind_a_nat_validates_the_nat_and_is_acked_with_nd() -> None:
    net = Net(nat={A("10.7.0.1"): A("203.0.113.7")})
    a, b = established(net)
    a.engine.address_added(ip_interface("10.7.0.1/24"), net.now)
    net.run(5)
    eb = b.entry_for(A1)
    assert eb.active == [A(A1), A("203.0.113.7")]  # an ADDR_UP: not preferred
    assert eb.nat == {A("203.0.113.7"): A("10.7.0.1")}
    assert A("10.7.0.1") not in eb.addresses()  # a private address is no locator
    nat = a.events_of(ev.NatDetected)
    assert nat == [ev.NatDetected(a.entry_for(B1).hid, A("10.7.0.1"), A("203.0.113.7"))]
    assert a.events_of(ev.FlowsNeedBinding) == []  # its flows did not move
    assert A("10.7.0.1") in a.entry_for(B1).local


def nat_handoff() -> tuple[Net, Host, Host]:
    """A (public A1) moves behind a NAT (10.7.0.1 seen as 203.0.113.7)."""
    net = Net(nat={A("10.7.0.1"): A("203.0.113.7")})
    a, b = established(net)
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("10.7.0.1/24"), net.now)
    net.run(5)
    return net, a, b


def test_a_handoff_into_a_nat_moves_the_peer_to_the_nat_and_asks_for_knocks() -> None:
    net, a, b = nat_handoff()
    eb = b.entry_for("203.0.113.7")
    assert eb.active == [A("203.0.113.7")] and eb.nat == {A("203.0.113.7"): A("10.7.0.1")}
    assert A(A1) in eb.retired
    hid = a.entry_for(B1).hid
    assert a.events_of(ev.FlowsNeedBinding) == [ev.FlowsNeedBinding(hid, A("10.7.0.1"))]
    assert a.engine.peer_info(hid)["we_are_observed_as"] == "203.0.113.7"
    # The challenge went to the NAT's address, and was answered through it.
    probes = [s for s in net.log if decode(s.datagram.data).type is T.PATH_PROBE]
    assert any(s.datagram.dst == A("203.0.113.7") and s.delivered for s in probes)


def test_a_knock_binds_a_flow_only_when_signed_by_the_host_and_from_its_nat() -> None:
    net, a, b = nat_handoff()
    hid_a = a.entry_for(B1).hid
    flow = FlowSpec(6, A(A1), 40000, A(B1), 5001)
    knock = a.engine.flow_binding(hid_a, flow, A("10.7.0.1"))
    assert knock is not None and knock.startswith(KNOCK_MAGIC)
    body = knock[len(KNOCK_MAGIC) :]
    hid_b = b.entry_for("203.0.113.7").hid
    # From elsewhere (a third host claiming the flow): refused.
    assert b.engine.receive_binding(body, A("198.51.100.66"), 41000, net.now) is None
    assert b.engine.receive_binding(body, A("203.0.113.7"), 61001, net.now) == (hid_b, flow)
    # Replayed (a copy an on-path host saw): refused.
    assert b.engine.receive_binding(body, A("203.0.113.7"), 61002, net.now) is None
    # Forged: same fields, no valid signature.
    forged = encode(
        Message(type=T.FLOW_BIND, seq=0, host_id=A("10.7.0.1"), flow=flow, counter=10**15)
    )
    assert b.engine.receive_binding(forged, A("203.0.113.7"), 61003, net.now) is None
    reasons = [r.reason for r in b.events_of(ev.MessageRejected)]
    assert reasons[-3:] == [
        RejectReason.UNVERIFIED_SOURCE,
        RejectReason.REPLAY,
        RejectReason.UNSIGNED,
    ]
    assert b.engine.counters.flows_bound == 1


def test_leaving_a_nat_the_flows_started_behind_it_knock_from_the_new_address() -> None:
    net = Net(nat={A("10.0.0.1"): A("203.0.113.100")})
    a = net.add(Host("A", ["10.0.0.1/24"], seed=1))
    net.add(Host("B", [B1 + "/24"], seed=2))
    a.connect(B1, 0)  # a flow started behind the NAT
    net.run(5)
    a.engine.handoff(ip_interface("10.0.0.1/24"), ip_interface("192.0.2.44/24"), net.now)
    net.run(5)
    hid = a.entry_for(B1).hid
    assert a.events_of(ev.FlowsNeedBinding) == [
        ev.FlowsNeedBinding(hid, A("192.0.2.44"), identifiers=frozenset({A("10.0.0.1")}))
    ]


def test_knocks_from_one_nat_address_are_held_to_their_rate() -> None:
    net, a, b = nat_handoff()
    b.engine._knocks = PerSource(rate=300.0, burst=3)  # as `knock_burst = 3` would
    hid_a = a.entry_for(B1).hid
    flows = [FlowSpec(17, A(A1), 40000 + i, A(B1), 53) for i in range(5)]
    knocks = [a.engine.flow_binding(hid_a, f, A("10.7.0.1")) for f in flows]
    bound = [
        b.engine.receive_binding(k[len(KNOCK_MAGIC) :], A("203.0.113.7"), 61000 + i, net.now)
        for i, k in enumerate(knocks)
        if k is not None
    ]
    assert [x is not None for x in bound] == [True, True, True, False, False]
    assert b.engine.counters.dropped == {"knock_rate": 2}


def test_moving_on_from_a_nat_retires_the_nat_address_too() -> None:
    net, a, b = nat_handoff()
    a.engine.handoff(ip_interface("10.7.0.1/24"), ip_interface("192.0.2.44/24"), net.now)
    net.run(5)
    eb = b.entry_for("192.0.2.44")
    assert eb.active == [A("192.0.2.44")] and A("203.0.113.7") in eb.retired
    # Still marked as a NAT's: flows named by it belong to whoever is behind it.
    assert eb.nat == {A("203.0.113.7"): A("10.7.0.1")} and eb.locator not in eb.nat
    assert a.engine.peer_info(a.entry_for(B1).hid)["we_are_observed_as"] is None


def test_behind_a_nat_the_host_keeps_its_mapping_alive_while_it_has_flows() -> None:
    net = Net(nat={A("10.7.0.1"): A("203.0.113.7")})
    in_use = {"yes": True}
    a, b = established(net)
    a.engine._in_use = lambda hid: in_use["yes"]
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("10.7.0.1/24"), net.now)
    net.run(5)
    interval = a.engine.config.nat_keepalive
    net.run(interval * 3)
    assert a.engine.counters.keepalives_sent == 3
    in_use["yes"] = False
    net.run(interval * 3)
    assert a.engine.counters.keepalives_sent == 3  # nothing needs it: stopped
    assert b.engine.counters.messages_rejected == {}


def _aware_nat(seed: int = 9) -> NatAgent:
    key = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    return NatAgent(key=key, counter_start=1000, rng=random.Random(seed))


def _to_b(net: Net, b: Host, agent: NatAgent, src: str = "203.0.113.7") -> None:
    """What the agent has to send goes to B, as from the NAT's port 4733."""
    for d in agent.datagrams_to_send(net.now):
        assert d.dst == A(B1)
        b.engine.receive_datagram(d.data, A(src), A(B1), net.now, src_port=4733)


def test_an_ihmp_aware_nat_tells_the_peer_each_flows_port_once_its_key_is_proven() -> None:
    net, _a, b = nat_handoff()
    agent = _aware_nat()
    agent.ihmp_crossed(A("10.7.0.1"), A(B1), net.now)
    mapping = NatMapping(6, A("10.7.0.1"), 40000, A("203.0.113.7"), 61000)
    agent.mapping_created(mapping, A(B1), 5001, net.now)
    _to_b(net, b, agent)
    assert b.events_of(ev.NatEntryReceived) == []  # not before the challenge is answered
    (probe,) = b.engine.datagrams_to_send(net.now)
    assert decode(probe.data).type is T.PATH_PROBE and probe.dst_port == 4733
    agent.receive_datagram(probe.data, A(B1), A("203.0.113.7"), DEFAULT_PORT, net.now)
    (answer,) = agent.datagrams_to_send(net.now)
    b.engine.receive_datagram(answer.data, A("203.0.113.7"), A(B1), net.now, src_port=4733)
    hid = b.entry_for("203.0.113.7").hid
    assert b.events_of(ev.NatEntryReceived) == [ev.NatEntryReceived(hid, mapping)]
    (ack,) = b.engine.datagrams_to_send(net.now)
    agent.receive_datagram(ack.data, A(B1), A("203.0.113.7"), DEFAULT_PORT, net.now)
    assert agent.counters.entries_acked == 1 and agent.get_timer() is None
    # The next entry from the proven key applies at once.
    second = NatMapping(17, A("10.7.0.1"), 40001, A("203.0.113.7"), 61001)
    agent.mapping_created(second, A(B1), 6001, net.now)
    _to_b(net, b, agent)
    assert b.events_of(ev.NatEntryReceived)[-1] == ev.NatEntryReceived(hid, second)
    # Mappings of hosts that never spoke IHMP through the NAT, or of IHMP itself: nothing,
    agent.mapping_created(NatMapping(6, A("10.7.0.2"), 1, A("203.0.113.7"), 2), A(B1), 80, 0)
    agent.mapping_created(
        NatMapping(17, A("10.7.0.1"), 4731, A("203.0.113.7"), 4731), A(B1), 4731, 0
    )
    assert agent.datagrams_to_send(net.now) == [] and agent.counters.mappings_ignored == 2
    # unless the host says HELLO through the NAT soon after its flow began (the flow
    # prompted it): then that mapping goes too.
    agent.ihmp_crossed(A(B1), A("10.7.0.2"), 1.0)
    (late,) = agent.datagrams_to_send(net.now)
    assert decode(late.data).nat_mapping == NatMapping(6, A("10.7.0.2"), 1, A("203.0.113.7"), 2)


def test_a_nat_entry_from_anyone_but_the_hosts_nat_or_an_unproven_key_maps_nothing() -> None:
    net, _a, b = nat_handoff()
    mapping = NatMapping(6, A("10.7.0.1"), 40000, A("203.0.113.7"), 61000)
    # A third host's own NAT_ENTRY about A's flow: not A's NAT.
    eve = _aware_nat(seed=66)
    eve.ihmp_crossed(A("10.7.0.1"), A(B1), net.now)
    eve.mapping_created(replace(mapping, external=A("198.51.100.66")), A(B1), 5001, net.now)
    _to_b(net, b, eve, src="198.51.100.66")
    # Spoofed from A's NAT address, with eve's key: challenged, and eve never sees it.
    eve.mapping_created(mapping, A(B1), 5001, net.now)
    _to_b(net, b, eve)
    (probe,) = b.engine.datagrams_to_send(net.now)
    assert probe.dst == A("203.0.113.7")  # the challenge goes to the NAT, not to eve
    assert b.events_of(ev.NatEntryReceived) == []
    reasons = [r.reason for r in b.events_of(ev.MessageRejected)]
    assert reasons == [RejectReason.UNVERIFIED_SOURCE]


# -- no I/O in the engine ----------------------------------------------------------


def test_ihmp_package_has_no_io() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent / "ihmp"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bimport socket\b|\bsocket\.", text), path
        assert not re.search(r"\btime\.|\bimport time\b|\basyncio\b|\bsleep\(", text), path


def test_a_send_that_failed_locally_is_retried_soon_and_not_counted() -> None:
    net = Net()
    a, b = established(net)
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.77/24"), net.now)
    (first,) = a.engine.datagrams_to_send(net.now)  # lost: "no route yet"
    for _ in range(MAX_LOCAL_RETRIES):  # the route takes a while to appear
        a.engine.send_failed(first.src, first.dst, net.now)
        assert a.engine.get_timer() == pytest.approx(net.now + 0.01)
        net.now += 0.01
        a.engine.handle_timer(net.now)
        (first,) = a.engine.datagrams_to_send(net.now)
    # Beyond MAX_LOCAL_RETRIES the normal RTO applies again, and nothing was spent.
    a.engine.send_failed(first.src, first.dst, net.now)
    assert a.engine.get_timer() == pytest.approx(net.now + EngineConfig().initial_rto)
    net.run(1)
    types = [decode(s.datagram.data).type for s in net.log[-4:]]
    assert types == [T.HANDOFF, T.PATH_PROBE, T.ACK, T.ACK]
    assert b.entry_for("192.0.2.77").active == [A("192.0.2.77")]


# -- everyday mobility: ghosts, going back, HELLO collisions, loss --------------------


def test_a_datagram_to_an_address_we_left_is_refused_and_changes_nothing() -> None:
    """After a move the old address lives on as a ghost for the flows: no locator."""
    net = Net()
    a, b = established(net)
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.77/24"), net.now)
    net.run(5)
    before = a.table.snapshot()
    # B's late retransmission of something, to A's old address (now a ghost).
    probe = b.engine
    hello = encode_hello_from(b, host_id=B1, src=B1)
    a.engine.receive_datagram(hello, A(B1), A(A1), net.now)
    assert a.engine.counters.messages_rejected["not_a_locator"] == 1
    assert a.engine.datagrams_to_send(net.now) == []  # nothing is sent from the ghost
    assert a.table.snapshot() == before
    assert probe is b.engine


def encode_hello_from(host: Host, *, host_id: str, src: str) -> bytes:
    """A HELLO as ``host`` would sign it (counter far ahead, so never a replay)."""
    from ihmp.wire import Message

    msg = Message(
        type=T.HELLO,
        seq=1,
        host_id=A(host_id),
        counter=10**15,
        advertised=(A(src),),
        src_addr=A(src),
        public_key=public_key_bytes(host.key),  # type: ignore[arg-type]
    )
    return encode(msg, host.key)


def test_a_hello_for_a_flow_of_a_ghost_address_goes_from_a_real_one() -> None:
    """A restarted daemon adopts a flow whose local end is a ghost: it must not say
    HELLO from it."""
    net = Net()
    a, b = pair(net, a_addrs=["192.0.2.77/24"])
    hid = a.engine.flow_started(A(B1), A(A1), 0)  # A1: the flow's identifier, a ghost
    net.run(2)
    hello = next(s for s in net.log if decode(s.datagram.data).type is T.HELLO)
    assert hello.datagram.src == A("192.0.2.77")
    assert a.table.get(hid).state is HidState.ESTABLISHED  # type: ignore[arg-type]
    assert A(A1) not in b.table.lookup(A("192.0.2.77")).addresses()  # type: ignore[union-attr]


def test_going_back_to_an_address_we_had_before() -> None:
    """home -> office -> home: the old address becomes the locator again."""
    net = Net()
    a, b = established(net)
    office = "192.0.2.77"
    for old, new in [(A1, office), (office, A1), (A1, office), (office, A1)]:
        a.engine.handoff(ip_interface(old + "/24"), ip_interface(new + "/24"), net.now)
        net.run(5)
        eb = b.entry_for(new)
        assert eb.active == [A(new)] and eb.addresses() == {A(new)}
        assert a.entry_for(B1).local == [A(new)]
        assert_symmetric(a, new, b, B1)
    assert_events_mirror_table(a)
    assert_events_mirror_table(b)


def crossing_hellos(net: Net) -> tuple[Host, Host, list[tuple[Host, Datagram]]]:
    """A and B both say HELLO before either hears the other's: the two HELLOs, held."""
    a, b = pair(net)
    net.hold = True
    a.connect(B1, 0)
    b.connect(A1, 0)
    net.flush()
    held = list(net.held)
    net.held.clear()
    net.hold = False
    return a, b, held


def test_simultaneous_hellos_make_one_exchange() -> None:
    """Both ends see the flow's first packet and say HELLO: the tie-break keeps one."""
    net = Net()
    a, b, held = crossing_hellos(net)
    for host, dgram in held:  # the two HELLOs cross in the network
        net.deliver(host, dgram)
    net.run(30)
    hellos = [s for s in net.log if decode(s.datagram.data).type is T.HELLO]
    assert len(hellos) == 2  # the two crossing ones; nobody retransmits
    for host in (a, b):
        assert not host.engine.counters.messages_rejected
        assert all(e.state is HidState.ESTABLISHED for e in host.table)
    assert_symmetric(a, A1, b, B1)


def test_an_unanswered_hello_never_demotes_a_peer_that_answered() -> None:
    """B's HELLO crossed A's and is lost; A moves before B retransmits it: B's HELLO
    goes unanswered, yet A is established and must stay so."""
    net = Net()
    a, b, held = crossing_hellos(net)
    from_a = [(h, d) for h, d in held if h is a]
    for host, dgram in from_a:  # B's HELLO is lost
        net.deliver(host, dgram)
    net.flush()  # B's ACK: A's exchange is done, B's HELLO is still pending
    assert a.entry_for(B1).state is HidState.ESTABLISHED
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.77/24"), net.now)
    net.run(60)
    entry = b.entry_for("192.0.2.77")
    assert entry.state is HidState.ESTABLISHED
    assert b.events_of(ev.PeerLegacy) == []
    assert_symmetric(a, "192.0.2.77", b, B1)


def test_the_winning_hello_follows_the_other_end_when_it_moved() -> None:
    """Seen with loss on the real kernel: both first HELLOs lost; B (the higher Host
    ID, which gives way) moves and says its HELLO again from the new address; A
    answers each copy, and every ACK is lost. A's own HELLO, which won the
    tie-break, must now go where B is: otherwise B never hears from A and takes it
    for legacy."""
    net = Net()
    a, b, _ = crossing_hellos(net)  # both lost
    # Its cookies get through: B's HELLO must get as far as being taken in.
    net.drop = lambda d: (
        d.src == A(A1) and decode(d.data).type is T.ACK and decode(d.data).cookie is None
    )
    b.engine.handoff(ip_interface(B1 + "/24"), ip_interface("203.0.113.7/24"), net.now)
    net.run(60)
    assert b.events_of(ev.PeerLegacy) == []
    assert b.entry_for(A1).state is HidState.ESTABLISHED
    assert a.entry_for("203.0.113.7").state is HidState.ESTABLISHED
    from_a = [s for s in net.log if s.datagram.src == A(A1)]
    assert any(s.delivered and decode(s.datagram.data).type is T.HELLO for s in from_a)


@pytest.mark.parametrize("seed", range(6))
def test_five_handoffs_under_thirty_percent_loss_all_converge(seed: int) -> None:
    """Default timers: every handoff converges although 30 % of datagrams are lost."""
    net = Net(loss=0.3, seed=seed)
    a, b = pair(net)
    a.connect(B1, 0)
    net.run(60)
    assert b.entry_for(A1).state is HidState.ESTABLISHED
    addrs = [A1, "192.0.2.77"]
    for i in range(5):
        old, new = addrs[i % 2], addrs[(i + 1) % 2]
        a.engine.handoff(ip_interface(old + "/24"), ip_interface(new + "/24"), net.now)
        net.run(EngineConfig().exchange_deadline)
        assert b.entry_for(new).active[0] == A(new)
        assert b.entry_for(new).addresses() == {A(new)}
        assert_symmetric(a, new, b, B1)
    assert b.events_of(ev.PeerLost) == [] and b.events_of(ev.PeerLegacy) == []


# -- a restarted daemon resumes -------------------------------------------------------


def test_save_and_restore_round_trip_the_state() -> None:
    net = Net()
    a, _b = established(net)
    a.engine.address_added(ip_interface("203.0.113.5/24"), net.now)
    net.run(5)
    saved = a.engine.save(net.now)
    a2 = a.restarted(net)
    assert a2.table.snapshot() == a.table.snapshot()
    assert sorted(map(str, a2.engine.local_addresses)) == sorted(map(str, a.engine.local_addresses))
    assert a2.engine.save(net.now)["hosts"] == saved["hosts"]
    # Every host came back as a HostChanged event, so StackTrans learns them all.
    assert_events_mirror_table(a2)


def test_restored_state_refuses_what_it_cannot_use() -> None:
    net = Net()
    a, _b = established(net)
    saved = a.engine.save(net.now)
    fresh = Host("A", [], seed=9, key=a.key)
    for broken in ({**saved, "version": 99}, {**saved, "hosts": [{"hid": "x"}]}, {}):
        with pytest.raises(ValueError):
            fresh.engine.restore(broken, net.now)
        assert len(fresh.table) == 0


@pytest.mark.parametrize("who", ["a", "b"])
def test_a_restarted_engine_resumes_with_its_peer(who: str) -> None:
    """kill -9 after a handoff, start again: the peer keeps its state, the restarted
    side re-synchronises with a HELLO from a real address; replays stay refused."""
    net = Net()
    a, b = established(net)
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.77/24"), net.now)
    net.run(5)
    old_handoff = next(s.datagram for s in net.log if decode(s.datagram.data).type is T.HANDOFF)
    if who == "a":
        a = a.restarted(net)
        a.engine.resume(net.now)
    else:
        b = b.restarted(net)
        b.engine.resume(net.now)
    net.run(5)
    assert_symmetric(a, "192.0.2.77", b, B1)
    assert b.entry_for("192.0.2.77").addresses() == {A("192.0.2.77")}
    hellos = [s for s in net.log if decode(s.datagram.data).type is T.HELLO]
    assert hellos[-1].delivered and hellos[-1].datagram.src in (A("192.0.2.77"), A(B1))
    # A capture of the old HANDOFF, replayed at B after the restart: refused.
    before = b.table.snapshot()
    b.engine.receive_datagram(old_handoff.data, old_handoff.src, old_handoff.dst, net.now)
    assert b.engine.counters.messages_rejected.get("replay") == 1
    assert b.table.snapshot() == before


def test_a_handoff_while_the_daemon_was_down_is_caught_up() -> None:
    net = Net()
    a, b = established(net)
    a = a.restarted(net)  # still believes it is at A1
    # What the monitor reports when it finds A1 gone and a new address:
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.77/24"), net.now)
    a.engine.resume(net.now)
    net.run(5)
    assert b.entry_for("192.0.2.77").addresses() == {A("192.0.2.77")}
    assert len(b.table) == 1  # the same HID: no second entry for the new address
    assert_symmetric(a, "192.0.2.77", b, B1)


def test_a_peer_that_never_heard_our_key_is_told_it_before_an_address_event() -> None:
    """Seen with 30 % loss on the real kernel: HELLOs cross, A's wins, B drops its own;
    B's HELLO and B's ACK of A's HELLO are both lost, then B moves (A's HELLO keeps
    going to B's old address). A never learned B's key, so it would refuse B's
    HANDOFF for ever: B says HELLO first, and A takes both."""
    net = Net()
    a, b, held = crossing_hellos(net)
    for host, dgram in held:
        if host is a:
            net.deliver(host, dgram)  # B gets A's HELLO; A never gets B's
    net.hold = True
    net.flush()  # B's ACK of it ...
    net.held.clear()  # ... is lost
    net.hold = False
    assert b.entry_for(A1).state is HidState.ESTABLISHED
    assert a.entry_for(B1).key is None  # A has no key for B
    b.engine.handoff(ip_interface(B1 + "/24"), ip_interface("203.0.113.7/24"), net.now)
    net.run(60)
    entry = a.entry_for("203.0.113.7")
    assert entry.state is HidState.ESTABLISHED and entry.key is not None
    assert entry.addresses() == {A("203.0.113.7")}
    # B's HANDOFF may come before its HELLO is taken in (which needs a cookie):
    # refused then, taken when retransmitted.
    assert any(e.type is T.HANDOFF and not e.stale for e in a.events_of(ev.MessageApplied))
    assert_symmetric(a, A1, b, "203.0.113.7")


def test_a_hello_from_an_address_we_lost_is_said_again_from_the_new_one() -> None:
    net = Net()
    a, b = pair(net)
    net.hold = True
    a.connect(B1, 0)
    net.flush()
    net.held.clear()  # the first HELLO is lost
    net.hold = False
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.77/24"), net.now)
    net.run(10)
    # (The lost first HELLO never reached the network log.)
    hellos = [s for s in net.log if decode(s.datagram.data).type is T.HELLO]
    assert {s.datagram.src for s in hellos} == {A("192.0.2.77")}  # never the old one
    assert b.entry_for("192.0.2.77").state is HidState.ESTABLISHED
    assert_symmetric(a, "192.0.2.77", b, B1)


def test_a_hello_said_again_from_a_new_address_keeps_its_host_id() -> None:
    """Seen with loss on the real kernel: both HELLOs lost, then the MH moves. Its
    HELLO, said again from the new address, must name the old one (the peer made
    a HID for it from the flow's first packet): one HID at the peer, not two."""
    net = Net()
    a, b = pair(net)
    net.hold = True
    a.connect(B1, 0)
    b.connect(A1, 0)  # B has a HID for A1 (the flow's first packet)
    net.flush()
    net.held.clear()  # both HELLOs lost
    net.hold = False
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface("192.0.2.77/24"), net.now)
    net.run(30)
    assert len(b.table) == 1
    entry = b.entry_for("192.0.2.77")
    assert entry.state is HidState.ESTABLISHED and entry.key is not None
    # ... and A1, which A left before the two knew each other, is withdrawn there.
    assert entry.addresses() == {A("192.0.2.77")}
    assert_symmetric(a, "192.0.2.77", b, B1)


# -- FLOW_MOVE (per-flow locators of a multihomed host) --------------------------------

A2 = "203.0.113.5"
MOVED = FlowSpec(6, A(A1), 40312, A(B1), 22)  # as A's socket sees it


def multihomed(net: Net) -> tuple[Host, Host]:
    """A with a second address B has verified."""
    a, b = established(net)
    a.engine.address_added(ip_interface(A2 + "/24"), net.now)
    net.run(5)
    assert A(A2) in b.entry_for(A1).active and A(A2) in a.entry_for(B1).local
    return a, b


def test_flow_move_to_a_verified_address_is_applied_then_acked() -> None:
    net = Net()
    a, b = multihomed(net)
    hid = a.entry_for(B1).hid
    since = net.now
    seq = a.engine.move_flows(hid, [MOVED], A(A2), net.now)
    assert seq is not None
    net.run(1)
    assert net.types_sent(since=since) == [T.FLOW_MOVE, T.ACK]
    sent = net.log[-2].datagram
    assert (sent.src, sent.dst) == (A(A2), A(B1))  # from the address it moves to
    assert b.events_of(ev.FlowMoveReceived) == [
        ev.FlowMoveReceived(b.entry_for(A1).hid, MOVED, A(A2))
    ]
    done = [e for e in a.events_of(ev.ExchangeCompleted) if e.type is T.FLOW_MOVE]
    assert [(e.seq, e.attempts) for e in done] == [(seq, 1)]
    assert a.engine.counters.flow_moves_sent == 1
    assert b.engine.counters.flow_moves_received == 1


def test_one_flow_move_moves_up_to_sixteen_flows_with_one_ack() -> None:
    net = Net()
    a, b = multihomed(net)
    hid = a.entry_for(B1).hid
    flows = [replace(MOVED, lport=40312 + i) for i in range(MAX_FLOWS_PER_MOVE)]
    since = net.now
    seq = a.engine.move_flows(hid, flows, A(A2), net.now)
    net.run(1)
    assert net.types_sent(since=since) == [T.FLOW_MOVE, T.ACK]
    assert len(decode(net.log[-2].datagram.data).more_flows) == MAX_FLOWS_PER_MOVE - 1
    peer_hid = b.entry_for(A1).hid
    assert b.events_of(ev.FlowMoveReceived) == [
        ev.FlowMoveReceived(peer_hid, f, A(A2)) for f in flows
    ]
    assert [e.seq for e in a.events_of(ev.ExchangeCompleted) if e.type is T.FLOW_MOVE] == [seq]
    assert b.engine.counters.flow_moves_received == 1
    with pytest.raises(ValueError, match="1 to 16 flows"):
        a.engine.move_flows(hid, [*flows, replace(MOVED, lport=1)], A(A2), net.now)
    with pytest.raises(ValueError, match="1 to 16 flows"):
        a.engine.move_flows(hid, [], A(A2), net.now)


def test_flow_move_is_not_sent_for_an_address_the_peer_has_not_verified() -> None:
    net = Net()
    a, _ = established(net)
    hid = a.entry_for(B1).hid
    assert a.engine.move_flows(hid, [MOVED], A(A2), net.now) is None  # not ours
    assert a.engine.move_flows(hid + 99, [MOVED], A(A1), net.now) is None  # no such peer
    assert a.engine.datagrams_to_send(net.now) == []


def test_flow_move_to_an_unverified_address_is_refused_and_changes_nothing() -> None:
    """A signed FLOW_MOVE naming an address the receiver never verified (an attacker's
    address, say, from a peer whose key it holds) is refused, not challenged."""
    net = Net()
    a, b = established(net)
    hid = a.entry_for(B1).hid
    peer = a.engine._peer(hid)
    entry = a.entry_for(B1)
    evil = a.engine._message(
        peer, T.FLOW_MOVE, host_id=entry.local[0], new_addr=A("192.0.2.66"), flow=MOVED
    )
    a.engine._send(hid, evil, A(A1), A(B1), net.now, track=False)
    net.run(1)
    rejected = b.events_of(ev.MessageRejected)
    assert [r.reason for r in rejected] == [RejectReason.UNVERIFIED_ADDRESS]
    assert b.events_of(ev.FlowMoveReceived) == []
    assert T.ACK not in net.types_sent(since=net.now - 1)
    assert b.engine.counters.messages_rejected == {"unverified_address": 1}


def test_a_lost_flow_move_is_sent_again_until_acked() -> None:
    net = Net()
    a, b = multihomed(net)
    lost = [True]

    def drop_first(d: Datagram) -> bool:
        if lost and decode(d.data).type is T.FLOW_MOVE:
            lost.clear()
            return True
        return False

    net.drop = drop_first
    since = net.now
    seq = a.engine.move_flows(a.entry_for(B1).hid, [MOVED], A(A2), net.now)
    net.run(5)
    assert net.types_sent(since=since) == [T.FLOW_MOVE, T.FLOW_MOVE, T.ACK]
    done = [e for e in a.events_of(ev.ExchangeCompleted) if e.type is T.FLOW_MOVE]
    assert [(e.seq, e.attempts) for e in done] == [(seq, 2)]
    assert len(b.events_of(ev.FlowMoveReceived)) == 1
