"""The IHMP engine, two (or more) engines back to back over an in-memory network.

Fake clock, no sockets, no sleeps. Every exchange of section III-B of the paper,
both directions, plus reliability and security.
"""

from __future__ import annotations

import itertools
import pathlib
import re
from dataclasses import replace
from ipaddress import ip_interface

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ihmp import events as ev
from ihmp.engine import MAX_LOCAL_RETRIES, EngineConfig, seq_newer
from ihmp.hosts import HidState
from ihmp.keys import TrustStore
from ihmp.wire import Flags, MessageType, NatMapping, decode, encode, public_key_bytes, verify
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
    assert net.types_sent() == [T.HELLO, T.ACK]
    assert [type(e) for e in a.events_of(ev.PeerEstablished)] == [ev.PeerEstablished]
    assert a.engine.counters.messages_sent == 1 and b.engine.counters.messages_sent == 1


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
    assert net.types_sent(since=1) == [T.ADDR_UP, T.ACK]
    assert net.log[-2].datagram.src == A("203.0.113.5")  # sent from the new address
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
    assert net.types_sent(since=t0) == [T.HANDOFF, T.ACK]
    handoff = decode(net.log[-2].datagram.data)
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
    assert [decode(d.data).type for d in a.engine.datagrams_to_send(net.now)] == [
        MessageType.HELLO
    ]


def test_retransmission_backs_off_exponentially_with_a_cap() -> None:
    net = Net()
    a = net.add(Host("A", [A1 + "/24"], seed=1, config=EngineConfig(max_attempts=7)))
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


def test_hello_through_an_ihmp_unaware_nat_is_nat_forced() -> None:
    net = Net(nat={A("10.0.0.1"): A("203.0.113.100")})
    a = net.add(Host("A", ["10.0.0.1/24"], seed=1))
    b = net.add(Host("B", [B1 + "/24"], seed=2))
    a.connect(B1, 0)
    net.run(5)
    assert a.entry_for(B1).state is HidState.NAT_FORCED
    eb = b.entry_for("203.0.113.100")
    assert eb.state is HidState.NAT_FORCED and eb.active == [A("203.0.113.100")]
    ack = decode(net.log[-1].datagram.data)
    assert ack.flags & Flags.ND and ack.flags & Flags.NF
    assert b.events_of(ev.NatDetected) == [
        ev.NatDetected(eb.hid, A("10.0.0.1"), A("203.0.113.100"))
    ]
    # No further signaling with a NAT-forced peer.
    a.engine.address_added(ip_interface("192.0.2.9/24"), net.now)
    assert a.engine.datagrams_to_send(net.now) == []


def test_addr_up_from_behind_a_nat_is_kept_unreachable_and_acked_with_nd() -> None:
    net = Net(nat={A("10.7.0.1"): A("203.0.113.7")})
    a, b = established(net)
    a.engine.address_added(ip_interface("10.7.0.1/24"), net.now)
    net.run(5)
    assert A("10.7.0.1") in b.entry_for(A1).unreachable
    nat = a.events_of(ev.NatDetected)
    assert nat == [ev.NatDetected(a.entry_for(B1).hid, A("10.7.0.1"), A("203.0.113.7"))]
    assert_symmetric(a, A1, b, B1)


def test_nat_entry_and_ns_flag() -> None:
    net = Net()
    a, b = established(net)
    mapping = NatMapping(6, A("10.0.0.5"), 40000, A(A1), 61000)
    a.engine.send_nat_entry(a.entry_for(B1).hid, mapping, A(A1), net.now)
    net.run(2)
    hid = b.entry_for(A1).hid
    assert b.events_of(ev.NatEntryReceived) == [ev.NatEntryReceived(hid, mapping)]
    assert b.engine.peer_info(hid)["nat_supported"] is True
    assert b.engine.peer_info(hid)["nat_entries"] == 1


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
    assert [decode(s.datagram.data).type for s in net.log[-2:]] == [T.HANDOFF, T.ACK]
    assert b.entry_for("192.0.2.77").active == [A("192.0.2.77")]
