"""Experiment 6: footprint. Daemon memory and CPU, idle and at 10k flows; start-up time.

* Start-up: a helper in the MH's namespace starts ``dime up`` and asks the control
  socket for ``status`` until it answers (the daemon serves it only once everything
  is installed); the time between the two is "dime up to ready". The first start
  generates the host key and is reported apart; the median is over the others.
* Memory and CPU of the MH's daemon (``/proc/<pid>/status`` VmRSS and VmHWM,
  utime+stime over a window), in the Fig. 7 testbed with dime on both hosts and the
  CH established as a peer: idle, and holding 10k UDP flows (real flows it learned:
  connected UDP sockets, one datagram each, as in the scalability experiment). CPU
  while learning those 10k flows is reported too.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from testbed.experiments.common import (
    PYTHON,
    ROOT,
    UNSHAPED,
    RunContext,
    machine_line,
    median,
    plot_path,
    progress,
    progress_done,
    pyplot,
    save_figure,
    smoke_note,
    write_result,
)
from testbed.fig7 import V4, Fig7
from testbed.flows import SEED_LPORT, Flows, sink
from testbed.netns import read_reply, topology
from testbed.procstat import ProcCpu, cpu_meter
from testbed.runner import Dime, established, running

NAME = "footprint"
TITLE = "Footprint: daemon memory, CPU and start-up time"

MODES = ("nft", "nfqueue")
FLOWS = 10_000
SMOKE_FLOWS = 10
WINDOW_S = 10.0
SMOKE_WINDOW_S = 0.2
SETTLE_S = 2.0  # after the peer is established, before the idle window
SMOKE_SETTLE_S = 0.2
STARTS = 5
PAPER = "no memory, CPU or start-up figures; the paper's point is that DIME runs on a Pi B+"

# Runs in the namespace: start dime up, ask its control socket until it answers.
STARTUP = r"""
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from dime import control
log, argv = sys.argv[2], sys.argv[3:]
t0 = time.monotonic()
p = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT)
ready = None
while time.monotonic() - t0 < 60 and p.poll() is None:
    try:
        control.request("status", timeout=20)
        ready = time.monotonic() - t0
        break
    except (control.NotRunning, OSError, ValueError):
        time.sleep(0.005)
print(json.dumps({"ready_s": ready}), flush=True)
sys.stdin.readline()
try:
    control.request("down", timeout=10)
except Exception:
    p.terminate()
try:
    p.wait(timeout=30)
except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
print(json.dumps({"exit": p.returncode}), flush=True)
"""


def startup_times(ctx: RunContext, mode: str) -> dict[str, Any]:
    starts = 1 + ctx.n(STARTS)
    times: list[float | None] = []
    with topology(f"fs{mode[:3]}") as topo:
        fig = Fig7.build(topo, V4)
        state = ctx.tmp / f"state-fp-start-{mode}"
        for i in range(starts):
            progress(f"{NAME}: {mode}: start-up {i + 1}/{starts}")
            log = ctx.tmp / f"dime-fp-start-{mode}-{i}.log"
            # The runner's dime and environment, but not its readiness wait: each poll
            # of `dime status` takes a fifth of a second; the helper asks the control
            # socket every 5 ms, from inside the namespace.
            dime = Dime(fig.mh, state, log)
            helper = fig.mh.popen(
                PYTHON, "-c", STARTUP, str(ROOT), str(log), dime.exe, "up", "--dataplane", mode,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True, env=dime.env(),
            )  # fmt: skip
            try:
                times.append(json.loads(read_reply(helper, 90, "start-up"))["ready_s"])
                assert helper.stdin is not None
                helper.stdin.write("stop\n")
                helper.stdin.flush()
                read_reply(helper, 60, "stop")
            finally:
                if helper.poll() is None:
                    helper.kill()
                helper.wait()
    warm = [t for t in times[1:] if t is not None]
    return {
        "first_s": round(times[0], 3) if times and times[0] is not None else None,
        "all_s": [round(t, 3) if t is not None else None for t in times],
        "median_s": round(median(warm), 3) if warm else None,
        "min_s": round(min(warm), 3) if warm else None,
        "max_s": round(max(warm), 3) if warm else None,
        "failed": sum(1 for t in times if t is None),
    }


def usage(ctx: RunContext, mode: str) -> dict[str, Any]:
    nflows = SMOKE_FLOWS if ctx.smoke else FLOWS
    window = SMOKE_WINDOW_S if ctx.smoke else WINDOW_S
    res: dict[str, Any] = {"flows": nflows, "window_s": window}
    with topology(f"fu{mode[:3]}") as topo:
        fig = Fig7.build(topo, V4)
        p = fig.plan
        sink(fig.ch)
        hosts = [Dime.in_dir(fig.ch, ctx.tmp, f"fp-{mode}-ch"),
                 Dime.in_dir(fig.mh, ctx.tmp, f"fp-{mode}-mh")]  # fmt: skip
        with running(hosts, "--dataplane", mode) as (dch, dmh):
            seed = Flows(fig.mh, p.c1.host, p.m1.host, lport=SEED_LPORT)
            flows = Flows(fig.mh, p.c1.host, p.m1.host)
            try:
                seed.open(1)
                seed.send_new()
                dmh.wait_status(established(p.c1.host), what="peer established", tries=3)
                pid, ch_pid = dmh.pid, dch.pid
                time.sleep(SMOKE_SETTLE_S if ctx.smoke else SETTLE_S)
                progress(f"{NAME}: {mode}: idle, {window:g} s")
                with cpu_meter(pid) as cpu:
                    time.sleep(window)
                res["idle"] = {
                    "rss_kib": ProcCpu(pid).rss_kib(),
                    "cpu_pct": cpu.get("cpu_pct"),
                    "entries": len(dmh.status(tries=3)["sockets"]),
                    "ch_rss_kib": ProcCpu(ch_pid).rss_kib(),
                }
                progress(f"{NAME}: {mode}: learning {nflows} flows")
                flows.open(nflows)
                t0 = time.monotonic()
                with cpu_meter(pid) as learn:
                    flows.send_new()
                res["learning"] = {
                    "seconds": round(time.monotonic() - t0, 2),
                    "cpu_pct": learn.get("cpu_pct"),
                }
                entries = len(dmh.status(tries=3)["sockets"])
                progress(f"{NAME}: {mode}: holding {entries} flows, {window:g} s")
                with cpu_meter(pid) as cpu:
                    time.sleep(window)
                res["loaded"] = {
                    "rss_kib": ProcCpu(pid).rss_kib(),
                    "hwm_kib": ProcCpu(pid).hwm_kib(),
                    "cpu_pct": cpu.get("cpu_pct"),
                    "entries": entries,
                    "entries_after": len(dmh.status(tries=3)["sockets"]),
                }
            finally:
                flows.close()
                seed.close()
    return res


def run(ctx: RunContext) -> Path:
    results: dict[str, Any] = {}
    for mode in MODES:
        results[mode] = {"startup": startup_times(ctx, mode), **usage(ctx, mode)}
        r = results[mode]
        progress_done(
            f"   {mode}: ready in {r['startup']['median_s']} s (median); RSS idle "
            f"{r['idle']['rss_kib'] / 1024:.1f} MiB, {r['idle']['cpu_pct']} % CPU; with "
            f"{r['loaded']['entries']} flows {r['loaded']['rss_kib'] / 1024:.1f} MiB, "
            f"{r['loaded']['cpu_pct']} % CPU"
        )
    config = {
        "modes": list(MODES),
        "flows": SMOKE_FLOWS if ctx.smoke else FLOWS,
        "window_s": SMOKE_WINDOW_S if ctx.smoke else WINDOW_S,
        "starts": 1 + ctx.n(STARTS),
        "sweep_interval_s": 2.0,
    }
    path = write_result(
        ctx, NAME, config, results,
        **UNSHAPED,
    )  # fmt: skip
    plot(results, ctx.out / f"{NAME}.png", ctx.smoke)
    return path


def plot(results: dict[str, Any], path: Path, smoke: bool) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    xs = list(range(len(MODES)))
    for off, key, color, label in (
        (-0.2, "idle", "tab:gray", "idle"),
        (0.2, "loaded", "tab:blue", "holding the flows"),
    ):
        axes[0].bar([x + off for x in xs], [results[m][key]["rss_kib"] / 1024 for m in MODES],
                    0.4, color=color, label=label)  # fmt: skip
        axes[1].bar([x + off for x in xs], [results[m][key]["cpu_pct"] or 0 for m in MODES],
                    0.4, color=color, label=label)  # fmt: skip
    for x, m in zip(xs, MODES, strict=True):
        ts = [t for t in results[m]["startup"]["all_s"][1:] if t is not None]
        axes[2].scatter([x] * len(ts), ts, color="tab:blue", s=14)
        first = results[m]["startup"]["first_s"]
        if first is not None:
            axes[2].scatter([x], [first], color="tab:red", marker="x", s=30)
        med = results[m]["startup"]["median_s"]
        if med is not None:
            axes[2].hlines(med, x - 0.25, x + 0.25, color="k")
    n = results[MODES[0]]["flows"]
    axes[0].set_ylabel("MH daemon RSS (MiB)")
    axes[1].set_ylabel("MH daemon CPU (% of one core)")
    axes[2].set_ylabel("dime up -> status answers (s)")
    axes[2].set_title("start-up (x: first, generates the key; bar: median)", fontsize=9)
    for ax in axes:
        ax.set_xticks(xs, [f"dime {m}" for m in MODES])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[0].set_title(f"memory, idle vs {n:,} flows", fontsize=9)
    axes[1].set_title(f"CPU, idle vs {n:,} flows", fontsize=9)
    fig.suptitle("dime footprint" + (" [smoke]" if smoke else ""))
    save_figure(fig, path)


def report(doc: dict[str, Any], out: Path, md_dir: Path) -> str:
    meta, cfg, res = doc["meta"], doc["config"], doc["results"]
    n = cfg["flows"]
    lines = [f"## {TITLE}", "", *smoke_note(meta)]
    lines += [
        "The MH's daemon in the Fig. 7 testbed, dime on both hosts, the CH established as "
        f"a peer. CPU is utime+stime over {cfg['window_s']:g} s, in % of one core; RSS is "
        f"VmRSS (peak: VmHWM). The {n:,} flows are real flows the daemon learned "
        "(connected UDP sockets, one datagram each) and held during the window; dime's "
        f"liveness sweep runs every {cfg['sweep_interval_s']:g} s or less often with many flows. "
        "Start-up is from "
        "starting `dime up` to its control socket answering `status` (everything "
        f"installed), {cfg['starts']} starts per data plane.",
        "",
        f"* Command: `{meta['command']}`",
        f"* Machine: {machine_line(meta)}",
        f"* Link: {meta.get('link')}; no delay added",
        "",
        f"![footprint]({plot_path(out, md_dir, NAME + '.png')})",
        "",
        "| data plane | state | flows in table | RSS (MiB) | peak RSS (MiB) | CPU (% of a core) "
        "| goal | paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in cfg["modes"]:
        r = res[m]
        i, ld, lr = r["idle"], r["loaded"], r["learning"]
        lines += [
            f"| {m} | idle | {i['entries']} | {i['rss_kib'] / 1024:.1f} | - | "
            f"{_f(i['cpu_pct'], 1)} | none set | none given |",
            f"| {m} | learning {n:,} flows ({lr['seconds']:g} s) | - | - | - | "
            f"{_f(lr['cpu_pct'], 1)} | none set | none given |",
            f"| {m} | holding {n:,} flows | {ld['entries']:,} | {ld['rss_kib'] / 1024:.1f} | "
            f"{ld['hwm_kib'] / 1024:.1f} | {_f(ld['cpu_pct'], 1)} | none set | none given |",
        ]
    lines += [
        "",
        "| data plane | first start (s, generates the host key) | median (s) | min-max (s) "
        "| failed | goal | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in cfg["modes"]:
        s = res[m]["startup"]
        lines.append(
            f"| {m} | {_f(s['first_s'], 2)} | {_f(s['median_s'], 2)} "
            f"| {_f(s['min_s'], 2)}-{_f(s['max_s'], 2)} | {s['failed']} | none set | none given |"
        )
    lines += [
        "",
        f"Paper: {PAPER}. The issue sets no numeric goal for the footprint. The CH's "
        "daemon, idle: "
        + ", ".join(f"{m} {res[m]['idle']['ch_rss_kib'] / 1024:.1f} MiB" for m in cfg["modes"])
        + ".",
        "",
    ]
    return "\n".join(lines)


def _f(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
