"""A mobile host's everyday life, on the real kernel: `dime up` in the MH and the CH
of the Fig. 7 testbed, traffic both ways, and what a laptop does all day.

* the same two networks again and again (home -> office -> home: the MH gets back
  an address it had, whose ghost is still on lo), with hard and with soft handoffs;
* the daemon killed (`kill -9`) and started again, on either host, and a handoff
  while it is down;
* a control path that loses 30 % of IHMP datagrams (nft `numgen` on the router);
* the address the MH left, given to another host on the same link: no ARP fight.

Each scenario carries a paced TCP transfer each way (SHA-256 checked, no reset
anywhere) and a UDP request/response stream that must be answered after the last
move. Stall times (no data at a receiver around a move) are printed (``-s``).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from testbed.fig7 import V4, Subnet
from testbed.netns import Namespace, topology
from testbed.runner import Dime
from tests.netns_util import (
    XFER,
    OnFig7,
    add_rst_counter,
    check_transfer,
    daemons_stopped,
    fig7_testbed,
    py,
    result,
    rst_count,
    tcp_transfer,
    wait_for,
)

pytestmark = pytest.mark.netns

RATE = 4.0  # Mbit/s each way: light on the CPUs, enough to see every stall
SLOT = 0.1  # s: the receivers' timeline resolution


@dataclass
class Traffic:
    """A TCP transfer each way and a UDP request/response stream MH -> CH."""

    up: tuple[Popen[bytes], Popen[bytes]]  # (server at the CH, client at the MH)
    down: tuple[Popen[bytes], Popen[bytes]]  # (server at the MH, client at the CH)
    udp: tuple[Popen[bytes], Popen[bytes]]  # (echo at the CH, client at the MH)
    nbytes: int
    started: float = field(default_factory=time.time)


@dataclass
class Bed(OnFig7):
    tmp: Path
    daemons: dict[str, Dime] = field(default_factory=dict)
    _before: int = 0  # _ch_saw(the new address) when the last move began
    settled: float = 0.0  # wall clock when wait_handed_off last saw the CH follow
    #: (wall clock when the MH lost its old address, when it had the new one, what)
    moves: list[tuple[float, float, str]] = field(default_factory=list)

    def dime(self, name: str) -> Dime:
        if name not in self.daemons:
            self.daemons[name] = Dime.in_dir(getattr(self.fig, name), self.tmp, name)
        return self.daemons[name]

    def up(self, *names: str) -> None:
        for name in names:
            self.dime(name).up("-v")

    def logs(self) -> str:
        return "\n".join(d.log_tail(60) for d in self.daemons.values())

    # -- moves ---------------------------------------------------------------------------

    def hard(self, old: tuple[str, Subnet], new: tuple[str, Subnet], gap: float = 0.5) -> None:
        """The MH loses ``old`` (address and link); ``gap`` s later it is on ``new``."""
        self._before = self._ch_saw(new[1].host)
        lost = time.time()
        self.fig.detach(self.mh, *old)
        time.sleep(gap)
        self.fig.attach(self.mh, *new)
        self.moves.append((lost, time.time(), f"hard {old[1].host} -> {new[1].host}"))

    def soft(self, old: tuple[str, Subnet], new: tuple[str, Subnet], overlap: float) -> None:
        """The MH gets ``new``; ``overlap`` s later it leaves ``old``."""
        self._before = self._ch_saw(new[1].host)
        self.fig.attach(self.mh, *new)
        time.sleep(overlap)
        lost = time.time()
        self.fig.detach(self.mh, *old)
        self.moves.append((lost, time.time(), f"soft {old[1].host} -> {new[1].host}"))

    def _ch_saw(self, addr: str) -> int:
        """How many times the CH's log has had the MH at ``addr`` only (its HID table
        changes are logged at info level)."""
        return self.dime("ch").log_text().count(f"active [{addr}] unreachable")

    def wait_handed_off(self, old: str, new: str, timeout: float = 40) -> float:
        """Until the CH has the MH at ``new`` only, once more since the last move
        (seconds waited). From the CH's log: a `dime status` would cost a process
        every poll."""
        start = time.monotonic()
        while self._ch_saw(new) <= self._before:
            if time.monotonic() - start > timeout:
                raise AssertionError(f"the CH never had the MH at {new} only (it left {old})"
                                     f"\n{self.logs()}")  # fmt: skip
            time.sleep(0.05)
        self.settled = time.time()
        return time.monotonic() - start

    # -- traffic -------------------------------------------------------------------------

    def traffic(self, seconds: float) -> Traffic:
        """Traffic for about ``seconds`` (then the TCP connections idle until check())."""
        p = self.fig.plan
        nbytes = int(RATE * 1e6 / 8 * seconds)
        # Both connections stay open until check(): every move happens to a live
        # connection, and none closes while a move may still deliver late duplicates.
        up = tcp_transfer(self.mh, self.ch, p.c1.host, nbytes, RATE, 5001, 90, hold_open=True)
        down = tcp_transfer(self.ch, self.mh, p.m1.host, nbytes, RATE, 5002, 90, hold_open=True)
        echo = py(self.ch, XFER, "udp-echo", "--bind", p.c1.host, "--port", "5300",
                  "--duration", str(seconds + 30))  # fmt: skip
        wait_for(echo, "listening", 10)
        # The UDP stream runs until check() stops it, after the last move (however
        # long the moves take: under loss, say).
        client = py(self.mh, XFER, "udp-client", "--connect", p.c1.host, "--port", "5300",
                    "--duration", str(seconds + 120), "--interval", "0.05")  # fmt: skip
        wait_for(client, "ready", 10)
        return Traffic(up, down, (echo, client), nbytes)

    def check(self, t: Traffic) -> dict[str, list[float | None]]:
        """Every byte intact both ways, no reset, UDP answered after the last move;
        the stalls of each direction around each move, and when data came again."""
        namespaces = (self.ch, self.mh)
        last_move = max((w for _, w, _ in self.moves), default=t.started)
        # UDP must flow once the last move is over: 2 s after it, and after the CH
        # followed it (a lossy control path may take longer than that).
        after = max(last_move + 2, self.settled)
        time.sleep(max(after + 1 - time.time(), 0))
        # The moves are over: the senders may close (result() closes their stdin).
        sent_up, sent_down = result(t.up[1], 120), result(t.down[1], 120)
        up = result(t.up[0], 120)  # the CH's receiving side (its timeline)
        down = result(t.down[0], 120)
        for name, (server, _), sent, got in (("up", t.up, sent_up, up),
                                             ("down", t.down, sent_down, down)):  # fmt: skip
            assert sent["error"] is None, f"{name} sender: {sent['error']}\n{self.logs()}"
            assert got["error"] is None, f"{name} receiver: {got['error']}\n{self.logs()}"
            assert got["bytes"] == sent["bytes"] == t.nbytes, name
            assert got["sha256"] == sent["sha256"], name
            assert server.returncode == 0
        for ns in namespaces:
            assert rst_count(ns) == 0, f"TCP reset seen in {ns.name}\n{self.logs()}"
        echo, client = t.udp
        client.terminate()
        udp = result(client, 30)
        echo.terminate()
        echo.wait(10)
        late = [r for r in udp["reply_times"] if r > after - t.started]
        assert late, f"no UDP reply once the last move was over\n{self.logs()}"
        return {
            "up": stalls(up, self.moves),
            "down": stalls(down, self.moves),
            "up after": resumed(up, self.moves),
            "down after": resumed(down, self.moves),
        }

    def down_all(self) -> None:
        for d in self.daemons.values():
            d.down().check()


def stalls(received: dict[str, Any], moves: list[tuple[float, float, str]]) -> list[float | None]:
    """For each move, the longest time the receiver got nothing, from when the old
    address went until the next move (at most 5 s on), in 0.1 s slots; None for a
    move after the last byte arrived (nothing was left to stall)."""
    timeline: list[int] = received["timeline"]
    start: float = received["start"]
    out: list[float | None] = []
    ends = [lost for lost, _, _ in moves[1:]] + [float("inf")]
    for (lost, _, _), nxt in zip(moves, ends, strict=True):
        a = max(int((lost - start) / SLOT), 0)
        b = min(int((min(nxt, lost + 5) - start) / SLOT), len(timeline))
        if a >= len(timeline):
            out.append(None)
            continue
        longest = run = 0
        for slot in timeline[a:b]:
            run = run + 1 if slot == 0 else 0
            longest = max(longest, run)
        out.append(round(longest * SLOT, 1))
    return out


def resumed(received: dict[str, Any], moves: list[tuple[float, float, str]]) -> list[float | None]:
    """For each move, from when the MH had its new address to the first 0.1 s slot
    with data at the receiver (the demo's handoff gap, without its rate threshold);
    None for a move after the last byte arrived."""
    timeline: list[int] = received["timeline"]
    start: float = received["start"]
    out: list[float | None] = []
    for _, got, _ in moves:
        a = max(int((got - start) / SLOT), 0)
        first = next((i for i in range(a, len(timeline)) if timeline[i]), None)
        out.append(None if first is None else round(max(start + (first + 0.5) * SLOT - got, 0), 2))
    return out


@contextlib.contextmanager
def bed(tmp_path: Path, tag: str) -> Iterator[Bed]:
    with fig7_testbed(tag) as fig:
        b = Bed(fig, tmp_path)
        with daemons_stopped(b.daemons.values, b.logs):
            yield b


def report(name: str, b: Bed, s: dict[str, list[float | None]]) -> None:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v}"  # "-": the data was all in before the move

    up, down, up2, down2 = ([fmt(v) for v in s[k]] for k in s)
    print(f"\n{name}: stalls per move (s), MH->CH [{' '.join(up)}], CH->MH [{' '.join(down)}]"
          f"; data again after the new address MH->CH [{' '.join(up2)}], "
          f"CH->MH [{' '.join(down2)}]")  # fmt: skip
    for (_, when, what), u, d, u2, d2 in zip(b.moves, up, down, up2, down2, strict=True):
        print(f"  {time.strftime('%H:%M:%S', time.localtime(when))} {what}: "
              f"stall {u} / {d} s, data again {u2} / {d2} s after the new address")  # fmt: skip


M1, M2 = ("m1", V4.m1), ("m2", V4.m2)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_ten_handoffs_between_the_same_two_networks(tmp_path: Path, kind: str) -> None:
    """home -> office -> home ...: every return is to an address whose ghost is on lo
    (hard: the old address goes 0.5 s before the new one comes; soft: the new one
    comes 0.5 s before the old one goes)."""
    with bed(tmp_path, kind) as b:
        b.up("ch", "mh")
        t = b.traffic(14)
        time.sleep(1)
        here, there = M1, M2
        for _ in range(10):
            if kind == "hard":
                b.hard(here, there, gap=0.5)
            else:
                b.soft(here, there, overlap=0.5)
            b.wait_handed_off(here[1].host, there[1].host)
            time.sleep(0.3)
            here, there = there, here
        s = b.check(t)
        report(f"ten {kind} handoffs", b, s)
        # Back at m1 (ten moves): m1 is a locator again, nothing is rewritten.
        st = b.dime("mh").status()
        assert st["local_addresses"] == [V4.m1.host]
        assert st["ghosts"] == []
        b.down_all()


def kill(d: Dime) -> None:
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait(timeout=10)


@pytest.mark.parametrize("who", ["mh", "ch", "mh-moves-while-down"])
def test_a_daemon_killed_and_started_again_resumes(tmp_path: Path, who: str) -> None:
    """`kill -9` after a handoff (of the MH or of the CH), then `dime up` again: the
    flows go on. Or the MH moves while its daemon is down: it catches up."""
    with bed(tmp_path, f"restart{len(who)}") as b:
        b.up("ch", "mh")
        t = b.traffic(12)
        time.sleep(1)
        b.hard(M1, M2)
        b.wait_handed_off(V4.m1.host, V4.m2.host)
        victim = "ch" if who == "ch" else "mh"
        kill(b.dime(victim))
        if who == "mh-moves-while-down":
            time.sleep(0.5)
            b.hard(M2, M1)  # back home while no daemon runs on the MH
        time.sleep(1)
        before = b.dime(victim).before  # what there was before dime ran at all
        b.dime(victim).up("-v")
        b.dime(victim).before = before
        log = b.dime(victim).log_text()
        assert "taking over what an earlier dime left here" in log
        assert "resuming 1 peers of the previous daemon" in log
        if who == "mh-moves-while-down":
            b.wait_handed_off(V4.m2.host, V4.m1.host)
        time.sleep(2)
        s = b.check(t)
        report(f"restart ({who})", b, s)
        # One HID each side: the restarted end kept its peer, nobody made a second one.
        for name in ("ch", "mh"):
            hids = b.dime(name).status()["hids"]
            assert len(hids) == 1 and hids[0]["state"] == "established", hids
        b.down_all()


#: IHMP goes from port 4731 to port 4731 both ways: one rule loses 30 % of it in each
#: direction. (A second rule on the source port, as this had before, made it 51 %.)
LOSSY = """
table inet lossy {
  counter dropped { }
  chain lose {
    type filter hook forward priority 0; policy accept;
    udp dport 4731 numgen random mod 100 < 30 counter name dropped drop
  }
}
"""


@pytest.mark.parametrize("run", range(3))
def test_handoffs_converge_with_thirty_percent_of_ihmp_lost(tmp_path: Path, run: int) -> None:
    """The router drops 30 % of IHMP datagrams (both ways); the data path is fine.
    Five handoffs, and the whole run three times over (fresh daemons and keys each
    time; parallel workers take them side by side): every handoff converges."""
    with bed(tmp_path, f"loss{run}") as b:
        b.fig.r.sh(f"nft -f - <<'EOF'\n{LOSSY}\nEOF")
        b.up("ch", "mh")
        t = b.traffic(14)
        time.sleep(1)
        here, there = M1, M2
        waited = []
        for _ in range(5):
            b.hard(here, there)
            waited.append(round(b.wait_handed_off(here[1].host, there[1].host, 60), 1))
            time.sleep(0.5)
            here, there = there, here
        s = b.check(t)
        listing = b.fig.r.run("nft", "-j", "list", "counter", "inet", "lossy", "dropped")
        dropped = json.loads(listing)["nftables"][1]["counter"]["packets"]
        print(f"\nrun {run}: {dropped} IHMP datagrams dropped; the CH had the new "
              f"address after {waited} s")  # fmt: skip
        report(f"30 % IHMP loss, run {run}", b, s)
        assert dropped > 0
        b.down_all()


#: What crosses the MH's ARP hooks after dime's own rules (priority 0): requests for
#: the old address that reach its stack, and packets it sends naming either address.
ARP_COUNT = """
table arp count {
  counter asked_ghost { }
  counter named_ghost { }
  counter named_new { }
  chain i {
    type filter hook input priority 10;
    arp operation request arp daddr ip 198.51.100.2 counter name asked_ghost
  }
  chain o {
    type filter hook output priority 10;
    arp saddr ip 198.51.100.2 counter name named_ghost
    arp saddr ip 198.51.100.3 counter name named_new
  }
}
"""

#: A UDP sender bound to the MH's first address, to a host without dime on its own
#: link: its packets are never rewritten, so after the renumbering they leave from
#: the ghost and need ARP for the router.
GHOST_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.51.100.2", 0))
print("ready", file=sys.stderr, flush=True)
for _ in range(400):
    try:
        s.sendto(b"x", ("198.51.100.254", 9))
    except OSError:
        pass  # while the address is neither real nor a ghost yet
    time.sleep(0.05)
"""


def counters(ns: Namespace) -> dict[str, int]:
    listing = json.loads(ns.run("nft", "-j", "list", "counters", "table", "arp", "count"))
    return {c["counter"]["name"]: c["counter"]["packets"]
            for c in listing["nftables"] if "counter" in c}  # fmt: skip


def test_the_address_the_mh_left_is_not_fought_over(tmp_path: Path) -> None:
    """The MH is renumbered on its link (DHCP gives it another address) while flows
    are bound to the old one (a ghost now); another host gets the old address. The
    router's ARP for it must reach only the new owner (its pings go there, its
    neighbour entry is the new owner's), no request for it reaches the MH's stack,
    and no ARP packet that leaves the MH names it: the requests the MH makes for
    packets still sent from the ghost name its new address instead."""
    with topology("arp") as topo:
        r, mh, other = topo.add_ns("r"), topo.add_ns("mh"), topo.add_ns("other")
        topo.link(mh, "eth0", r, "p1")
        topo.link(other, "eth0", r, "p2")
        topo.bridge(r, "lan", ["p1", "p2"])
        r.addr_add("lan", "198.51.100.254/24")
        mh.addr_add("eth0", "198.51.100.2/24")
        mh.ip("route", "add", "default", "via", "198.51.100.254")
        ch = topo.add_ns("ch")
        topo.link(ch, "eth0", r, "c1")
        r.addr_add("c1", "192.0.2.126/25")
        ch.addr_add("eth0", "192.0.2.1/25")
        ch.ip("route", "add", "default", "via", "192.0.2.126")
        r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns in (ch, mh):
            add_rst_counter(ns)
        daemons = [Dime.in_dir(ns, tmp_path, name) for ns, name in ((ch, "ch"), (mh, "mh"))]
        sender: Popen[bytes] | None = None
        try:
            for d in daemons:
                d.up("-v")
            # The test's own counting table, gone again before dime's residue check.
            mh.sh(f"nft -f - <<'EOF'\n{ARP_COUNT}\nEOF")
            server, client = tcp_transfer(mh, ch, "192.0.2.1", 4_000_000, RATE, timeout=60)
            sender = py(mh, "-c", GHOST_SENDER)
            wait_for(sender, "ready", 10)
            time.sleep(1)
            # Renumbered on the same link (a new DHCP lease): the old address goes, the
            # new one comes.
            mh.addr_del("eth0", "198.51.100.2/24")
            mh.addr_add("eth0", "198.51.100.3/24")
            mh.ip("route", "replace", "default", "via", "198.51.100.254")
            mh.run("nft", "reset", "counters", "table", "arp", "count")  # count from here
            daemons[0].wait_status(lambda st: any(h["active"] == ["198.51.100.3"]
                                                  for h in st["hids"]), timeout=20)  # fmt: skip
            assert "198.51.100.2" in mh.run("ip", "-o", "addr", "show", "dev", "lo")
            # The old address goes to another host on the same link.
            other.addr_add("eth0", "198.51.100.2/24")
            r.run("ip", "neigh", "flush", "dev", "lan")
            pings = r.run("ping", "-c", "5", "-i", "0.2", "-W", "1", "198.51.100.2", check=False)
            assert " 0% packet loss" in pings, pings
            other_mac = other.run("cat", "/sys/class/net/eth0/address").strip()
            neigh = r.run("ip", "neigh", "show", "198.51.100.2", "dev", "lan")
            assert other_mac in neigh, (neigh, other_mac)
            check_transfer((ch, mh), server, client, 4_000_000)
            # Only the ghost's sender is left: the MH forgets its neighbours, and the
            # next packet from the ghost needs an ARP request.
            mh.ip("neigh", "flush", "dev", "eth0")
            time.sleep(0.5)
            seen = counters(mh)
            assert seen["asked_ghost"] == 0, seen
            assert seen["named_ghost"] == 0, seen
            assert seen["named_new"] > 0, seen
            mh.run("nft", "delete", "table", "arp", "count")
            for d in daemons:
                d.down().check()
        finally:
            if sender is not None:
                sender.kill()
            for d in daemons:
                d.stop()
