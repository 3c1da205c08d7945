"""Which flows are alive (stacktrans/sweep.py): the kernel's text tables, parsed.

The unit tests parse nf_conntrack lines; the real-kernel test opens TCP and UDP
flows (IPv4 and IPv6) in a namespace with conntrack running and checks that a
snapshot holds exactly the live ones, conntrack entries included.
"""

from __future__ import annotations

import json
import os
import time
from ipaddress import ip_address

import pytest

from stacktrans.socket_table import UDP, FlowKey
from stacktrans.sweep import _conntrack_line
from testbed.netns import topology
from tests.netns_util import py, read_line

A = ip_address


def test_conntrack_lines_give_the_original_udp_tuple() -> None:
    v4 = (
        "ipv4     2 udp      17 27 src=10.0.0.1 dst=10.0.0.2 sport=5000 dport=53 [UNREPLIED] "
        "src=10.0.0.2 dst=10.0.0.1 sport=53 dport=5000 mark=0 zone=0 use=2"
    )
    v6 = (
        "ipv6     10 udp      17 29 src=2001:db8::1 dst=2001:db8::2 sport=40000 dport=9 "
        "src=2001:db8::2 dst=2001:db8::1 sport=9 dport=40000 mark=0 zone=0 use=2"
    )
    assert _conntrack_line(v4) == FlowKey(UDP, A("10.0.0.1"), 5000, A("10.0.0.2"), 53)
    assert _conntrack_line(v6) == FlowKey(UDP, A("2001:db8::1"), 40000, A("2001:db8::2"), 9)
    tcp = v4.replace("udp      17", "tcp      6 ESTABLISHED")
    for line in (tcp, "", "ipv4 2 udp 17 27 src=10.0.0.1", "ipv4 2 udp 17 27 " + "x=1 " * 9):
        assert _conntrack_line(line) is None


# Runs in namespace "a": opens flows to b, then answers "check" with what a snapshot
# says about each, and "close NAME" by closing one.
PROBE = r"""
import json, socket, sys
from ipaddress import ip_address
from stacktrans.socket_table import TCP, UDP, FlowKey
from stacktrans.sweep import Liveness
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
    elif cmd == "send":
        socks[arg[0]].sendto(b"x", (b4, 9))
        print("{}", flush=True)
    else:
        live = Liveness()
        print(json.dumps({n: k in live for n, k in keys.items()}
                         | {"ct_versions": sorted(live.ct_versions)}), flush=True)
"""

SERVER = r"""
import socket, sys, threading
def serve(fam, addr):
    s = socket.socket(fam)
    s.bind((addr, 5000))
    s.listen()
    while True:
        c, _ = s.accept()
        threading.Thread(target=lambda c=c: c.recv(1), daemon=True).start()
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
        server = py(b, "-c", SERVER, "10.78.0.2", "2001:db8:78::2")
        probe = None
        try:
            assert read_line(server, 10) == "listening"
            probe = py(a, "-c", PROBE, "10.78.0.2", "2001:db8:78::2", "10.78.0.1")
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
            # A server's UDP flow whose conntrack entry is gone (idle past its timeout)
            # has ended, though the socket is still bound; a connected one lives with
            # its socket.
            a.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=1")
            ask("send srv4")  # its entry now times out after 1 s
            time.sleep(2.5)
            snap = ask("check")
            assert snap["srv4"] is False and snap["udp4"] is True and snap["tcp6"] is True
        finally:
            for p in (probe, server):
                if p is not None:
                    p.kill()
                    p.wait()
