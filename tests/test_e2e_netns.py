"""dime end to end: the real CLI (`dime up`) in the MH and the CH of the Fig. 7
testbed, real handoffs, real transfers. Every scenario checks SHA-256 and TCP resets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from testbed.delay import tbf_args
from testbed.fig7 import PRIVATE, V4, V6, Fig7, Plan
from testbed.netns import Namespace
from testbed.runner import Dime, any_established, down_all, handed_off, up_all
from tests.netns_util import (
    check_transfer,
    daemons_stopped,
    fig7_testbed,
    py,
    result,
    tcp_transfer,
    wait_for,
)

pytestmark = pytest.mark.netns


@dataclass
class Bed:
    """The Fig. 7 testbed and dime (``testbed.runner``) in its CH and MH."""

    fig: Fig7
    tmp: Path
    daemons: dict[str, Dime] = field(default_factory=dict)

    @property
    def plan(self) -> Plan:
        return self.fig.plan

    def dime(self, name: str) -> Dime:
        """dime in host ``name`` ("ch", "mh"): keys of this test's hosts live in its
        tmp dir, not in /var/lib/dime."""
        ns = getattr(self.fig, name)
        return Dime(ns, self.tmp / name, self.tmp / f"dime-{name}.log", name)

    def up(self, *names: str, args: tuple[str, ...] = ()) -> None:
        started = [self.dime(name) for name in names]
        up_all(started, "-v", *args)
        self.daemons.update((d.name, d) for d in started)

    def cli(self, name: str, *args: str) -> str:
        """A one-shot dime command in host ``name``; its output (it must succeed)."""
        res = self.dime(name).cli(*args)
        assert res.returncode == 0, f"dime {' '.join(args)}: {res.stderr}"
        return res.stdout

    def wait_established(self) -> None:
        """Both daemons have finished a HELLO exchange with a peer."""
        for d in self.daemons.values():
            d.wait_status(any_established, timeout=15)

    def down(self) -> None:
        """dime down everywhere: exit status 0, and nothing left behind."""
        for stopped in down_all(list(self.daemons.values())):
            assert stopped.code == 0, f"{stopped.name}: {stopped.output}\n{stopped.log_tail}"
            assert not stopped.residue, f"{stopped.name}: {stopped.residue}"
        self.daemons.clear()

    def logs(self) -> str:
        return "\n\n".join(f"== {n}\n{d.log_tail(40)}" for n, d in self.daemons.items())


@contextlib.contextmanager
def bed(tmp_path: Path, plan: Plan = V4, tag: str = "e2e") -> Iterator[Bed]:
    with fig7_testbed(tag, plan) as fig:
        b = Bed(fig, tmp_path)
        with daemons_stopped(b.daemons.values, b.logs):
            yield b


def tcp(
    sender: Namespace,
    receiver: Namespace,
    addr: str,
    nbytes: int,
    rate: float,
    port: int = 5001,
    hold_open: bool = False,
) -> tuple[Popen[bytes], Popen[bytes]]:
    return tcp_transfer(sender, receiver, addr, nbytes, rate, port, hold_open=hold_open)


def check(b: Bed, server: Popen[bytes], client: Popen[bytes], nbytes: int) -> None:
    check_transfer((b.fig.ch, b.fig.mh), server, client, nbytes, b.logs())


def bulk_through_bottleneck(
    b: Bed, sender: str, nbytes: int, args: tuple[str, ...] = (), hold_open: bool = False
) -> tuple[Popen[bytes], Popen[bytes]]:
    """dime up at both ends (with ``args``), 20 Mbit/s (50 ms of queue) on the
    router's way to each, and an unpaced transfer from ``sender`` ("mh": to the CH;
    "ch": to the MH's old address), running once both daemons know each other
    (``hold_open``: its connection stays open after its bytes, until checked)."""
    p = b.plan
    for dev in ("rc1", "rm1", "rm2"):
        b.fig.r.run("tc", "qdisc", "replace", "dev", dev, "root", *tbf_args(20, 50))
    b.up("ch", "mh", args=args)
    if sender == "mh":
        transfer = tcp(b.fig.mh, b.fig.ch, p.c1.host, nbytes, rate=0, hold_open=hold_open)
    else:
        transfer = tcp(b.fig.ch, b.fig.mh, p.m1.host, nbytes, rate=0, hold_open=hold_open)
    b.wait_established()
    return transfer


def hid_of(status: dict[str, object], addr: str) -> dict[str, object]:
    for h in status["hids"]:  # type: ignore[attr-defined]
        if addr in h["active"]:
            return dict(h)
    raise AssertionError(f"no HID with active {addr}: {status['hids']}")


# -- scenarios --------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [2.0], ids=["gap2s"])
def test_hard_handoff_mh(tmp_path: Path, gap: float) -> None:
    with bed(tmp_path) as b:
        p = b.plan
        b.up("ch", "mh")
        # 8 s at 20 Mbit/s: data is still to send when the address goes, even on a
        # slow machine; held open, the flow is still listed after the move (a paced
        # sender catches up at once, and would otherwise be done).
        nbytes = 20_000_000
        server, client = tcp(b.fig.mh, b.fig.ch, p.c1.host, nbytes, rate=20, hold_open=True)
        b.wait_established()
        # During the transfer, both sides list the flow and the peer.
        st = b.daemons["ch"].wait_status(any_established)
        assert hid_of(st, p.m1.host)["key"] is not None
        assert [s["remote"].rsplit(":", 1)[0] for s in st["sockets"]] == [p.m1.host]
        assert st["sockets"][0]["local"] == f"{p.c1.host}:5001"
        b.fig.hard_handoff_mh(gap)
        # Active, not only claimed: the CH lists it unreachable until its challenge
        # comes back answered.
        st = b.daemons["ch"].wait_status(lambda s: any(p.m2.host in h["active"] for h in s["hids"]))
        assert hid_of(st, p.m2.host)["active"] == [p.m2.host]
        assert st["sockets"][0]["remote"].startswith(p.m1.host)  # identifier unchanged
        assert f"ghost address {p.m1.host} kept on lo" in b.daemons["mh"].log_text()
        check(b, server, client, nbytes)
        mh = b.daemons["mh"].status()
        assert mh["counters"]["messages_rejected"] == {}
        if gap:
            # Paced, nothing in flight when the address went: new data could not
            # leave and TCP's probe timer backed off. dime's ACK restarts it when the
            # CH challenges the new address, or the CH's second ACK does when it
            # switches to it, whichever comes first (stacktrans/rto_revert.py).
            prompted = [d.status()["counters"]["tcp_flows_prompted"] for d in b.daemons.values()]
            assert sum(prompted) >= 1, b.logs()
        b.down()


@pytest.mark.parametrize(
    ("plan", "sender"),
    [(V4, "mh"), (V6, "mh"), (V6, "ch")],
    ids=["v4-mh-sends", "v6-mh-sends", "v6-ch-sends"],
)
def test_hard_handoff_bulk_sender_is_prompted_to_retransmit(
    tmp_path: Path, plan: Plan, sender: str
) -> None:
    """A bulk transfer through a 20 Mbit/s bottleneck has data in flight when the MH
    loses its address; 2 s without a path back its retransmission timer off. dime
    prompts the sender to retransmit (RFC 6069 over IPv4, a path MTU signal over
    IPv6) once the path is back, instead of leaving it to the timer: the MH when the
    CH challenges its new address, the CH when the MH answers."""
    with bed(tmp_path, plan) as b:
        nbytes = 16_000_000  # ~6.5 s at 20 Mbit/s
        server, client = bulk_through_bottleneck(b, sender, nbytes)
        # Backed off to 0.8 s: the timer fires about 1.4 s and 3 s after the first
        # loss; the path comes back between the two, where only a prompt helps.
        b.fig.hard_handoff_mh(2.2)
        check(b, server, client, nbytes)
        counters = {n: d.status()["counters"] for n, d in b.daemons.items()}
        # The MH's own prompt, or the CH's second ACK when it switches (what the MH
        # sent before the outage arrived; its ACKs were lost), whichever comes first.
        assert sum(c["tcp_flows_prompted"] for c in counters.values()) >= 1, b.logs()
        if sender == "ch":  # nobody but the CH can make the CH send
            assert counters["ch"]["tcp_retransmits_prompted"] >= 1, b.logs()
        b.down()


@pytest.mark.parametrize("sender", ["mh", "ch"], ids=["mh-sends", "ch-sends"])
def test_soft_handoff_in_flight_is_recovered_at_once(tmp_path: Path, sender: str) -> None:
    """A bulk transfer through a 20 Mbit/s bottleneck (50 ms of queue) when the MH's
    old address goes: what the CH sent to it in the meantime is lost. The CH, on
    learning the move, acknowledges again what it received (the MH sends) or
    retransmits its window (the CH sends) at once (stacktrans/rto_revert.py).
    (follow_routes = false: the flow stays on the old address until it goes.)"""
    with bed(tmp_path) as b:
        # ~8 s at 20 Mbit/s: still sending when the old address goes, even where
        # starting the transfer and the new address took a loaded machine 4 s.
        nbytes = 20_000_000
        config = tmp_path / "dime.toml"
        config.write_text("follow_routes = false\n")
        server, client = bulk_through_bottleneck(b, sender, nbytes, ("--config", str(config)))
        b.fig.soft_handoff_mh(overlap=1.0)
        check(b, server, client, nbytes)
        counters = b.daemons["ch"].status()["counters"]
        prompted = "tcp_acks_prompted" if sender == "mh" else "tcp_retransmits_prompted"
        assert counters[prompted] == 1, b.logs()
        assert counters["flows_moved_to_route"] == 0
        assert b.daemons["mh"].status()["counters"]["flow_moves_sent"] == 0
        b.down()


def flow_of(status: dict[str, Any], port: int) -> dict[str, Any]:
    """The socket-table entry (``dime status``) of the flow to or from TCP ``port``."""
    flows = [f for f in status["sockets"] if f["proto"] == "tcp" and port in _ports(f)]
    assert len(flows) == 1, status["sockets"]
    return flows[0]


def _both_at(status: dict[str, Any], end: str, addr: str) -> bool:
    """Both test flows (ports 5001 and 5002) have ``end`` ("via", "to") at ``addr``."""
    return all(flow_of(status, port)[end] == addr for port in (5001, 5002))


def _ports(flow: dict[str, Any]) -> set[int]:
    return {int(str(flow[end]).rpartition(":")[2]) for end in ("local", "remote")}


@pytest.mark.parametrize(
    ("plan", "sender"), [(V4, "mh"), (V6, "ch")], ids=["v4-mh-sends", "v6-ch-sends"]
)
def test_soft_handoff_follows_the_new_default_route(
    tmp_path: Path, plan: Plan, sender: str
) -> None:
    """Make-before-break (config follow_routes, on by default): the MH's new address
    comes with a new default route, and the running flows move to it (one FLOW_MOVE
    for both) while the old address still works. When the old one goes, nothing is
    sent to it any more: no data or ACK in flight is lost there, so neither end is
    prompted."""
    with bed(tmp_path, plan, "e2er") as b:
        p = b.plan
        # ~10 s at 20 Mbit/s: still sending after the moves, unless the machine is so
        # loaded that starting the processes below takes longer (seen in CI); held
        # open, the flow is there to be moved either way.
        nbytes = 25_000_000
        server, client = bulk_through_bottleneck(b, sender, nbytes, hold_open=True)
        # A second, paced flow the same way: both move in one FLOW_MOVE (MORE_FLOWS).
        sending, receiving = (b.fig.mh, b.fig.ch) if sender == "mh" else (b.fig.ch, b.fig.mh)
        to = p.c1.host if sender == "mh" else p.m1.host
        paced = tcp(sending, receiving, to, 2_500_000, rate=2, port=5002, hold_open=True)
        b.daemons["mh"].wait_status(lambda s: len(s["sockets"]) == 2)
        b.fig.attach(b.fig.mh, "m2", p.m2)  # address, then `ip route replace default`
        mh = b.daemons["mh"].wait_status(lambda s: _both_at(s, "via", p.m2.host))
        ch = b.daemons["ch"].wait_status(lambda s: _both_at(s, "to", p.m2.host))
        assert mh["counters"]["flows_moved_to_route"] == 2, b.logs()
        assert flow_of(mh, 5001)["rule"] is None
        assert mh["counters"]["flow_moves_sent"] == 1, b.logs()
        assert ch["counters"]["flow_moves_received"] == 1, b.logs()
        b.fig.detach(b.fig.mh, "m1", p.m1)
        check(b, server, client, nbytes)
        check(b, *paced, 2_500_000)
        for d in b.daemons.values():
            counters = d.status()["counters"]
            assert counters["tcp_flows_prompted"] == 0, b.logs()
        b.down()


def test_connection_opened_before_dime_up(tmp_path: Path) -> None:
    with bed(tmp_path) as b:
        p = b.plan
        nbytes = 12_000_000
        server, client = tcp(b.fig.mh, b.fig.ch, p.c1.host, nbytes, rate=20)
        time.sleep(0.5)
        b.up("ch", "mh")  # adopts the running connection, says HELLO for it
        b.daemons["mh"].wait_status(any_established)
        b.fig.hard_handoff_mh(0.5)
        check(b, server, client, nbytes)
        b.down()


def test_both_hosts_move_one_after_the_other(tmp_path: Path) -> None:
    with bed(tmp_path) as b:
        p = b.plan
        b.up("ch", "mh")
        nbytes = 16_000_000
        server, client = tcp(b.fig.mh, b.fig.ch, p.c1.host, nbytes, rate=20)
        b.wait_established()  # the transfer runs and the peers know each other
        b.fig.hard_handoff_mh(0.5)
        b.daemons["ch"].wait_status(lambda s: p.m2.host in str(s["hids"]))
        time.sleep(1)
        b.fig.hard_handoff_ch(0.5)
        b.daemons["mh"].wait_status(lambda s: p.c2.host in str(s["hids"]))
        check(b, server, client, nbytes)
        mh = b.daemons["mh"].status()
        assert hid_of(mh, p.c2.host)["local"] == [p.m2.host]
        b.down()


def test_ipv6_hard_handoff(tmp_path: Path) -> None:
    with bed(tmp_path, V6, "e2e6") as b:
        p = b.plan
        b.up("ch", "mh")
        nbytes = 10_000_000
        server, client = tcp(b.fig.mh, b.fig.ch, p.c1.host, nbytes, rate=20)
        b.wait_established()  # the transfer runs and the peers know each other
        b.fig.hard_handoff_mh(0.5)
        b.daemons["ch"].wait_status(lambda s: p.m2.host in str(s["hids"]))
        check(b, server, client, nbytes)
        b.down()


def both_ways_across_a_move(b: Bed, move: Callable[[], None]) -> None:
    """A paced TCP transfer each way (MH -> CH and CH -> MH) at once, ``move`` of the
    MH in the middle of both; the CH follows it to m2, and every byte arrives."""
    p = b.plan
    b.up("ch", "mh")
    nbytes = 12_000_000  # 4.8 s each at 20 Mbit/s: not over before the move
    up = tcp(b.fig.mh, b.fig.ch, p.c1.host, nbytes, rate=20, port=5001)
    down = tcp(b.fig.ch, b.fig.mh, p.m1.host, nbytes, rate=20, port=5002)
    b.wait_established()  # the transfers run and the peers know each other
    assert up[1].poll() is None and down[1].poll() is None, "over before the move"
    move()
    st = b.daemons["ch"].wait_status(handed_off(p.m1.host, p.m2.host), timeout=30)
    mh = hid_of(st, p.m2.host)
    assert mh["active"] == [p.m2.host], mh
    assert mh["local"] == [p.c1.host], mh
    check(b, *up, nbytes)
    check(b, *down, nbytes)
    st = b.daemons["mh"].status()
    assert hid_of(st, p.c1.host)["local"] == [p.m2.host]
    assert st["counters"]["messages_rejected"] == {}
    b.down()


def test_hard_handoff_between_private_blocks(tmp_path: Path) -> None:
    """A routed private network, no NAT: the MH moves from 172.16.1.2 to 192.168.2.2
    (another private block), the CH is at 10.0.0.1 (a third one). Every path is only
    potentially reachable to IHMP: the HANDOFF from the new address is a probe, with
    no other path to fall back on, and it gets through."""
    with bed(tmp_path, PRIVATE, "e2ep") as b:
        both_ways_across_a_move(b, lambda: b.fig.hard_handoff_mh(0.5))


def test_soft_handoff_between_private_blocks(tmp_path: Path) -> None:
    """The same network, the new address first: its ADDR_UP is a probe (the old path
    is a fallback), then the old address goes."""
    with bed(tmp_path, PRIVATE, "e2ep") as b:
        both_ways_across_a_move(b, lambda: b.fig.soft_handoff_mh(1.0))


def test_nfqueue_dataplane_hard_handoff(tmp_path: Path) -> None:
    with bed(tmp_path, tag="e2eq") as b:
        p = b.plan
        b.up("ch", "mh", args=("--dataplane", "nfqueue"))
        assert b.daemons["ch"].status()["dataplane"] == "nfqueue"
        nbytes = 6_000_000
        server, client = tcp(b.fig.mh, b.fig.ch, p.c1.host, nbytes, rate=16)
        b.wait_established()  # the transfer runs and the peers know each other
        b.fig.hard_handoff_mh(0.5)
        check(b, server, client, nbytes)
        b.down()


SILENT_SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1)
print("listening", file=sys.stderr, flush=True)
c, _ = s.accept()
time.sleep(40)
"""

BLOCKED_CLIENT = """
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], 5001))
print("ready", file=sys.stderr, flush=True)
c.settimeout(40)
start = time.monotonic()
try:
    c.recv(10)
    err = "closed"
except OSError as exc:
    err = type(exc).__name__
print(json.dumps({"error": err, "after": time.monotonic() - start}), flush=True)
"""


def test_peer_lost_fails_its_sockets_instead_of_hanging(tmp_path: Path) -> None:
    """The MH loses its only address for good: after the grace period its HID for the
    CH is removed, and an application blocked in recv() gets an error, not a hang."""
    cfg = tmp_path / "dime.toml"
    cfg.write_text("handoff_window = 0.5\n[ihmp]\npath_loss_grace = 2.0\n")
    with bed(tmp_path, tag="e2el") as b:
        p = b.plan
        b.up("ch", "mh", args=("--config", str(cfg)))
        server = py(b.fig.ch, "-c", SILENT_SERVER, p.c1.host)
        wait_for(server, "listening", 10)
        client = py(b.fig.mh, "-c", BLOCKED_CLIENT, p.c1.host)
        wait_for(client, "ready", 10)
        b.daemons["mh"].wait_status(any_established)
        b.fig.detach(b.fig.mh, "m1", p.m1)  # gone, and nothing new comes up
        out = result(client, 60)
        server.kill()
        assert out["error"] in ("ConnectionAbortedError", "ConnectionResetError"), out
        st = b.daemons["mh"].wait_status(lambda s: not s["hids"] and not s["sockets"])
        assert st["ghosts"] == []
        b.down()


def test_strict_mode_with_keys_configured_beforehand(tmp_path: Path) -> None:
    with bed(tmp_path, tag="e2es") as b:
        p = b.plan
        key = {name: b.cli(name, "keygen").strip() for name in ("ch", "mh")}
        b.cli("ch", "trust", key["mh"], "--addr", p.m1.host)
        b.cli("mh", "trust", key["ch"], "--addr", p.c1.host)
        b.up("ch", "mh", args=("--strict",))
        nbytes = 8_000_000
        server, client = tcp(b.fig.mh, b.fig.ch, p.c1.host, nbytes, rate=20)
        st = b.daemons["ch"].wait_status(any_established)
        assert hid_of(st, p.m1.host)["key"] == key["mh"]
        b.fig.hard_handoff_mh(0.5)
        b.daemons["ch"].wait_status(lambda s: p.m2.host in str(s["hids"]))
        check(b, server, client, nbytes)
        b.down()
