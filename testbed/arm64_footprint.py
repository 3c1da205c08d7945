"""Footprint on arm64 (issue 16): the footprint experiment reduced to what an emulated
arm64 VM carries in minutes, plus the CPU a handoff costs.

    python -m testbed.arm64_footprint [--out DIR] [--flows N] [--handoffs N]

The data plane dime chooses on this kernel (``--dataplane auto``, recorded). From
:mod:`testbed.experiments.footprint`:
start-up ("dime up" to ready, 1 + 5 starts), the MH daemon's RSS idle and holding
``--flows`` learned UDP flows (10,000). Then, with those flows held, ``--handoffs`` hard
handoffs of the MH (a fresh address each time): the MH daemon's CPU time from the move
until it is idle again, less its idle rate. Writes ``<out>/arm64.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.experiments import footprint
from testbed.experiments.common import DEFAULT_OUT, RunContext, progress_done, write_result
from testbed.fig7 import V4, Fig7, moves
from testbed.flows import SEED_LPORT, Flows, sink
from testbed.netns import topology
from testbed.procstat import HZ, ProcCpu, cpu_meter
from testbed.runner import Dime, established, running

NAME = "arm64"
MODE = "auto"  # what dime chooses on this kernel (status says which)
IDLE_WINDOW_S = 10.0
HANDOFF_LIMIT_S = 60.0


def handoff_cpu(fig: Fig7, dch: Dime, pid: int, count: int, idle_pct: float) -> dict[str, Any]:
    """CPU seconds of the MH daemon per hard handoff, from the move until it was below
    30 % of a core for a second, less what it uses idle over as long. Each handoff must
    have reached the CH (its peer active at the new address) before the next."""
    costs, settles = [], []
    for fdev, fsub, tdev, tsub in moves(fig.plan, count):
        proc = ProcCpu(pid)
        t0, c0 = time.monotonic(), proc.ticks()
        fig.detach(fig.mh, fdev, fsub)
        fig.attach(fig.mh, tdev, tsub)
        settle = footprint._settle(pid, limit_s=HANDOFF_LIMIT_S)
        dt = time.monotonic() - t0
        costs.append((proc.ticks() - c0) / HZ - idle_pct / 100 * dt)
        settles.append(settle)
        dch.wait_status(established(tsub.host), what="the MH at its new address", tries=3)
    return {
        "handoffs": count,
        "cpu_s": [round(c, 3) for c in costs],
        "cpu_s_mean": round(sum(costs) / len(costs), 3),
        "settle_s": settles,
    }


def usage(ctx: RunContext, flows_n: int, handoffs: int) -> dict[str, Any]:
    with topology("a64fp") as topo:
        fig = Fig7.build(topo, V4)
        p = fig.plan
        sink(fig.ch)
        hosts = [Dime.in_dir(fig.ch, ctx.tmp, "a64-ch"), Dime.in_dir(fig.mh, ctx.tmp, "a64-mh")]
        with running(hosts, "--dataplane", MODE) as (dch, dmh):
            seed = Flows(fig.mh, p.c1.host, p.m1.host, lport=SEED_LPORT)
            flows = Flows(fig.mh, p.c1.host, p.m1.host)
            try:
                seed.open(1)
                seed.send_new()
                dmh.wait_status(established(p.c1.host), what="peer established", tries=3)
                pid = dmh.pid
                time.sleep(footprint.SETTLE_S)
                with cpu_meter(pid) as cpu:
                    time.sleep(IDLE_WINDOW_S)
                idle = {**footprint._memory(pid), "cpu_pct": cpu.get("cpu_pct")}
                dataplane = dmh.status(tries=3)["dataplane"]
                level = footprint._level(MODE, flows_n, IDLE_WINDOW_S, pid, flows, dmh)
                ho = handoff_cpu(fig, dch, pid, handoffs, idle["cpu_pct"] or 0.0)
                after = footprint._memory(pid)
            finally:
                flows.close()
                seed.close()
    return {
        "dataplane": dataplane,
        "idle": idle,
        "flows": level,
        "handoff": ho,
        "after_handoffs": after,
    }


def report(res: dict[str, Any]) -> str:
    mib = 1024
    idle, lv, ho, st = res["idle"], res["flows"], res["handoff"], res["startup"]
    peak = max(idle["hwm_kib"], lv["hwm_kib"], res["after_handoffs"]["hwm_kib"]) / mib
    return "\n".join(
        [
            f"## Footprint on arm64 (emulated Cortex-A57, dataplane {res['dataplane']})",
            "",
            f"Measured by `{res['command']}` inside `./quickstart arm64`'s VM "
            f"({res['machine']}); the emulator (qemu TCG, no KVM) is several times slower "
            "than a Pi, so times and CPU are upper bounds; memory is what a Pi would see.",
            "",
            "| what | arm64 |",
            "|---|---|",
            f"| import floor (Python + dime's imports) | {res['import_floor_kib'] / mib:.1f} MiB |",
            f"| RSS idle (one peer) | {idle['rss_kib'] / mib:.1f} MiB |",
            f"| RSS holding {lv['flows']:,} flows | {lv['rss_kib'] / mib:.1f} MiB "
            f"(learned in {lv['learn_s']} s, settled in {lv['settle_s']} s) |",
            f"| peak RSS (VmHWM) | {peak:.1f} MiB |",
            f"| start-up, dime up to ready (median of {len(st['all_s']) - 1}) | "
            f"{st['median_s']} s (first, with key generation: {st['first_s']} s) |",
            f"| CPU per hard handoff ({ho['handoffs']}, {lv['flows']:,} flows held) | "
            f"{ho['cpu_s_mean']} s (each: {', '.join(map(str, ho['cpu_s']))}) |",
            f"| CPU idle / holding {lv['flows']:,} flows "
            f"| {idle['cpu_pct']} % / {lv['cpu_pct']} % |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.arm64_footprint")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--flows", type=int, default=footprint.GOAL_10K_FLOWS)
    p.add_argument("--handoffs", type=int, default=3)
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("must run as root (it creates network namespaces)")
    with tempfile.TemporaryDirectory(prefix="dime-a64-") as tmp:
        ctx = RunContext(out=a.out, runs=1, smoke=False, tmp=Path(tmp))
        t0 = time.monotonic()
        res: dict[str, Any] = {"import_floor_kib": footprint.import_floor_kib()}
        res["startup"] = footprint.startup_times(ctx, MODE)
        progress_done(f"   start-up: median {res['startup']['median_s']} s")
        res.update(usage(ctx, a.flows, a.handoffs))
        res["duration_s"] = round(time.monotonic() - t0, 1)
        config = {"mode": MODE, "flows": a.flows, "handoffs": a.handoffs,
                  "idle_window_s": IDLE_WINDOW_S}  # fmt: skip
        path = write_result(ctx, NAME, config, res, arch=platform.machine())
        md = report({**res, "command": ctx.command, "machine": platform.machine()})
        path.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
