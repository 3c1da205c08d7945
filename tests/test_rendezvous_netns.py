"""Rendezvous points on the real kernel: `dime rendezvous` in its own namespace (or
a hostile one, testbed/rendezvous.py), `dime up` in the CH and the MH.

* the Fig. 7 testbed, a rendezvous point on a third link of its router: both hosts
  lose their address and get a new one within 100 ms of each other. With the
  rendezvous point configured the connections survive; without one each side's
  peer is dropped after the grace period and the sockets fail (no hang);
* the same with a hostile rendezvous point, which forwards every message tampered
  first and replays it later: the peer rejects those (counted), nothing else
  changes, and the connections survive;
* the NAT testbed (testbed/nat.py): the MH behind NAT A (conntrack, which drops what
  comes from an address the MH never sent to), the CH moves; the rendezvous point
  on the CH's segment forwards the CH's HANDOFF through the mapping the MH keeps
  open to it.

Each carries a paced TCP transfer each way, SHA-256 checked, no TCP reset in the CH
or the MH. The resume time (from the move to the first data at each receiver) is
printed (``-s``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from testbed import rendezvous
from testbed.fig7 import V4, Fig7
from testbed.nat import B_TABLE, CH_ADDR, EVE_ADDR, SUBNETS, WAN1, NatLab, resumed_tcp
from testbed.netns import Namespace, add_rst_counter, rst_count, topology
from testbed.rendezvous import RendezvousDaemon
from testbed.runner import Dime, any_established
from tests.netns_util import (
    ROOT,
    daemons_stopped,
    py,
    read_line,
    result,
    tcp_transfer,
    wait_for,
)

pytestmark = pytest.mark.netns

RATE = 8.0  # Mbit/s each way
SECONDS = 5.0  # of traffic: the moves come after 2 s
NBYTES = int(RATE * 1e6 / 8 * SECONDS)
NATFLOWS = str(ROOT / "testbed" / "natflows.py")


@dataclass
class Bed:
    tmp: Path
    daemons: dict[str, Dime] = field(default_factory=dict)
    rv: RendezvousDaemon | None = None

    def up(self, ns: Namespace, name: str, config: str) -> Dime:
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(config)
        d = self.daemons[name] = Dime.in_dir(ns, self.tmp, name)
        d.up("-v", "--config", str(cfg))
        return d

    def serve_rendezvous(self, ns: Namespace) -> RendezvousDaemon:
        self.rv = RendezvousDaemon.in_dir(ns, self.tmp, "rv")  # type: ignore[assignment]
        assert self.rv is not None
        self.rv.start("-v")
        self.rv.wait_ready()
        return self.rv

    def logs(self) -> str:
        parts = [d.log_tail(50) for d in self.daemons.values()]
        if self.rv is not None:
            parts.append(self.rv.log_tail(20))
        return "\n".join(parts)

    def down(self) -> None:
        for d in self.daemons.values():
            d.down().check()
        self.daemons.clear()
        if self.rv is not None:
            stopped = self.rv.terminate()
            assert stopped.code == 0, stopped.describe()
            self.rv = None


def config(rv_addr: str | None, deadline: float = 30.0, grace: float = 30.0) -> str:
    lines = [f'rendezvous = ["{rv_addr}"]'] if rv_addr else []
    lines += ["[ihmp]", f"exchange_deadline = {deadline}", f"path_loss_grace = {grace}"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def fig7_bed(tmp_path: Path, tag: str) -> Iterator[tuple[Bed, Fig7, Namespace]]:
    """Fig. 7 with a rendezvous namespace on the router; resets counted."""
    with topology(tag) as topo:
        fig = Fig7.build(topo, V4)
        rv = rendezvous.attach(topo, fig.r)
        for ns in (fig.ch, fig.mh):
            add_rst_counter(ns)
        b = Bed(tmp_path)
        with daemons_stopped(b.daemons.values, b.logs):
            try:
                yield b, fig, rv
            finally:
                if b.rv is not None:
                    b.rv.terminate()


def both_move(fig: Fig7) -> tuple[float, float]:
    """Both hosts lose their address, then both get the new one: all within 100 ms
    (one shell, ``ip -n``: a process per command would take longer than that on a
    loaded machine). Returns when the first address went and the last new one was
    up (time.time())."""
    p = fig.plan
    steps = []
    for ns, dev, sub in ((fig.mh, "m1", p.m1), (fig.ch, "c1", p.c1)):
        steps += [f"ip -n {ns.name} addr del {sub.host_cidr()} dev {dev}",
                  f"ip -n {ns.name} link set {dev} down"]  # fmt: skip
    for ns, dev, sub in ((fig.mh, "m2", p.m2), (fig.ch, "c2", p.c2)):
        steps += [f"ip -n {ns.name} link set {dev} up",
                  f"ip -n {ns.name} addr add {sub.host_cidr()} dev {dev}",
                  f"ip -n {ns.name} route replace default via {sub.router} dev {dev}"]  # fmt: skip
    lost = time.time()
    subprocess.run(["sh", "-ec", "; ".join(steps)], check=True, timeout=10)
    up = time.time()
    assert up - lost < 0.1, f"the moves took {up - lost:.3f} s"
    return lost, up


def transfers(fig: Fig7) -> tuple[tuple[Popen[bytes], Popen[bytes]], ...]:
    """A paced TCP transfer each way: MH -> CH and CH -> MH."""
    p = fig.plan
    up = tcp_transfer(fig.mh, fig.ch, p.c1.host, NBYTES, RATE, 5001, timeout=20)
    down = tcp_transfer(fig.ch, fig.mh, p.m1.host, NBYTES, RATE, 5002, timeout=20)
    return up, down


Pair = tuple[Popen[bytes], Popen[bytes]]  # (receiver, sender)


def finish(namespaces: tuple[Namespace, ...], pairs: dict[str, Pair], logs: str) -> dict[str, Any]:
    """Every transfer complete and intact, no TCP reset: each receiver's result."""
    got = {}
    for name, (receiver, sender) in pairs.items():
        sent, received = result(sender, 120), result(receiver, 120)
        assert sent["error"] is None, f"{name} sender: {sent['error']}\n{logs}"
        assert received["error"] is None, f"{name} receiver: {received['error']}\n{logs}"
        assert received["bytes"] == sent["bytes"] == NBYTES, name
        assert received["sha256"] == sent["sha256"], name
        got[name] = received
    for ns in namespaces:
        assert rst_count(ns) == 0, f"TCP reset seen in {ns.name}\n{logs}"
    return got


def report(what: str, got: dict[str, Any], moved: tuple[float, float]) -> None:
    """The resume time of each transfer: from the move (lost, up) to its first data
    after the outage."""
    cells = []
    lost, up = moved
    for name, received in got.items():
        resumed = resumed_tcp(received, up, lost)
        cells.append(f"{name} {'-' if resumed is None else f'{resumed:.2f} s'}")
    print(f"\nresume after {what}: {'  '.join(cells)}")


def move_both_under_traffic(b: Bed, fig: Fig7, what: str) -> tuple[Dime, Dime]:
    """dime up in the CH and the MH with the rendezvous point at rv's address, a
    transfer each way, both hosts moved at once 2 s in; the transfers must complete
    intact. The CH's and the MH's daemons."""
    ch = b.up(fig.ch, "ch", config(rendezvous.address()))
    mh = b.up(fig.mh, "mh", config(rendezvous.address()))
    (s_up, c_up), (s_down, c_down) = transfers(fig)
    for d in (ch, mh):
        d.wait_status(lambda s: any_established(s) and s["rendezvous"][0]["registered"])
    time.sleep(2.0)
    moved = both_move(fig)
    pairs = {"MH->CH": (s_up, c_up), "CH->MH": (s_down, c_down)}
    report(what, finish((fig.ch, fig.mh), pairs, b.logs()), moved)
    return ch, mh


def test_both_hosts_move_at_once_with_a_rendezvous_point(tmp_path: Path) -> None:
    with fig7_bed(tmp_path, "rvboth") as (b, fig, rv_ns):
        b.serve_rendezvous(rv_ns)
        ch, mh = move_both_under_traffic(b, fig, "both moved at once")
        st = mh.status()
        assert st["rendezvous"] == [
            {**st["rendezvous"][0], "server": rendezvous.address(), "registered": True}
        ]
        relays = [d.status()["counters"] for d in (ch, mh)]
        assert sum(c["relays_sent"] for c in relays) >= 1, relays
        assert sum(c["relayed_received"] for c in relays) >= 1, relays
        assert b.rv is not None
        rv_status = json.loads(b.rv.cli("status", "--json").stdout)
        assert rv_status["role"] == "rendezvous" and rv_status["counters"]["relayed"] >= 1
        hosts = {h["address"] for h in rv_status["registered_hosts"]}
        assert hosts == {fig.plan.c2.host, fig.plan.m2.host}
        b.down()


def test_both_hosts_move_at_once_without_one_the_sockets_fail(tmp_path: Path) -> None:
    deadline, grace = 2.0, 1.5
    with fig7_bed(tmp_path, "rvnone") as (b, fig, _rv):
        ch = b.up(fig.ch, "ch", config(None, deadline, grace))
        mh = b.up(fig.mh, "mh", config(None, deadline, grace))
        (s_up, c_up), (s_down, c_down) = transfers(fig)
        for d in (ch, mh):
            d.wait_status(any_established)
        time.sleep(1.0)
        start = time.monotonic()
        both_move(fig)
        # Every end fails (an error, not a hang), soon after the deadline and grace.
        ends = [result(p, 60) for p in (c_up, c_down, s_up, s_down)]
        took = time.monotonic() - start
        senders = [e["error"] for e in ends[:2]]
        assert all(senders), f"the senders did not fail: {ends}\n{b.logs()}"
        assert took < 60
        for d in (ch, mh):
            st = d.status()
            assert st["hids"] == [], st["hids"]
            assert "lost its last path" in d.log_text()
        print(f"\nboth moved, no rendezvous point: the sockets failed after {took:.1f} s")
        b.down()


def test_a_hostile_rendezvous_point_cannot_tamper_or_replay(tmp_path: Path) -> None:
    with fig7_bed(tmp_path, "rvevil") as (b, fig, rv_ns):
        evil = py(rv_ns, "-m", "testbed.rendezvous", "hostile", "--bind", rendezvous.address())
        try:
            line = read_line(evil, 15)
            assert json.loads(line)["ready"], line
            ch, mh = move_both_under_traffic(b, fig, "both moved at once, a hostile one")
            time.sleep(1.5)  # the replays come a second after the genuine copies
        finally:
            evil.terminate()
        forwarded = json.loads(read_line(evil, 15))
        assert forwarded["tampered"] >= 1 and forwarded["replayed"] >= 1, forwarded
        rejected: dict[str, int] = {}
        for d in (ch, mh):
            for reason, n in d.status()["counters"]["messages_rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + n
        assert rejected.get("bad_signature", 0) >= 1, (rejected, forwarded)
        assert rejected.get("replay", 0) >= 1, rejected
        # Nothing changed but what the genuine copies said: each side has exactly the
        # other's new address.
        assert [h["active"] for h in mh.status()["hids"]] == [[fig.plan.c2.host]]
        assert [h["active"] for h in ch.status()["hids"]] == [[fig.plan.m2.host]]
        b.down()


# -- the CH moves, the MH behind a conntrack NAT -----------------------------------------


CH_NET = ("192.0.2.1", "192.0.2.10", 24)  # (its router, the CH, prefix length)
ISP = "198.51.100.254"  # that router on the CH's first segment
CH_NEW = CH_NET[1]


def second_network_for_the_ch(lab: NatLab) -> None:
    """Another network for the CH, one router (``isp``) away from its segment: the
    CH's second interface ``eth1`` links to it, down until the CH moves there. The
    NAT router and eve reach it via ``isp``; what the MH sends there leaves its NAT
    from the same public address as before (a NAT has one)."""
    gw, _, plen = CH_NET
    isp = lab.topo.add_ns("isp")
    lab.topo.link(isp, "eth0", lab.sw, "isp")
    lab.sw.ip("link", "set", "isp", "master", "br0")
    isp.addr_add("eth0", f"{ISP}/24")
    lab.topo.link(lab.ch, "eth1", isp, "eth1")
    isp.addr_add("eth1", f"{gw}/{plen}")
    isp.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    isp.ip("route", "add", "default", "via", WAN1)
    lab.ch.ip("link", "set", "eth1", "down")
    for ns in (lab.r, lab.eve):
        ns.ip("route", "add", f"192.0.2.0/{plen}", "via", ISP)
    # NAT B's packets leave through wan2 (their own routing table).
    lab.r.ip("route", "add", f"192.0.2.0/{plen}", "via", ISP, "dev", "wan2", "table", str(B_TABLE))


def move_ch(lab: NatLab) -> tuple[float, float]:
    """The CH leaves its network (the address, then the link) for the other one:
    when the old address went and the new one was up (time.time())."""
    gw, addr, plen = CH_NET
    lost = time.time()
    lab.ch.addr_del("eth0", f"{CH_ADDR}/24")
    lab.ch.ip("link", "set", "eth0", "down")
    lab.ch.ip("link", "set", "eth1", "up")
    lab.ch.addr_add("eth1", f"{addr}/{plen}")
    lab.ch.ip("route", "replace", "default", "via", gw, "dev", "eth1")
    return lost, time.time()


def nat_transfers(lab: NatLab) -> tuple[tuple[Popen[bytes], Popen[bytes]], ...]:
    """A paced TCP transfer each way, both opened by the MH (behind the NAT)."""
    up = tcp_transfer(lab.mh, lab.ch, CH_ADDR, NBYTES, RATE, 5001, timeout=20)
    sender = py(lab.ch, NATFLOWS, "tcp-send-server", "--bind", CH_ADDR, "--port", "5002",
                "--bytes", str(NBYTES), "--rate", str(RATE), "--timeout", "20")  # fmt: skip
    wait_for(sender, "listening", 10)
    receiver = py(lab.mh, NATFLOWS, "tcp-recv-client", "--connect", CH_ADDR, "--port", "5002",
                  "--timeout", "20")  # fmt: skip
    wait_for(receiver, "ready", 10)
    return up, (receiver, sender)


@pytest.mark.parametrize("nat", ["A", "B"])
def test_the_ch_moves_while_the_mh_is_behind_a_conntrack_nat(tmp_path: Path, nat: str) -> None:
    """NAT A keeps the MH's ports; NAT B (fully random) gives the flows new ones
    towards the CH's new address, which the CH learns from their knocks."""
    with topology(f"rvnat{nat}") as topo:
        lab = NatLab.build(topo, start=nat)
        second_network_for_the_ch(lab)
        for ns in (lab.ch, lab.mh):
            add_rst_counter(ns)
        b = Bed(tmp_path)
        with daemons_stopped(b.daemons.values, b.logs):
            try:
                b.serve_rendezvous(lab.eve)  # a third host with a stable address
                ch = b.up(lab.ch, "ch", config(EVE_ADDR))
                mh = b.up(lab.mh, "mh", config(EVE_ADDR))
                (s_up, c_up), (s_down, c_down) = nat_transfers(lab)
                for d in (ch, mh):
                    d.wait_status(lambda s: any_established(s) and s["rendezvous"][0]["registered"])
                seen = mh.status()["rendezvous"][0]["observed_as"]
                assert seen == SUBNETS[nat].seen_as(lab.addr)  # through the NAT
                time.sleep(2.0)
                up = move_ch(lab)
                pairs = {"MH->CH": (s_up, c_up), "CH->MH": (s_down, c_down)}
                got = finish((lab.ch, lab.mh), pairs, b.logs())
                report(f"the CH moved, the MH behind NAT {nat}", got, up)
                st = mh.status()
                assert [h["active"][0] for h in st["hids"]] == [CH_NEW], st["hids"]
                assert ch.status()["counters"]["relays_sent"] >= 1
                b.down()
            finally:
                if b.rv is not None:
                    b.rv.terminate()
