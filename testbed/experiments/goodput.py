"""Handoff goodput (the paper's Fig. 8) and the handoff gap.

A TCP transfer (iperf3, 15 s) from the MH to the CH of the Fig. 7 testbed, for dime,
Linux kernel MPTCP and plain TCP, with no handoff, a soft handoff (the new address
comes up at 5 s, the old one goes down at 10 s) and a hard handoff (the old address
goes down at 5 s, the new one comes up at 10 s). Every run builds a fresh topology.

Paths (:class:`DataPath`): the main one is IPv4 with data MH -> CH, all three systems.
dime and MPTCP also run over IPv6 (the Fig. 7 plan ``V6``) and with data CH -> MH, in
each combination (plain TCP never survives a handoff: the main path shows it). The
MH opens the connection in both directions (iperf3's client runs in the MH; for
CH -> MH it runs with ``-R``, and the server in the CH sends), so a handoff means the
same to the connection whichever way its data flows.

The path: the router delays each packet it forwards by ``DELAY_MS`` = 30 ms (netem
where the kernel has it, else the user-space NFQUEUE delay line of
:mod:`testbed.delay`), so a round trip MH-CH-MH crosses it twice: RTT ~ 60 ms, the
paper's 60 ms (read as the round trip, which is what its reference [53] lists). The
router shapes its egress to ``RATE_MBIT`` = 20 Mbit/s with tbf (queue: one RTT at that
rate, about a bandwidth-delay product); at that rate the delay line uses 5-10 % of a
core, and the no-handoff goodput (~18.3 Mbit/s, the rate less the headers) shows it
is the link, not the line, that limits. The RTT each run actually had is measured
with ping before the transfer, and under load during the no-handoff runs.

Timing: the events run in their own threads at 5 s and 10 s after the client's data
started (its first 100 ms report arrives 0.1 s after that), and every event records
when its ``ip`` command returned. The goodput timeline is the server's, whose clock
starts when it starts the test (a fraction of an RTT earlier).

MPTCP: see ``MPTCP_SETUP``: the in-kernel path manager, configured as its
documentation describes (limits, ``subflow`` endpoints for the MH's addresses, added
and removed with the addresses, as mptcpd does), and ``mptcpize run`` for iperf3.
Plain TCP: the connection is bound to the old address, so it dies when that address
goes (hard: at 5 s; soft: at 10 s, when the return path goes). The harness bounds
every run: the client is killed 2 s after its end, the server then gets SIGTERM
(iperf3 still prints its JSON with the intervals it saw).

Measures, per run:

* goodput: the **receiver's** application bytes per 100 ms interval, and their mean
  over the transfer (bytes delivered / duration). MH -> CH: the iperf3 server's JSON
  intervals. CH -> MH: the iperf3 client's (the receiver's, with ``-R``) interval
  reports, its ``Transfer`` column (3 significant digits; the server's JSON would be
  the sender's bytes, and the client's ``-J`` prints nothing until the end, where the
  start of the data must be seen as it happens). The receiver's interface bytes over
  the transfer (headers and retransmissions included) are kept as a cross-check,
  ``rx_if_mbps``;
* handoff gap: as :mod:`testbed.handoff_gap` defines it (the one definition the demo
  uses too), from the receiver's interface counter, sampled every 10 ms in the same
  clock as the events: the CH's c1 for MH -> CH, the sum of the MH's m1 and m2 for
  CH -> MH (m1's counter stays readable after it goes down). The reference time is
  when the new address was configured (``ip addr add`` returned) for a hard handoff,
  when the old address was removed for a soft one. Per system and path: median (of
  the runs that recovered), p90 (nearest rank, a run that never recovered counting
  as infinite) and max (None if any run never recovered);
* ratio to the ideal: soft = the same system and path's no-handoff goodput, hard =
  2/3 of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.capture import Capture
from testbed.delay import Emulation, emulate
from testbed.experiments.common import (
    RunContext,
    machine_line,
    mean,
    median,
    nearest_rank,
    progress,
    progress_done,
    pyplot,
    save_figure,
    write_result,
)
from testbed.fig7 import V4, V6, Fig7, Plan, Subnet
from testbed.handoff_gap import SAMPLE, WINDOW, RxSampler, bytes_at, handoff_gap
from testbed.iperf3 import iperf3_server, ping_rtt_ms
from testbed.netns import Namespace, topology
from testbed.runner import Dime, stop_all, up_all

NAME = "goodput"
TITLE = "Handoff goodput (Fig. 8) and handoff gap"

SYSTEMS = ("dime", "mptcp", "tcp")
HANDOFFS = ("none", "soft", "hard")
DELAY_MS = 30.0  # one way, per crossing of the router: RTT = 2 x 30 = 60 ms, the paper's 60 ms
RATE_MBIT = 20.0  # tbf on the router's egress; the delay line uses 5-10 % of a core at this rate
ROUTER_DEVS = ["rc1", "rc2", "rm1", "rm2"]
#: What a run's capture keeps (``Run.capture``): iperf3's connections and IHMP.
CAPTURE_FILTER = "tcp port 5201 or udp port 4731"
INTERVAL = 0.1  # iperf3 report interval (s)
GOAL_RATIO = 0.97
GOAL_GAP_EXTRA = 0.050  # gap goal: <= 1 RTT + 50 ms
GAP_QUANTILE = 0.9  # the gap's p90, by nearest rank


@dataclass(frozen=True)
class DataPath:
    """Which way a run's data goes: the IP version (the Fig. 7 plan V4 or V6) and the
    direction. The MH opens the connection either way (``reverse``: iperf3 -R, the
    server in the CH sends)."""

    family: int  # 4 | 6
    reverse: bool  # data CH -> MH

    @property
    def key(self) -> str:
        """The path's name in the results: "v4 MH->CH" ..."""
        return f"v{self.family} {'CH->MH' if self.reverse else 'MH->CH'}"

    @property
    def direction(self) -> str:
        return "CH -> MH" if self.reverse else "MH -> CH"

    @property
    def plan(self) -> Plan:
        return V6 if self.family == 6 else V4

    @property
    def systems(self) -> tuple[str, ...]:
        """Plain TCP only on the main path: it never survives a handoff anyway."""
        return SYSTEMS if self == MAIN else ("dime", "mptcp")


def path_fields(path: DataPath) -> dict[str, Any]:
    """What a run's result says about its path."""
    return {"data_path": path.key, "family": path.family, "direction": path.direction}


def path_key(res: dict[str, Any]) -> str:
    """A run result's path (results written before there were paths: the main one)."""
    return str(res.get("data_path", MAIN.key))


MAIN = DataPath(4, reverse=False)  # the paper's Fig. 8; the results' top-level keys
PATHS = (MAIN, DataPath(6, reverse=False), DataPath(4, reverse=True), DataPath(6, reverse=True))


@dataclass(frozen=True)
class Timing:
    """A run's schedule (s from the client's first data): the transfer's length, the
    two handoff events, and how long a transfer that never completes (a dead plain
    TCP connection) is given past its end before it is stopped."""

    duration: float
    ev1: float
    ev2: float
    grace: float = 2.0

    @property
    def ping_after(self) -> float:
        """When the ping under load starts: after slow start, well before the end."""
        return min(1.5, 0.3 * self.duration)


FULL = Timing(15.0, 5.0, 10.0)
SMOKE = Timing(1.0, 1 / 3, 2 / 3, grace=0.3)  # iperf3 -t takes whole seconds
#: Smoke mode runs each code path once, not every combination: dime's handoff and
#: reaction, MPTCP's endpoints, a plain TCP connection that dies with its address, the
#: ping under load (no handoff), and IPv6 with data CH -> MH (iperf3 -R, the MH's
#: summed counters) for dime and MPTCP. The other cells of the report say "not run".
SMOKE_RUNS = (
    (MAIN, "dime", "hard"),
    (MAIN, "mptcp", "soft"),
    (MAIN, "tcp", "hard"),
    (MAIN, "tcp", "none"),
    (PATHS[3], "dime", "hard"),
    (PATHS[3], "mptcp", "soft"),
)

MPTCP_SETUP = (
    "net.mptcp.enabled=1; ip mptcp limits set subflows 2 add_addr_accepted 2 on both hosts; "
    "on the MH an endpoint with the subflow flag for each address, added when the address "
    "comes up and deleted when it goes (what mptcpd does); iperf3 under mptcpize run at "
    "both ends"
)

GOODPUT_BYTES = (
    "the receiver's application bytes per 100 ms: MH -> CH the iperf3 server's JSON "
    "intervals; CH -> MH (iperf3 -R) the iperf3 client's interval reports (Transfer, "
    "3 significant digits). Gap: the receiver's interface rx counter (CH: c1; MH: m1 + m2)"
)

#: What a dime gap is made of, from captures of single runs (the numbers are one-way
#: delays of the 30 ms line; see docs/architecture.md, "After an outage, and after the
#: peer's move").
GAP_ANATOMY = (
    "Hard handoff: the MH's HANDOFF reaches the CH, which challenges the new address "
    "before it sends anything there (a round trip); the MH moves its flows when the "
    "challenge arrives and prompts its TCP, whose retransmission timer backed off "
    "during the outage (RFC 6069 over IPv4, a path MTU signal over IPv6: "
    "`stacktrans/rto_revert.py`). After a retransmission timeout TCP sends one "
    "segment and waits for its ACK before the rest of its window: a second round "
    "trip. So the floor is about 2.5 RTT from the new address (HANDOFF, challenge, "
    "answer and first segment, its ACK, the window), plus half the 100 ms window of "
    "the definition: the 1 RTT + 50 ms goal cannot be met without sending to an "
    "address before it is proven, or without TCP skipping its loss recovery. With "
    "BBR, the kernel's default here, the first ACK after the 5 s outage also finds "
    "BBR's 10 s min-RTT filter expired: it enters PROBE_RTT (cwnd 4 for 200 ms + 1 "
    "RTT; `ss -ti` in the MH shows it from about 300 to 600 ms after the new address) "
    "right after the handoff. Every BBR flow does so every 10 s (the no-handoff runs "
    "too); MPTCP's fresh subflow does not in the 5 s left. "
    "Soft handoff: make-before-break. The new address comes with a new default route "
    "(`ip route replace`); dime follows the route (`follow_routes`, the default): once "
    "the CH has verified the new address (the ADDR_UP's challenge, about one round trip "
    "after the address), the MH moves the flow there with one FLOW_MOVE while the old "
    "address still works, at about 5.1 s. When the old address goes at 10 s nothing is "
    "sent to it any more: in every dime soft run the rate at the CH stays at the link's "
    "over the removal (100 ms intervals of the timeline), nothing is lost and nothing "
    "is prompted. What the gap counts instead is BBR's PROBE_RTT (cwnd 4 for 200 ms + "
    "1 RTT, 10 s after the flow's lowest RTT sample), which falls about 10.3 to 10.9 s "
    "into every transfer, the no-handoff runs too (their column 'no handoff' above: "
    "the same definition at the same instant; where one run's PROBE_RTT falls later "
    "than the others', its gap is longer). (Before dime followed routes, the flow "
    "stayed on the old address until it went: what the CH sent there while the news "
    "travelled was lost, and the gap was about one round trip plus the prompt's "
    "retransmission: 70 to 160 ms.) With "
    "data CH -> MH, MPTCP uses both links while both are up (a subflow on each, each "
    "link shaped on its own), so its soft-handoff goodput exceeds one link's."
)

PAPER = {
    "soft": "all protocols almost identical (constant rate, bound by the links)",
    "hard": "DIME ~2/3 of soft, 'almost exactly'; MIPv6 and HIP noticeably lower",
    "gap": "no number; DIME's control exchange is fastest (hard handoff, Fig. 8)",
}

_LINE = re.compile(r"^\[\s*\d+\]\s+(\d+\.\d+)-(\d+\.\d+)\s+sec")
# An interval report of a receiving iperf3 client (-R): no Retr column, and not one of
# the two summaries at the end (they end in "sender" / "receiver").
_RECV = re.compile(
    r"^\[\s*\d+\]\s+(\d+\.\d+)-(\d+\.\d+)\s+sec\s+(\d+(?:\.\d+)?)\s+([KMG]?)Bytes"
    r"\s+\d+(?:\.\d+)?\s+[KMG]?bits/sec\s*$"
)
_UNIT = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}  # iperf3's byte units are binary


# -- measuring -----------------------------------------------------------------------------


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_ACKED = re.compile(r"IHMP (\w+) #\d+ to HID \d+ acknowledged in")


def dime_reaction(log: Path, ref_wall: float) -> dict[str, Any]:
    """From the MH's dime log: how long after ``ref_wall`` dime noticed the address
    change, had its translation in place, and had the peer's acknowledgement (s)."""
    out: dict[str, Any] = {}
    try:
        text = log.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        m = _LOG_TIME.match(line)
        if not m:
            continue
        ts = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
        dt = ts - ref_wall
        if dt < -0.05:  # the log has ms resolution; the event time is taken after the fact
            continue
        dt = round(max(dt, 0.0), 3)
        if "noticed_s" not in out and re.search(r"INFO dime: (address (up|down)|handoff):", line):
            out["noticed_s"] = dt
        elif "rewrite_s" not in out and re.search(r"rewrite remote .* local \{'", line):
            out["rewrite_s"] = dt
        elif "peer_ack_s" not in out and (a := _ACKED.search(line)):
            out["peer_ack_s"], out["message"] = dt, a.group(1)
    return out


# -- one run -------------------------------------------------------------------------------


@dataclass
class Run:
    system: str
    handoff: str
    index: int
    timing: Timing
    path: DataPath = MAIN
    cc: str | None = None  # TCP congestion control of the transfer (iperf3 -C), else the default
    capture: Path | None = None  # a pcap of the router's CH-side device during the transfer
    events: dict[str, float] = field(default_factory=dict)  # name -> monotonic time
    wall: dict[str, float] = field(default_factory=dict)  # name -> time.time() (for logs)
    notes: list[str] = field(default_factory=list)


def _attach(fig: Fig7, run: Run, dev: str, sub: Subnet, mptcp_id: int | None) -> None:
    """Fig7.attach, with the instant the address was configured recorded."""
    mh = fig.mh
    mh.ip("link", "set", dev, "up")
    mh.addr_add(dev, sub.host_cidr())
    run.events["new_addr"], run.wall["new_addr"] = time.monotonic(), time.time()
    family = ("-6",) if fig.plan.family == 6 else ()
    mh.ip(*family, "route", "replace", "default", "via", sub.router, "dev", dev)
    run.events["new_route"] = time.monotonic()
    fig.events.append((run.events["new_route"], f"mh: {sub.host} up on {dev}"))
    if mptcp_id is not None:  # what mptcpd/NetworkManager do when an address appears
        mh.ip("mptcp", "endpoint", "add", sub.host, "dev", dev, "id", str(mptcp_id), "subflow")
        run.events["mptcp_endpoint"] = time.monotonic()


def _detach(fig: Fig7, run: Run, dev: str, sub: Subnet, mptcp_id: int | None) -> None:
    fig.detach(fig.mh, dev, sub)
    run.events["old_down"], run.wall["old_down"] = fig.events[-1][0], time.time()
    if mptcp_id is not None:  # the address is gone: so is its endpoint (and its subflows)
        fig.mh.ip("mptcp", "endpoint", "delete", "id", str(mptcp_id), check=False)


def _mptcp_setup(fig: Fig7) -> None:
    for ns in (fig.mh, fig.ch):
        ns.run("sysctl", "-qw", "net.mptcp.enabled=1")
        ns.ip("mptcp", "limits", "set", "subflows", "2", "add_addr_accepted", "2")
    p = fig.plan
    fig.mh.ip("mptcp", "endpoint", "add", p.m1.host, "dev", "m1", "id", "1", "subflow")


def _at(when: float, action: Callable[[], None], errors: list[str]) -> threading.Thread:
    def go() -> None:
        delay = when - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            action()
        except Exception as exc:  # reported with the run, never lost
            errors.append(f"event failed: {exc!r}")

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


def _stop_proc(proc: subprocess.Popen[bytes], grace: float = 3.0) -> tuple[bytes, bytes]:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def _server_intervals(out: bytes) -> tuple[list[float], str | None]:
    """Bytes per interval from the iperf3 server's JSON (also after SIGTERM)."""
    try:
        doc = json.loads(out)
    except ValueError:
        return [], "iperf3 server printed no JSON"
    vals = [float(iv["sum"]["bytes"]) for iv in doc.get("intervals", [])]
    return vals, doc.get("error")


def receiver_intervals(lines: list[str], n: int) -> list[float]:
    """Bytes per ``INTERVAL`` from a receiving iperf3 client's text reports (-R), ``n``
    of them: each report in the slot its start time names (a report missing leaves a
    0; the summaries at the end and anything past ``n`` are left out)."""
    out = [0.0] * n
    for line in lines:
        m = _RECV.match(line)
        if not m:
            continue
        k = round(float(m.group(1)) / INTERVAL)
        if 0 <= k < n:
            out[k] += float(m.group(3)) * _UNIT[m.group(4)]
    return out


def one_run(
    ctx: RunContext,
    run: Run,
    label: str,
    *,
    delay_ms: float = DELAY_MS,
    rate_mbit: float = RATE_MBIT,
    loaded_rtt: bool = False,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "system": run.system,
        "handoff": run.handoff,
        "run": run.index,
        **path_fields(run.path),
    }
    prefix = ("mptcpize", "run") if run.system == "mptcp" else ()
    with topology(f"gp{run.index}") as topo:
        fig = Fig7.build(topo, run.path.plan)
        plan = fig.plan
        em: Emulation | None = None
        dimes: list[Dime] = []
        try:
            em = emulate(fig.r, ROUTER_DEVS, delay_ms, rate_mbit)
            if run.system == "dime":
                # One log per run: the path too ("v6-CH-MH"), or later paths overwrite it.
                where = run.path.key.replace(" ", "-").replace("->", "-")
                tag = f"{run.system}-{where}-{run.handoff}-{run.index}"
                dimes = [Dime.in_dir(ns, ctx.tmp, f"{tag}-{n}") for ns, n in
                         ((fig.mh, "mh"), (fig.ch, "ch"))]  # fmt: skip
                up_all(dimes, "-v")
            elif run.system == "mptcp":
                _mptcp_setup(fig)
            res["tcp_cc"] = fig.mh.run("sysctl", "-n", "net.ipv4.tcp_congestion_control").strip()
            res["rtt_ms"] = ping_rtt_ms(
                fig.mh, plan.c1.host, count=1 if ctx.smoke else 5, family=plan.family
            )
            with _captured(fig, run.capture):
                res.update(_transfer(fig, run, label, prefix, loaded_rtt))
        finally:
            if em is not None:
                res["delay_line"] = em.stop()
                res["path"] = em.describe()
                if em.mode == "nfqueue" and (
                    "error" in res["delay_line"] or res["delay_line"].get("died_early")
                ):
                    run.notes.append(f"delay line failed: {res['delay_line']}")
            stop_all(dimes)
            if dimes:
                res["dime_logs"] = [str(d.log) for d in dimes]
                ref = "new_addr" if run.handoff == "hard" else "old_down"
                if ref in run.wall:
                    res["dime_mh"] = dime_reaction(dimes[0].log, run.wall[ref])
    res["events"] = {
        k: round(v - run.events.get("t0", v), 4) for k, v in run.events.items() if k != "t0"
    }
    if run.notes:
        res["notes"] = run.notes
    return res


@contextlib.contextmanager
def _captured(fig: Fig7, path: Path | None) -> Iterator[None]:
    """tcpdump on the router's CH-side device (every packet between the hosts passes it
    once) into ``path`` while the block runs; nothing without a path."""
    if path is None:
        yield
        return
    cap = Capture(fig.r, "rc1", CAPTURE_FILTER, path)
    cap.start()
    try:
        yield
    finally:
        cap.stop()


def _ns_process(ns: Namespace, seconds: float) -> subprocess.Popen[bytes]:
    """A process that stays in ``ns`` for ``seconds`` (an RxSampler reads the
    namespace's counters through it), once it is in there: ``ip netns exec`` starts
    in the caller's namespace."""
    proc = ns.popen("sleep", f"{seconds:g}", stdout=subprocess.DEVNULL)
    want = os.stat(f"/run/netns/{ns.name}").st_ino
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == want:
                return proc
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"no process entered {ns.name} in 5 s")


def _transfer(
    fig: Fig7, run: Run, label: str, prefix: tuple[str, ...], loaded_rtt: bool
) -> dict[str, Any]:
    t = run.timing
    plan = fig.plan
    rev = run.path.reverse
    server = iperf3_server(fig.ch, "-i", str(INTERVAL), prefix=prefix)
    # The receiver's counter: the CH's c1, or (CH -> MH) the MH's two interfaces summed.
    holder: subprocess.Popen[bytes] | None = None
    if rev:
        holder = _ns_process(fig.mh, t.duration + t.grace + 60)
        sampler = RxSampler(holder.pid, "m1", "m2")
    else:
        sampler = RxSampler(server.pid, "c1")
    sampler.start()
    client = fig.mh.popen(
        *prefix, "iperf3", "-c", plan.c1.host, "-t", f"{t.duration:g}", "-i", str(INTERVAL),
        "-f", "k", "--forceflush", "--connect-timeout", "3000", *(("-R",) if rev else ()),
        *(("-C", run.cc) if run.cc else ()),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    first = threading.Event()
    lines: list[str] = []

    def reader() -> None:
        assert client.stdout is not None
        for raw in client.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            m = _LINE.match(line)
            if m and not first.is_set() and m.group(1) == "0.00":
                run.events["t0"] = time.monotonic() - float(m.group(2))
                first.set()

    rd = threading.Thread(target=reader, daemon=True)
    rd.start()
    out: dict[str, Any] = {}
    errors: list[str] = []
    ping: subprocess.Popen[bytes] | None = None
    ivs: list[float] = []
    where = "MH" if rev else "CH"
    try:
        if not first.wait(15):
            raise RuntimeError("iperf3 client never started: " + " | ".join(lines[-5:]))
        t0 = run.events["t0"]
        mptcp = run.system == "mptcp"
        m1, m2 = plan.m1, plan.m2
        if run.handoff == "soft":
            _at(t0 + t.ev1, lambda: _attach(fig, run, "m2", m2, 2 if mptcp else None), errors)
            _at(t0 + t.ev2, lambda: _detach(fig, run, "m1", m1, 1 if mptcp else None), errors)
        elif run.handoff == "hard":
            _at(t0 + t.ev1, lambda: _detach(fig, run, "m1", m1, 1 if mptcp else None), errors)
            _at(t0 + t.ev2, lambda: _attach(fig, run, "m2", m2, 2 if mptcp else None), errors)
        if loaded_rtt:
            n = max(int((t.duration - t.ping_after - 1.0) / 0.2), 3)
            ping = fig.mh.popen(
                "sh", "-c",
                f"sleep {t.ping_after:g}; exec ping -{plan.family} -c {n} -i 0.2 -q {plan.c1.host}",
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = t0 + t.duration + t.grace
        every = 0.25 if sys.stderr.isatty() else 2.5  # a log file gets fewer lines
        shown = 0.0
        while client.poll() is None and time.monotonic() < deadline:
            now = time.monotonic() - t0
            if now - shown >= every:
                shown = now
                rate = sampler.rate_bps() / 1e6
                progress(f"   {label}  t={now:5.1f}s  {rate:6.2f} Mbit/s at the {where}")
            time.sleep(0.05)
        if client.poll() is None:
            run.notes.append("iperf3 client did not finish in time: killed (flow dead)")
        _stop_proc(client)
        rd.join(timeout=2)
        # The server ends on its own after a complete test; otherwise it is stopped
        # (SIGTERM: it still prints its JSON with the intervals it saw).
        try:
            sout, _ = server.communicate(timeout=t.grace)
        except subprocess.TimeoutExpired:
            sout, _ = _stop_proc(server)
            run.notes.append("iperf3 server stopped by the harness (test never completed)")
        if not rev:  # the server received: its JSON has the receiver's bytes
            ivs, err = _server_intervals(sout)
            if err:
                out["iperf3_error"] = err
        if ping is not None:
            pout = ping.communicate(timeout=t.duration + 10)[0].decode()
            for line in pout.splitlines():
                if "min/avg/max" in line:
                    out["rtt_loaded_ms"] = float(line.split("=")[1].split("/")[1])
    finally:
        for p in (client, server, ping, holder):
            if p is not None and p.poll() is None:
                _stop_proc(p, 1.0)
        sampler.stop()
    if errors:
        run.notes.extend(errors)
    n = round(t.duration / INTERVAL)
    # CH -> MH: the client received; its reports (read whole: the reader is done).
    ivs = receiver_intervals(lines, n) if rev else (ivs + [0.0] * n)[:n]
    out["timeline_mbps"] = [round(b * 8 / INTERVAL / 1e6, 3) for b in ivs]
    out["goodput_mbps"] = round(sum(ivs) * 8 / t.duration / 1e6, 3)
    t0 = run.events["t0"]
    wire = bytes_at(sampler.samples, t0 + t.duration) - bytes_at(sampler.samples, t0)
    out["rx_if_mbps"] = round(wire * 8 / t.duration / 1e6, 3)
    out["client_tail"] = lines[-4:]
    if run.handoff == "none":
        # The same definition at the instant of the handoffs' reference, without one:
        # what the flow does there anyway (BBR's PROBE_RTT falls about there).
        dip = handoff_gap(
            sampler.samples, t0 + t.ev2, start=t0, first_event=t0 + t.ev1, end=t0 + t.duration
        )
        out["dip_s"] = None if dip.seconds is None else round(dip.seconds, 3)
    else:
        ref = run.events.get("new_addr" if run.handoff == "hard" else "old_down")
        if ref is None:
            out["gap_s"], out["pre_mbps"] = None, None
        else:
            gap = handoff_gap(
                sampler.samples, ref, start=t0, first_event=t0 + t.ev1, end=t0 + t.duration
            )
            out["gap_s"] = None if gap.seconds is None else round(gap.seconds, 3)
            out["pre_mbps"] = round(gap.pre_bps / 1e6, 3)
    return out


# -- the experiment ------------------------------------------------------------------------


def gap_stats(gaps: list[float | None]) -> dict[str, Any]:
    """Median, p90 and max of handoff gaps (s; None: the run never recovered).

    Median: of the runs that recovered (None if none did). p90: nearest rank over all
    runs, one that never recovered counting as infinitely long (None when the rank
    falls on one). Max: None if any run never recovered."""
    rec = sorted(x for x in gaps if x is not None)
    p90 = nearest_rank([math.inf if x is None else x for x in gaps], GAP_QUANTILE) if gaps else None
    return {
        "recovered": len(rec),
        "gap_s_median": round(median(rec), 3) if rec else None,
        "gap_s_p90": round(p90, 3) if p90 is not None and math.isfinite(p90) else None,
        "gap_s_max": round(max(rec), 3) if rec and len(rec) == len(gaps) else None,
    }


def summarize(runs: list[dict[str, Any]], timing: Timing, path: DataPath = MAIN) -> dict[str, Any]:
    """Per system of ``path`` and handoff: goodput (mean, runs, min, max), the mean
    timeline, the gap's statistics (:func:`gap_stats`), dime's reaction, and the
    ratio to the ideal (soft: the same system and path's no-handoff goodput; hard:
    the share of the transfer with an address, 2/3, of it). Only ``path``'s runs."""
    summary: dict[str, Any] = {}
    runs = [r for r in runs if path_key(r) == path.key]
    for system in path.systems:
        per: dict[str, Any] = {}
        for handoff in HANDOFFS:
            rs = [r for r in runs if r["system"] == system and r["handoff"] == handoff]
            ok = [r for r in rs if "goodput_mbps" in r]
            g = [r["goodput_mbps"] for r in ok]
            entry: dict[str, Any] = {
                "n": len(ok),
                "failed": len(rs) - len(ok),
                "goodput_mbps": round(mean(g), 3),
                "goodput_mbps_runs": g,
                "goodput_mbps_min": min(g) if g else None,
                "goodput_mbps_max": max(g) if g else None,
            }
            if ok:
                n = len(ok[0]["timeline_mbps"])
                entry["timeline_mbps"] = [
                    round(mean([r["timeline_mbps"][i] for r in ok]), 3) for i in range(n)
                ]
            if handoff != "none":
                gaps = [r.get("gap_s") for r in ok]
                entry["gap_s_runs"] = gaps
                entry.update(gap_stats(gaps))
            else:
                dips = [r["dip_s"] for r in ok if r.get("dip_s") is not None]
                entry["dip_s_runs"] = [r.get("dip_s") for r in ok]
                entry["dip_s_median"] = round(median(dips), 3) if dips else None
            reacts = [r["dime_mh"] for r in ok if r.get("dime_mh")]
            if reacts:
                entry["dime_mh_median_s"] = {
                    k: round(median([x[k] for x in reacts if k in x]), 3)
                    for k in ("noticed_s", "rewrite_s", "peer_ack_s")
                    if any(k in x for x in reacts)
                }
            per[handoff] = entry
        ideal = per["none"]["goodput_mbps"]
        for handoff, factor in (
            ("soft", 1.0),
            ("hard", (timing.duration - (timing.ev2 - timing.ev1)) / timing.duration),
        ):
            e = per[handoff]
            e["ideal_mbps"] = round(ideal * factor, 3)
            e["ratio"] = (
                round(e["goodput_mbps"] / (ideal * factor), 3) if ideal and e["n"] else None
            )
        summary[system] = per
    return summary


def schedule(ctx: RunContext) -> list[tuple[int, DataPath, str, str]]:
    """(run index, path, system, handoff) in the order they run: every combination
    (each path with its systems) ``runs`` times, each repetition running everything
    once, so that slow drift of the machine hits all alike; in smoke mode only
    :data:`SMOKE_RUNS`."""
    if ctx.smoke:
        return [(0, path, system, handoff) for path, system, handoff in SMOKE_RUNS]
    return [
        (i, p, s, h) for i in range(ctx.runs) for p in PATHS for s in p.systems for h in HANDOFFS
    ]


def _rtt_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The RTT before the transfers (ping) and under load (no-handoff runs), ms."""
    rtts = [r["rtt_ms"] for r in runs if isinstance(r.get("rtt_ms"), float)]
    rtts = [x for x in rtts if not math.isnan(x)]
    loaded = [r["rtt_loaded_ms"] for r in runs if "rtt_loaded_ms" in r]
    return {
        "rtt_ms": {
            "mean": round(mean(rtts), 2) if rtts else None,
            "min": min(rtts, default=None),
            "max": max(rtts, default=None),
        },
        "rtt_loaded_ms": {
            "mean": round(mean(loaded), 2) if loaded else None,
            "max": max(loaded, default=None),
        },
    }


def summarize_paths(runs: list[dict[str, Any]], timing: Timing) -> dict[str, Any]:
    """Per path (key :attr:`DataPath.key`): its family, direction and systems, RTT,
    summary (:func:`summarize`) and dime's goals (:func:`_comparisons`, against 1 RTT
    + 50 ms of that path's own RTT). Paths without a run are left out."""
    out: dict[str, Any] = {}
    for path in PATHS:
        mine = [r for r in runs if path_key(r) == path.key]
        if not mine:
            continue
        rtt = _rtt_stats(mine)
        summary = summarize(mine, timing, path)
        out[path.key] = {
            "family": path.family,
            "direction": path.direction,
            "systems": list(path.systems),
            **rtt,
            "summary": summary,
            "comparisons": _comparisons(summary, rtt["rtt_ms"]["mean"]),
        }
    return out


def run(ctx: RunContext) -> Path:
    timing = SMOKE if ctx.smoke else FULL
    n = ctx.n(ctx.runs)
    runs: list[dict[str, Any]] = []
    plan = schedule(ctx)
    started = time.monotonic()
    for k, (i, dp, system, handoff) in enumerate(plan, 1):
        label = f"[{k}/{len(plan)}] {dp.key:9s} {system:5s} {handoff:4s} run {i + 1}/{n}"
        r = Run(system, handoff, i, timing, dp)
        try:
            res = one_run(ctx, r, label, loaded_rtt=(handoff == "none"))
        except Exception as exc:
            res = {"system": system, "handoff": handoff, "run": i, **path_fields(dp)}
            res["error"] = repr(exc)
            progress_done(f"   {label}: failed: {exc!r}")
        else:
            gap = res.get("gap_s")
            extra = "" if handoff == "none" else f", gap {_fmt_s(gap)}"
            progress_done(
                f"   {label}: {res['goodput_mbps']:.2f} Mbit/s"
                f"{extra} (RTT {res.get('rtt_ms', float('nan')):.1f} ms)"
            )
        runs.append(res)
    # The top-level summary, comparisons and RTT are the main path's (older tooling
    # reads them); "paths" has every path, the main one included.
    paths = summarize_paths(runs, timing)
    main = paths[MAIN.key]  # every schedule has it
    summary = main["summary"]
    cpu = [r["delay_line"].get("cpu_pct", 0.0) for r in runs if r.get("delay_line")]
    late = [r["delay_line"].get("late_max_ms", 0.0) for r in runs if r.get("delay_line")]
    link: dict[str, Any] = next((r["path"] for r in runs if "path" in r), {})
    rtt = main["rtt_ms"]["mean"]
    comparisons = _comparisons(summary, rtt)
    results = {
        "summary": summary,
        "comparisons": comparisons,
        "rtt_ms": main["rtt_ms"],
        "rtt_loaded_ms": main["rtt_loaded_ms"],
        "paths": paths,
        "delay_line": {
            "cpu_pct_mean": round(mean(cpu), 1) if cpu else None,
            "cpu_pct_max": max(cpu, default=None),
            "late_max_ms": max(late, default=None),
        },
        "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
    }
    config = {
        "systems": list(SYSTEMS),
        "handoffs": list(HANDOFFS),
        "paths": {p.key: list(p.systems) for p in PATHS},
        "main_path": MAIN.key,
        "goodput_bytes": GOODPUT_BYTES,
        "gap_p90": "nearest rank; a run that never recovered counts as infinite",
        "runs": n,
        "duration_s": timing.duration,
        "events_s": [timing.ev1, timing.ev2],
        "interval_s": INTERVAL,
        "gap_window_s": WINDOW,
        "gap_sample_s": SAMPLE,
        "tcp_congestion_control": next((r["tcp_cc"] for r in runs if "tcp_cc" in r), None),
        "mptcp": MPTCP_SETUP,
        "dime": "dime up -v on the MH and the CH, default configuration",
        **link,
    }
    out = write_result(
        ctx,
        NAME,
        config,
        results,
        rtt_ms=rtt,
        link_rate_mbit=link.get("rate_mbit", RATE_MBIT),
        delay=link.get("delay_mode"),
    )
    plot(summary, timing, ctx.out / f"{NAME}.png", rtt, link)
    return out


def _fmt_s(x: float | None) -> str:
    return "never" if x is None else f"{x * 1000:.0f} ms"


def _comparisons(summary: dict[str, Any], rtt_ms: float | None) -> dict[str, Any]:
    goal_gap = (rtt_ms or 0) / 1000 + GOAL_GAP_EXTRA
    out: dict[str, Any] = {"goal_gap_s": round(goal_gap, 3), "goal_ratio": GOAL_RATIO}
    d, m = summary["dime"], summary["mptcp"]
    for h in ("soft", "hard"):
        ratio = d[h].get("ratio")
        gmax = d[h].get("gap_s_max")
        gmed = d[h].get("gap_s_median")
        out[h] = {
            "dime_ratio_ok": ratio is not None and ratio >= GOAL_RATIO,
            "dime_ge_mptcp": d[h]["goodput_mbps"] >= m[h]["goodput_mbps"],
            "dime_ratio_ge_mptcp": (ratio or 0) >= (m[h].get("ratio") or 0),
            "dime_gap_median_ok": gmed is not None and gmed <= goal_gap,
            "dime_gap_max_ok": gmax is not None and gmax <= goal_gap,
        }
    # A soft handoff's reference instant is 10 s into the transfer, where the flow may
    # dip anyway (BBR's PROBE_RTT): what the handoff adds to the same system's
    # no-handoff runs at that instant. (A hard handoff's flow is dead before it.)
    gmed, dip = d["soft"].get("gap_s_median"), d["none"].get("dip_s_median")
    out["soft"]["dime_gap_beyond_none_ok"] = (
        gmed is not None and gmed - (dip or 0.0) <= goal_gap
        if "dip_s_median" in d["none"]
        else None
    )
    out["hard"]["dime_gap_beyond_none_ok"] = None
    return out


# -- plot and report -----------------------------------------------------------------------

COLORS = {"dime": "tab:blue", "mptcp": "tab:orange", "tcp": "tab:green"}
LABELS = {"dime": "dime", "mptcp": "MPTCP (kernel)", "tcp": "plain TCP"}


def plot(
    summary: dict[str, Any], timing: Timing, path: Path, rtt: float | None, em: dict[str, Any]
) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, handoff in zip(axes, ("soft", "hard"), strict=True):
        drawn: dict[str, Any] = {}
        for system in reversed(SYSTEMS):  # dime drawn last, on top
            e = summary[system][handoff]
            tl = e.get("timeline_mbps")
            if not tl:
                continue
            xs = [(i + 0.5) * INTERVAL for i in range(len(tl))]
            (drawn[system],) = ax.plot(xs, tl, color=COLORS[system], lw=1.2,
                    label=f"{LABELS[system]} ({e['goodput_mbps']:.1f} Mbit/s)")  # fmt: skip
        none = summary["tcp"]["none"].get("timeline_mbps")
        if none:
            xs = [(i + 0.5) * INTERVAL for i in range(len(none))]
            (drawn["none"],) = ax.plot(xs, none, color="0.6", lw=0.8, ls=":",
                                       label="plain TCP, no handoff")  # fmt: skip
        ev = ("new address up", "old address down")
        if handoff == "hard":
            ev = ev[::-1]
        for x, what in ((timing.ev1, ev[0]), (timing.ev2, ev[1])):
            ax.axvline(x, color="k", ls="--", lw=0.8)
            ax.text(x + 0.1, 0.02, what, rotation=90, transform=ax.get_xaxis_transform(),
                    fontsize=8, va="bottom")  # fmt: skip
        ax.set_title(f"{handoff} handoff")
        ax.set_xlabel("time (s)")
        ax.set_xlim(0, timing.duration)
        ax.grid(alpha=0.3)
        handles = [drawn[k] for k in (*SYSTEMS, "none") if k in drawn]
        ax.legend(handles=handles, fontsize=8, loc="upper right")
    axes[0].set_ylabel("goodput (Mbit/s, per 100 ms, mean over runs)")
    n = summary["dime"]["soft"]["n"]
    fig.suptitle(
        f"TCP handoff goodput, IPv4, MH -> CH (iperf3 receiver side), {n} run(s) each; "
        f"link {em.get('rate_mbit', RATE_MBIT):g} Mbit/s, RTT {rtt or float('nan'):.1f} ms "
        f"({em.get('delay_mode', '?')} delay)",
        fontsize=10,
    )
    save_figure(fig, path)


def _yes(ok: bool | None) -> str:
    if ok is None:
        return "-"
    return "yes" if ok else "**no**"


def _recovery_note(out: Path) -> list[str]:
    """What the recovery benchmark (``out``/recovery.json) measured of a hard
    handoff's refill, by direction; nothing if it has not run."""
    path = out / "recovery.json"
    if not path.exists():
        return []
    # Imported here: the benchmark runs this module's transfers (it imports it).
    from testbed.recovery_bench import summary

    doc = json.loads(path.read_text())
    cases = [
        f"{c['path']}, {c['cc']}: gap {c['gap_ms']} ms, {c['resent']:g} segments sent "
        f"again, per round trip {' / '.join(', '.join(map(str, r)) for r in c['rounds'])}"
        for c in summary(doc)
        if c["gap_ms"] is not None and c["resent"] is not None
    ]
    if not cases:
        return []
    return [
        "",
        f"Why a hard handoff costs more with data CH -> MH (`{doc['meta']['command']}`, "
        f"{doc['meta']['date']}, testbed/results/recovery.md: one dime hard handoff per "
        "run, the router captured; the sender's segments counted from the MH's HANDOFF): "
        + "; ".join(cases)
        + ". With data MH -> CH the router had delivered the MH's window before the old "
        "link went and only the CH's ACKs to the old address were lost: the MH sends "
        "about one segment again and its window goes on. With data CH -> MH everything "
        "the CH had in flight to the MH's old address (the router's queue towards it "
        "included) was lost, and the CH's TCP sends it again after its retransmission "
        "timeout. With BBR the first ACK after the outage also starts PROBE_RTT (4 "
        "segments per round trip for 200 ms + 1 RTT: its min-RTT filter is 10 s old), "
        "after which it sends at the full rate; with CUBIC it starts again from one "
        "segment and doubles each round trip (slow start). Where the CH's backed-off "
        "timer fired just before the new address was proven (a run whose first rounds "
        "after the first segment are empty), the reverted timer (RFC 6069) still runs "
        "its base timeout from that attempt. A path MTU signal that retransmits at once "
        "was tried for that case and taken out: 3 of 11 hard handoffs with data CH -> MH "
        "then refilled at a few segments per round trip for seconds. Over IPv6, whose "
        "TCP has no RFC 6069, that signal is the prompt (without it the flow would wait "
        "for its backed-off timer, up to 3.2 s), and the same slowness shows in some "
        "runs: the v6 CH -> MH hard maximum below. MPTCP's fresh subflow starts from "
        "its initial window of 10 segments instead.",
    ]


def report(doc: dict[str, Any], out: Path, md_dir: Path) -> str:
    meta, cfg, res = doc["meta"], doc["config"], doc["results"]
    s, cmp_ = res["summary"], res["comparisons"]
    rtt = res["rtt_ms"]["mean"]
    goal_gap = cmp_["goal_gap_s"]
    png = out / f"{NAME}.png"
    try:
        rel = png.resolve().relative_to(md_dir.resolve())
        link = str(rel)
    except ValueError:
        import os

        link = os.path.relpath(png.resolve(), md_dir.resolve())
    lines = [f"## {TITLE}", ""]
    if meta.get("smoke"):
        lines += ["*Smoke run: one short run of each; the figures are not meaningful.*", ""]
    lines += [
        f"A {cfg['duration_s']:g} s TCP transfer (iperf3) from the MH to the CH of the "
        "Fig. 7 testbed, over IPv4"
        + (" (the main path; all paths below)" if res.get("paths") else "")
        + ". Soft handoff: "
        "the new address comes up at "
        f"{cfg['events_s'][0]:g} s, the old one goes down at {cfg['events_s'][1]:g} s; "
        "hard handoff: the reverse. Goodput is the iperf3 server's (receiver's) bytes; "
        f"{cfg['runs']} run(s) of each, a fresh topology for each run.",
        "",
        f"* Command: `{meta['command']}`",
        f"* Machine: {machine_line(meta)}",
        f"* Link: tbf {cfg.get('rate_mbit')} Mbit/s on the router's egress (queue "
        f"{cfg.get('tbf_latency_ms')} ms); delay {cfg.get('one_way_delay_ms')} ms per "
        f"crossing of the router by `{cfg.get('delay_mode')}`"
        + (
            " (the user-space NFQUEUE delay line, `testbed/delay.py`: this kernel has no netem)"
            if cfg.get("delay_mode") == "nfqueue"
            else ""
        ),
        f"* RTT measured by ping MH -> CH before each transfer: mean {rtt} ms "
        f"(min {res['rtt_ms']['min']}, max {res['rtt_ms']['max']}); under load "
        f"(during the no-handoff transfers): mean {res['rtt_loaded_ms']['mean']} ms. "
        "The paper used 60 ms of netem latency.",
        f"* Systems: dime: {cfg.get('dime')}. MPTCP: {cfg.get('mptcp')}. Plain TCP: "
        f"nothing. TCP congestion control: {cfg.get('tcp_congestion_control')} (the "
        "kernel's default).",
        f"* Delay line CPU: mean {res['delay_line']['cpu_pct_mean']} % of one core "
        f"(max {res['delay_line']['cpu_pct_max']} %), latest verdict "
        f"{res['delay_line']['late_max_ms']} ms after due.",
        "",
        f"![goodput over time]({link})",
        "",
        "### Goodput",
        "",
        "Ideal: soft = the same system's no-handoff goodput, hard = 2/3 of it "
        f"({cfg['events_s'][1] - cfg['events_s'][0]:g} s of {cfg['duration_s']:g} without "
        "any address). Goal for dime: >= 0.97 of ideal, and at least MPTCP.",
        "",
        "| system | handoff | goodput (Mbit/s, mean) | min-max | ideal | ratio | goal | paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for system in SYSTEMS:
        for h in HANDOFFS:
            e = s[system][h]
            mm = (
                f"{e['goodput_mbps_min']:.2f}-{e['goodput_mbps_max']:.2f}"
                if e.get("goodput_mbps_min") is not None
                else "-"
            )
            if h == "none":
                ideal = ratio = goal = "-"
                paper = "reference"
            else:
                ideal = f"{e['ideal_mbps']:.2f}"
                ratio = f"{e['ratio']:.3f}" if e.get("ratio") is not None else "-"
                goal = f">= {GOAL_RATIO}" if system == "dime" else "-"
                paper = PAPER[h] if system == "dime" else "-"
            fails = f" ({e['failed']} failed)" if e.get("failed") else ""
            got = "not run" if not e["n"] + e["failed"] else f"{e['goodput_mbps']:.2f}{fails}"
            lines.append(
                f"| {LABELS[system]} | {h} | {got} | {mm} | {ideal} | {ratio} | {goal} | {paper} |"
            )
    lines += [
        "",
        "### Handoff gap",
        "",
        "From the new address being configured (`ip addr add` returned; hard handoff) or "
        "the old one being removed (soft handoff) until data flows again: the middle of "
        "the first sliding 100 ms window, after the flow dipped, that carries at least "
        "half the pre-handoff rate (the CH's received bytes, sampled every "
        f"{cfg['gap_sample_s'] * 1000:g} ms in the clock of the events). 0: no window "
        "within 1 s of the event fell below half (no disruption); a flow already without "
        "data in the 100 ms before the reference (a hard handoff) counts as disrupted "
        "from it on. 'never': the flow did "
        "not recover before the end of the transfer. This includes TCP's own recovery "
        "(retransmission timer, slow start). Goal: "
        f"<= 1 RTT + 50 ms = {goal_gap * 1000:.0f} ms.",
        "",
        "Median of the runs that recovered; p90 by nearest rank, a run that never "
        "recovered counting as infinite ('never' if the rank falls on one); max: 'never' "
        "if any run never recovered.",
        "",
        "'no handoff': the same definition applied to the same system's no-handoff "
        "runs at the instant a soft handoff's reference falls (10 s into the transfer): "
        "what the flow does there anyway (median).",
        "",
        "| system | handoff | median | p90 | max | recovered | no handoff | goal | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system in SYSTEMS:
        for h in ("soft", "hard"):
            e = s[system][h]
            goal = f"<= {goal_gap * 1000:.0f} ms" if system == "dime" else "-"
            paper = PAPER["gap"] if system == "dime" and h == "hard" else "-"
            lines.append(
                f"| {LABELS[system]} | {h} | {_gap_cells(e)} | {e.get('recovered')}/{e['n']} | "
                f"{_dip(s[system]['none']) if h == 'soft' else '-'} | {goal} | {paper} |"
            )
    react = [
        f"{h}: noticed the change after {_fmt_s(e.get('noticed_s'))}, translation in "
        f"place after {_fmt_s(e.get('rewrite_s'))}, peer's acknowledgement after "
        f"{_fmt_s(e.get('peer_ack_s'))}"
        for h in ("soft", "hard")
        if (e := s["dime"][h].get("dime_mh_median_s"))
    ]
    if react:
        lines += [
            "",
            "dime's own reaction on the MH (its log; median from the same reference "
            "time): " + "; ".join(react) + ". " + GAP_ANATOMY,
            *_recovery_note(out),
        ]
    lines += ["", "### Goals", "", "| goal | soft | hard |", "|---|---|---|"]
    rows = [(text.format(goal=f"{goal_gap * 1000:.0f} ms"), key) for text, key in GOAL_ROWS]
    for text, key in rows:
        cells = (_yes(cmp_[h].get(key)) for h in ("soft", "hard"))
        lines.append(f"| {text} | {' | '.join(cells)} |")
    missed = [
        f"{text} ({h})" for text, key in rows for h in ("soft", "hard") if cmp_[h].get(key) is False
    ]
    lines += _verdict(missed, "dime misses", "dime meets every goal of this experiment.")
    if res.get("paths"):
        lines += _paths_report(res["paths"], cfg)
    return "\n".join(lines)


def _gap_cells(e: dict[str, Any]) -> str:
    """median | p90 | max of a summary entry ("-" for a p90 results before it lack)."""
    if not e["n"]:
        return "- | - | -"
    p90 = _fmt_s(e["gap_s_p90"]) if "gap_s_p90" in e else "-"
    return f"{_fmt_s(e.get('gap_s_median'))} | {p90} | {_fmt_s(e.get('gap_s_max'))}"


GOAL_ROWS = (
    (f"dime >= {GOAL_RATIO} of ideal", "dime_ratio_ok"),
    ("dime goodput >= MPTCP's", "dime_ge_mptcp"),
    ("dime gap median <= {goal}", "dime_gap_median_ok"),
    ("dime gap max <= {goal}", "dime_gap_max_ok"),
    (
        "dime gap median beyond its no-handoff runs' at the same instant <= {goal}",
        "dime_gap_beyond_none_ok",
    ),
)


def _dip(none: dict[str, Any]) -> str:
    """A no-handoff entry's median dip at the soft handoff's instant ("-": not run)."""
    return _fmt_s(none.get("dip_s_median")) if none.get("dip_s_runs") else "-"


def _paths_report(paths: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Every path in one compact table, then dime's goals per path."""
    lines = [
        "### All paths: IPv4 and IPv6, both directions",
        "",
        "The same transfer and handoffs over each path: the IP version (the Fig. 7 "
        "plan V4 or V6) and the direction of the data. The MH opens the connection "
        "either way (iperf3's client runs in the MH; for CH -> MH with `-R`, the "
        "server in the CH sends). Plain TCP runs on the main path only: it never "
        "survives a handoff. Goodput: the receiver's application bytes (MH -> CH: "
        "the iperf3 server's JSON intervals; CH -> MH: the iperf3 client's interval "
        "reports, 3 significant digits each). Gap: the receiver's interface counter "
        "(CH: c1; MH: m1 + m2 summed). Ratio: to the same system and path's "
        "no-handoff goodput (hard: 2/3 of it). Gap median of the runs that recovered, "
        "p90 by nearest rank (never recovered = infinite), max.",
        "",
        "| path | RTT (ms) | system | handoff | goodput (Mbit/s) | ratio to ideal | "
        "gap median | p90 | max | recovered |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, p in paths.items():
        rtt = p["rtt_ms"]["mean"]
        for system in p["systems"]:
            for h in HANDOFFS:
                e = p["summary"][system][h]
                if not e["n"] + e["failed"]:
                    lines.append(f"| {key} | {rtt} | {LABELS[system]} | {h} | not run "
                                 "| - | - | - | - | - |")  # fmt: skip
                    continue
                fails = f" ({e['failed']} failed)" if e.get("failed") else ""
                if h == "none":
                    dip = f"{_dip(e)} (no handoff, at 10 s)" if "dip_s_median" in e else "-"
                    ratio, gaps = "reference", f"{dip} | - | - | -"
                else:
                    ratio = f"{e['ratio']:.3f}" if e.get("ratio") is not None else "-"
                    gaps = f"{_gap_cells(e)} | {e['recovered']}/{e['n']}"
                lines.append(
                    f"| {key} | {rtt} | {LABELS[system]} | {h} | {e['goodput_mbps']:.2f}"
                    f"{fails} | {ratio} | {gaps} |"
                )
    lines += [
        "",
        "#### Goals per path",
        "",
        "dime's goals on every path; the gap goal is 1 RTT + 50 ms with that path's RTT "
        "(ping, `-6` for IPv6, before each transfer).",
        "",
        "| path | goal | soft | hard |",
        "|---|---|---|---|",
    ]
    missed = []
    for key, p in paths.items():
        cmp_ = p["comparisons"]
        goal = f"{cmp_['goal_gap_s'] * 1000:.0f} ms"
        # A goal is judged only where dime ran (smoke mode leaves cells out).
        ran = [h for h in ("soft", "hard") if p["summary"]["dime"][h]["n"]]
        for text, k in GOAL_ROWS:
            row = text.format(goal=goal)
            cells = [_yes(cmp_[h].get(k)) if h in ran else "not run" for h in ("soft", "hard")]
            lines.append(f"| {key} | {row} | {' | '.join(cells)} |")
            missed += [f"{key}: {row} ({h})" for h in ran if cmp_[h].get(k) is False]
    everything = "dime meets every goal on every path."
    shortfall = _shortfall(paths, cfg["duration_s"], cfg["events_s"][1] - cfg["events_s"][0])
    return lines + _verdict(missed, "dime misses (all paths)", everything) + shortfall


def _shortfall(paths: dict[str, Any], duration: float, outage: float) -> list[str]:
    """What dime's hard handoff lost beyond its ``outage`` s without an address, per
    path, in seconds at the no-handoff rate, beside what the ratio goal allows."""
    parts = []
    for key, p in paths.items():
        none, hard = p["summary"]["dime"]["none"], p["summary"]["dime"]["hard"]
        if not (none["n"] and hard["n"]) or hard.get("gap_s_median") is None:
            continue
        lost = (hard["ideal_mbps"] - hard["goodput_mbps"]) / none["goodput_mbps"] * duration
        parts.append(f"{key} {lost:.2f} s (gap median {hard['gap_s_median']:.2f} s)")
    allowed = (1 - GOAL_RATIO) * (duration - outage)
    if not parts:
        return []
    return [
        "",
        f"What dime's hard handoff lost beyond its time without an address, as seconds at "
        f"its no-handoff rate (the goal, {GOAL_RATIO} of ideal, allows {allowed:.2f} s): "
        + "; ".join(parts)
        + ". It is the gap (until half the rate is back) and the refill after it (the "
        "recovery note above: BBR's PROBE_RTT right after the outage, and with data "
        "CH -> MH the window lost in flight, sent again), and that the ideal counts two "
        "thirds of the no-handoff runs' own PROBE_RTT (at 10 s) while a hard-handoff "
        "run has a whole one.",
    ]


def _verdict(missed: list[str], heading: str, all_met: str) -> list[str]:
    """The goals' closing line: what is missed, or that nothing is."""
    text = f"**{heading}:** " + "; ".join(missed) + "." if missed else all_met
    return ["", text, ""]
