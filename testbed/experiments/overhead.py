"""Experiment 5: throughput overhead of dime's translation.

TCP throughput (iperf3, one stream, receiver side) from the MH to the CH of the Fig. 7
testbed on the same links, three ways: no dime at all, dime with the ``nft`` data
plane, dime with the ``nfqueue`` data plane; unshaped, and with the router's egress
to the CH shaped to 100 Mbit/s (tbf).

Each run is one TCP connection. With dime, the MH hands off (hard, gap 0) in the
middle of it: *before* the move dime knows the flow but rewrites nothing; *after* it
the connection keeps its old addresses on both ends, so both daemons rewrite every
packet both ways (the MH: source out, destination in; the CH: destination out,
source in). Throughput is taken from the receiver's 0.5 s intervals: before = from
0.5 s to just before the move, after = from 1 s after the move to the end. Without
dime the same run has no handoff (the connection could not survive one) and both
windows are the plain path.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.experiments.common import (
    RunContext,
    fixed,
    machine_line,
    mean,
    plot_path,
    progress,
    progress_done,
    pyplot,
    save_figure,
    smoke_note,
    write_result,
)
from testbed.fig7 import V4, Fig7, moves
from testbed.iperf3 import iperf3_client, iperf3_reports, iperf3_server, ping_rtt_ms
from testbed.netns import Namespace, topology
from testbed.runner import Dime, running

NAME = "overhead"
TITLE = "Throughput overhead of translation"

CONFIGS = ("none", "nft", "nfqueue")
SHAPINGS: tuple[int | None, ...] = (None, 100)  # Mbit/s on R's egress to the CH
#: Smoke mode: the shaped link only (it runs every line the unshaped one does, and tc).
SMOKE_SHAPINGS: tuple[int | None, ...] = (100,)


@dataclass(frozen=True)
class Schedule:
    """One run: ``before`` s, the move, ``settle`` s, then ``after`` s; the receiver
    reports every ``interval`` s, and the first ``skip`` s (slow start) are in neither
    window. iperf3 -t takes whole seconds: the three add up to one."""

    before: float
    settle: float
    after: float
    interval: float
    skip: float

    @property
    def total(self) -> float:
        return self.before + self.settle + self.after


FULL = Schedule(3.0, 1.0, 3.0, 0.5, 0.5)
# Smoke: one second, with intervals in both windows (TCP may need a retransmission
# timeout, 200 ms, after the move).
SMOKE = Schedule(0.5, 0.3, 0.2, 0.1, 0.1)
TBF = ("burst", "256kbit", "latency", "20ms")
#: The StackTrans issue's goals, by data plane and link (None: unshaped).
GOALS = {
    ("nft", None): ">= 0.95 of no dime",
    ("nft", 100): ">= 0.95 of no dime",
    ("nfqueue", None): ">= 1 Gbit/s (a struct prototype: 0.63)",
    ("nfqueue", 100): ">= 0.95 of no dime",
}
WHY = {
    "nft": (
        "nft: with dime every packet also crosses conntrack (the queue rules need it) and "
        "dime's rewrite chains; on this 2-CPU machine iperf3's two ends and the softirqs "
        "are CPU-bound already, and the no-dime reference itself varies by a factor of 2 "
        "between runs (see min-max)."
    ),
    "nfqueue": (
        "nfqueue: every packet goes to the daemon and back, through Python, as a GSO/GRO "
        "super-packet of up to 64 kB (dime's own nfnetlink_queue client); a rewritten one "
        "whose checksum the kernel left partial (veth: the sender computed none) must have "
        "its checksum summed in Python at the receiving end (the kernel takes a payload "
        "back as CHECKSUM_NONE), about 0.1-0.2 ms per 64 kB here; both daemons, iperf3's "
        "two ends and the softirqs share the 2 CPUs (see the daemons' CPU per Gbit)."
    ),
}
PAPER = (
    "Fig. 8: soft-handoff goodput 'almost identical' for DIME, MIPv6 and HIP, 'bound by "
    "the physical links' (no overhead figure given)"
)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (its threads included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def windows(report: dict[str, Any], sch: Schedule) -> tuple[float, float]:
    """(before, after) receiver throughput in bit/s from the server's intervals."""
    before, after = [], []
    for iv in report.get("intervals", []):
        s = iv.get("sum", {})
        start, end, bps = s.get("start", 0.0), s.get("end", 0.0), s.get("bits_per_second")
        if bps is None or end - start < sch.interval * 0.5:
            continue
        if start >= sch.skip and end <= sch.before - 0.2:
            before.append(bps)
        elif start >= sch.before + sch.settle - 0.05 and end <= sch.total + 0.05:
            after.append(bps)
    return mean(before), mean(after)


@contextlib.contextmanager
def shaped(r: Namespace, rate: int | None) -> Iterator[None]:
    if rate is not None:
        r.run("tc", "qdisc", "replace", "dev", "rc1", "root", "tbf", "rate", f"{rate}mbit", *TBF)
    yield


def measure(ctx: RunContext, config: str, rate: int | None) -> dict[str, Any]:
    runs = ctx.n(ctx.runs)
    sch = SMOKE if ctx.smoke else FULL
    label = f"{config}, {'unshaped' if rate is None else f'{rate} Mbit/s'}"
    out: dict[str, Any] = {"runs": []}
    with topology(f"ov{config[:3]}{rate or 0}") as topo:
        fig = Fig7.build(topo, V4)
        hosts = (
            []
            if config == "none"
            else [Dime.in_dir(fig.ch, ctx.tmp, f"ov-{config}-ch"),
                  Dime.in_dir(fig.mh, ctx.tmp, f"ov-{config}-mh")]
        )  # fmt: skip
        with shaped(fig.r, rate), running(hosts, "--dataplane", config) as procs:
            out["rtt_ms"] = ping_rtt_ms(fig.mh, fig.plan.c1.host, count=1 if ctx.smoke else 5)
            plan = moves(fig.plan, runs)
            for i in range(runs):
                progress(f"{NAME}: {label}: run {i + 1}/{runs}")
                srv = iperf3_server(fig.ch, "-i", f"{sch.interval:g}")
                cli = iperf3_client(fig.mh, fig.plan.c1.host, "-t", f"{sch.total:g}")
                t0 = time.monotonic()
                cpu0 = sum(cpu_seconds(p.pid) for p in procs)
                moved = False
                if procs:
                    time.sleep(max(0.0, t0 + sch.before - time.monotonic()))
                    fdev, fsub, tdev, tsub = plan[i]
                    fig.detach(fig.mh, fdev, fsub)
                    fig.attach(fig.mh, tdev, tsub)
                    moved = True
                crep, srep = iperf3_reports(cli, srv, sch.total + 30)
                cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
                run: dict[str, Any] = {"moved": moved}
                if "error" in crep or "error" in srep:
                    run["error"] = str(crep.get("error") or srep.get("error"))
                else:
                    bef, aft = windows(srep, sch)
                    run.update(
                        before_bps=bef,
                        after_bps=aft,
                        retransmits=crep.get("end", {}).get("sum_sent", {}).get("retransmits"),
                    )
                    gbit = srep.get("end", {}).get("sum_received", {}).get("bytes", 0) * 8 / 1e9
                    if procs and gbit:
                        # Both daemons' CPU over the whole run, per Gbit received: CPU
                        # seconds per Gbit = CPUs busy per Gbit/s.
                        run["daemons_cpu_s"] = round(cpu, 3)
                        run["daemons_cpu_s_per_gbit"] = round(cpu / gbit, 3)
                if procs:
                    st = procs[1].status()
                    run["mh_translated_in_user_space"] = st["counters"].get(
                        "packets_translated_in_user_space"
                    )
                out["runs"].append(run)
                if procs and i + 1 < runs:
                    time.sleep(0.5)
            if procs:
                out["ghosts_last"] = procs[1].status()["ghosts"]
    ok = [r for r in out["runs"] if "error" not in r]
    out["errors"] = len(out["runs"]) - len(ok)
    for key in ("before", "after"):
        xs = [r[f"{key}_bps"] for r in ok if r.get(f"{key}_bps")]
        out[f"{key}_gbps"] = round(mean(xs) / 1e9, 4) if xs else None
        out[f"{key}_gbps_min"] = round(min(xs) / 1e9, 4) if xs else None
        out[f"{key}_gbps_max"] = round(max(xs) / 1e9, 4) if xs else None
    cpus = [r["daemons_cpu_s_per_gbit"] for r in ok if "daemons_cpu_s_per_gbit" in r]
    out["daemons_cpu_s_per_gbit"] = round(mean(cpus), 3) if cpus else None
    progress_done(
        f"   {label}: before {out['before_gbps']} Gbit/s, after {out['after_gbps']} Gbit/s"
    )
    return out


def run(ctx: RunContext) -> Path:
    results: dict[str, Any] = {}
    shapings = SMOKE_SHAPINGS if ctx.smoke else SHAPINGS
    for rate in shapings:
        key = "unshaped" if rate is None else f"{rate}mbit"
        results[key] = {c: measure(ctx, c, rate) for c in CONFIGS}
        base = results[key]["none"]
        ref = mean([x for x in (base["before_gbps"], base["after_gbps"]) if x])
        base["reference_gbps"] = round(ref, 4) if ref else None
        for c in CONFIGS:
            e = results[key][c]
            for w in ("before", "after"):
                v = e.get(f"{w}_gbps")
                e[f"{w}_ratio"] = round(v / ref, 3) if v and ref else None
    sch = SMOKE if ctx.smoke else FULL
    config = {
        "configs": list(CONFIGS),
        "shapings_mbit": list(shapings),
        "runs": ctx.n(ctx.runs),
        "windows_s": {
            "before": [sch.skip, sch.before - 0.2],
            "after": [sch.before + sch.settle, sch.total],
        },
        "iperf3": "iperf3 TCP, one stream, default congestion control; receiver-side "
        f"{sch.interval:g} s intervals",
        "tbf": " ".join(TBF),
        "handoff": "hard, gap 0, in the middle of each run (dime only)",
        "cpu": "Daemons' CPU: utime + stime of both daemons (/proc/<pid>/stat) over each "
        "whole run (both windows and the move), divided by the Gbit the receiver got",
    }
    rtts = [
        results[k][c]["rtt_ms"]
        for k in results
        for c in CONFIGS
        if results[k][c].get("rtt_ms") is not None
    ]
    path = write_result(
        ctx, NAME, config, results,
        link="unshaped veth, and tbf 100 Mbit/s on the router's egress to the CH",
        delay_ms=0, delay="none added",
        rtt_ms=round(mean(rtts), 3) if rtts else None,
    )  # fmt: skip
    plot(results, ctx.out / f"{NAME}.png", ctx.smoke)
    return path


def plot(results: dict[str, Any], path: Path, smoke: bool) -> None:
    plt = pyplot()

    keys = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8))
    if len(keys) == 1:
        axes = [axes]
    for ax, key in zip(axes, keys, strict=True):
        xs = list(range(len(CONFIGS)))
        for off, w, color in ((-0.2, "before", "tab:gray"), (0.2, "after", "tab:blue")):
            vals = [results[key][c].get(f"{w}_gbps") or 0 for c in CONFIGS]
            label = "before the move (no rewrite)" if w == "before" else "after (translated)"
            ax.bar([x + off for x in xs], vals, 0.4, color=color, label=label)
        ax.set_xticks(xs, ["no dime", "dime nft", "dime nfqueue"])
        ax.set_ylabel("TCP throughput received (Gbit/s)")
        ax.set_title("unshaped" if key == "unshaped" else key.replace("mbit", " Mbit/s"))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Throughput overhead, iperf3 TCP MH -> CH" + (" [smoke]" if smoke else ""))
    save_figure(fig, path)


def report(doc: dict[str, Any], out: Path, md_dir: Path) -> str:
    meta, cfg, res = doc["meta"], doc["config"], doc["results"]
    w = cfg["windows_s"]
    lines = [f"## {TITLE}", "", *smoke_note(meta)]
    lines += [
        "TCP throughput MH -> CH (iperf3, one stream, receiver side) on the same links "
        "without dime and with dime in each data plane. With dime the MH hands off in "
        "the middle of each connection: before the move dime only learned the flow; "
        "after it both daemons rewrite every packet of the connection both ways. Without "
        "dime there is no move. Windows: before "
        f"{w['before'][0]:g}-{w['before'][1]:g} s, after {w['after'][0]:g}-{w['after'][1]:g} s "
        f"of each run; {cfg['runs']} run(s) per row, one topology per row.",
        "",
        f"* Command: `{meta['command']}`",
        f"* Machine: {machine_line(meta)}",
        f"* Links: {meta.get('link')} (tbf {cfg['tbf']}); RTT (ping MH -> CH, idle) "
        f"{meta.get('rtt_ms')} ms; no delay added",
        "",
        f"![throughput overhead]({plot_path(out, md_dir, NAME + '.png')})",
        "",
        "| link | system | before move (Gbit/s) | after move, translated (Gbit/s) | min-max "
        "after | ratio after / no dime | daemons' CPU s per Gbit | goal | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    misses = []
    for key, rows in res.items():
        link = "unshaped" if key == "unshaped" else key.replace("mbit", " Mbit/s")
        for c in cfg["configs"]:
            e = rows[c]
            mm = (
                f"{e['after_gbps_min']:.3f}-{e['after_gbps_max']:.3f}"
                if e.get("after_gbps_min") is not None
                else "-"
            )
            if c == "none":
                expect, ratio = "reference", "1 (reference)"
            else:
                rate = None if key == "unshaped" else int(key.removesuffix("mbit"))
                expect = GOALS[(c, rate)]
                ratio = fixed(e.get("after_ratio"), 3)
                miss = _miss(c, rate, e)
                if miss:
                    misses.append((c, f"{c} on the {link} link: {miss}"))
            lines.append(
                f"| {link} | {'no dime' if c == 'none' else 'dime ' + c} "
                f"| {fixed(e.get('before_gbps'), 3)} | {fixed(e.get('after_gbps'), 3)} | {mm} "
                f"| {ratio} | {fixed(e.get('daemons_cpu_s_per_gbit'), 2)} | {expect} "
                f"| {'-' if c == 'none' else 'no figure (below)'} |"
            )
    lines += [
        "",
        f"Paper: {PAPER}. Goals: the StackTrans issue's. "
        + cfg.get("cpu", "Daemons' CPU: not measured in this run")
        + " (CPU seconds per Gbit = CPUs "
        "busy per Gbit/s). In nfqueue mode it depends on the packets' size: unshaped, "
        "TCP's GSO/GRO packets of up to 64 kB reach the daemons; on the shaped link the "
        "router's tbf (burst 32 kB) cuts them into MTU-sized packets, so the CH's daemon "
        "gets each of those (and the ACKs both ways are many more), each a round trip "
        "through Python.",
        "",
    ]
    if misses:
        lines.append("**dime misses:** " + "; ".join(text for _, text in misses) + ".")
        lines += ["", "Why: " + " ".join(WHY[c] for c in dict.fromkeys(c for c, _ in misses))]
    else:
        lines.append("dime meets every goal of this experiment.")
    lines.append("")
    return "\n".join(lines)


def _miss(config: str, rate: int | None, e: dict[str, Any]) -> str | None:
    """How a row misses its goal, or None."""
    if config == "nfqueue" and rate is None:
        g = e.get("after_gbps")
        return f"{g:.3f} Gbit/s (goal >= 1)" if g is not None and g < 1.0 else None
    r = e.get("after_ratio")
    return f"{r:.3f} of no dime (goal >= 0.95)" if r is not None and r < 0.95 else None
