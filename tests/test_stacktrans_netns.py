"""StackTrans on the real kernel: two namespaces, real TCP/UDP, both data-plane modes.

A test double plays IHMP: it sets each node's HID table as IHMP would after a move.
Every transfer is checked byte for byte (SHA-256) and for TCP resets.

Each scenario runs on one or two combinations of IP version and data plane, so that
every kernel path (nft maps and NFQUEUE, IPv4 and IPv6) is covered here; the logic
of every scenario in every combination is checked in memory by tests/test_stack_sim.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from subprocess import Popen
from typing import Any

import pytest

from testbed.fig7 import V4, V6, Fig7, Plan
from testbed.netns import Topology, topology
from testbed.runner import KernelState
from tests.netns_util import (
    XFER,
    OnFig7,
    StNode,
    add_rst_counter,
    kernel_state,
    py,
    result,
    tcp_transfer,
    wait_for,
)
from tests.netns_util import check_transfer as check

pytestmark = pytest.mark.netns


@dataclass
class Pair(OnFig7):
    """The Fig. 7 testbed seen as a pair: the CH and the mobile host MH."""

    @property
    def plan(self) -> Plan:
        return self.fig.plan


def make_pair(topo: Topology, plan: Plan) -> Pair:
    fig = Fig7.build(topo, plan)
    for ns in (fig.ch, fig.mh):
        add_rst_counter(ns)
    return Pair(fig)


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """The Fig. 7 pair for the plan a test names (``indirect`` parametrization)."""
    with topology(f"st{request.param.family}") as topo:
        yield make_pair(topo, request.param)


def check_transfer(pair: Pair, server: Popen[bytes], client: Popen[bytes], nbytes: int) -> None:
    check((pair.ch, pair.mh), server, client, nbytes)


def moved(ch: StNode, mh: StNode, p: Plan) -> None:
    """What IHMP leaves in both tables after the MH's handoff m1 -> m2 (HANDOFF + ACK)."""
    ch.send(cmd="host", addr=p.m1.host, active=[p.m2.host], local=[p.c1.host])
    mh.send(cmd="locals", addrs=[p.m2.host])
    mh.send(cmd="host", addr=p.c1.host, active=[p.c1.host], local=[p.m2.host])


def dump_with_flows(node: StNode, n: int, timeout: float = 5.0) -> dict[str, Any]:
    """The node's dump once it has ``n`` flows (or at ``timeout``): the notices of
    new flows are asynchronous, those of flows the kernel learned batched (up to
    10 ms late)."""
    deadline = time.monotonic() + timeout
    while len((dump := node.send(cmd="dump"))["flows"]) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return dump


def start_nodes(pair: Pair, mode: str) -> tuple[StNode, StNode]:
    p = pair.plan
    return StNode.start(pair.ch, mode, [p.c1.host]), StNode.start(pair.mh, mode, [p.m1.host])


def assert_no_residue(pair: Pair, before: dict[str, KernelState]) -> None:
    for ns in (pair.ch, pair.mh):
        now = kernel_state(ns)
        assert now[0] == before[ns.name][0], "nft ruleset differs after stop"
        assert now[3] == before[ns.name][3], "iptables rules differ after stop"
        assert "scope host lo" not in ns.run("ip", "-o", "addr", "show", "dev", "lo").replace(
            "127.0.0.1/8 scope host lo", ""
        ).replace("::1/128 scope host", "")


@pytest.mark.parametrize(
    ("pair", "mode", "direction"),
    [(V4, "nft", "from-mobile"), (V6, "nfqueue", "to-mobile")],
    ids=["v4-from-mobile-nft", "v6-to-mobile-nfqueue"],
    indirect=["pair"],
)
def test_tcp_survives_handoff(pair: Pair, mode: str, direction: str) -> None:
    """The MH changes address mid-transfer: the CH sees its *remote* locator change,
    the MH its *local* one (its old address lives on as a ghost on lo)."""
    p = pair.plan
    before = {ns.name: kernel_state(ns) for ns in (pair.ch, pair.mh)}
    ch, mh = start_nodes(pair, mode)
    try:
        nbytes = 6_000_000
        if direction == "to-mobile":
            server, client = tcp_transfer(pair.ch, pair.mh, p.m1.host, nbytes, rate=20)
        else:
            server, client = tcp_transfer(pair.mh, pair.ch, p.c1.host, nbytes, rate=20)
        time.sleep(0.5)
        pair.fig.hard_handoff_mh()
        moved(ch, mh, p)
        assert mh.send(cmd="dump")["ghosts"] == [p.m1.host]
        check_transfer(pair, server, client, nbytes)
        flows = ch.send(cmd="dump")["flows"]
        assert [f["remote"] for f in flows] == [p.m1.host]  # the identifier never changed
    finally:
        ch.stop()
        mh.stop()
    assert_no_residue(pair, before)


@pytest.mark.parametrize(
    ("pair", "mode"), [(V4, "nfqueue"), (V6, "nft")], ids=["v4-nfqueue", "v6-nft"],
    indirect=["pair"],
)  # fmt: skip
def test_udp_keeps_flowing(pair: Pair, mode: str) -> None:
    p = pair.plan
    ch, mh = start_nodes(pair, mode)
    try:
        echo = py(
            pair.mh, XFER, "udp-echo", "--bind", p.m1.host, "--port", "5300", "--duration", "6"
        )
        wait_for(echo, "listening", 10)
        client = py(
            pair.ch,
            XFER,
            "udp-client",
            "--connect",
            p.m1.host,
            "--port",
            "5300",
            "--duration",
            "4",
            "--interval",
            "0.05",
        )
        wait_for(client, "ready", 10)
        time.sleep(1)
        pair.fig.hard_handoff_mh()
        moved(ch, mh, p)
        out = result(client, 30)
        result(echo, 30)
        assert out["error"] is None
        after = [t for t in out["reply_times"] if t > 2.0]
        assert len(after) > 20, f"only {len(after)} replies after the move"
    finally:
        ch.stop()
        mh.stop()


@pytest.mark.parametrize(("pair", "mode"), [(V6, "nft")], ids=["v6-nft"], indirect=["pair"])
def test_s1_s2_two_identifiers_of_one_host(pair: Pair, mode: str) -> None:
    """s1 knows the MH by its old address, s2 (opened after the move) by the new one."""
    p = pair.plan
    ch, mh = start_nodes(pair, mode)
    try:
        n1, n2 = 5_000_000, 2_000_000
        server1, client1 = tcp_transfer(pair.ch, pair.mh, p.m1.host, n1, rate=16, port=5001)
        time.sleep(0.5)
        pair.fig.hard_handoff_mh()
        moved(ch, mh, p)
        server2, client2 = tcp_transfer(pair.ch, pair.mh, p.m2.host, n2, rate=16, port=5002)
        flows = dump_with_flows(ch, 2)["flows"]
        assert sorted(f["remote"] for f in flows) == sorted([p.m1.host, p.m2.host])
        assert len({f["hid"] for f in flows}) == 1  # one host under two identifiers
        check_transfer(pair, server1, client1, n1)
        check_transfer(pair, server2, client2, n2)
    finally:
        ch.stop()
        mh.stop()


@pytest.mark.parametrize(("pair", "mode"), [(V4, "nft")], ids=["v4-nft"], indirect=["pair"])
def test_connection_opened_before_stacktrans_survives(pair: Pair, mode: str) -> None:
    p = pair.plan
    nbytes = 6_000_000
    # Held open: a slow machine (arm64 under emulation) may have sent every byte
    # before the daemons are up, and the connection must still be there to adopt.
    server, client = tcp_transfer(pair.ch, pair.mh, p.m1.host, nbytes, rate=16, hold_open=True)
    ch, mh = start_nodes(pair, mode)  # adopts the running connection (sock_diag)
    try:
        assert len(ch.send(cmd="dump")["flows"]) == 1
        assert len(mh.send(cmd="dump")["flows"]) == 1
        pair.fig.hard_handoff_mh()
        moved(ch, mh, p)
        check_transfer(pair, server, client, nbytes)
    finally:
        ch.stop()
        mh.stop()


@pytest.mark.parametrize("mode", ["nfqueue"])
def test_flow_to_host_without_dime_is_untouched(mode: str) -> None:
    with topology("stleg") as topo:
        pair = make_pair(topo, V4)
        ch = StNode.start(pair.ch, mode, [V4.c1.host])  # only the CH runs StackTrans
        try:
            nbytes = 3_000_000
            server, client = tcp_transfer(pair.ch, pair.mh, V4.m1.host, nbytes, rate=0)
            check_transfer(pair, server, client, nbytes)
            dump = ch.send(cmd="dump")
            assert dump["hids"][0]["active"] == [V4.m1.host]
            assert dump["new_hids"] == [dump["hids"][0]["hid"]]  # a HELLO was prompted
        finally:
            ch.stop()


def test_handoff_without_translation_breaks_the_connection() -> None:
    """Control: the same move with no StackTrans loses the connection, so the tests
    above really depend on the translation."""
    with topology("stctl") as topo:
        pair = make_pair(topo, V4)
        _, client = tcp_transfer(pair.ch, pair.mh, V4.m1.host, 4_000_000, rate=16, timeout=5)
        time.sleep(0.5)
        pair.fig.hard_handoff_mh()
        sent = result(client, 90)
        assert sent["error"] is not None  # times out: nothing reaches the MH any more


@pytest.mark.parametrize("mode", ["nft"])
def test_route_to_the_old_identifier_is_kept(mode: str) -> None:
    """The CH only has routes to the subnets it needs: when the MH's old subnet's
    route goes, StackTrans keeps a host route to the old identifier (along the new
    locator's path), so the socket's route lookup still succeeds, and removes it
    when done."""
    with topology("strt") as topo:
        pair = make_pair(topo, V4)
        p, ch_ns = V4, pair.ch
        ch_ns.ip("route", "del", "default")
        ch_ns.ip("route", "add", p.m1.prefix, "via", p.c1.router)
        ch, mh = start_nodes(pair, mode)
        try:
            nbytes = 5_000_000
            server, client = tcp_transfer(pair.ch, pair.mh, p.m1.host, nbytes, rate=16)
            time.sleep(0.5)
            pair.fig.hard_handoff_mh()
            ch_ns.ip("route", "del", p.m1.prefix)
            ch_ns.ip("route", "add", p.m2.prefix, "via", p.c1.router)
            moved(ch, mh, p)
            routes = ch_ns.ip("route", "show", "proto", "209")
            assert routes.split()[0] == p.m1.host, routes
            check_transfer(pair, server, client, nbytes)
        finally:
            ch.stop()
            mh.stop()
        assert ch_ns.ip("route", "show", "proto", "209") == ""


SHORT_CONNECTIONS = """
import hashlib, socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    data = bytes([i]) * 50_000
    s = socket.create_connection((addr, port), timeout=10)
    s.sendall(data); s.shutdown(socket.SHUT_WR)
    answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer == hashlib.sha256(data).digest(), i
    s.close()
print("ok", flush=True)
"""

SHA_SERVER = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
print("listening", file=sys.stderr, flush=True)
for _ in range(int(sys.argv[3])):
    c, _ = s.accept()
    data = b"".join(iter(lambda: c.recv(65536), b""))
    c.sendall(hashlib.sha256(data).digest()); c.close()
"""


@pytest.mark.parametrize("pair", [V4, V6], ids=["v4", "v6"], indirect=True)
def test_the_kernel_learns_new_flows_to_a_known_host_without_queueing_them(pair: Pair) -> None:
    """nft mode, both ends know each other: new connections each way are learned by
    the kernel's learn chains (in the kernel's flow set at once), never queued; the
    daemons learn them from the NFLOG notices; a connection learned so survives a
    hard handoff."""
    p = pair.plan
    ch, mh = start_nodes(pair, "nft")
    try:
        mh.send(cmd="host", addr=p.c1.host, active=[p.c1.host], local=[p.m1.host])
        ch.send(cmd="host", addr=p.m1.host, active=[p.m1.host], local=[p.c1.host])
        n = 12
        server = py(pair.ch, "-c", SHA_SERVER, p.c1.host, "5600", str(n))
        wait_for(server, "listening", 10)
        client = py(pair.mh, "-c", SHORT_CONNECTIONS, p.c1.host, "5600", str(n))
        out, err = client.communicate(timeout=60)
        assert out.strip() == b"ok", err
        server.wait(timeout=10)
        sender, receiver = tcp_transfer(pair.mh, pair.ch, p.c1.host, 4_000_000, rate=20)
        family = "6" if ":" in p.c1.host else "4"
        for node, ns in ((mh, pair.mh), (ch, pair.ch)):
            listing = ns.run("nft", "list", "set", "inet", "dime", f"flows{family}")
            assert len(re.findall(r"\. 5600\b", listing)) == n, listing  # the kernel's own
            dump = dump_with_flows(node, n + 1)
            assert len(dump["flows"]) == n + 1, dump["flows"]
            counters = dump["counters"]
            assert counters["packets_queued"] == 0, counters
            # Notices: each connection's SYN-ACK (and the transfer's).
            assert counters["flow_notices"] >= n + 1, counters
            assert counters["flow_notices_lost"] == 0, counters
            # ... through the group of notices the kernel batches (all are of flows
            # it holds), in at most as many reads.
            assert counters["flow_notices_batched"] == counters["flow_notices"], counters
            assert 0 < counters["flow_notice_batches"] <= counters["flow_notices"], counters
            assert counters["flow_notices_batched_lost"] == 0, counters
            # Each notice said the kernel holds the flow: no daemon added it again.
            assert counters["flows_learned_by_kernel"] == n + 1, counters
        time.sleep(0.5)
        pair.fig.hard_handoff_mh()
        moved(ch, mh, p)
        check_transfer(pair, receiver, sender, 4_000_000)
    finally:
        ch.stop()
        mh.stop()
