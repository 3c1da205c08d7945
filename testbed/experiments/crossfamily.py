"""Experiment: throughput of a flow carried across IP versions.

TCP throughput (iperf3, one stream, receiver side) from the MH to the CH of the Fig.
7 testbed made dual-stack on their first links, unshaped. Each run is one IPv4
connection; with dime, the MH loses its IPv4 address in the middle of it (keeping
its IPv6 one): from then on both daemons carry the connection across, each packet
translated between IPv4 and IPv6 in user space (``stacktrans.family``) and put back
whole through a packet socket (``stacktrans.carry``, ``stacktrans.link_send``).
Without dime the same run has no move (the connection could not survive one): the
reference. The daemons' CPU time over
the runs, per Gbit received, is reported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from testbed.experiments.common import (
    RunContext,
    fixed,
    machine_line,
    mean,
    progress,
    progress_done,
    smoke_note,
    write_result,
)
from testbed.experiments.overhead import FULL, SMOKE, cpu_seconds, windows
from testbed.fig7 import V4, Fig7
from testbed.iperf3 import iperf3_client, iperf3_reports, iperf3_server, ping_rtt_ms
from testbed.netns import topology
from testbed.runner import Dime, running

NAME = "crossfamily"
TITLE = "Throughput of a flow carried across IP versions"
CONFIGS = ("none", "nft", "nfqueue")
GOAL_GBPS = 1.0  # the IPv4/IPv6 handover issue's goal, unshaped, after the move
WHY = (
    "How: each translated packet goes back whole where it can, through a packet "
    "socket with a virtio-net header (stacktrans.link_send): the 64 kB GSO packets "
    "the daemon gets from the kernel are cut into segments and summed by the kernel, "
    "and the peer's daemon gets them whole too (veth keeps them whole), so each side "
    "pays one Python round trip per 64 kB instead of ~45. Before that (raw sockets, "
    "segments cut and summed in Python): 0.103 Gbit/s (nft), 0.116 Gbit/s (nfqueue). "
    "Not measured: a wire that cuts the packets (a real NIC's TSO) where the receiver "
    "does not merge them again (no GRO): its daemon then translates every MTU-sized "
    "packet, as every daemon did before this change (0.1 Gbit/s). Real NICs merge with GRO by "
    "default."
)


def measure(ctx: RunContext, config: str) -> dict[str, Any]:
    runs = ctx.n(ctx.runs)
    sch = SMOKE if ctx.smoke else FULL
    out: dict[str, Any] = {"runs": []}
    v4 = V4.m1
    with topology(f"xf{config[:3]}") as topo:
        fig = Fig7.build(topo, V4)
        fig.add_ipv6()
        hosts = (
            []
            if config == "none"
            else [Dime.in_dir(fig.ch, ctx.tmp, f"xf-{config}-ch"),
                  Dime.in_dir(fig.mh, ctx.tmp, f"xf-{config}-mh")]
        )  # fmt: skip
        with running(hosts, "--dataplane", config) as procs:
            out["rtt_ms"] = ping_rtt_ms(fig.mh, V4.c1.host, count=1 if ctx.smoke else 5)
            cpu0 = sum(cpu_seconds(p.pid) for p in procs)
            received_bits = 0.0
            for i in range(runs):
                progress(f"{NAME}: {config}: run {i + 1}/{runs}")
                srv = iperf3_server(fig.ch, "-i", f"{sch.interval:g}")
                cli = iperf3_client(fig.mh, V4.c1.host, "-t", f"{sch.total:g}")
                t0 = time.monotonic()
                if procs:
                    time.sleep(max(0.0, t0 + sch.before - time.monotonic()))
                    fig.mh.ip("addr", "del", v4.host_cidr(), "dev", "m1")
                crep, srep = iperf3_reports(cli, srv, sch.total + 30)
                run: dict[str, Any] = {"moved": bool(procs)}
                if "error" in crep or "error" in srep:
                    run["error"] = str(crep.get("error") or srep.get("error"))
                else:
                    bef, aft = windows(srep, sch)
                    run.update(before_bps=bef, after_bps=aft)
                    received_bits += srep.get("end", {}).get("sum_received", {}).get("bytes", 0) * 8
                if procs:
                    st = procs[1].status()
                    run["carried"] = st["counters"].get("packets_carried_across")
                    fig.mh.ip("addr", "add", v4.host_cidr(), "dev", "m1", "nodad")
                    fig.mh.ip("route", "replace", "default", "via", v4.router)
                    time.sleep(1.0)  # (IPv4 verified again: the next run starts native)
                out["runs"].append(run)
            cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
    ok = [r for r in out["runs"] if "error" not in r]
    out["errors"] = len(out["runs"]) - len(ok)
    for key in ("before", "after"):
        xs = [r[f"{key}_bps"] for r in ok if r.get(f"{key}_bps")]
        out[f"{key}_gbps"] = round(mean(xs) / 1e9, 4) if xs else None
    gbit = received_bits / 1e9
    out["daemon_cpu_s_per_gbit"] = round(cpu / gbit, 3) if procs and gbit else None
    progress_done(f"   {config}: before {out['before_gbps']}, after {out['after_gbps']} Gbit/s")
    return out


def run(ctx: RunContext) -> Path:
    results = {c: measure(ctx, c) for c in CONFIGS}
    ref = results["none"]
    base = mean([x for x in (ref["before_gbps"], ref["after_gbps"]) if x])
    for c in CONFIGS:
        v = results[c].get("after_gbps")
        results[c]["after_ratio"] = round(v / base, 3) if v and base else None
    sch = SMOKE if ctx.smoke else FULL
    config = {
        "configs": list(CONFIGS),
        "runs": ctx.n(ctx.runs),
        "windows_s": {
            "before": [sch.skip, sch.before - 0.2],
            "after": [sch.before + sch.settle, sch.total],
        },
        "move": "the MH's IPv4 address deleted in the middle of each run (dime only); "
        "its IPv6 one stays",
    }
    rtts = [r["rtt_ms"] for r in results.values() if r.get("rtt_ms") is not None]
    return write_result(
        ctx, NAME, config, results,
        link="unshaped veth, dual-stack", delay_ms=0, delay="none added",
        rtt_ms=round(mean(rtts), 3) if rtts else None,
    )  # fmt: skip


def report(doc: dict[str, Any], out: Path, md_dir: Path) -> str:
    meta, cfg, res = doc["meta"], doc["config"], doc["results"]
    w = cfg["windows_s"]
    lines = [f"## {TITLE}", "", *smoke_note(meta)]
    lines += [
        "TCP throughput MH -> CH (iperf3, one IPv4 stream, receiver side), unshaped. With "
        "dime the MH loses its IPv4 address in the middle of each connection and keeps its "
        "IPv6 one: after that both daemons carry the connection across, translating every "
        "packet (up to 64 kB with GSO) in user space. Without dime there is no move "
        "(reference). Windows: before "
        f"{w['before'][0]:g}-{w['before'][1]:g} s, after {w['after'][0]:g}-{w['after'][1]:g} "
        f"s of each run; {cfg['runs']} run(s) per row.",
        "",
        f"* Command: `{meta['command']}`",
        f"* Machine: {machine_line(meta)}",
        f"* Links: {meta.get('link')}; RTT (ping MH -> CH, idle) {meta.get('rtt_ms')} ms",
        "",
        "| system | before (Gbit/s, IPv4) | after (Gbit/s, carried across) | ratio after / no "
        "dime | daemons' CPU s per Gbit | goal |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for c in cfg["configs"]:
        e = res[c]
        goal = "reference" if c == "none" else f">= {GOAL_GBPS:g} Gbit/s after"
        lines.append(
            f"| {'no dime' if c == 'none' else 'dime ' + c} | {fixed(e.get('before_gbps'), 3)} "
            f"| {fixed(e.get('after_gbps'), 3)} | {fixed(e.get('after_ratio'), 3)} "
            f"| {fixed(e.get('daemon_cpu_s_per_gbit'), 3)} | {goal} |"
        )
        after = e.get("after_gbps")
        if c != "none" and after is not None:
            met = "met" if after >= GOAL_GBPS else f"missed ({after:.3f} Gbit/s)"
            verdicts.append(f"dime {c}: {met}")
    lines += [
        "",
        "Daemons' CPU: utime + stime of both daemons over the whole runs (before the move "
        "too, when the kernel carries the flow natively), divided by the Gbit the receiver "
        "got.",
        "",
        "Goal (>= 1 Gbit/s carried across, unshaped): " + "; ".join(verdicts) + ".",
        "",
        WHY,
        "",
    ]
    return "\n".join(lines)
