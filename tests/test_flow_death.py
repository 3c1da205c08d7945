"""Flow death as the kernel announces it: parsing destroy messages (crafted bytes, as
the kernel lays them out), the suspects an event makes and how a lookup settles
them, and the Dataplane dropping what ended. The real kernel's events are exercised
by tests/test_flow_death_netns.py.
"""

from __future__ import annotations

import socket
import struct
from ipaddress import ip_address

import pytest

from stacktrans.flow_death import (
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    INET_DIAG_PROTOCOL,
    IPCTNL_MSG_CT_DELETE,
    TIME_WAIT_S,
    Death,
    DeathWatch,
    Fate,
    Suspects,
    _fate,
    parse_conntrack_destroy,
    parse_socket_destroy,
)
from stacktrans.kernel_flows import SOCK_DIAG_BY_FAMILY, DiagSocketInfo, TcpState
from stacktrans.netlink import attr, message
from stacktrans.service import DataplaneConfig, StackTrans, _on
from stacktrans.socket_table import TCP, UDP, FlowKey
from tests.test_dataplane import LOCAL, PEER, make

A = ip_address
NESTED = 0x8000  # NLA_F_NESTED, as the kernel sets it on tuples


def diag_msg(family: int, state: int, src: str, sport: int, dst: str, dport: int,
             protocol: int | None) -> bytes:  # fmt: skip
    """An inet_diag_msg as a destroy group carries it (tcp_info left out)."""
    head = struct.pack(
        "=BBBBHH16s16s",
        family,
        state,
        0,
        0,
        socket.htons(sport),
        socket.htons(dport),
        A(src).packed.ljust(16, b"\0"),
        A(dst).packed.ljust(16, b"\0"),
    )
    body = head + bytes(72 - len(head))
    if protocol is not None:
        body += attr(INET_DIAG_PROTOCOL, bytes([protocol]))
    return body


def ct_msg(proto: int, src: str, sport: int | None, dst: str, dport: int) -> bytes:
    """A conntrack destroy event's payload: nfgenmsg, then the original tuple."""
    v6 = ":" in src
    ip = attr((CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC), A(src).packed) + attr(
        (CTA_IP_V6_DST if v6 else CTA_IP_V4_DST), A(dst).packed
    )
    ports = attr(CTA_PROTO_NUM, bytes([proto]))
    if sport is not None:
        ports += attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
    ports += attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    tup = attr(CTA_TUPLE_IP | NESTED, ip) + attr(CTA_TUPLE_PROTO | NESTED, ports)
    return struct.pack("!BBH", 10 if v6 else 2, 0, 0) + attr(CTA_TUPLE_ORIG | NESTED, tup)


# == parsing ==============================================================================


def test_a_tcp_socket_destroyed() -> None:
    d = parse_socket_destroy(diag_msg(2, 7, "192.0.2.1", 40000, "198.51.100.2", 80, TCP))
    assert d == Death(TCP, A("192.0.2.1"), 40000, A("198.51.100.2"), 80)
    assert d.connected and d.key() == FlowKey(TCP, A("192.0.2.1"), 40000, A("198.51.100.2"), 80)


def test_an_ipv6_socket_with_mapped_addresses_names_the_ipv4_flow() -> None:
    msg = diag_msg(10, 1, "::ffff:192.0.2.1", 5000, "::ffff:198.51.100.2", 53, UDP)
    assert parse_socket_destroy(msg) == Death(UDP, A("192.0.2.1"), 5000, A("198.51.100.2"), 53)


def test_an_unconnected_udp_socket_names_only_its_port() -> None:
    d = parse_socket_destroy(diag_msg(10, 7, "::", 7777, "::", 0, UDP))
    assert d is not None and not d.connected and d.lport == 7777


def test_a_reset_tcp_socket_has_lost_its_remote_port() -> None:
    """What the kernel sends for a socket closed with SO_LINGER 0 (seen in a netns)."""
    d = parse_socket_destroy(diag_msg(2, 7, "192.0.2.1", 40000, "198.51.100.2", 0, TCP))
    assert d is not None and not d.connected and d.remote == A("198.51.100.2")


def test_other_protocols_are_no_death_of_ours() -> None:
    assert parse_socket_destroy(diag_msg(2, 7, "192.0.2.1", 1, "198.51.100.2", 2, 132)) is None


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x02" * 40,  # shorter than an inet_diag_msg
        diag_msg(2, 7, "192.0.2.1", 1, "198.51.100.2", 2, None),  # no protocol attribute
        diag_msg(2, 7, "192.0.2.1", 1, "198.51.100.2", 2, TCP).replace(b"\x02", b"\x07", 1),
    ],
    ids=["empty", "short", "no-protocol", "bad-family"],
)
def test_a_malformed_socket_message_is_an_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_socket_destroy(payload)


def test_a_udp_conntrack_entry_forgotten() -> None:
    d = parse_conntrack_destroy(ct_msg(UDP, "198.51.100.2", 53, "192.0.2.1", 5000))
    assert d == Death(UDP, A("198.51.100.2"), 53, A("192.0.2.1"), 5000, conntrack=True)
    d6 = parse_conntrack_destroy(ct_msg(UDP, "2001:db8::1", 5000, "2001:db8::2", 53))
    assert d6 is not None and d6.local == A("2001:db8::1") and d6.rport == 53


def test_tcp_conntrack_entries_are_left_to_the_sockets() -> None:
    assert parse_conntrack_destroy(ct_msg(TCP, "198.51.100.2", 80, "192.0.2.1", 40000)) is None


@pytest.mark.parametrize(
    "payload",
    [
        b"\x02\x00",
        struct.pack("!BBH", 2, 0, 0),  # no tuple
        ct_msg(UDP, "198.51.100.2", None, "192.0.2.1", 5000),  # no source port
        ct_msg(UDP, "198.51.100.2", 53, "192.0.2.1", 5000)[:-6],  # cut short
    ],
    ids=["short", "no-tuple", "no-port", "truncated"],
)
def test_a_malformed_conntrack_event_is_an_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_conntrack_destroy(payload)


def test_the_watch_counts_what_it_cannot_parse_and_goes_on() -> None:
    heard: list[Death] = []
    watch = DeathWatch(heard.append, lambda: None)
    good = diag_msg(2, 7, "192.0.2.1", 40000, "198.51.100.2", 80, TCP)
    data = b"".join(
        [
            message(SOCK_DIAG_BY_FAMILY, 0, 0, b"\x02" * 12),  # malformed
            message(SOCK_DIAG_BY_FAMILY, 0, 0, good),
            message(99, 0, 0, b"whatever"),  # not a destroy message: ignored
        ]
    )
    watch.feed(data + b"\x10\x00", parse_socket_destroy)  # a truncated tail ends the walk
    assert [d.lport for d in heard] == [40000]
    assert (watch.events, watch.malformed) == (1, 1)

    def broken(death: Death) -> None:
        raise RuntimeError("handler bug")

    watch.on_death = broken
    watch.feed(message(IPCTNL_MSG_CT_DELETE, 0, 0, good), parse_socket_destroy)
    assert watch.malformed == 2  # a failing handler never takes the reader down


# == suspects =============================================================================

K = FlowKey(TCP, LOCAL, 40000, PEER, 80)
U = FlowKey(UDP, LOCAL, 5000, PEER, 53)


def test_a_suspect_whose_socket_is_gone_has_ended() -> None:
    s = Suspects()
    s.add([K, U], now=1.0)
    taken = s.take(now=1.0)
    assert s.settle(taken, {K: Fate.GONE, U: Fate.CONNECTED}, now=1.1) == {K: None}
    assert len(s) == 0


def test_a_udp_flow_a_server_socket_serves_ends_with_its_conntrack_entry_only() -> None:
    s = Suspects()
    s.add([U], now=1.0)  # another socket on its port closed: the server is still there
    assert s.settle(s.take(2.0), {U: Fate.BOUND}, now=2.0) == {}
    s.add([U], now=3.0, conntrack=True)  # conntrack forgot it: idle past its timeout
    assert s.settle(s.take(3.0), {U: Fate.BOUND}, now=3.0) == {U: 3.0}


def test_a_flow_in_time_wait_is_looked_up_again_once_it_is_over() -> None:
    s = Suspects()
    s.add([K], now=1.0)
    assert s.settle(s.take(1.0), {K: Fate.LINGERING}, now=1.0) == {}
    assert s.next_due() == pytest.approx(1.0 + TIME_WAIT_S + 1.0)
    assert s.take(now=30.0) == {}
    assert s.settle(s.take(now=70.0), {K: Fate.GONE}, now=70.0) == {K: None}


def test_a_suspect_the_kernel_cannot_be_asked_about_is_left_to_the_sweep() -> None:
    s = Suspects()
    s.add([U], now=1.0, conntrack=True)
    assert s.settle(s.take(1.0), {}, now=1.0) == {}  # the lookup failed: no fate
    assert len(s) == 0


def info(state: int, local: str, lport: int, remote: str, rport: int) -> DiagSocketInfo:
    return DiagSocketInfo(2, state, A(local), lport, A(remote), rport)


def test_what_a_lookup_found_decides_the_fate() -> None:
    est = info(TcpState.ESTABLISHED, "192.0.2.1", 40000, "198.51.100.2", 80)
    tw = info(TcpState.TIME_WAIT, "192.0.2.1", 40000, "198.51.100.2", 80)
    listener = info(TcpState.LISTEN, "192.0.2.1", 40000, "0.0.0.0", 0)
    assert _fate(K, None, True) is Fate.GONE
    assert _fate(K, est, True) is Fate.CONNECTED  # a new socket: its own end will come
    assert _fate(K, tw, True) is Fate.LINGERING
    assert _fate(K, listener, True) is Fate.GONE
    connected = info(TcpState.ESTABLISHED, "192.0.2.1", 5000, "198.51.100.2", 53)
    server = info(TcpState.CLOSE, "0.0.0.0", 5000, "0.0.0.0", 0)
    assert _fate(U, connected, True) is Fate.CONNECTED
    assert _fate(U, server, True) is Fate.BOUND
    assert _fate(U, None, False) is Fate.UNKNOWN  # no udp_diag: every lookup says ENOENT


def test_a_death_that_names_no_flow_matches_by_port_and_known_ends() -> None:
    server = Death(UDP, A("0.0.0.0"), 5000, A("0.0.0.0"), 0)
    reset = Death(TCP, LOCAL, 40000, PEER, 0)
    assert _on(server, U) and not _on(server, FlowKey(UDP, LOCAL, 5001, PEER, 53))
    assert _on(reset, K) and not _on(reset, FlowKey(TCP, LOCAL, 40000, A("203.0.113.9"), 80))
    assert not _on(reset, U)


# == the Dataplane ========================================================================


def test_ended_flows_leave_the_table_and_the_kernel_sets() -> None:
    tr, _, nft, _ = make(2)
    nft.batches.clear()
    assert tr.tracks(K) and not tr.tracks(FlowKey(TCP, LOCAL, 1, PEER, 80))
    gone = tr.flows_ended([K, FlowKey(TCP, LOCAL, 1, PEER, 80)], taken_at=1.0)
    assert [e.key for e in gone] == [K]
    assert not tr.tracks(K) and len(tr.sockets) == 1
    tr.kernel.flush()  # type: ignore[attr-defined]
    assert any("delete element" in b and "40000" in b for b in nft.batches)


def test_a_flow_first_seen_after_the_lookup_began_is_kept() -> None:
    """A new socket with the same key: the lookup (begun earlier) spoke of the old one."""
    tr, _, _, _ = make(0)
    tr.flow_seen(K, now=5.0)
    assert tr.flows_ended([K], taken_at=4.0) == []
    assert tr.tracks(K)


def test_flows_on_ports_and_idle_udp() -> None:
    tr, _, _, _ = make(2)
    tr.flow_seen(U, now=0.0)
    assert set(tr.flows_on({(UDP, 5000), (TCP, 40001)})) == {
        U,
        FlowKey(TCP, LOCAL, 40001, PEER, 80),
    }
    assert tr.expire_idle(now=100.0, udp_idle=120.0) == []
    assert [e.key for e in tr.expire_idle(now=121.0, udp_idle=120.0)] == [U]
    assert len(tr.sockets) == 2  # TCP flows have no idle timeout


def test_flows_a_sweep_missed_once_are_looked_up_on_their_own() -> None:
    """Where deaths are announced the next full sweep is minutes away: a flow the
    snapshot lacked (its destroy event lost, say) is a suspect at once, which an
    exact lookup settles; without destroy events the next sweep, seconds away, does."""
    for announced in (False, True):
        tr, _, _, _ = make(2)
        tr.take_effects()
        one, other = sorted((e.key for e in tr.sockets), key=lambda k: k.lport)
        service = StackTrans(DataplaneConfig(), clock=lambda: 5.0, hid_for=lambda *a: None)
        service.dataplane = tr
        if announced:
            service.deaths = DeathWatch(lambda death: None, lambda: None)
        service._swept({one}, taken_at=4.0)
        assert tr.missing_once == {other}
        assert {e.key for e in tr.sockets} == {one, other}  # one snapshot decides nothing
        assert service.suspects.take(5.0) == ({other: None} if announced else {})


def test_ends_lookups_find_after_a_sweep_are_counted_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    tr, _, _, _ = make(2)
    tr.take_effects()
    one, other = sorted((e.key for e in tr.sockets), key=lambda k: k.lport)
    service = StackTrans(DataplaneConfig(), clock=lambda: 5.0, hid_for=lambda *a: None)
    service.dataplane = tr
    service.deaths = DeathWatch(lambda death: None, lambda: None)
    monkeypatch.setattr(service, "schedule_reconcile", lambda: None)  # no kernel here
    service._swept({one}, taken_at=4.0)  # other: missed once, looked up
    service._flows_ended({one: None, other: None}, taken_at=5.0)  # both found ended
    assert (service.ended_after_sweeps, service.ended_by_events) == (1, 1)
    assert len(tr.sockets) == 0
