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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testbed import rendezvous
from testbed.fig7 import V4, Fig7
from testbed.nat import EVE_ADDR, SUBNETS, NatLab, resumed_tcp
from testbed.netns import Namespace, add_rst_counter, rst_count, topology
from testbed.rendezvous import (
    CH_NEW,
    NBYTES,
    Pair,
    RendezvousDaemon,
    both_move,
    config,
    fig7_transfers,
    move_ch,
    nat_transfers,
    second_network_for_the_ch,
)
from testbed.runner import Dime, any_established
from tests.netns_util import daemons_stopped, py, read_line, result

pytestmark = pytest.mark.netns


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
    pairs = fig7_transfers(fig)
    for d in (ch, mh):
        d.wait_status(lambda s: any_established(s) and s["rendezvous"][0]["registered"])
    time.sleep(2.0)
    moved = both_move(fig)
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
        pairs = fig7_transfers(fig)
        (s_up, c_up), (s_down, c_down) = pairs["MH->CH"], pairs["CH->MH"]
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
# (its second network and the move: testbed.rendezvous.second_network_for_the_ch, move_ch)


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
                pairs = nat_transfers(lab)
                for d in (ch, mh):
                    d.wait_status(lambda s: any_established(s) and s["rendezvous"][0]["registered"])
                seen = mh.status()["rendezvous"][0]["observed_as"]
                assert seen == SUBNETS[nat].seen_as(lab.addr)  # through the NAT
                time.sleep(2.0)
                up = move_ch(lab)
                got = finish((lab.ch, lab.mh), pairs, b.logs())
                report(f"the CH moved, the MH behind NAT {nat}", got, up)
                st = mh.status()
                assert [h["active"][0] for h in st["hids"]] == [CH_NEW], st["hids"]
                assert ch.status()["counters"]["relays_sent"] >= 1
                b.down()
            finally:
                if b.rv is not None:
                    b.rv.terminate()
