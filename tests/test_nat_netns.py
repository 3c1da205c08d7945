"""NAT traversal on the real kernel: `dime up` in the CH and the MH of the NAT
testbed (testbed/nat.py), and the MH moving between a public subnet and private
subnets behind two NATs of one router (A: port-preserving masquerade, leaving as
198.51.100.2; B: masquerade fully-random, leaving as 198.51.100.3).

* public -> A -> A (another private address) -> B -> public, over one set of flows
  opened once both daemons were up; the wire between the CH and the router shows
  the flows themselves (their own ports, no encapsulation in IHMP, no relay);
* a connection the CH opened while the MH was public, and the MH then behind B;
* the same moves with the router running `dime nat` (an IHMP-aware NAT); and flows
  the MH opened behind NAT B (known to the CH by the NAT's ports), with `dime nat`,
  then public -> A;
* keepalive: the MH idle behind B longer than the router's UDP timeout, then moved;
* forged packets from eve (the NAT's public address and the MH's old one as their
  source) that try to claim the flows;
* `dime status --json` in the CH: `behind_nat` and `observed_addr` of the MH's entry.

Each scenario carries a paced TCP transfer each way (SHA-256 checked, no reset in
the CH or the MH) and a UDP request/response stream MH -> CH that must be answered
after the last move. The resume time after each move (from the new address up to
the first data at each receiver, and to the first UDP answer) is printed (``-s``).
A failure says what went wrong, with the tails of the daemons' logs.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest

from testbed.capture import Capture, Packet
from testbed.nat import (
    CH_ADDR,
    IHMP_PORT,
    MOVES,
    NAT_B,
    PUBLIC,
    SUBNETS,
    WAN1,
    WAN2,
    Move,
    NatDaemon,
    NatLab,
    conversations,
    resumed_tcp,
    resumed_udp,
)
from testbed.natflows import answer, ask, tell
from testbed.netns import Namespace, add_rst_counter, rst_count, topology
from testbed.runner import Dime, Status
from tests.netns_util import (
    ROOT,
    daemons_stopped,
    py,
    result,
    tcp_transfer,
    wait_for,
)

pytestmark = pytest.mark.netns

NATFLOWS = str(ROOT / "testbed" / "natflows.py")
RATE = 4.0  # Mbit/s each way
GAP = 0.2  # s between the old address gone and the new one up
DWELL = 4.0  # s after a move before the next one (or the end): data must be back by then
WARMUP = 1.0  # s of traffic before the first move
UP_PORT, DOWN_PORT, UDP_PORT = 5001, 5002, 5300  # at the CH, at the MH, at the CH
UDP_MH_PORT = 5400  # the MH's UDP client port
TCP_TIMEOUT = 10  # s: a transfer that makes no progress that long fails (not hangs)


# -- the bed -------------------------------------------------------------------------------


@dataclass
class Traffic:
    """A TCP transfer each way and a UDP request/response stream MH -> CH."""

    up: tuple[Popen[bytes], Popen[bytes]]  # (receiver at the CH, sender at the MH)
    down: tuple[Popen[bytes], Popen[bytes]]  # (receiver at the MH, sender at the CH)
    udp: tuple[Popen[bytes], Popen[bytes]]  # (echo at the CH, client at the MH)
    nbytes: int
    down_port: int  # the CH's own port of the down connection (its client's)


@dataclass
class Outcome:
    """What :meth:`Bed.check` found: per move, seconds from the new address to data
    again (None: none came), and what the UDP ends reported."""

    resumed: list[dict[str, Any]]
    udp: dict[str, Any]
    echo: dict[str, Any]


@dataclass
class Bed:
    lab: NatLab
    tmp: Path
    daemons: dict[str, Dime] = field(default_factory=dict)
    allowed_ch_resets: Callable[[], int] = lambda: 0  # resets the CH may send (to eve)

    @property
    def ch(self) -> Namespace:
        return self.lab.ch

    @property
    def mh(self) -> Namespace:
        return self.lab.mh

    def dime(self, name: str) -> Dime:
        """``ch`` and ``mh``: dime up; ``r``: dime nat in the router."""
        if name not in self.daemons:
            ns = {"ch": self.lab.ch, "mh": self.lab.mh, "r": self.lab.r}[name]
            kind = NatDaemon if name == "r" else Dime
            self.daemons[name] = kind.in_dir(ns, self.tmp, name)
        return self.daemons[name]

    def up(self, *names: str, mh_config: str = "", extra: tuple[str, ...] = ()) -> None:
        for name in names:
            args = ["-v", *extra]
            if name == "mh" and mh_config:
                cfg = self.tmp / "mh.toml"
                cfg.write_text(mh_config)
                args += ["--config", str(cfg)]
            self.dime(name).up(*args)

    def aware_nat(self) -> None:
        """``dime nat`` in the router, IHMP from the uplinks let in."""
        self.lab.open_ihmp()
        self.dime("r").up()

    def logs(self) -> str:
        return "\n".join(d.log_tail(60) for d in self.daemons.values())

    def fail(self, what: str) -> AssertionError:
        """The failure, short (``bed`` prints the daemons' logs after it)."""
        return AssertionError(what)

    # -- moves ---------------------------------------------------------------------------

    def move(self, subnet: str, host: int | None = None, dwell: float = DWELL) -> Move:
        m = self.lab.move_to(subnet, host, gap=GAP)
        time.sleep(dwell)
        return m

    # -- traffic -------------------------------------------------------------------------

    def traffic(
        self, seconds: float, connected_udp: bool = False, mh_opens_all: bool = False
    ) -> Traffic:
        """Traffic for about ``seconds`` (the TCP connections then stay open, idle,
        until :meth:`check`). The CH connects to the MH for the CH -> MH transfer, or
        with ``mh_opens_all`` the MH connects to the CH for it too (the CH then sends
        on a connection it accepted: testbed.natflows tcp-send-server). ``connected_udp``:
        the CH's UDP socket is connected to the MH's address and port (it takes
        nothing from anyone else)."""
        lab = self.lab
        nbytes = int(RATE * 1e6 / 8 * seconds)
        up = tcp_transfer(
            self.mh, self.ch, CH_ADDR, nbytes, RATE, UP_PORT, TCP_TIMEOUT, hold_open=True
        )
        if mh_opens_all:
            sender = py(self.ch, NATFLOWS, "tcp-send-server", "--bind", CH_ADDR,
                        "--port", str(DOWN_PORT), "--bytes", str(nbytes), "--rate", str(RATE),
                        "--timeout", str(TCP_TIMEOUT), "--hold-open")  # fmt: skip
            wait_for(sender, "listening", 10)
            receiver = py(self.mh, NATFLOWS, "tcp-recv-client", "--connect", CH_ADDR,
                          "--port", str(DOWN_PORT), "--timeout", str(TCP_TIMEOUT))  # fmt: skip
            wait_for(receiver, "ready", 10)
            down = (receiver, sender)
        else:
            down = tcp_transfer(
                self.ch, self.mh, lab.addr, nbytes, RATE, DOWN_PORT, TCP_TIMEOUT, hold_open=True
            )
        peer = ["--peer", f"{lab.addr}:{UDP_MH_PORT}"] if connected_udp else []
        echo = py(self.ch, NATFLOWS, "udp-echo", "--bind", CH_ADDR, "--port", str(UDP_PORT),
                  *peer)  # fmt: skip
        wait_for(echo, "listening", 10)
        client = py(self.mh, NATFLOWS, "udp-client", "--connect", CH_ADDR,
                    "--port", str(UDP_PORT), "--bind-port", str(UDP_MH_PORT))  # fmt: skip
        wait_for(client, "ready", 10)
        down_port = DOWN_PORT if mh_opens_all else local_port(self.ch, DOWN_PORT)
        return Traffic(up, down, (echo, client), nbytes, down_port)

    def check(self, t: Traffic) -> Outcome:
        """Every byte intact both ways, no reset (but those ``allowed_ch_resets``), UDP
        answered after the last move and still at the end; per move, data back in
        each direction before the next move."""
        moves = self.lab.moves
        assert moves, "no move made"
        time.sleep(max(moves[-1].up + DWELL - time.time(), 0))
        # The moves are over: the senders may close (result() closes their stdin).
        sent_up, sent_down = result(t.up[1], 120), result(t.down[1], 120)
        broken = {n: s["error"] for n, s in (("MH -> CH", sent_up), ("CH -> MH", sent_down))
                  if s["error"] is not None}  # fmt: skip
        if broken:  # (not waiting for the receivers: testbed.xfer's waits 60 s of silence)
            for proc in (t.up[0], t.down[0], *t.udp):
                proc.kill()
            raise self.fail(f"TCP sender failed: {broken}")
        got_up, got_down = result(t.up[0], 120), result(t.down[0], 120)
        end = time.time()
        echo, client = t.udp
        client.terminate()
        udp = result(client, 30)
        echo.terminate()
        echoed = result(echo, 30)
        rows: list[dict[str, Any]] = []
        for i, m in enumerate(moves):
            rows.append({
                "move": m.what,
                "up": resumed_tcp(got_up, m.up),
                "down": resumed_tcp(got_down, m.up),
                "udp": resumed_udp(udp["reply_times"], m.up),
                "by": moves[i + 1].lost if i + 1 < len(moves) else end,
            })  # fmt: skip
        report(rows)  # first: whatever fails below, the resume times are shown (-s)
        for name, sent, got in (("MH -> CH", sent_up, got_up), ("CH -> MH", sent_down, got_down)):
            if sent["error"] is not None or got["error"] is not None:
                raise self.fail(f"TCP {name}: sender {sent['error']}, receiver {got['error']}")
            if not got["bytes"] == sent["bytes"] == t.nbytes or got["sha256"] != sent["sha256"]:
                raise self.fail(
                    f"TCP {name}: {sent['bytes']} bytes sent, {got['bytes']} received, "
                    f"SHA-256 {'equal' if got['sha256'] == sent['sha256'] else 'differs'}"
                )
        resets = {"ch": rst_count(self.ch) - self.allowed_ch_resets(), "mh": rst_count(self.mh)}
        if any(resets.values()):
            raise self.fail(f"TCP resets seen (beyond those to eve's forged sources): {resets}")
        for row, m in zip(rows, moves, strict=True):
            late = [k for k in ("up", "down", "udp") if row[k] is None or m.up + row[k] > row["by"]]
            if late:
                raise self.fail(
                    f"after the move {m.what}: no data {', '.join(late)} before "
                    f"{'the next move' if row['by'] != end else 'the end'} "
                    f"({row['by'] - m.up:.1f} s after the new address); resumed: {table(rows)}"
                )
        if not [r for r in udp["reply_times"] if r > end - 1.5]:
            raise self.fail(f"no UDP answer in the last 1.5 s: {udp['received']} answers of "
                            f"{udp['sent']} requests")  # fmt: skip
        return Outcome(rows, udp, echoed)

    def down_all(self) -> None:
        for d in self.daemons.values():
            if isinstance(d, NatDaemon):
                d.terminate().check()
            else:
                d.down().check()


def local_port(ns: Namespace, remote_port: int) -> int:
    """The local port of ``ns``'s established TCP connection to ``remote_port``."""
    out = ns.run("ss", "-tnH", "state", "established", "dport", "=", f":{remote_port}")
    found = re.search(rf"{re.escape(CH_ADDR)}:(\d+)", out)
    assert found, f"no connection to port {remote_port} in {ns.name}: {out!r}"
    return int(found.group(1))


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    return "; ".join(
        f"{r['move']}: up {fmt(r['up'])} down {fmt(r['down'])} udp {fmt(r['udp'])}" for r in rows
    )


def report(rows: list[dict[str, Any]]) -> None:
    print("\nresume after each move (s from the new address to data at the receiver; TCP in "
          "100 ms slots, 0.00: the same 100 ms):")  # fmt: skip
    for r in rows:
        cells = [("-" if r[k] is None else f"{r[k]:.2f}") for k in ("up", "down", "udp")]
        print(f"  {r['move']:<36} MH->CH {cells[0]:>5}  CH->MH {cells[1]:>5}  UDP {cells[2]:>5}")


@contextlib.contextmanager
def bed(tmp_path: Path, tag: str, start: str = "public") -> Iterator[Bed]:
    """The NAT testbed, resets counted in the CH and the MH; daemons stopped after."""
    with topology(tag) as topo:
        lab = NatLab.build(topo, start=start)
        for ns in (lab.ch, lab.mh):
            add_rst_counter(ns)
        b = Bed(lab, tmp_path)
        with daemons_stopped(b.daemons.values, b.logs):
            yield b


def chain_seconds(moves: int) -> float:
    """How long the transfers must last to carry data through ``moves`` moves."""
    return WARMUP + moves * (GAP + DWELL) + 3


# -- the wire ------------------------------------------------------------------------------


def check_direct(b: Bed, packets: list[Packet], t: Traffic) -> None:
    """After each move, the flows cross the CH's link with their own ports, between
    the CH and the MH's public source (its own address, or its NAT's); nothing but
    the router's uplinks and the MH's public address is on the CH's end; IHMP is a
    small part of what crosses (the data is not carried in it)."""
    moves = b.lab.moves
    flows = {"TCP MH -> CH": ("tcp", UP_PORT), "TCP CH -> MH": ("tcp", t.down_port),
             "UDP": ("udp", UDP_PORT)}  # fmt: skip
    for i, m in enumerate(moves):
        until = moves[i + 1].lost if i + 1 < len(moves) else float("inf")
        source = SUBNETS[m.subnet].seen_as(m.new)
        conv = conversations(packets, CH_ADDR, m.up, until)
        for what, (proto, port) in flows.items():
            if not any(k[:2] == (proto, source) and k[3] == port for k in conv):
                raise b.fail(
                    f"after the move {m.what}: no {what} packets with data between "
                    f"{CH_ADDR}:{port} and {source} on the CH's link; seen: {sorted(conv)[:20]}"
                )
    everything = conversations(packets, CH_ADDR)
    others = sorted({k[1] for k in everything} - {PUBLIC.host, WAN1, WAN2})
    assert not others, f"packets between the CH and hosts other than the MH's: {others}"
    ihmp = sum(n for k, n in everything.items() if IHMP_PORT in (k[2], k[3]))
    data = sum(n for k, n in everything.items() if (k[0], k[3]) in flows.values())
    assert ihmp * 20 < data, f"{ihmp} IHMP datagrams for {data} packets of the flows"


# -- scenarios -------------------------------------------------------------------------------


def run_chain(b: Bed, capture: Capture | None = None) -> Outcome:
    t = b.traffic(chain_seconds(len(MOVES)))
    time.sleep(WARMUP)
    for subnet, host in MOVES:
        b.move(subnet, host)
    out = b.check(t)
    if capture is not None:
        check_direct(b, capture.stop(), t)
    return out


def test_moves_between_the_public_subnet_and_two_nats(tmp_path: Path) -> None:
    """public -> A -> A (10.77.1.21) -> B -> public, the flows carried through every
    move, directly between the CH and where the MH is."""
    with bed(tmp_path, "natchain") as b:
        b.up("ch", "mh")
        cap = b.lab.capture(tmp_path / "wire.pcap")
        try:
            run_chain(b, cap)
        finally:
            cap.stop()
        b.down_all()


def test_a_connection_the_ch_opened_follows_the_mh_behind_nat_b(tmp_path: Path) -> None:
    """The CH connects to a server on the MH while the MH is public (and sends to it,
    the MH only acknowledging); the MH moves behind the port-randomizing NAT B."""
    with bed(tmp_path, "natinb") as b:
        b.up("ch", "mh")
        t = b.traffic(WARMUP + GAP + DWELL + 3)
        time.sleep(WARMUP)
        b.move("B")
        b.check(t)
        b.down_all()


def test_the_same_moves_through_an_ihmp_aware_nat(tmp_path: Path) -> None:
    """The router runs `dime nat`; the MH and the CH `dime up`; the same moves."""
    with bed(tmp_path, "nataware") as b:
        b.aware_nat()
        b.up("ch", "mh")
        run_chain(b)
        if not b.dime("r").running:
            raise b.fail("dime nat in the router is no longer running")
        b.down_all()


def test_flows_the_mh_started_behind_an_aware_nat_follow_it(tmp_path: Path) -> None:
    """The router runs `dime nat`; the MH starts behind the port-randomizing NAT B and
    opens every flow there (both TCP connections and the UDP stream: nobody can
    connect to it). It moves to the public subnet, then behind A: the flows, known
    to the CH by NAT B's address and ports, follow it."""
    with bed(tmp_path, "natawb", start="B") as b:
        b.aware_nat()
        b.up("ch", "mh")
        t = b.traffic(WARMUP + 2 * (GAP + DWELL) + 3, mh_opens_all=True)
        time.sleep(WARMUP)
        b.move("public")
        b.move("A")
        b.check(t)
        if not b.dime("r").running:
            raise b.fail("dime nat in the router is no longer running")
        b.down_all()


def test_through_a_port_randomizing_nat_in_nfqueue_mode(tmp_path: Path) -> None:
    """Both daemons rewrite every packet in user space (`--dataplane nfqueue`): the
    flows' NAT ports are applied there. public -> B -> public."""
    with bed(tmp_path, "natnfq") as b:
        b.up("ch", "mh", extra=("--dataplane", "nfqueue"))
        t = b.traffic(WARMUP + 2 * (GAP + DWELL) + 3)
        time.sleep(WARMUP)
        b.move("B")
        b.move("public")
        b.check(t)
        b.down_all()


def test_flows_the_mh_started_behind_an_unaware_nat_follow_it(tmp_path: Path) -> None:
    """No `dime nat`: the MH opens every flow behind the port-preserving NAT A (the CH
    knows them by A's address), then moves to the public subnet and behind B. The CH
    moves such flows only on their own knocks (other hosts behind A may have flows
    named by A's address too): from the public address, then from behind B."""
    with bed(tmp_path, "natuna", start="A") as b:
        b.up("ch", "mh")
        t = b.traffic(WARMUP + 2 * (GAP + DWELL) + 3, mh_opens_all=True)
        time.sleep(WARMUP)
        b.move("public")
        b.move("B")
        b.check(t)
        b.down_all()


KEEPALIVE = 1.0  # s: the MH's nat_keepalive
UDP_TIMEOUT = 3  # s: the router's conntrack UDP timeouts
REACH_IDLE = 5.0  # s without any traffic behind NAT B, then the CH sends first
IDLE = 8.0  # s without any traffic behind NAT B, then the MH moves


def test_keepalive_holds_an_idle_mh_behind_a_nat(tmp_path: Path) -> None:
    """The router forgets idle UDP mappings after 3 s; the MH's dime keeps its NAT
    mappings alive (nat_keepalive = 1.0). The MH, behind B with a TCP connection and
    a UDP socket pair to the CH, stays idle for 5 s: the CH sends first on both
    flows, and the MH gets it. Idle again for 8 s, then it moves to A: both flows
    work, both ways. All along, dime's keepalives cross the CH's link."""
    with bed(tmp_path, "natkeep") as b:
        b.lab.udp_timeouts(UDP_TIMEOUT)
        b.up("ch", "mh", mh_config=f"nat_keepalive = {KEEPALIVE}\n")
        server = py(b.ch, NATFLOWS, "peer-server", "--bind", CH_ADDR,
                    "--tcp-port", "5010", "--udp-port", "5310")  # fmt: skip
        client: Popen[bytes] | None = None
        cap = b.lab.capture(tmp_path / "idle.pcap")
        idle: list[tuple[float, float]] = []  # (from, to) wall clock
        try:
            wait_for(server, "listening", 10)
            client = py(b.mh, NATFLOWS, "peer-client", "--connect", CH_ADDR,
                        "--tcp-port", "5010", "--udp-port", "5310", "--bind-port", "5410",
                        "--timeout", "10")  # fmt: skip
            wait_for(client, "ready", 10)
            ping(b, client, "on the public subnet")
            push(b, server, client, "on the public subnet")
            b.move("B", dwell=0)
            ping(b, client, "behind NAT B")
            push(b, server, client, "behind NAT B")
            for seconds in (REACH_IDLE, IDLE):
                idle.append((time.time(), time.time() + seconds))
                time.sleep(seconds)
                if seconds == REACH_IDLE:
                    push(b, server, client, f"after {seconds:g} s idle behind B")
            b.move("A", dwell=0)
            where = f"after {IDLE:g} s idle behind B and a move to A"
            ping(b, client, where)
            push(b, server, client, where)
        finally:
            packets = cap.stop()
            for proc in (client, server):
                if proc is not None:
                    proc.kill()
                    proc.wait()
        # The keepalives: UDP from NAT B's address to the CH all through each idle
        # time, never UDP_TIMEOUT s apart (counted from a second in: the last
        # exchange's own packets come first).
        for start, end in idle:
            kept = sorted(p.t for p in packets if p.proto == 17 and p.src == WAN2
                          and p.dst == CH_ADDR and start + 1 <= p.t <= end)  # fmt: skip
            longest = max(b_ - a_ for a_, b_ in pairwise([start + 1, *kept, end]))
            if longest >= UDP_TIMEOUT:
                raise b.fail(
                    f"no NAT keepalive from {WAN2} for {longest:.1f} s while the MH was idle "
                    f"behind B (the router's UDP timeout is {UDP_TIMEOUT} s): {len(kept)} "
                    f"datagrams in {end - start - 1:.1f} s"
                )
        for ns, name in ((b.ch, "ch"), (b.mh, "mh")):
            if rst_count(ns):
                raise b.fail(f"TCP reset seen in {name}")
        b.down_all()


def ping(b: Bed, client: Popen[bytes], where: str) -> None:
    """The MH sends on both flows (UDP again every 0.3 s) and gets its echo."""
    pong = ask(client, "ping", 20)
    if pong["tcp"] is None or pong["udp"] is None or pong["error"]:
        raise b.fail(f"{where}: the MH's TCP/UDP ping was not answered: {pong}")
    print(f"{where}: the MH's ping answered in {pong['tcp']} s (TCP), {pong['udp']} s (UDP)")


def push(b: Bed, server: Popen[bytes], client: Popen[bytes], where: str) -> None:
    """The CH sends on both flows (UDP five times, 0.2 s apart); the MH receives."""
    tell(client, "recv")
    time.sleep(0.2)
    pushed = ask(server, "push", 20)
    got = answer(client, 20)
    if pushed["error"] or got["tcp"] is None or got["udp"] is None or got["error"]:
        raise b.fail(f"{where}: what the CH sent did not reach the MH: {pushed} -> {got}")
    print(f"{where}: what the CH sent reached the MH (TCP and UDP)")


#: RSTs the CH sends to eve's forged (address, port) pairs: expected (they name no
#: connection of the CH's), and not a reset of any flow. Added after dime up and
#: removed before dime down (dime's residue check compares the ruleset).
EVE_PORTS = range(20000, 20100)
EVE_RST = f"""
table inet evecount {{
  counter rst_to_eve {{ }}
  chain o {{
    type filter hook postrouting priority 10;
    tcp flags rst tcp dport {EVE_PORTS.start}-{EVE_PORTS.stop - 1} counter name rst_to_eve
  }}
}}
"""


def counter(ns: Namespace, table_: str, name: str) -> int:
    listing = json.loads(ns.run("nft", "-j", "list", "counter", "inet", table_, name))
    return int(next(c["counter"]["packets"] for c in listing["nftables"] if "counter" in c))


def test_forged_packets_do_not_claim_the_flows(tmp_path: Path) -> None:
    """The MH has moved behind NAT B. eve sends UDP datagrams and TCP ACKs with payload
    to the CH's ports of the flows, from NAT B's public address and from the MH's old
    public address, from ports the flows do not use (a NAT rebinding, or the MH back
    home, as an off-path attacker would claim it). The CH sends no flow data to eve's
    claimed sources, the flows go on (and through one more move), the CH's connected
    UDP socket never gets eve's payload, the TCP streams stay intact."""
    with bed(tmp_path, "nateve") as b:
        b.up("ch", "mh")
        cap = b.lab.capture(tmp_path / "before.pcap")
        t = b.traffic(WARMUP + 3 * (GAP + DWELL) + 3, connected_udp=True)
        time.sleep(WARMUP)
        b.move("B")
        used = {k[2] for k in conversations(cap.stop(), CH_ADDR)}
        eve_ports = [p for p in EVE_PORTS if p not in used][:10]
        b.ch.sh(f"nft -f - <<'EOF'\n{EVE_RST}\nEOF")
        b.allowed_ch_resets = lambda: counter(b.ch, "evecount", "rst_to_eve")
        cap = b.lab.capture(tmp_path / "after.pcap")
        try:
            attack_at = time.time()
            forge = py(b.lab.eve, NATFLOWS, "forge", "--dst", CH_ADDR,
                       "--src", f"{NAT_B.public},{PUBLIC.host}",
                       "--sports", ",".join(map(str, eve_ports)),
                       "--udp-dport", str(UDP_PORT),
                       "--tcp-dports", f"{UP_PORT},{t.down_port}")  # fmt: skip
            sent = result(forge, 60)
            assert sent["sent"] > 0, sent
            time.sleep(DWELL)
            b.move("A")
            out = b.check(t)
        finally:
            packets = cap.stop()
        if out.echo["foreign_count"]:
            raise b.fail(f"the CH's UDP socket received eve's datagrams: {out.echo}")
        claimed = {(NAT_B.public, p) for p in eve_ports} | {(PUBLIC.host, p) for p in eve_ports}
        to_eve = [p for p in packets if p.src == CH_ADDR and (p.dst, p.dport) in claimed
                  and p.payload and p.t >= attack_at]  # fmt: skip
        if to_eve:
            raise b.fail(
                f"the CH sent {len(to_eve)} packets with data to eve's forged sources, e.g. "
                f"{to_eve[0].dst}:{to_eve[0].dport} (port {to_eve[0].sport})"
            )
        print(f"eve sent {sent['sent']} forged packets from ports {eve_ports[0]}-"
              f"{eve_ports[-1]}; the CH reset {b.allowed_ch_resets()} of them")  # fmt: skip
        # Counted and checked: gone before dime's residue check (it compares rulesets,
        # counter values included).
        b.ch.run("nft", "delete", "table", "inet", "evecount")
        b.ch.run("nft", "reset", "counters", "table", "inet", "dmrst")
        b.allowed_ch_resets = lambda: 0
        b.down_all()


PROOF_LOSS = 1.0  # s during which the MH's answers to the CH's challenge are lost
LOSE_ANSWERS = f"""
table inet prooflost {{
  counter answers_lost {{ }}
  set heard {{ type ipv4_addr; flags dynamic; }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ip saddr {NAT_B.public} udp dport {IHMP_PORT} ip saddr @heard counter name answers_lost drop
    ip saddr {NAT_B.public} udp dport {IHMP_PORT} add @heard {{ ip saddr }}
  }}
}}
"""


def test_flows_whose_packets_beat_our_proof_through_a_nat_go_on(tmp_path: Path) -> None:
    """The MH moves behind the port-randomizing NAT B; the CH hears its HANDOFF, but
    not its answers to the challenge for 1 s (only the first IHMP packet through
    NAT B gets in). The MH moved its flows when the challenge reached it, so their
    packets come from NAT B's new ports while the CH has not proven the address:
    they are held, not taken as new flows (a UDP datagram so taken held the very
    port its knock then named, and the UDP stream stayed down until the next move).
    Once the address is proven and the flows knock, all three go on; the MH's TCP,
    whose timer backed off meanwhile, is prompted then."""
    with bed(tmp_path, "natproof") as b:
        b.up("ch", "mh")
        t = b.traffic(WARMUP + GAP + PROOF_LOSS + DWELL + 3, connected_udp=True)
        time.sleep(WARMUP)
        b.ch.sh(f"nft -f - <<'EOF'\n{LOSE_ANSWERS}\nEOF")
        try:
            b.move("B", dwell=PROOF_LOSS)
        finally:
            lost = counter(b.ch, "prooflost", "answers_lost")
            b.ch.run("nft", "delete", "table", "inet", "prooflost")
        if not lost:
            raise b.fail("no answer of the MH's was lost: the CH proved NAT B at once")
        time.sleep(DWELL)
        named_by_nat = [s for s in b.dime("ch").status()["sockets"]
                        if s["remote"].startswith(f"{NAT_B.public}:")]  # fmt: skip
        if named_by_nat:
            raise b.fail(f"the CH took the MH's packets for new flows: {named_by_nat}")
        # The ACK of the MH's HANDOFF came late (sent again meanwhile): its TCP to the
        # CH, whose timer backed off while the CH held its segments, is prompted then.
        log_text = b.dime("mh").log_text()
        acked = re.search(r"HANDOFF #\d+ to HID \d+ acknowledged", log_text)
        if acked is None or "prompted tcp" not in log_text[acked.end() :]:
            raise b.fail("the MH's TCP was not prompted after the late ACK of its HANDOFF")
        b.check(t)
        b.down_all()


def host_key(d: Dime) -> str:
    found = re.search(r"host key ([0-9a-f]{64})", d.log_text())
    assert found, f"no 'host key' line in {d.name}'s log\n{d.log_tail()}"
    return found.group(1)


def peer_entry(st: Status, key: str) -> dict[str, Any] | None:
    return next((dict(h) for h in st["hids"] if h.get("key") == key), None)


def test_status_says_whether_the_mh_is_behind_a_nat(tmp_path: Path) -> None:
    """The CH's `dime status --json`, the MH's entry: behind_nat false and no
    observed_addr requirement while it is public; behind_nat true with observed_addr
    198.51.100.2 behind A, 198.51.100.3 behind B; false again once public."""
    with bed(tmp_path, "natstat") as b:
        b.up("ch", "mh")
        echo = py(b.ch, NATFLOWS, "udp-echo", "--bind", CH_ADDR, "--port", str(UDP_PORT))
        wait_for(echo, "listening", 10)
        client = py(b.mh, NATFLOWS, "udp-client", "--connect", CH_ADDR,
                    "--port", str(UDP_PORT), "--interval", "0.1")  # fmt: skip
        try:
            wait_for(client, "ready", 10)
            key = host_key(b.dime("mh"))
            expect_view(b, key, None, "on the public subnet")
            for subnet, public in (("A", WAN1), ("B", WAN2), ("public", None)):
                b.lab.move_to(subnet, gap=GAP)
                expect_view(b, key, public, f"after the move to {subnet}")
            last_up = b.lab.moves[-1].up
            time.sleep(1.5)
            client.terminate()
            udp = result(client, 30)
        finally:
            for proc in (client, echo):
                proc.kill()
                proc.wait()
        if resumed_udp(udp["reply_times"], last_up) is None:
            raise b.fail("no UDP answer after the last move")
        b.down_all()


def expect_view(b: Bed, key: str, public: str | None, where: str, timeout: float = 20) -> None:
    """Until the CH's entry for the MH (by its key) says it is behind a NAT with
    public address ``public`` (None: not behind a NAT); AssertionError after
    ``timeout`` s, with the last entry seen."""
    deadline = time.monotonic() + timeout
    entry: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        entry = peer_entry(b.dime("ch").status(), key)
        if entry is not None:
            if public is None and entry.get("behind_nat") is False:
                return
            if entry.get("behind_nat") is True and entry.get("observed_addr") == public:
                return
        time.sleep(0.2)
    want = "behind_nat false" if public is None else f"behind_nat true, observed_addr {public}"
    raise b.fail(f"{where}: the CH's entry for the MH never had {want}; last seen: {entry}")
