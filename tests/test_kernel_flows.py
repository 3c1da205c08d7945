"""Tests for stacktrans.kernel_flows: the kernel's sockets and conntrack, listed.

Unit tests parse sock_diag messages, ``struct tcp_info``, /proc addresses and
nf_conntrack lines, and check the /proc fallbacks. The real-kernel tests run in
network namespaces: adoption (every kind of socket, in every state wanted, against
the /proc fallback), ``tcp_progress`` by exact lookups (a chosen subset of TCP
sockets, IPv4, IPv6 and IPv4-mapped, against ``ss -ti``; sockets that do not exist
or are no flow give nothing) and the sweep's liveness snapshot (conntrack included).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from ihmp.addr import unmap
from stacktrans.kernel_flows import (
    DiagError,
    DiagSocketInfo,
    Flow,
    SockDiag,
    TcpProgress,
    conntrack_line,
    existing_flows,
    kernel_sockets,
    parse_diag_msg,
    parse_tcp_info,
    proc_address,
)
from stacktrans.socket_table import TCP, UDP, FlowKey
from testbed.netns import Namespace, topology
from tests.netns_util import py, read_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
A = ip_address

# == the decision on one sock_diag message =============================================


def diag(
    state: int, src: str, sport: int, dst: str, dport: int, family: int = 2, attrs: bytes = b""
) -> bytes:
    """An ``inet_diag_msg`` as the kernel sends it (after the netlink header)."""
    head = struct.pack("=BBBB", family, state, 0, 0)
    sockid = struct.pack("!HH16s16s", sport, dport, A(src).packed, A(dst).packed)
    return head + sockid + bytes(72 - len(head) - len(sockid)) + attrs


def diag_flow(msg: bytes, proto: int) -> Flow | None:
    return parse_diag_msg(msg).flow(proto)


def test_flow_from_message() -> None:
    tcp = TCP
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
    udp = UDP
    assert diag_flow(diag(7, "0.0.0.0", 53, "0.0.0.0", 0), udp) is None
    assert diag_flow(diag(7, "192.0.2.1", 53, "0.0.0.0", 0), udp) is None
    assert diag_flow(diag(1, "192.0.2.1", 5000, "198.51.100.1", 0), udp) is None
    assert diag_flow(diag(1, "::", 5000, "::", 0, 10), udp) is None
    flow = diag_flow(diag(1, "192.0.2.1", 5000, "198.51.100.1", 53), udp)
    assert flow == Flow(udp, IPv4Address("192.0.2.1"), 5000, IPv4Address("198.51.100.1"), 53)


def test_odd_messages_raise_for_the_caller_to_skip() -> None:
    with pytest.raises(ValueError):
        diag_flow(diag(1, "192.0.2.1", 1, "192.0.2.2", 2, family=1), 6)
    with pytest.raises(ValueError):
        diag_flow(diag(1, "192.0.2.1", 1, "192.0.2.2", 2)[:40], 6)  # truncated


def test_a_refused_dump_is_an_error() -> None:
    # The kernel answers a dump it cannot give (no diag module for the protocol) with
    # an error message, where pyroute2 gave an empty list. Protocol 253 (RFC 3692,
    # experiments): no kernel has its module (255, raw sockets, is raw_diag's, which
    # Debian's kernel loads on demand).
    with SockDiag() as sd, pytest.raises(DiagError):
        sd.dump(socket.AF_INET, 253)


def tcp_info(size: int = 232) -> bytes:
    """A ``struct tcp_info`` with the fields of TcpProgress set, cut to ``size`` bytes."""
    raw = bytearray(232)
    raw[2], raw[4] = 3, 5  # retransmits, backoff
    raw[5] = 0x07  # options: timestamps, SACK, window scaling
    raw[6] = 0x7A  # snd_wscale:4, rcv_wscale:4 in one byte
    struct.pack_into("=II", raw, 16, 1448, 1460)  # snd_mss, rcv_mss
    struct.pack_into("=I", raw, 24, 17)  # unacked
    struct.pack_into("=I", raw, 60, 1500)  # pmtu
    struct.pack_into("=QQ", raw, 120, 1001, 333)  # bytes_acked, bytes_received
    struct.pack_into("=I", raw, 228, 70656)  # snd_wnd
    return bytes(raw[:size])


SND_WSCALE = 0xA if sys.byteorder == "little" else 0x7  # bit fields fill from the LSB on LE


FULL = TcpProgress(5, 3, 1001, 333, 70656, SND_WSCALE, 17, 1448, 1500, True)


def test_tcp_info_fields_at_the_kernels_offsets() -> None:
    assert parse_tcp_info(tcp_info()) == FULL
    # An older kernel's shorter struct: what it lacks is 0 ("not reported").
    assert parse_tcp_info(tcp_info(228)) == dataclasses.replace(FULL, snd_wnd=0)
    assert parse_tcp_info(tcp_info(104)) == dataclasses.replace(
        FULL, bytes_acked=0, bytes_received=0, snd_wnd=0
    )
    assert parse_tcp_info(tcp_info(60)) == dataclasses.replace(
        FULL, bytes_acked=0, bytes_received=0, snd_wnd=0, pmtu=0
    )


def test_tcp_info_is_found_among_the_attributes() -> None:
    def attr(kind: int, payload: bytes) -> bytes:
        pad = bytes(-len(payload) % 4)
        return struct.pack("=HH", 4 + len(payload), kind) + payload + pad

    msg = diag(1, "192.0.2.1", 1000, "198.51.100.1", 80, attrs=attr(8, b"\1") + attr(2, tcp_info()))
    info = parse_diag_msg(msg, with_tcp_info=True).tcp_info
    assert info == FULL
    assert parse_diag_msg(msg).tcp_info is None  # not asked for
    assert parse_diag_msg(msg[:80], with_tcp_info=True).tcp_info is None  # no INET_DIAG_INFO


def test_proc_address() -> None:
    def word(*octets: int) -> str:
        return f"{int.from_bytes(bytes(octets), sys.byteorder):08X}"

    assert proc_address(word(10, 0, 0, 1)) == IPv4Address("10.0.0.1")
    v6 = IPv6Address("2001:db8::ffff:1")
    text = "".join(word(*v6.packed[i : i + 4]) for i in range(0, 16, 4))
    assert proc_address(text) == v6
    with pytest.raises(ValueError):
        proc_address("0A00")


def socket_info(state: int, src: str, sport: int, dst: str, dport: int) -> DiagSocketInfo:
    return DiagSocketInfo(2, state, A(src), sport, A(dst), dport)


class EmptyDiag:
    """A sock_diag socket that, like a kernel without udp_diag, lists nothing for UDP."""

    closed = False

    def dump(self, family: int, protocol: int, states: int) -> list[DiagSocketInfo]:
        if protocol == UDP:
            return []
        return [socket_info(1, "192.0.2.1", 1000, "198.51.100.1", 80)]

    def close(self) -> None:
        EmptyDiag.closed = True


def test_proc_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    udp = Flow(UDP, IPv4Address("192.0.2.1"), 53, IPv4Address("198.51.100.1"), 53)
    tcp = Flow(TCP, IPv4Address("192.0.2.1"), 1000, IPv4Address("198.51.100.1"), 80)
    asked: list[tuple[int, int]] = []

    def fake_proc(family: int, proto: int) -> list[Flow]:
        asked.append((family, proto))
        return [udp] if family == 2 else []

    monkeypatch.setattr("stacktrans.kernel_flows.proc_flows", fake_proc)
    monkeypatch.setattr("stacktrans.kernel_flows.SockDiag", EmptyDiag)
    assert existing_flows() == [tcp, udp]  # the IPv6 TCP dump repeats the flow: once
    assert asked == [(2, UDP), (10, UDP)]
    assert EmptyDiag.closed

    def broken() -> None:
        raise OSError("no sock_diag")

    monkeypatch.setattr("stacktrans.kernel_flows.SockDiag", broken)
    asked.clear()
    assert existing_flows() == [udp]
    assert len(asked) == 4


def test_the_sweep_reads_proc_where_a_dump_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    flow = Flow(UDP, IPv4Address("192.0.2.1"), 53, IPv4Address("198.51.100.1"), 53)
    bindings = {(IPv4Address("0.0.0.0"), 53)}

    class NoUdpDiag(EmptyDiag):
        def dump(self, family: int, protocol: int, states: int) -> list[DiagSocketInfo]:
            if protocol == UDP:
                raise DiagError(2, "no udp_diag")
            return super().dump(family, protocol, states)

        def __enter__(self) -> NoUdpDiag:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    monkeypatch.setattr("stacktrans.kernel_flows.SockDiag", NoUdpDiag)
    monkeypatch.setattr("stacktrans.kernel_flows.proc_sockets", lambda: {flow})
    monkeypatch.setattr("stacktrans.kernel_flows.udp_bindings", lambda: bindings)
    assert kernel_sockets() == ({flow}, bindings)


# == adoption, on the real kernel ======================================================

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

PEER_SCRIPT = r"""
import socket, threading

def keep(conn):
    # Hold the connection until the other end closes, then close too; echo what
    # arrives (tcp_progress test: bytes both ways).
    while data := conn.recv(65536):
        conn.sendall(data)
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
    lo_client.getsockname()[:2], ["::1", lo_udp.getsockname()[1]],
    tw,  # the whole 4-tuple: another connection may have the same local port
]
print(json.dumps(out), flush=True)
threading.Event().wait()
"""

ADOPT_SCRIPT = r"""
import asyncio, json

import socket
from stacktrans.kernel_flows import existing_flows, proc_flows
from stacktrans.socket_table import TCP, UDP

def dump(flows):
    return [[f.proto, str(f.local), f.lport, str(f.remote), f.rport] for f in flows]

flows = existing_flows()
# The way the daemon calls it: from a thread, with an event loop running.
assert asyncio.run(asyncio.to_thread(existing_flows)) == flows
# The /proc fallback, read in full, for comparison.
proc = [
    f
    for family in (socket.AF_INET, socket.AF_INET6)
    for proto in (TCP, UDP)
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
            return (TCP, la, lp, ra, rp)

        def udp(key: str) -> tuple[int, str, int, str, int]:
            la, lp, ra, rp = opened[key][:4]
            return (UDP, la, lp, ra, rp)

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
        expected.add((TCP, "10.0.0.1", lport, "10.0.0.2", rport))
        assert expected <= flows
        for local in opened["not"]:  # (address, port), or a whole (local, remote)
            assert not [f for f in flows if f[1 : 1 + len(local)] == tuple(local)], local
        # Nothing else: every flow of the namespace is one we opened.
        assert flows == expected

        # The other end sees the same TCP connections, reversed (plus the mapped one,
        # which it accepted on its dual-stack socket, and no UDP: it never connected).
        peer_flows = flows_in(b)
        for proto, la, lp, ra, rp in expected:
            if proto == TCP and ra != "10.0.0.99" and lp != opened["close_wait"][1]:
                assert (proto, ra, rp, la, lp) in peer_flows
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


# == tcp_progress: exact lookups of chosen sockets =====================================

# Runs in namespace "a": opens argv[1] connections to b's PEER_SCRIPT (IPv4, IPv6 and
# IPv4-mapped in turn), connection i sends and gets back 100 * (i + 1) bytes. Prints
# their keys, then answers "progress I J ..." with tcp_progress of those connections
# and of the keys in `absent`, and "absent" with a bare lookup of those alone.
PROGRESS_SCRIPT = r"""
import json, socket, sys
from ipaddress import ip_address
from ihmp.addr import unmap
from stacktrans.kernel_flows import SockDiag, tcp_progress
from stacktrans.socket_table import TCP, UDP, FlowKey

def key(sock, proto=TCP):
    (la, lp), (ra, rp) = sock.getsockname()[:2], sock.getpeername()[:2]
    return FlowKey(proto, unmap(ip_address(la)), lp, unmap(ip_address(ra)), rp)

def dump(k):
    return [k.proto, str(k.local), k.lport, str(k.remote), k.rport]

targets = [
    (socket.AF_INET, "10.0.0.2", 5000),
    (socket.AF_INET6, "2001:db8::2", 5001),
    (socket.AF_INET6, "::ffff:10.0.0.2", 5001),
]
conns = []
for i in range(int(sys.argv[1])):
    family, host, port = targets[i % 3]
    s = socket.socket(family)
    # A small buffer makes our window scale (rcv_wscale) differ from the peer's
    # (snd_wscale), which share a byte of tcp_info.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    n = 100 * (i + 1)
    s.sendall(b"x" * n)
    got = 0
    while got < n:
        got += len(s.recv(65536))
    conns.append(s)
keys = [key(s) for s in conns]

# Keys that name no flow's socket.
listen4 = socket.socket()
listen4.bind(("10.0.0.1", 5100))
listen4.listen()
listen6 = socket.socket(socket.AF_INET6)
listen6.bind(("2001:db8::1", 5101))
listen6.listen()
time_wait = socket.create_connection(("10.0.0.2", 5000))
tw_key = key(time_wait)
time_wait.shutdown(socket.SHUT_WR)
assert time_wait.recv(1) == b""  # the peer's FIN: we are in TIME_WAIT
time_wait.close()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.connect(("10.0.0.2", 9))
A = ip_address
absent = [
    # no connection, but a listener on the local port: the kernel answers with it
    FlowKey(TCP, A("10.0.0.1"), 5100, A("10.0.0.2"), 1234),
    FlowKey(TCP, A("2001:db8::1"), 5101, A("2001:db8::2"), 1234),
    # nothing at all
    FlowKey(TCP, A("10.0.0.1"), 4999, A("10.0.0.2"), 4999),
    FlowKey(TCP, A("2001:db8::1"), 4999, A("2001:db8::2"), 4999),
    tw_key,
    key(udp, UDP),
]
print(json.dumps([dump(k) for k in keys]), flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "absent":
        with SockDiag() as sd:
            print(json.dumps(len(sd.lookup_tcp(absent, with_tcp_info=True))), flush=True)
        continue
    asked = [keys[int(i)] for i in args] + absent
    got = tcp_progress(asked)
    print(json.dumps([[dump(k), [p.backoff, p.retransmits, p.bytes_acked, p.bytes_received,
                                 p.snd_wnd, p.snd_wscale]] for k, p in got.items()]), flush=True)
"""

Key = tuple[int, str, int, str, int]


def ss_tcp_info(ns: Namespace) -> dict[Key, list[int]]:
    """``ss -ti`` of ``ns``: [backoff, bytes_acked, bytes_received, snd_wnd, snd_wscale]
    of each TCP socket (ss leaves a field out when it is 0)."""
    out: dict[Key, list[int]] = {}
    key: Key | None = None
    for line in ns.run("ss", "-tinH").splitlines():
        if not line[:1].isspace():  # "STATE RECV-Q SEND-Q LOCAL PEER"
            local, peer = line.split()[3:5]
            key = (TCP, *_ss_endpoint(local), *_ss_endpoint(peer))
            continue
        fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
        assert key is not None
        out[key] = [
            int(fields.get("backoff", 0)),
            int(fields.get("bytes_acked", 0)),
            int(fields.get("bytes_received", 0)),
            int(fields.get("snd_wnd", 0)),
            int(fields["wscale"].split(",")[0]),
        ]
    return out


def _ss_endpoint(text: str) -> tuple[str, int]:
    addr, port = text.rsplit(":", 1)
    return str(unmap(ip_address(addr.strip("[]")))), int(port)


@pytest.mark.netns
@needs_root
@pytest.mark.timeout(60)
def test_tcp_progress_of_chosen_sockets(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    conns = 40  # more than one batch of lookups (LOOKUP_BATCH)
    peer = probe = None
    try:
        peer, _ = start(b, PEER_SCRIPT)
        probe = py(a, "-c", PROGRESS_SCRIPT, str(conns))
        keys: list[Key] = [tuple(k) for k in json.loads(read_line(probe, 20))]
        assert {ip_address(k[1]).version for k in keys} == {4, 6}

        def ask(line: str) -> object:
            assert probe is not None and probe.stdin is not None
            probe.stdin.write(line.encode() + b"\n")
            probe.stdin.flush()
            return json.loads(read_line(probe, 20))

        # Sockets that do not exist, or are no flow: nothing, and no error.
        assert ask("absent") == 0

        for chosen in (range(0, conns, 2), range(conns)):
            for _ in range(10):  # until no window update lands between the two ss
                before = ss_tcp_info(a)
                got = {tuple(k): p for k, p in ask("progress " + " ".join(map(str, chosen)))}
                if ss_tcp_info(a) == before:
                    break
            assert set(got) == {keys[i] for i in chosen}
            for i in chosen:
                backoff, retransmits, acked, received, snd_wnd, wscale = got[keys[i]]
                assert (acked, received) == (100 * (i + 1) + 1, 100 * (i + 1))  # SYN: +1
                assert (backoff, retransmits) == (0, 0)
                assert [backoff, acked, received, snd_wnd, wscale] == before[keys[i]]
    finally:
        for proc in (probe, peer):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=10)


# == liveness: the sweep's snapshot ====================================================


def test_conntrack_lines_give_the_original_udp_tuple() -> None:
    v4 = (
        "ipv4     2 udp      17 27 src=10.0.0.1 dst=10.0.0.2 sport=5000 dport=53 [UNREPLIED] "
        "src=10.0.0.2 dst=10.0.0.1 sport=53 dport=5000 mark=0 zone=0 use=2"
    )
    v6 = (
        "ipv6     10 udp      17 29 src=2001:db8::1 dst=2001:db8::2 sport=40000 dport=9 "
        "src=2001:db8::2 dst=2001:db8::1 sport=9 dport=40000 mark=0 zone=0 use=2"
    )
    assert conntrack_line(v4) == FlowKey(UDP, A("10.0.0.1"), 5000, A("10.0.0.2"), 53)
    assert conntrack_line(v6) == FlowKey(UDP, A("2001:db8::1"), 40000, A("2001:db8::2"), 9)
    tcp = v4.replace("udp      17", "tcp      6 ESTABLISHED")
    for line in (tcp, "", "ipv4 2 udp 17 27 src=10.0.0.1", "ipv4 2 udp 17 27 " + "x=1 " * 9):
        assert conntrack_line(line) is None


# Runs in namespace "a": opens flows to b, then answers "check" with what a snapshot
# says about each, and "close NAME" by closing one.
SWEEP_PROBE = r"""
import json, socket, sys
from ipaddress import ip_address
from stacktrans.socket_table import TCP, UDP, FlowKey
from stacktrans.kernel_flows import Liveness
b4, b6 = sys.argv[1], sys.argv[2]
socks, keys = {}, {}
def flow(name, fam, kind, dst, port):
    s = socket.socket(fam, kind)
    s.connect((dst, port))
    if kind == socket.SOCK_DGRAM:
        s.send(b"x")
    l, r = s.getsockname(), s.getpeername()
    socks[name] = s
    keys[name] = FlowKey(TCP if kind == socket.SOCK_STREAM else UDP,
                         ip_address(l[0]), l[1], ip_address(r[0]), r[1])
flow("tcp4", socket.AF_INET, socket.SOCK_STREAM, b4, 5000)
flow("tcp6", socket.AF_INET6, socket.SOCK_STREAM, b6, 5000)
flow("udp4", socket.AF_INET, socket.SOCK_DGRAM, b4, 9)
flow("udp6", socket.AF_INET6, socket.SOCK_DGRAM, b6, 9)
# an unconnected socket (a sendto/recvfrom server): its flows live by conntrack
srv = socks["srv4"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind((sys.argv[3], 0))
srv.sendto(b"x", (b4, 9))
keys["srv4"] = FlowKey(UDP, ip_address(sys.argv[3]), srv.getsockname()[1], ip_address(b4), 9)
print("ready", flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "close":  # at once: a TCP socket resets instead of lingering in FIN_WAIT
        s = socks.pop(arg[0])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()
        print("{}", flush=True)
    elif cmd == "finish":  # an orderly close, ours first: we end in TIME_WAIT
        s = socks.pop(arg[0])
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the peer's FIN
        s.close()
        print("{}", flush=True)
    elif cmd == "send":
        socks[arg[0]].sendto(b"x", (b4, 9))
        print("{}", flush=True)
    else:
        live = Liveness()
        print(json.dumps({n: k in live for n, k in keys.items()}
                         | {"ct_versions": sorted(live.ct_versions)}), flush=True)
"""

SWEEP_SERVER = r"""
import socket, sys, threading
def serve(fam, addr):
    s = socket.socket(fam)
    s.bind((addr, 5000))
    s.listen()
    while True:
        c, _ = s.accept()
        threading.Thread(target=lambda c=c: (c.recv(1), c.close()), daemon=True).start()
sinks = []
for fam, addr in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    threading.Thread(target=serve, args=(fam, addr), daemon=True).start()
    sinks.append(socket.socket(fam, socket.SOCK_DGRAM))  # UDP port 9: no ICMP errors
    sinks[-1].bind((addr, 9))
print("listening", flush=True)
sys.stdin.read()
"""


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_a_snapshot_holds_exactly_the_live_flows() -> None:
    with topology("sweep") as topo:
        a, b = topo.add_ns("a"), topo.add_ns("b")
        topo.link(a, "va", b, "vb")
        for ns, dev, n in ((a, "va", 1), (b, "vb", 2)):
            ns.addr_add(dev, f"10.78.0.{n}/24")
            ns.addr_add(dev, f"2001:db8:78::{n}/64")
        # conntrack runs in a namespace once a rule there needs it (as dime's do)
        a.run(
            "nft",
            "add table inet cttest; add chain inet cttest out "
            "{ type filter hook output priority 0; }; add rule inet cttest out ct state new accept",
        )
        server = py(b, "-c", SWEEP_SERVER, "10.78.0.2", "2001:db8:78::2")
        probe = None
        try:
            assert read_line(server, 10) == "listening"
            probe = py(a, "-c", SWEEP_PROBE, "10.78.0.2", "2001:db8:78::2", "10.78.0.1")
            assert read_line(probe, 10) == "ready"

            def ask(line: str) -> dict[str, object]:
                assert probe is not None and probe.stdin is not None
                probe.stdin.write(line.encode() + b"\n")
                probe.stdin.flush()
                return dict(json.loads(read_line(probe, 20)))

            snap = ask("check")
            assert snap == {
                "tcp4": True, "tcp6": True, "udp4": True, "udp6": True, "srv4": True,
                "ct_versions": [4, 6],
            }  # fmt: skip
            for name in ("tcp4", "udp6"):
                ask(f"close {name}")
            snap = ask("check")
            assert snap["tcp4"] is False and snap["udp6"] is False
            assert snap["tcp6"] is True and snap["udp4"] is True
            # A socket in TIME_WAIT still answers a retransmitted FIN: still alive.
            ask("finish tcp6")
            assert "]:5000" in a.run("ss", "-tan", "state", "time-wait")
            assert ask("check")["tcp6"] is True
            # A server's UDP flow whose conntrack entry is gone (idle past its timeout)
            # has ended, though the socket is still bound; a connected one lives with
            # its socket.
            a.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=1")
            ask("send srv4")  # its entry now times out after 1 s
            time.sleep(2.5)
            snap = ask("check")
            assert snap["srv4"] is False and snap["udp4"] is True
        finally:
            for p in (probe, server):
                if p is not None:
                    p.kill()
                    p.wait()
