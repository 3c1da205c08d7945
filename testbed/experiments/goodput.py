"""Handoff goodput (the paper's Fig. 8) and the handoff gap.

A TCP transfer (iperf3, 15 s) from the MH to the CH of the Fig. 7 testbed, for dime,
Linux kernel MPTCP and plain TCP, with no handoff, a soft handoff (the new address
comes up at 5 s, the old one goes down at 10 s) and a hard handoff (the old address
goes down at 5 s, the new one comes up at 10 s). Every run builds a fresh topology.

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

* goodput: the iperf3 **server's** (receiver's) bytes per 100 ms interval, and their
  mean over the transfer (bytes delivered / duration);
* handoff gap: as :mod:`testbed.handoff_gap` defines it (the one definition the demo
  uses too), from the CH's received bytes (its interface counter, sampled every
  10 ms in the same clock as the events). The reference time is when the new address
  was configured (``ip addr add`` returned) for a hard handoff, when the old address
  was removed for a soft one.
* ratio to the ideal: soft = the system's own no-handoff goodput, hard = 2/3 of it.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.delay import Emulation, emulate
from testbed.experiments.common import (
    RunContext,
    machine_line,
    mean,
    median,
    progress,
    progress_done,
    pyplot,
    save_figure,
    write_result,
)
from testbed.fig7 import V4, Fig7, Subnet
from testbed.handoff_gap import SAMPLE, WINDOW, RxSampler, handoff_gap
from testbed.iperf3 import iperf3_server, ping_rtt_ms
from testbed.netns import topology
from testbed.runner import Dime, stop_all, up_all

NAME = "goodput"
TITLE = "Handoff goodput (Fig. 8) and handoff gap"

SYSTEMS = ("dime", "mptcp", "tcp")
HANDOFFS = ("none", "soft", "hard")
DELAY_MS = 30.0  # one way, per crossing of the router: RTT = 2 x 30 = 60 ms, the paper's 60 ms
RATE_MBIT = 20.0  # tbf on the router's egress; the delay line uses 5-10 % of a core at this rate
ROUTER_DEVS = ["rc1", "rc2", "rm1", "rm2"]
INTERVAL = 0.1  # iperf3 report interval (s)
GOAL_RATIO = 0.97
GOAL_GAP_EXTRA = 0.050  # gap goal: <= 1 RTT + 50 ms


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
#: Smoke mode runs each path once, not every combination: dime's handoff and reaction,
#: MPTCP's endpoints, a plain TCP connection that dies with its address, and the ping
#: under load (no handoff). The other cells of the report say "not run".
SMOKE_RUNS = (("dime", "hard"), ("mptcp", "soft"), ("tcp", "hard"), ("tcp", "none"))

MPTCP_SETUP = (
    "net.mptcp.enabled=1; ip mptcp limits set subflows 2 add_addr_accepted 2 on both hosts; "
    "on the MH an endpoint with the subflow flag for each address, added when the address "
    "comes up and deleted when it goes (what mptcpd does); iperf3 under mptcpize run at "
    "both ends"
)

PAPER = {
    "soft": "all protocols almost identical (constant rate, bound by the links)",
    "hard": "DIME ~2/3 of soft, 'almost exactly'; MIPv6 and HIP noticeably lower",
    "gap": "no number; DIME's control exchange is fastest (hard handoff, Fig. 8)",
}

_LINE = re.compile(r"^\[\s*\d+\]\s+(\d+\.\d+)-(\d+\.\d+)\s+sec")


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
    events: dict[str, float] = field(default_factory=dict)  # name -> monotonic time
    wall: dict[str, float] = field(default_factory=dict)  # name -> time.time() (for logs)
    notes: list[str] = field(default_factory=list)


def _attach(fig: Fig7, run: Run, dev: str, sub: Subnet, mptcp_id: int | None) -> None:
    """Fig7.attach, with the instant the address was configured recorded."""
    mh = fig.mh
    mh.ip("link", "set", dev, "up")
    mh.addr_add(dev, sub.host_cidr())
    run.events["new_addr"], run.wall["new_addr"] = time.monotonic(), time.time()
    mh.ip("route", "replace", "default", "via", sub.router, "dev", dev)
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


def one_run(
    ctx: RunContext,
    run: Run,
    label: str,
    *,
    delay_ms: float = DELAY_MS,
    rate_mbit: float = RATE_MBIT,
    loaded_rtt: bool = False,
) -> dict[str, Any]:
    res: dict[str, Any] = {"system": run.system, "handoff": run.handoff, "run": run.index}
    prefix = ("mptcpize", "run") if run.system == "mptcp" else ()
    with topology(f"gp{run.index}") as topo:
        fig = Fig7.build(topo, V4)
        plan = fig.plan
        em: Emulation | None = None
        dimes: list[Dime] = []
        try:
            em = emulate(fig.r, ROUTER_DEVS, delay_ms, rate_mbit)
            if run.system == "dime":
                tag = f"{run.system}-{run.handoff}-{run.index}"
                dimes = [Dime.in_dir(ns, ctx.tmp, f"{tag}-{n}") for ns, n in
                         ((fig.mh, "mh"), (fig.ch, "ch"))]  # fmt: skip
                up_all(dimes, "-v")
            elif run.system == "mptcp":
                _mptcp_setup(fig)
            res["tcp_cc"] = fig.mh.run("sysctl", "-n", "net.ipv4.tcp_congestion_control").strip()
            res["rtt_ms"] = ping_rtt_ms(fig.mh, plan.c1.host, count=1 if ctx.smoke else 5)
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


def _transfer(
    fig: Fig7, run: Run, label: str, prefix: tuple[str, ...], loaded_rtt: bool
) -> dict[str, Any]:
    t = run.timing
    plan = fig.plan
    server = iperf3_server(fig.ch, "-i", str(INTERVAL), prefix=prefix)
    sampler = RxSampler(server.pid, "c1")
    sampler.start()
    client = fig.mh.popen(
        *prefix, "iperf3", "-c", plan.c1.host, "-t", f"{t.duration:g}", "-i", str(INTERVAL),
        "-f", "k", "--forceflush", "--connect-timeout", "3000",
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
                "sh", "-c", f"sleep {t.ping_after:g}; exec ping -c {n} -i 0.2 -q {plan.c1.host}",
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
                progress(f"   {label}  t={now:5.1f}s  {rate:6.2f} Mbit/s at the CH")
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
        ivs, err = _server_intervals(sout)
        if err:
            out["iperf3_error"] = err
        if ping is not None:
            pout = ping.communicate(timeout=t.duration + 10)[0].decode()
            for line in pout.splitlines():
                if "min/avg/max" in line:
                    out["rtt_loaded_ms"] = float(line.split("=")[1].split("/")[1])
    finally:
        for p in (client, server, ping):
            if p is not None and p.poll() is None:
                _stop_proc(p, 1.0)
        sampler.stop()
    if errors:
        run.notes.extend(errors)
    n = round(t.duration / INTERVAL)
    ivs = (ivs + [0.0] * n)[:n]
    out["timeline_mbps"] = [round(b * 8 / INTERVAL / 1e6, 3) for b in ivs]
    out["goodput_mbps"] = round(sum(ivs) * 8 / t.duration / 1e6, 3)
    out["client_tail"] = lines[-4:]
    if run.handoff != "none":
        ref = run.events.get("new_addr" if run.handoff == "hard" else "old_down")
        if ref is None:
            out["gap_s"], out["pre_mbps"] = None, None
        else:
            t0 = run.events["t0"]
            gap = handoff_gap(
                sampler.samples, ref, start=t0, first_event=t0 + t.ev1, end=t0 + t.duration
            )
            out["gap_s"] = None if gap.seconds is None else round(gap.seconds, 3)
            out["pre_mbps"] = round(gap.pre_bps / 1e6, 3)
    return out


# -- the experiment ------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], timing: Timing) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for system in SYSTEMS:
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
                rec = [x for x in gaps if x is not None]
                entry["gap_s_runs"] = gaps
                entry["recovered"] = len(rec)
                entry["gap_s_median"] = round(median(rec), 3) if rec else None
                entry["gap_s_max"] = (
                    round(max(rec), 3) if rec and len(rec) == len(gaps) else None
                )  # None: some run never recovered
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


def schedule(ctx: RunContext) -> list[tuple[int, str, str]]:
    """(run index, system, handoff) in the order they run: every combination ``runs``
    times, interleaved so that slow drift of the machine hits all alike; in smoke mode
    only :data:`SMOKE_RUNS`."""
    if ctx.smoke:
        return [(0, system, handoff) for system, handoff in SMOKE_RUNS]
    return [(i, s, h) for i in range(ctx.runs) for s in SYSTEMS for h in HANDOFFS]


def run(ctx: RunContext) -> Path:
    timing = SMOKE if ctx.smoke else FULL
    n = ctx.n(ctx.runs)
    runs: list[dict[str, Any]] = []
    plan = schedule(ctx)
    started = time.monotonic()
    for k, (i, system, handoff) in enumerate(plan, 1):
        label = f"[{k}/{len(plan)}] {system:5s} {handoff:4s} run {i + 1}/{n}"
        r = Run(system, handoff, i, timing)
        try:
            res = one_run(ctx, r, label, loaded_rtt=(handoff == "none"))
        except Exception as exc:
            res = {"system": system, "handoff": handoff, "run": i, "error": repr(exc)}
            progress_done(f"   {label}: failed: {exc!r}")
        else:
            gap = res.get("gap_s")
            extra = "" if handoff == "none" else f", gap {_fmt_s(gap)}"
            progress_done(
                f"   {label}: {res['goodput_mbps']:.2f} Mbit/s"
                f"{extra} (RTT {res.get('rtt_ms', float('nan')):.1f} ms)"
            )
        runs.append(res)
    summary = summarize(runs, timing)
    rtts = [r["rtt_ms"] for r in runs if isinstance(r.get("rtt_ms"), float)]
    rtts = [x for x in rtts if not math.isnan(x)]
    loaded = [r["rtt_loaded_ms"] for r in runs if "rtt_loaded_ms" in r]
    cpu = [r["delay_line"].get("cpu_pct", 0.0) for r in runs if r.get("delay_line")]
    late = [r["delay_line"].get("late_max_ms", 0.0) for r in runs if r.get("delay_line")]
    path: dict[str, Any] = next((r["path"] for r in runs if "path" in r), {})
    rtt = round(mean(rtts), 2) if rtts else None
    comparisons = _comparisons(summary, rtt)
    results = {
        "summary": summary,
        "comparisons": comparisons,
        "rtt_ms": {"mean": rtt, "min": min(rtts, default=None), "max": max(rtts, default=None)},
        "rtt_loaded_ms": {
            "mean": round(mean(loaded), 2) if loaded else None,
            "max": max(loaded, default=None),
        },
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
        "runs": n,
        "duration_s": timing.duration,
        "events_s": [timing.ev1, timing.ev2],
        "interval_s": INTERVAL,
        "gap_window_s": WINDOW,
        "gap_sample_s": SAMPLE,
        "tcp_congestion_control": next((r["tcp_cc"] for r in runs if "tcp_cc" in r), None),
        "mptcp": MPTCP_SETUP,
        "dime": "dime up -v on the MH and the CH, default configuration",
        **path,
    }
    out = write_result(
        ctx,
        NAME,
        config,
        results,
        rtt_ms=rtt,
        link_rate_mbit=path.get("rate_mbit", RATE_MBIT),
        delay=path.get("delay_mode"),
    )
    plot(summary, timing, ctx.out / f"{NAME}.png", rtt, path)
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
        f"TCP handoff goodput, MH -> CH (iperf3 receiver side), {n} run(s) each; "
        f"link {em.get('rate_mbit', RATE_MBIT):g} Mbit/s, RTT {rtt or float('nan'):.1f} ms "
        f"({em.get('delay_mode', '?')} delay)",
        fontsize=10,
    )
    save_figure(fig, path)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


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
        "Fig. 7 testbed. Soft handoff: the new address comes up at "
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
        "| system | handoff | median | max | recovered | goal | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for system in SYSTEMS:
        for h in ("soft", "hard"):
            e = s[system][h]
            med = _fmt_s(e.get("gap_s_median"))
            mx = _fmt_s(e.get("gap_s_max"))
            goal = f"<= {goal_gap * 1000:.0f} ms" if system == "dime" else "-"
            paper = PAPER["gap"] if system == "dime" and h == "hard" else "-"
            lines.append(
                f"| {LABELS[system]} | {h} | {med} | {mx} | {e.get('recovered')}/{e['n']} | "
                f"{goal} | {paper} |"
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
            "time): " + "; ".join(react) + ". The rest of a gap is TCP's: after a hard "
            "handoff its retransmission timer had backed off for 5 s, and dime prompts "
            "it to retransmit at once when the CH acknowledges the new address "
            "(`stacktrans/rto_revert.py`, RFC 6069); TCP then restarts from a window of "
            "one segment and needs a few round trips to carry half its earlier rate. "
            "After a soft handoff the packets and ACKs in flight on the old address "
            "when it goes are lost, and TCP notices at its retransmission timeout "
            "(at least 200 ms + RTT here) that nothing prompts earlier: the timer has "
            "not backed off yet.",
        ]
    lines += ["", "### Goals", "", "| goal | soft | hard |", "|---|---|---|"]
    rows = (
        (f"dime >= {GOAL_RATIO} of ideal", "dime_ratio_ok"),
        ("dime goodput >= MPTCP's", "dime_ge_mptcp"),
        (f"dime gap median <= {goal_gap * 1000:.0f} ms", "dime_gap_median_ok"),
        (f"dime gap max <= {goal_gap * 1000:.0f} ms", "dime_gap_max_ok"),
    )
    for text, key in rows:
        lines.append(f"| {text} | {_yes(cmp_['soft'][key])} | {_yes(cmp_['hard'][key])} |")
    missed = [f"{text} ({h})" for text, key in rows for h in ("soft", "hard") if not cmp_[h][key]]
    lines.append("")
    if missed:
        lines.append("**dime misses:** " + "; ".join(missed) + ".")
    else:
        lines.append("dime meets every goal of this experiment.")
    lines.append("")
    return "\n".join(lines)
