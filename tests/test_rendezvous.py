"""Rendezvous points: the server (ihmp/rendezvous.py) alone, and IHMP engines that
register with one and relay through it, over the in-memory network of
tests/ihmp_sim.py. Fake clock, no sockets."""

from __future__ import annotations

import itertools
from dataclasses import replace
from ipaddress import ip_interface

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ihmp import events as ev
from ihmp.addr import IPAddress
from ihmp.engine import Datagram, EngineConfig
from ihmp.events import RejectReason
from ihmp.registration import RendezvousAddressError, RendezvousPoint
from ihmp.rendezvous import Refused, RendezvousServer, ServerConfig
from ihmp.wire import (
    DEFAULT_PORT,
    Flags,
    Message,
    MessageType,
    decode,
    encode,
    public_key_bytes,
)
from tests.ihmp_sim import A, Host, Net, assert_symmetric

T = MessageType
RV = "192.0.2.200"
A1, A2 = "198.51.100.1", "198.51.100.2"
B1, B2 = "203.0.113.1", "203.0.113.2"


# == configured addresses =============================================================


@pytest.mark.parametrize(
    ("text", "addr", "port"),
    [
        ("192.0.2.1", "192.0.2.1", DEFAULT_PORT),
        ("192.0.2.1:9000", "192.0.2.1", 9000),
        ("2001:db8::1", "2001:db8::1", DEFAULT_PORT),
        ("[2001:db8::1]:9000", "2001:db8::1", 9000),
        ("[2001:db8::1]", "2001:db8::1", DEFAULT_PORT),
    ],
)
def test_rendezvous_point_forms(text: str, addr: str, port: int) -> None:
    point = RendezvousPoint.parse(text)
    assert (point.name, point.addr, point.port) == (text, A(addr), port)


@pytest.mark.parametrize(
    "text", ["", "rv.example", "192.0.2.1:0", "192.0.2.1:70000", "[2001:db8::1]x", "1.2.3.4:x"]
)
def test_rendezvous_point_refuses_what_it_cannot_use(text: str) -> None:
    with pytest.raises(RendezvousAddressError):
        RendezvousPoint.parse(text)


# == the server alone =================================================================

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUB = public_key_bytes(KEY)
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
OTHER_PUB = public_key_bytes(OTHER)
SERVER = A(RV)


def register(
    key: Ed25519PrivateKey, src: str, counter: int, seq: int = 7, nonce: bytes = b"n" * 8
) -> bytes:
    msg = Message(
        type=T.REGISTER,
        seq=seq,
        host_id=A(src),
        counter=counter,
        src_addr=A(src),
        advertised=(A(src),),
        public_key=public_key_bytes(key),
        nonce=nonce,
    )
    return encode(msg, key)


def handoff(key: Ed25519PrivateKey, counter: int, new: str = A2, old: str = A1) -> bytes:
    msg = Message(
        type=T.HANDOFF, seq=3, host_id=A(old), counter=counter, new_addr=A(new), old_addrs=(A(old),)
    )
    return encode(msg, key)


def relay(sender: bytes, target: bytes, payload: bytes, src: str = A2) -> bytes:
    msg = Message(
        type=T.RELAY, seq=0, host_id=A(src), public_key=sender, target=target, payload=payload
    )
    return encode(msg)


def receive(
    server: RendezvousServer, data: bytes, src: str, port: int = 40000, now: float = 0.0
) -> tuple[Refused | None, list[Datagram]]:
    refused = server.receive_datagram(data, A(src), port, SERVER, now)
    return refused, server.datagrams_to_send(now)


def test_register_is_answered_with_the_nonce_and_the_source_seen() -> None:
    server = RendezvousServer()
    request = register(KEY, "10.0.0.5", counter=1)
    refused, out = receive(server, request, A1, port=40001)  # a NAT in the way
    assert refused is None and len(out) == 1
    ack = decode(out[0].data)
    assert (ack.type, ack.seq, ack.nonce, ack.observed_addr) == (T.ACK, 7, b"n" * 8, A(A1))
    assert ack.flags & Flags.ND and ack.signature is None
    assert (out[0].src, out[0].dst, out[0].dst_port) == (SERVER, A(A1), 40001)
    assert len(out[0].data) < len(request)  # no amplification
    [host] = server.registered(now=1.0)
    assert (host["key"], host["address"], host["port"]) == (PUB.hex(), A1, 40001)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), Refused.BAD_SIGNATURE),
        (lambda d: d[:20], Refused.MALFORMED),
        (lambda d: b"\x00" * 40, Refused.MALFORMED),
    ],
)
def test_a_bad_register_is_refused_and_kept_nowhere(mutate: object, reason: Refused) -> None:
    server = RendezvousServer()
    refused, out = receive(server, mutate(register(KEY, A1, counter=1)), A1)  # type: ignore[operator]
    assert refused is reason and out == []
    assert server.registered(0.0) == []
    assert server.counters.refused == {reason.value: 1}


def test_a_replayed_register_moves_nothing() -> None:
    server = RendezvousServer()
    old = register(KEY, A1, counter=1)
    receive(server, old, A1)
    receive(server, register(KEY, A2, counter=2), A2)
    refused, out = receive(server, old, "192.0.2.66")  # an attacker replays it
    assert refused is Refused.REPLAY and out == []
    assert [h["address"] for h in server.registered(0.0)] == [A2]


def test_only_accepted_keys_register_and_room_is_limited() -> None:
    server = RendezvousServer(ServerConfig(accept=frozenset({PUB}), max_hosts=1))
    assert receive(server, register(OTHER, A2, counter=1), A2)[0] is Refused.NOT_ACCEPTED
    assert receive(server, register(KEY, A1, counter=1), A1)[0] is None
    open_server = RendezvousServer(ServerConfig(max_hosts=1))
    receive(open_server, register(KEY, A1, counter=1), A1)
    assert receive(open_server, register(OTHER, A2, counter=1), A2)[0] is Refused.FULL
    assert receive(open_server, register(KEY, A2, counter=2), A2)[0] is None  # a renewal


def test_registrations_run_out() -> None:
    server = RendezvousServer(ServerConfig(lifetime=10.0))
    receive(server, register(KEY, A1, counter=1), A1, now=0.0)
    assert server.get_timer() == 10.0
    server.handle_timer(10.0)
    assert server.registered(10.0) == [] and server.counters.expired == 1


def test_a_source_over_its_rate_is_refused_before_any_check() -> None:
    server = RendezvousServer(ServerConfig(rate=1.0, burst=2.0))
    results = [receive(server, b"junk", A1)[0] for _ in range(4)]
    assert results == [Refused.MALFORMED, Refused.MALFORMED] + [Refused.RATE_LIMITED] * 2


def both_registered() -> RendezvousServer:
    server = RendezvousServer()
    receive(server, register(KEY, A1, counter=1), A1, port=4731)
    receive(server, register(OTHER, B1, counter=1), B1, port=4731)
    server.datagrams_to_send(0.0)
    return server


def test_relay_goes_to_the_target_as_registered_and_is_smaller() -> None:
    server = both_registered()
    payload = handoff(KEY, counter=5)
    request = relay(PUB, OTHER_PUB, payload)
    refused, out = receive(server, request, A2, port=4731)
    assert refused is None and len(out) == 1
    fwd = decode(out[0].data)
    assert fwd.type is T.RELAYED and fwd.payload == payload and fwd.origin == (A(A2), 4731)
    assert (out[0].dst, out[0].dst_port) == (A(B1), 4731)
    assert len(out[0].data) < len(request)
    assert server.counters.relayed == 1


@pytest.mark.parametrize(
    ("sender", "target", "payload", "reason"),
    [
        (PUB, PUB[::-1], handoff(KEY, 5), Refused.UNKNOWN_TARGET),
        (PUB[::-1], OTHER_PUB, handoff(KEY, 5), Refused.UNKNOWN_SENDER),
        (PUB, OTHER_PUB, handoff(OTHER, 5), Refused.BAD_SIGNATURE),  # another's message
        (PUB, OTHER_PUB, register(KEY, A1, 9), Refused.NOT_RELAYABLE),
        (PUB, OTHER_PUB, b"\x01\x02\x03", Refused.MALFORMED),
    ],
)
def test_relay_refuses_what_a_registered_host_did_not_sign_for_a_registered_one(
    sender: bytes, target: bytes, payload: bytes, reason: Refused
) -> None:
    server = both_registered()
    refused, out = receive(server, relay(sender, target, payload), A2)
    assert refused is reason and out == []


# == engines with a rendezvous point, in the simulated network ======================


class RendezvousHost:
    """The server as a host of the simulated network (which knows no ports: every
    datagram comes from the IHMP port)."""

    def __init__(self, addr: str, config: ServerConfig | None = None) -> None:
        self.name = "RV"
        self.addr = A(addr)
        self.server = RendezvousServer(config)
        self.engine = self  # what the network calls
        self.tamper: list[bytes] = []  # payloads it forwarded, for the hostile tests

    def receive_datagram(self, data: bytes, src: IPAddress, dst: IPAddress, now: float) -> None:
        self.server.receive_datagram(data, src, DEFAULT_PORT, dst, now)

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out = self.server.datagrams_to_send(now)
        for d in out:
            msg = decode(d.data)
            if msg.type is T.RELAYED and msg.payload is not None:
                self.tamper.append(msg.payload)
        return out

    def current_addresses(self) -> list[IPAddress]:
        return [self.addr]

    def next_timer(self) -> float | None:
        return self.server.get_timer()

    def handle_timer(self, now: float) -> None:
        self.server.handle_timer(now)

    def drain_events(self) -> None:
        pass


POINT = RendezvousPoint.parse(RV)
FAST = EngineConfig(exchange_deadline=10.0, path_loss_grace=5.0)


def hosts(net: Net, rendezvous: bool = True) -> tuple[Host, Host, RendezvousHost]:
    points = [POINT] if rendezvous else []
    rv = RendezvousHost(RV)
    net.hosts.append(rv)  # type: ignore[arg-type]
    a = net.add(Host("A", [A1 + "/24"], seed=1, config=FAST, rendezvous=points))
    b = net.add(Host("B", [B1 + "/24"], seed=2, config=FAST, rendezvous=points))
    a.connect(B1, net.now)
    net.run(1)
    return a, b, rv


def test_hosts_register_at_start_and_after_every_move() -> None:
    net = Net()
    a, _b, rv = hosts(net)
    assert {h["address"] for h in rv.server.registered(net.now)} == {A1, B1}
    assert [r["registered"] for r in a.engine.rendezvous_status(net.now)] == [True]
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface(A2 + "/24"), net.now)
    net.run(1)
    assert {h["address"] for h in rv.server.registered(net.now)} == {A2, B1}
    [status] = a.engine.rendezvous_status(net.now)
    assert status["server"] == RV and status["registered"] and status["observed_as"] == A2


def test_registrations_are_renewed_before_they_run_out() -> None:
    net = Net()
    a, _b, rv = hosts(net)
    net.run(200)  # far beyond the 90 s lifetime
    assert len(rv.server.registered(net.now)) == 2
    assert a.engine.counters.registrations_sent >= 200 // 25


def both_move(net: Net, a: Host, b: Host) -> None:
    """Each loses its address and gets a new one at the same moment."""
    a.engine.handoff(ip_interface(A1 + "/24"), ip_interface(A2 + "/24"), net.now)
    b.engine.handoff(ip_interface(B1 + "/24"), ip_interface(B2 + "/24"), net.now)


def test_both_ends_move_at_once_and_meet_through_the_rendezvous_point() -> None:
    net = Net()
    a, b, rv = hosts(net)
    t0 = net.now
    both_move(net, a, b)
    net.run(5)
    assert a.entry_for(B2).locator == A(B2) and b.entry_for(A2).locator == A(A2)
    assert A(B1) not in a.entry_for(B2).addresses() and A(A1) not in b.entry_for(A2).addresses()
    assert_symmetric(a, A2, b, B2)
    assert not a.events_of(ev.PeerLost) and not b.events_of(ev.PeerLost)
    assert a.engine.counters.relays_sent >= 1 and b.engine.counters.relayed_received >= 1
    # Only address events were relayed; everything else went directly.
    assert {decode(p).type for p in rv.tamper} <= {T.HANDOFF}
    done = [e for e in a.events_of(ev.ExchangeCompleted) if e.type is T.HANDOFF]
    assert done and max(e.rtt for e in done) < 2.0, "resumed within the first retransmissions"
    assert net.now - t0 == 5


def test_both_ends_move_at_once_without_one_the_peer_is_lost() -> None:
    net = Net()
    a, b, _ = hosts(net, rendezvous=False)
    hid = a.entry_for(B1).hid
    both_move(net, a, b)
    net.run(FAST.exchange_deadline + FAST.path_loss_grace + 5)
    assert hid not in a.table
    assert [e.hid for e in a.events_of(ev.PeerLost)] == [hid]


def test_a_relayed_message_is_answered_directly() -> None:
    net = Net()
    a, b, rv = hosts(net)
    t0 = net.now
    both_move(net, a, b)
    net.run(5)
    for sent in net.log:
        if sent.at >= t0 and sent.datagram.src == rv.addr:
            assert decode(sent.datagram.data).type in (T.RELAYED, T.ACK)
    to_rv = [decode(s.datagram.data).type for s in net.log if s.datagram.dst == rv.addr]
    assert set(to_rv) <= {T.REGISTER, T.RELAY}


def forwarded(rv: RendezvousHost, data: bytes, dst: IPAddress) -> bytes:
    """A RELAYED as ``rv`` would send it to ``dst``, with ``data`` as its payload."""
    msg = Message(type=T.RELAYED, seq=0, host_id=rv.addr, origin=(A(A2), 4731), payload=data)
    return encode(msg)


def test_a_hostile_rendezvous_point_can_neither_tamper_nor_replay() -> None:
    net = Net()
    a, b, rv = hosts(net)
    both_move(net, a, b)
    net.run(5)
    before = b.table.snapshot()
    payload = next(p for p in rv.tamper if decode(p).host_id == A(A1))
    # Tampered: another new address for A, the signature left as it was.
    forged = decode(payload)
    tampered = encode(replace(forged, new_addr=A("192.0.2.66"), counter=forged.counter + 99))
    for data in (tampered, payload):
        b.engine.receive_datagram(forwarded(rv, data, A(B2)), rv.addr, A(B2), net.now)
    net.run(1)
    rejected = b.engine.counters.messages_rejected
    assert rejected.get(RejectReason.BAD_SIGNATURE.value) == 1
    assert rejected.get(RejectReason.REPLAY.value) == 1
    assert b.table.snapshot() == before


def test_relayed_messages_from_elsewhere_or_unpinned_hosts_are_refused() -> None:
    net = Net()
    a, b, rv = hosts(net)
    before = b.table.snapshot()
    stranger = Ed25519PrivateKey.generate()
    msg = Message(type=T.HANDOFF, seq=1, host_id=A(A1), counter=10**15, new_addr=A(A2),
                  old_addrs=(A(A1),))  # fmt: skip
    signed_by_a = encode(msg, a.key)
    # Not from our rendezvous point: an ordinary source, RELAYED is no message for it.
    b.engine.receive_datagram(forwarded(rv, signed_by_a, A(B1)), A("192.0.2.66"), A(B1), net.now)
    # From it, but signed by a key nobody pinned for A.
    b.engine.receive_datagram(forwarded(rv, encode(msg, stranger), A(B1)), rv.addr, A(B1), net.now)
    # From it, a message that may not be relayed (a challenge).
    probe = Message(type=T.PATH_PROBE, seq=1, host_id=A(A1), counter=10**15 + 1,
                    src_addr=A(A2), nonce=b"x" * 8)  # fmt: skip
    b.engine.receive_datagram(forwarded(rv, encode(probe, a.key), A(B1)), rv.addr, A(B1), net.now)
    net.run(1)
    assert sum(b.engine.counters.messages_rejected.values()) == 3
    assert b.table.snapshot() == before


def test_the_moving_host_behind_a_filtering_nat_hears_of_its_peers_move() -> None:
    """A is behind a NAT that drops what comes from addresses A never sent to (as
    Linux conntrack does); B moves. B's HANDOFF to the NAT is dropped; the
    rendezvous point, which A keeps a mapping to, forwards it."""
    net = Net()
    nat_public = A("198.51.100.99")
    net.nat[A("10.0.0.5")] = nat_public
    contacted: set[tuple[IPAddress, IPAddress]] = set()  # (NAT inside, remote)

    def filtering(d: Datagram) -> bool:
        if block_private(d.src):
            contacted.add((d.src, d.dst))
            return False
        return d.dst == nat_public and (A("10.0.0.5"), d.src) not in contacted

    net.drop = filtering
    rv = RendezvousHost(RV)
    net.hosts.append(rv)  # type: ignore[arg-type]
    a = net.add(Host("A", ["10.0.0.5/24"], seed=1, config=FAST, rendezvous=[POINT]))
    b = net.add(Host("B", [B1 + "/24"], seed=2, config=FAST, rendezvous=[POINT]))
    a.connect(B1, net.now)
    net.run(1)
    assert b.entry_for(str(nat_public)).locator == nat_public
    b.engine.handoff(ip_interface(B1 + "/24"), ip_interface(B2 + "/24"), net.now)
    net.run(5)
    assert a.entry_for(B2).locator == A(B2)
    assert b.entry_for(str(nat_public)).locator == nat_public
    needs = [e for e in a.events_of(ev.FlowsNeedBinding) if e.local == A("10.0.0.5")]
    assert needs, "A's flows knock towards B's new address, through the NAT"
    assert b.engine.counters.relays_sent >= 1


def block_private(addr: IPAddress) -> bool:
    return addr.is_private and not addr.is_global and str(addr).startswith("10.")


def test_relay_copies_carry_a_fresh_counter_each() -> None:
    net = Net()
    a, b, rv = hosts(net)
    both_move(net, a, b)
    net.run(5)
    counters = [decode(p).counter for p in rv.tamper]
    assert len(counters) >= 2
    assert len(counters) == len(set(counters))


def test_registration_unanswered_is_retried_with_backoff() -> None:
    net = Net()
    a = net.add(Host("A", [A1 + "/24"], seed=1, config=FAST, rendezvous=[POINT]))  # no server
    net.run(FAST.exchange_deadline + 1)
    sent = [s.at for s in net.log if s.datagram.dst == A(RV)]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sent)]
    assert gaps[:3] == [FAST.initial_rto, FAST.initial_rto * 2, FAST.max_rto]
    assert a.engine.rendezvous_status(net.now)[0]["registered"] is False


def test_a_lying_origin_is_never_taken_for_the_peer_or_its_nat() -> None:
    """A rendezvous point names its own address as a relayed message's origin. Taken
    as a NAT in front of the peer, a challenge there could be passed on to the peer
    and its answer passed back: the liar's address would be verified. The origin is
    only where answers go; the address the message itself names is challenged."""
    net = Net()
    a, b, rv = hosts(net)
    liar = A("192.0.2.66")
    msg = Message(type=T.HANDOFF, seq=a.engine._peers[a.entry_for(B1).hid].seq, host_id=A(A1),
                  counter=10**15, new_addr=A(A2), old_addrs=(A(A1),))  # fmt: skip
    data = Message(type=T.RELAYED, seq=0, host_id=rv.addr, origin=(liar, 4731),
                   payload=encode(msg, a.key))  # fmt: skip
    b.engine.receive_datagram(encode(data), rv.addr, A(B1), net.now)
    out = b.engine.datagrams_to_send(net.now)
    assert [d.dst for d in out if decode(d.data).type is T.PATH_PROBE] == [A(A2)]
    assert all(d.dst != liar for d in out)
    entry = b.table.get(a.entry_for(B1).hid)
    assert liar not in entry.addresses() and liar not in entry.nat


def test_a_registration_that_cannot_leave_yet_is_retried_at_once() -> None:
    net = Net()
    a = net.add(Host("A", [A1 + "/24"], seed=1, config=FAST, rendezvous=[POINT]))
    a.engine.handle_timer(0.0)
    [first] = a.engine.datagrams_to_send(0.0)
    a.engine.send_failed(first.src, first.dst, 0.0)  # no route yet
    assert a.engine.get_timer() == pytest.approx(0.01)
    a.engine.handle_timer(0.01)
    [again] = a.engine.datagrams_to_send(0.01)
    assert decode(again.data).seq == decode(first.data).seq  # the same registration
    assert a.engine.get_timer() == pytest.approx(0.01 + FAST.initial_rto)
