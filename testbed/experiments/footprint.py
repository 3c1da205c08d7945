"""Experiment 6: footprint. Daemon memory and CPU, idle and at 10k/100k flows; start-up.

* Start-up: a helper in the MH's namespace starts ``dime up`` and asks the control
  socket for ``status`` until it answers (the daemon serves it only once everything
  is installed); the time between the two is "dime up to ready". The first start
  generates the host key and is reported apart; the median is over the others.
* Memory and CPU of the MH's daemon (``/proc/<pid>/status`` VmRSS and VmHWM,
  utime+stime over a window), in the Fig. 7 testbed with dime on both hosts and the
  CH established as a peer: idle, and holding 10k UDP flows (real flows it learned:
  connected UDP sockets, one datagram each, as in the scalability experiment), then
  100k (nft mode). CPU while learning them is reported too. RSS is read before
  ``dime status`` is asked for the table (its answer for 100k flows is tens of MiB of
  JSON, which would be measured instead); it is split into file-backed (the shared
  libraries: Python, cryptography's OpenSSL, libnftables) and anonymous memory.
* The floor: the RSS of a Python process that only imports what ``dime up`` imports.

Goals (issue 13): idle <= 35 MiB, 10k flows <= 60 MiB, start-up <= 0.5 s (median).
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
    fixed,
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
from testbed.runner import Dime, DimeError, established, running

NAME = "footprint"
TITLE = "Footprint: daemon memory, CPU and start-up time"

MODES = ("nft", "nfqueue")
LEVELS = {"nft": (10_000, 100_000), "nfqueue": (10_000,)}
SMOKE_LEVELS = (10, 20)
GOAL_IDLE_MIB = 35.0
GOAL_10K_MIB = 60.0
GOAL_10K_FLOWS = 10_000
GOAL_STARTUP_S = 0.5
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


def _memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RSS split into anonymous and file-backed memory (KiB)."""
    out = {"rss_kib": 0, "hwm_kib": 0, "rss_anon_kib": 0, "rss_file_kib": 0}
    names = {"VmRSS": "rss_kib", "VmHWM": "hwm_kib", "RssAnon": "rss_anon_kib",
             "RssFile": "rss_file_kib"}  # fmt: skip
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in names:
            out[names[key]] = int(value.split()[0])
    return out


# As the dime program: dime.cli keeps ssl and _hashlib out only there (argv[0]).
IMPORTS = (
    "import sys\n"
    "sys.argv = ['/usr/bin/dime', 'up']  # (as dime up: dime.cli keeps ssl out then)\n"
    "import re, dime.cli, dime.daemon\n"
    "print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
)


def import_floor_kib() -> int:
    """RSS of a Python process that has imported what ``dime up`` imports, and no more."""
    out = subprocess.run([PYTHON, "-c", IMPORTS], capture_output=True, text=True, check=True,
                         cwd=ROOT)  # fmt: skip
    return int(out.stdout.strip())


def usage(ctx: RunContext, mode: str) -> dict[str, Any]:
    levels = SMOKE_LEVELS if ctx.smoke else LEVELS[mode]
    window = SMOKE_WINDOW_S if ctx.smoke else WINDOW_S
    res: dict[str, Any] = {"window_s": window, "levels": []}
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
                    **_memory(pid),
                    "cpu_pct": cpu.get("cpu_pct"),
                    "entries": len(dmh.status(tries=3)["sockets"]),
                    "ch_rss_kib": ProcCpu(ch_pid).rss_kib(),
                }
                for n in levels:
                    res["levels"].append(_level(mode, n, window, pid, flows, dmh))
            finally:
                flows.close()
                seed.close()
    return res


def _level(mode: str, n: int, window: float, pid: int, flows: Flows, dmh: Dime) -> dict[str, Any]:
    """Grow to ``n`` flows, let dime learn them, hold them for ``window`` s."""
    progress(f"{NAME}: {mode}: learning up to {n:,} flows")
    flows.open(n)
    t0 = time.monotonic()
    with cpu_meter(pid) as learn:
        flows.send_new()
    learn_s = round(time.monotonic() - t0, 2)
    # The notices of a burst may still be queued: wait until the daemon is done
    # learning (without asking status, whose answer would be measured too).
    settle_s = _settle(pid)
    progress(f"{NAME}: {mode}: holding {n:,} flows, {window:g} s")
    with cpu_meter(pid) as cpu:
        time.sleep(window)
    mem = _memory(pid)  # before the status call: its answer is big
    try:
        entries: int | None = len(dmh.status(tries=3, timeout=120)["sockets"])
    except DimeError as exc:  # a finding in itself: reported, not fatal
        progress_done(f"   {mode}: status with {n:,} flows did not answer: {str(exc)[:200]}")
        entries = None
    return {
        "flows": n,
        **mem,
        "cpu_pct": cpu.get("cpu_pct"),
        "learn_s": learn_s,
        "learn_cpu_pct": learn.get("cpu_pct"),
        "settle_s": settle_s,
        "entries": entries,
    }


def _settle(pid: int, busy_pct: float = 30.0, limit_s: float = 60.0) -> float | None:
    """Seconds until the daemon used less than ``busy_pct`` of a core over one second
    (None: still busy after ``limit_s``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        with cpu_meter(pid) as cpu:
            time.sleep(1.0)
        if (cpu.get("cpu_pct") or 0.0) < busy_pct:
            return round(time.monotonic() - t0, 1)
    return None


def run(ctx: RunContext) -> Path:
    results: dict[str, Any] = {"import_floor_kib": import_floor_kib()}
    for mode in MODES:
        results[mode] = {"startup": startup_times(ctx, mode), **usage(ctx, mode)}
        r = results[mode]
        held = "; ".join(
            f"{lv['flows']:,} flows {lv['rss_kib'] / 1024:.1f} MiB, {lv['cpu_pct']} % CPU"
            for lv in r["levels"]
        )
        progress_done(
            f"   {mode}: ready in {r['startup']['median_s']} s (median); RSS idle "
            f"{r['idle']['rss_kib'] / 1024:.1f} MiB, {r['idle']['cpu_pct']} % CPU; {held}"
        )
    results["goals"] = goals(results, ctx.smoke)
    config = {
        "modes": list(MODES),
        "levels": {m: list(SMOKE_LEVELS if ctx.smoke else LEVELS[m]) for m in MODES},
        "window_s": SMOKE_WINDOW_S if ctx.smoke else WINDOW_S,
        "starts": 1 + ctx.n(STARTS),
        "sweep_interval_s": 2.0,
        "goal_idle_mib": GOAL_IDLE_MIB,
        "goal_10k_mib": GOAL_10K_MIB,
        "goal_startup_s": GOAL_STARTUP_S,
    }
    path = write_result(
        ctx, NAME, config, results,
        **UNSHAPED,
    )  # fmt: skip
    plot(results, ctx.out / f"{NAME}.png", ctx.smoke)
    return path


def goals(results: dict[str, Any], smoke: bool) -> dict[str, dict[str, Any]]:
    """Per data plane: each goal's measured value (MiB or s) and whether it is met.
    The 10k goal is judged at the level nearest 10k (a smoke run has no 10k level)."""
    out: dict[str, dict[str, Any]] = {}
    for m in MODES:
        r = results[m]
        near = min(r["levels"], key=lambda lv: abs(lv["flows"] - GOAL_10K_FLOWS))
        idle = r["idle"]["rss_kib"] / 1024
        loaded = near["rss_kib"] / 1024
        start = r["startup"]["median_s"]
        out[m] = {
            "idle_mib": round(idle, 1),
            "idle_met": idle <= GOAL_IDLE_MIB,
            "flows": near["flows"],
            "flows_mib": round(loaded, 1),
            "flows_met": loaded <= GOAL_10K_MIB,
            "startup_s": start,
            "startup_met": start is not None and start <= GOAL_STARTUP_S,
        }
    return out


def _levels(r: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The flow levels of one data plane; a result of before levels had one."""
    if "levels" in r:
        return list(r["levels"])
    ld, lr = r["loaded"], r["learning"]
    return [{**ld, "flows": n, "learn_s": lr["seconds"], "learn_cpu_pct": lr["cpu_pct"]}]


def plot(results: dict[str, Any], path: Path, smoke: bool) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    xs = list(range(len(MODES)))
    top = max(len(results[m]["levels"]) for m in MODES)
    width = 0.8 / (1 + top)
    colors = ["tab:blue", "tab:purple", "tab:red"]
    for k in range(1 + top):
        off = (k - top / 2) * width
        rows = [results[m]["idle"] if k == 0 else (results[m]["levels"] + [None] * top)[k - 1]
                for m in MODES]  # fmt: skip
        for m_i, row in enumerate(rows):
            if row is None:
                continue
            name = "idle" if k == 0 else f"{row['flows']:,} flows"
            color = "tab:gray" if k == 0 else colors[(k - 1) % len(colors)]
            axes[0].bar(xs[m_i] + off, row["rss_kib"] / 1024, width, color=color,
                        label=name if m_i == 0 else None)  # fmt: skip
            axes[1].bar(xs[m_i] + off, row["cpu_pct"] or 0, width, color=color,
                        label=name if m_i == 0 else None)  # fmt: skip
    axes[0].axhline(GOAL_IDLE_MIB, color="k", ls="--", lw=0.8, label=f"goal idle {GOAL_IDLE_MIB:g}")
    axes[0].axhline(GOAL_10K_MIB, color="k", ls=":", lw=0.8, label=f"goal 10k {GOAL_10K_MIB:g}")
    axes[2].axhline(GOAL_STARTUP_S, color="k", ls="--", lw=0.8, label=f"goal {GOAL_STARTUP_S:g}")
    for x, m in zip(xs, MODES, strict=True):
        ts = [t for t in results[m]["startup"]["all_s"][1:] if t is not None]
        axes[2].scatter([x] * len(ts), ts, color="tab:blue", s=14)
        first = results[m]["startup"]["first_s"]
        if first is not None:
            axes[2].scatter([x], [first], color="tab:red", marker="x", s=30)
        med = results[m]["startup"]["median_s"]
        if med is not None:
            axes[2].hlines(med, x - 0.25, x + 0.25, color="k")
    axes[0].set_ylabel("MH daemon RSS (MiB)")
    axes[1].set_ylabel("MH daemon CPU (% of one core)")
    axes[2].set_ylabel("dime up -> status answers (s)")
    axes[2].set_title("start-up (x: first, generates the key; bar: median)", fontsize=9)
    for ax in axes:
        ax.set_xticks(xs, [f"dime {m}" for m in MODES])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    axes[0].set_title("memory, idle and holding flows", fontsize=9)
    axes[1].set_title("CPU, idle and holding flows", fontsize=9)
    fig.suptitle("dime footprint" + (" [smoke]" if smoke else ""))
    save_figure(fig, path)


def report(doc: dict[str, Any], out: Path, md_dir: Path) -> str:
    meta, cfg, res = doc["meta"], doc["config"], doc["results"]
    lines = [f"## {TITLE}", "", *smoke_note(meta)]
    lines += [
        "The MH's daemon in the Fig. 7 testbed, dime on both hosts, the CH established as "
        f"a peer. CPU is utime+stime over {cfg['window_s']:g} s, in % of one core; RSS is "
        "VmRSS (peak: VmHWM), read before `dime status` is asked for the table, and split "
        "into anonymous memory and file-backed pages (shared libraries: Python, "
        "cryptography's OpenSSL, libnftables). The flows are real flows the daemon "
        "learned (connected UDP sockets, one datagram each) and held during the window; "
        f"dime's liveness sweep runs every {cfg['sweep_interval_s']:g} s or less often "
        "with many flows. Start-up is from starting `dime up` to its control socket "
        f"answering `status` (everything installed), {cfg['starts']} starts per data plane.",
        "",
        f"* Command: `{meta['command']}`",
        f"* Machine: {machine_line(meta)}",
        f"* Link: {meta.get('link')}; no delay added",
        "",
        f"![footprint]({plot_path(out, md_dir, NAME + '.png')})",
        "",
        "| data plane | state | flows in table | RSS (MiB) | anon / file (MiB) "
        "| peak RSS (MiB) | CPU (% of a core) | goal | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in cfg["modes"]:
        r = res[m]
        i = r["idle"]
        lines.append(
            f"| {m} | idle | {i['entries']} | {i['rss_kib'] / 1024:.1f} | {_split(i)} | - | "
            f"{fixed(i['cpu_pct'], 1)} | <= {cfg.get('goal_idle_mib', GOAL_IDLE_MIB):g} MiB "
            "| none given |"
        )
        for lv in _levels(r, cfg.get("flows", 0)):
            n = lv["flows"]
            goal = (f"<= {cfg.get('goal_10k_mib', GOAL_10K_MIB):g} MiB"
                    if n == GOAL_10K_FLOWS else "reported")  # fmt: skip
            lines += [
                f"| {m} | learning {n:,} flows ({_learned(lv)}) | - | - | - | - | "
                f"{fixed(lv['learn_cpu_pct'], 1)} | none set | none given |",
                f"| {m} | holding {n:,} flows | {_entries(lv)} | {lv['rss_kib'] / 1024:.1f} "
                f"| {_split(lv)} | {lv['hwm_kib'] / 1024:.1f} | {fixed(lv['cpu_pct'], 1)} "
                f"| {goal} | none given |",
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
            f"| {m} | {fixed(s['first_s'], 2)} | {fixed(s['median_s'], 2)} "
            f"| {fixed(s['min_s'], 2)}-{fixed(s['max_s'], 2)} | {s['failed']} "
            f"| <= {cfg.get('goal_startup_s', GOAL_STARTUP_S):g} s | none given |"
        )
    lines += ["", f"Paper: {PAPER}. The CH's daemon, idle: "
              + ", ".join(f"{m} {res[m]['idle']['ch_rss_kib'] / 1024:.1f} MiB"
                          for m in cfg["modes"]) + "."]  # fmt: skip
    if "import_floor_kib" in res:
        lines.append(
            f"A Python process that only imports what `dime up` imports has "
            f"{res['import_floor_kib'] / 1024:.1f} MiB resident: the floor of the idle figure."
        )
    if "goals" in res:
        lines += ["", "Verdict (issue 13: idle <= "
                  f"{cfg['goal_idle_mib']:g} MiB, 10k flows <= {cfg['goal_10k_mib']:g} MiB, "
                  f"start-up <= {cfg['goal_startup_s']:g} s):", ""]  # fmt: skip
        for m in cfg["modes"]:
            g = res["goals"][m]
            idle = _verdict(g["idle_met"], g["idle_mib"], cfg["goal_idle_mib"], "MiB")
            held = _verdict(g["flows_met"], g["flows_mib"], cfg["goal_10k_mib"], "MiB")
            start = _verdict(g["startup_met"], g["startup_s"], cfg["goal_startup_s"], "s")
            lines.append(
                f"* {m}: idle {g['idle_mib']:.1f} MiB {idle}; {g['flows']:,} flows "
                f"{g['flows_mib']:.1f} MiB {held}; start-up {fixed(g['startup_s'], 2)} s {start}."
            )
        lines += ["", *_where_it_goes(res, cfg)]
    lines.append("")
    return "\n".join(lines)


# Measured apart (issue 13), as VmRSS after each import in a fresh interpreter, in
# the order dime up imports them: what the import floor is made of (MiB).
IMPORT_COSTS = (
    ("the interpreter (libpython, site)", 10.6),
    ("asyncio and the stdlib it pulls in", 5.0),
    ("cryptography (its Rust module, OpenSSL linked in)", 6.6),
    ("dime's own modules (ihmp, stacktrans, dime), with json, logging, ctypes...", 7.2),
)


def _where_it_goes(res: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """Where the memory goes, from the measured figures: the import floor, what the
    running daemon adds, and each flow's cost between the levels."""
    floor = res.get("import_floor_kib")
    if floor is None:
        return []
    parts = "; ".join(f"{what} {mib:g}" for what, mib in IMPORT_COSTS)
    out = [
        f"Where it goes: {floor / 1024:.1f} MiB is the import floor ({parts}: MiB each, "
        "measured apart). pyroute2 (22 MiB), cryptography's serialization package "
        "(1.5 MiB), ssl and libcrypto through hashlib (4.9 MiB) are no longer loaded, nor "
        "are click and what it imports (`dime up` reads its own options: 1.4 MiB) or, "
        "without a config file, tomllib (0.25 MiB). The file-backed part of RSS depends "
        "on what the page cache holds: a freshly installed (fully cached) "
        "cryptography module maps about 2 MiB more of itself than one only partly "
        "cached (measured with `posix_fadvise(DONTNEED)` on it: 37.9 against 35.65 "
        "MiB idle, the same code); these runs are on a venv in use for hours, whose "
        "import floor read 30.0 to 30.6 MiB with the same code, venv to venv."
    ]
    for m in cfg["modes"]:
        r = res[m]
        idle = r["idle"]
        text = (
            f"{m}: the running daemon adds {(idle['rss_kib'] - floor) / 1024:.1f} MiB to it "
            f"idle (file-backed {idle.get('rss_file_kib', 0) / 1024:.1f} MiB in all: "
            "libnftables and its libraries join the interpreter's)"
        )
        levels = r["levels"]
        if len(levels) >= 2:
            a, b = levels[-2], levels[-1]
            # Per entry in the table, not per flow opened: the daemon may not have
            # learned every flow yet when RSS is read.
            ea = a["entries"] if a["entries"] is not None else a["flows"]
            eb = b["entries"] if b["entries"] is not None else b["flows"]
            per = (b["rss_kib"] - a["rss_kib"]) * 1024 / max(eb - ea, 1)
            text += f"; from {ea:,} to {eb:,} entries each costs {per:,.0f} bytes of RSS"
        peak = next((lv for lv in levels if lv["hwm_kib"] > 1.5 * lv["rss_kib"]), None)
        if peak is not None:
            text += (
                f"; the peak ({peak['hwm_kib'] / 1024:.0f} MiB, reached by {peak['flows']:,} "
                "flows) is while learning them, not while holding them"
            )
        for lv in levels:
            if lv["entries"] is None:
                text += (
                    f"; with {lv['flows']:,} flows `dime status` did not answer (the "
                    "entries are counted as the flows opened)"
                )
            elif lv["entries"] < lv["flows"]:
                text += (
                    f"; of {lv['flows']:,} flows opened, only {lv['entries']:,} were in the "
                    f"table when RSS was read (their datagrams took {lv['learn_s']:g} s to "
                    f"send; the daemon was still busy, {fixed(lv['cpu_pct'], 0)} % CPU over the "
                    "window), so that row is not a figure for all of them"
                )
        out.append(f"* {text}.")
    return out


def _entries(lv: dict[str, Any]) -> str:
    return "status did not answer" if lv["entries"] is None else f"{lv['entries']:,}"


def _learned(lv: dict[str, Any]) -> str:
    """How long the datagrams took to send, and the daemon to be done with them."""
    if "settle_s" not in lv:
        return f"{lv['learn_s']:g} s"
    settle = "still busy after 60 s" if lv["settle_s"] is None else f"+{lv['settle_s']:g} s"
    return f"{lv['learn_s']:g} s, {settle} to settle"


def _verdict(met: bool, value: float | None, goal: float, unit: str) -> str:
    if met:
        return "(met)"
    if value is None:
        return "(**missed**: not measured)"
    digits = 3 if unit == "s" else 2
    return f"(**missed** by {value - goal:.{digits}f} {unit})"


def _split(row: dict[str, Any]) -> str:
    if "rss_anon_kib" not in row:
        return "-"
    return f"{row['rss_anon_kib'] / 1024:.1f} / {row['rss_file_kib'] / 1024:.1f}"
