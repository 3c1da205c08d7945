"""Tests for stacktrans.adopt: listing the flows that exist at start-up.

The real test opens sockets of every kind in one namespace of a pair, waits until each
TCP socket is in the state wanted, and runs existing_flows() in a subprocess inside
that namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from stacktrans.adopt import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Flow,
    diag_flow,
    existing_flows,
    proc_address,
)
from testbed.netns import Namespace, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)

# == the decision on one sock_diag message =============================================


def diag(
    state: int, src: str, sport: int, dst: str, dport: int, family: int = 2
) -> dict[str, object]:
    return {
        "header": {"error": None},
        "idiag_family": family,
        "idiag_state": state,
        "idiag_src": src,
        "idiag_sport": sport,
        "idiag_dst": dst,
        "idiag_dport": dport,
    }


def test_flow_from_message() -> None:
    tcp = IPPROTO_TCP
    assert diag_flow(diag(1, "192.0.2.1", 1000, "198.51.100.1", 80), tcp) == Flow(
        tcp, IPv4Address("192.0.2.1"), 1000, IPv4Address("198.51.100.1"), 80
    )
    mapped = diag_flow(diag(1, "::ffff:192.0.2.1", 1000, "::ffff:198.51.100.1", 80, 10), tcp)
    assert mapped is not None and mapped.local == IPv4Address("192.0.2.1")
    assert mapped.remote == IPv4Address("198.51.100.1")
    v6 = diag_flow(diag(8, "2001:db8::1", 1000, "2001:db8::2", 80, 10), tcp)  # CLOSE_WAIT
    assert v6 is not None and v6.remote == IPv6Address("2001:db8::2")
    for state in (6, 7, 10):  # TIME_WAIT, CLOSE, LISTEN
        assert diag_flow(diag(state, "192.0.2.1", 1000, "198.51.100.1", 80), tcp) is None
    assert diag_flow(diag(1, "127.0.0.1", 1000, "127.0.0.1", 80), tcp) is None
    assert diag_flow(diag(1, "192.0.2.1", 1000, "127.0.0.1", 80), tcp) is None
    assert diag_flow(diag(1, "::1", 1000, "::1", 80, 10), tcp) is None
    assert diag_flow(diag(1, "::ffff:127.0.0.1", 1000, "::ffff:192.0.2.9", 80, 10), tcp) is None


def test_udp_needs_a_remote_end() -> None:
    udp = IPPROTO_UDP
    assert diag_flow(diag(7, "0.0.0.0", 53, "0.0.0.0", 0), udp) is None
    assert diag_flow(diag(7, "192.0.2.1", 53, "0.0.0.0", 0), udp) is None
    assert diag_flow(diag(1, "192.0.2.1", 5000, "198.51.100.1", 0), udp) is None
    assert diag_flow(diag(1, "::", 5000, "::", 0, 10), udp) is None
    flow = diag_flow(diag(1, "192.0.2.1", 5000, "198.51.100.1", 53), udp)
    assert flow == Flow(udp, IPv4Address("192.0.2.1"), 5000, IPv4Address("198.51.100.1"), 53)


def test_odd_messages_raise_for_the_caller_to_skip() -> None:
    with pytest.raises(ValueError):
        diag_flow({**diag(1, "192.0.2.1", 1, "192.0.2.2", 2), "header": {"error": OSError()}}, 6)
    with pytest.raises(ValueError):
        diag_flow(diag(1, "192.0.2.1", 1, "192.0.2.2", 2, family=1), 6)
    with pytest.raises(KeyError):
        diag_flow({"idiag_family": 2}, 6)


def testproc_address() -> None:
    def word(*octets: int) -> str:
        return f"{int.from_bytes(bytes(octets), sys.byteorder):08X}"

    assert proc_address(word(10, 0, 0, 1)) == IPv4Address("10.0.0.1")
    v6 = IPv6Address("2001:db8::ffff:1")
    text = "".join(word(*v6.packed[i : i + 4]) for i in range(0, 16, 4))
    assert proc_address(text) == v6
    with pytest.raises(ValueError):
        proc_address("0A00")


class EmptyDiag:
    """A sock_diag socket that, like pyroute2 without udp_diag, says nothing for UDP."""

    closed = False

    def bind(self) -> None:
        pass

    def get_sock_stats(self, family: int, protocol: int, states: int) -> tuple[object, ...]:
        if protocol == IPPROTO_UDP:
            return ()
        return (diag(1, "192.0.2.1", 1000, "198.51.100.1", 80, family=2),)

    def close(self) -> None:
        EmptyDiag.closed = True


def test_proc_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    udp = Flow(IPPROTO_UDP, IPv4Address("192.0.2.1"), 53, IPv4Address("198.51.100.1"), 53)
    tcp = Flow(IPPROTO_TCP, IPv4Address("192.0.2.1"), 1000, IPv4Address("198.51.100.1"), 80)
    asked: list[tuple[int, int]] = []

    def fake_proc(family: int, proto: int) -> list[Flow]:
        asked.append((family, proto))
        return [udp] if family == 2 else []

    monkeypatch.setattr("stacktrans.adopt.proc_flows", fake_proc)
    monkeypatch.setattr("stacktrans.adopt.DiagSocket", EmptyDiag)
    assert existing_flows() == [tcp, udp]  # the IPv6 TCP dump repeats the flow: once
    assert asked == [(2, IPPROTO_UDP), (10, IPPROTO_UDP)]
    assert EmptyDiag.closed

    def broken() -> None:
        raise OSError("no sock_diag")

    monkeypatch.setattr("stacktrans.adopt.DiagSocket", broken)
    asked.clear()
    assert existing_flows() == [udp]
    assert len(asked) == 4


# == the real thing ====================================================================

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PEER_SCRIPT = r"""
import socket, threading

def keep(conn):
    # Hold the connection until the other end closes, then close too.
    while conn.recv(4096):
        pass
    conn.close()

def serve(family, port, handler):
    lsock = socket.socket(family)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    lsock.listen(16)
    def loop():
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

serve(socket.AF_INET, 5000, keep)
serve(socket.AF_INET6, 5001, keep)  # dual-stack: takes IPv4-mapped connections too
serve(socket.AF_INET, 5009, lambda conn: conn.close())  # leaves the client in CLOSE_WAIT
print("ready", flush=True)
threading.Event().wait()
"""

HOST_SCRIPT = r"""
import json, socket, threading

def ends(sock):
    local, remote = sock.getsockname(), sock.getpeername()
    return [local[0], local[1], remote[0], remote[1]]

out = {}
tcp4 = socket.create_connection(("10.0.0.2", 5000))
out["tcp4"] = ends(tcp4)
tcp6 = socket.create_connection(("2001:db8::2", 5001))
out["tcp6"] = ends(tcp6)
mapped = socket.socket(socket.AF_INET6)
mapped.connect(("::ffff:10.0.0.2", 5001))
out["mapped"] = ends(mapped)
udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp4.bind(("10.0.0.1", 6000))
udp4.connect(("10.0.0.2", 6001))
out["udp4"] = ends(udp4)
udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp6.connect(("2001:db8::2", 6003))
out["udp6"] = ends(udp6)

# CLOSE_WAIT: the peer closed at once; EOF means its FIN arrived.
close_wait = socket.create_connection(("10.0.0.2", 5009))
assert close_wait.recv(1) == b""
out["close_wait"] = ends(close_wait)

# SYN_SENT: 10.0.0.99 is a static neighbour nobody answers for: the SYN goes out to a
# MAC address nobody has, and is retried for minutes, with no error coming back.
syn_sent = socket.socket()
syn_sent.setblocking(False)
syn_sent.connect_ex(("10.0.0.99", 80))
out["syn_sent"] = [*syn_sent.getsockname(), "10.0.0.99", 80]

# Not flows:
listener = socket.socket()
listener.bind(("10.0.0.1", 5100))
listener.listen()
unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
unconnected.bind(("0.0.0.0", 6100))
unconnected6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
unconnected6.bind(("2001:db8::1", 6101))
lo_listen = socket.socket()
lo_listen.bind(("127.0.0.1", 7000))
lo_listen.listen()
lo_client = socket.create_connection(("127.0.0.1", 7000))
lo_server, _ = lo_listen.accept()
lo_udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
lo_udp.connect(("::1", 7001))
# TIME_WAIT: we send FIN first; EOF means the peer's FIN arrived, so we are in TIME_WAIT.
time_wait = socket.create_connection(("10.0.0.2", 5000))
tw = ends(time_wait)
time_wait.shutdown(socket.SHUT_WR)
assert time_wait.recv(1) == b""
time_wait.close()
out["not"] = [
    ["10.0.0.1", 5100], ["0.0.0.0", 6100], ["2001:db8::1", 6101], ["127.0.0.1", 7000],
    lo_client.getsockname()[:2], ["::1", lo_udp.getsockname()[1]], tw[:2],
]
print(json.dumps(out), flush=True)
threading.Event().wait()
"""

ADOPT_SCRIPT = r"""
import asyncio, json

import socket
from stacktrans.adopt import IPPROTO_TCP, IPPROTO_UDP, existing_flows, proc_flows

def dump(flows):
    return [[f.proto, str(f.local), f.lport, str(f.remote), f.rport] for f in flows]

flows = existing_flows()
# The way the daemon calls it: from a thread, with an event loop running.
assert asyncio.run(asyncio.to_thread(existing_flows)) == flows
# The /proc fallback, read in full, for comparison.
proc = [
    f
    for family in (socket.AF_INET, socket.AF_INET6)
    for proto in (IPPROTO_TCP, IPPROTO_UDP)
    for f in proc_flows(family, proto)
]
print(json.dumps({"diag": dump(flows), "proc": dump(proc)}))
"""


def flows_in(ns: Namespace) -> set[tuple[int, str, int, str, int]]:
    """existing_flows() in ``ns``, checked against the /proc fallback."""
    out = json.loads(ns.run(sys.executable, "-c", ADOPT_SCRIPT, timeout=30))
    diag = [tuple(f) for f in out["diag"]]
    assert len(set(diag)) == len(diag)  # no duplicates
    assert set(diag) == {tuple(f) for f in out["proc"]}
    return {(p, ip_s, lp, ip_r, rp) for p, ip_s, lp, ip_r, rp in diag}


def start(ns: Namespace, script: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = ns.popen(sys.executable, "-c", script, stdout=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None
    # Bounded by the test timeout; each script prints one line or dies.
    line = proc.stdout.readline().decode()
    assert line, f"{script[:40]!r} died: exit {proc.wait(timeout=10)}"
    return proc, line


@pytest.fixture
def pair() -> Iterator[tuple[Namespace, Namespace]]:
    with topology("adopt") as topo:
        a, b = topo.add_ns("a"), topo.add_ns("b")
        topo.link(a, "eth0", b, "eth0")
        a.addr_add("eth0", "10.0.0.1/24")
        b.addr_add("eth0", "10.0.0.2/24")
        a.addr_add("eth0", "2001:db8::1/64")
        b.addr_add("eth0", "2001:db8::2/64")
        a.ip("neigh", "add", "10.0.0.99", "lladdr", "02:00:5e:00:53:99", "dev", "eth0")
        yield a, b


@pytest.mark.netns
@needs_root
@pytest.mark.timeout(60)
def test_existing_flows_in_namespace(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    procs = []
    try:
        peer, _ = start(b, PEER_SCRIPT)
        procs.append(peer)
        host, line = start(a, HOST_SCRIPT)
        procs.append(host)
        opened = json.loads(line)

        flows = flows_in(a)

        def tcp(key: str) -> tuple[int, str, int, str, int]:
            la, lp, ra, rp = opened[key][:4]
            return (IPPROTO_TCP, la, lp, ra, rp)

        def udp(key: str) -> tuple[int, str, int, str, int]:
            la, lp, ra, rp = opened[key][:4]
            return (IPPROTO_UDP, la, lp, ra, rp)

        expected = {
            tcp("tcp4"),
            tcp("tcp6"),
            tcp("close_wait"),
            tcp("syn_sent"),
            udp("udp4"),
            udp("udp6"),
        }
        # The IPv4-mapped connection of an IPv6 socket is an IPv4 flow.
        _, lport, _, rport = opened["mapped"][:4]
        expected.add((IPPROTO_TCP, "10.0.0.1", lport, "10.0.0.2", rport))
        assert expected <= flows
        for local in opened["not"]:
            assert not [f for f in flows if (f[1], f[2]) == tuple(local)], local
        # Nothing else: every flow of the namespace is one we opened.
        assert flows == expected

        # The other end sees the same TCP connections, reversed (plus the mapped one,
        # which it accepted on its dual-stack socket, and no UDP: it never connected).
        peer_flows = flows_in(b)
        for proto, la, lp, ra, rp in expected:
            if proto == IPPROTO_TCP and ra != "10.0.0.99" and lp != opened["close_wait"][1]:
                assert (proto, ra, rp, la, lp) in peer_flows
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
