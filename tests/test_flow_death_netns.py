"""Event-driven flow death on the real kernel: a flow the data plane learned leaves the
socket table (and, in ``nft`` mode, the kernel's flow set) once the kernel announces
its socket's end, with the periodic sweep an hour away (it never runs here).

The MH's node hears the destroy events (``--deaths``); a helper in the MH holds the
sockets and closes them on command. What is asserted is table contents, polled with
a deadline; nothing is timed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from testbed.fig7 import V4, V6, Fig7, Plan
from testbed.netns import Namespace, topology
from tests.netns_util import StNode, py, wait_for

pytestmark = pytest.mark.netns

TW_PORT, RST_PORT, UDP_PORT = 5701, 5702, 5703

# In the CH: TCP servers that close once the peer has (so the MH's active close ends in
# TIME_WAIT), and a UDP sink.
SERVER = r"""
import socket, sys, threading
addr = sys.argv[1]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
def serve(port):
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen()
    while True:
        c, _ = s.accept()
        def drain(c=c):
            while c.recv(4096):
                pass
            c.close()
        threading.Thread(target=drain, daemon=True).start()
for port in (int(sys.argv[2]), int(sys.argv[3])):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
sink = socket.socket(fam, socket.SOCK_DGRAM)
sink.bind((addr, int(sys.argv[4])))
print("listening", file=sys.stderr, flush=True)
sys.stdin.read()
"""

# In the MH: sockets to the CH, opened and closed on command (one line each).
HOLDER = r"""
import socket, struct, sys
addr = sys.argv[1]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
socks = {}
print("ready", file=sys.stderr, flush=True)
for line in sys.stdin:
    cmd, port = line.split()
    if cmd in ("tcp", "udp"):
        s = socket.socket(fam, socket.SOCK_STREAM if cmd == "tcp" else socket.SOCK_DGRAM)
        s.connect((addr, int(port)))
        s.send(b"x")
        socks[port] = s
    elif cmd == "serve":  # an unconnected UDP socket on the wildcard address
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(port)))
        socks[port] = s
    elif cmd == "reset":  # SO_LINGER 0: a reset, no TIME_WAIT
        s = socks.pop(port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    else:
        socks.pop(port).close()
    print("ok", file=sys.stderr, flush=True)
"""


@pytest.fixture
def fig(request: pytest.FixtureRequest) -> Iterator[Fig7]:
    plan: Plan = request.param
    with topology(f"fd{plan.family}") as topo:
        yield Fig7.build(topo, plan)


def poll(what: str, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def rports(node: StNode) -> set[int]:
    return {f["rport"] for f in node.send(cmd="dump")["flows"]}


def in_flow_set(ns: Namespace, family: str, port: int) -> bool:
    listing = ns.run("nft", "list", "set", "inet", "dime", f"flows{family}")
    return re.search(rf"\. {port}\b", listing) is not None


@pytest.mark.parametrize(
    ("fig", "mode"), [(V4, "nft"), (V6, "nfqueue")], ids=["v4-nft", "v6-nfqueue"], indirect=["fig"]
)
def test_flows_leave_the_table_when_the_kernel_says_their_sockets_ended(
    fig: Fig7, mode: str
) -> None:
    p = fig.plan
    family = "6" if ":" in p.c1.host else "4"
    server = py(fig.ch, "-c", SERVER, p.c1.host, *map(str, (TW_PORT, RST_PORT, UDP_PORT)))
    holder = py(fig.mh, "-c", HOLDER, p.c1.host)
    ch = StNode.start(fig.ch, mode, [p.c1.host])
    mh = StNode.start(fig.mh, mode, [p.m1.host], deaths=True)

    def do(line: str) -> None:
        assert holder.stdin is not None
        holder.stdin.write(line.encode() + b"\n")
        holder.stdin.flush()
        wait_for(holder, "ok", 10)

    def counters() -> dict[str, Any]:
        return dict(mh.send(cmd="dump")["counters"])

    try:
        wait_for(server, "listening", 10)
        wait_for(holder, "ready", 10)
        mh.send(cmd="host", addr=p.c1.host, active=[p.c1.host], local=[p.m1.host])
        ch.send(cmd="host", addr=p.m1.host, active=[p.m1.host], local=[p.c1.host])
        for cmd, port in (("tcp", TW_PORT), ("tcp", RST_PORT), ("udp", UDP_PORT)):
            do(f"{cmd} {port}")
        ports = {TW_PORT, RST_PORT, UDP_PORT}
        poll("the three flows learned", lambda: ports <= rports(mh))
        if mode == "nft":
            assert all(in_flow_set(fig.mh, family, port) for port in ports)

        # A reset: the socket is freed at once; so is the flow.
        do(f"reset {RST_PORT}")
        poll("the reset flow dropped", lambda: RST_PORT not in rports(mh))
        assert {TW_PORT, UDP_PORT} <= rports(mh)
        if mode == "nft":
            assert not in_flow_set(fig.mh, family, RST_PORT)
            assert in_flow_set(fig.mh, family, UDP_PORT)

        # An active close: the socket is freed into TIME_WAIT, and the flow lives on
        # (a TIME_WAIT socket still answers the peer's retransmitted FIN). The UDP
        # flow's end, heard later, is looked up with or after it.
        heard = counters()["flow_deaths_heard"]
        do(f"close {TW_PORT}")
        poll("the closed TCP socket's end heard", lambda: counters()["flow_deaths_heard"] > heard)
        poll("TIME_WAIT", lambda: f":{TW_PORT}" in fig.mh.run("ss", "-tanH", "state", "time-wait"))
        do(f"close {UDP_PORT}")
        poll("the UDP flow dropped", lambda: UDP_PORT not in rports(mh))
        assert TW_PORT in rports(mh)
        if mode == "nft":
            assert not in_flow_set(fig.mh, family, UDP_PORT)
            assert in_flow_set(fig.mh, family, TW_PORT)

        c = counters()
        assert c["flows_ended_by_events"] == 2, c
        assert c["full_sweeps"] == 0, c
        assert c["flow_deaths_lost"] == 0 and c["flow_deaths_malformed"] == 0, c
    finally:
        for node in (mh, ch):
            node.stop()
        for proc in (holder, server):
            proc.kill()
            proc.wait()


SERVE_PORT, CLIENT_PORT = 5801, 5802


def reap_expired(ns: Namespace) -> None:
    """List ``ns``'s conntrack table: the kernel ends the entries that have expired as
    it lists them (their destroy events go out then), rather than at its garbage
    collector's next pass, which a busy machine's other entries can put a minute
    away (seen: a CI run waited 60 s in vain)."""
    ns.run("cat", "/proc/net/nf_conntrack")


@pytest.mark.parametrize("fig", [V4], ids=["v4"], indirect=True)
def test_nft_a_served_udp_flow_ends_when_conntrack_forgets_it(fig: Fig7) -> None:
    """nft mode: a UDP flow an unconnected socket serves ends with its conntrack entry
    (its idle timeout, lowered to 1 s here); the server socket stays."""
    p = fig.plan
    fig.mh.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=1")
    holder = py(fig.mh, "-c", HOLDER, p.c1.host)
    mh = StNode.start(fig.mh, "nft", [p.m1.host], deaths=True)
    try:
        wait_for(holder, "ready", 10)
        assert holder.stdin is not None
        holder.stdin.write(f"serve {SERVE_PORT}\n".encode())
        holder.stdin.flush()
        wait_for(holder, "ok", 10)
        mh.send(cmd="host", addr=p.c1.host, active=[p.c1.host], local=[p.m1.host])
        send = (
            "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.bind((sys.argv[1], int(sys.argv[2]))); "
            "s.sendto(b'x', (sys.argv[3], int(sys.argv[4])))"
        )
        sender = py(fig.ch, "-c", send, p.c1.host, str(CLIENT_PORT), p.m1.host, str(SERVE_PORT))
        assert sender.wait(timeout=10) == 0
        poll("the served flow learned", lambda: CLIENT_PORT in rports(mh))

        def dropped() -> bool:
            reap_expired(fig.mh)
            return CLIENT_PORT not in rports(mh)

        poll("the flow dropped with its conntrack entry", dropped, 60)
        assert not in_flow_set(fig.mh, "4", CLIENT_PORT)
        c = dict(mh.send(cmd="dump")["counters"])
        assert c["flows_ended_by_events"] == 1 and c["full_sweeps"] == 0, c
        assert f":{SERVE_PORT}" in fig.mh.run("ss", "-uanH")  # the server is still there
    finally:
        mh.stop()
        holder.kill()
        holder.wait()
