"""First-packet cost: what learning a new flow costs (StackTrans issue benchmark).

A new flow's first packet goes through NFQUEUE to the daemon, which records it (and
its HID) and programs the kernel before the verdict. Measured MH -> CH on the Fig. 7
testbed without added delay:

* added connect latency: median ``connect()`` time with dime minus without, over
  sequential TCP connections;
* new flows per second: sequential TCP connections completed per second, with and
  without dime.

Goals: median added latency <= 1 ms; >= 5,000 new flows/s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.experiments.common import PYTHON, RunContext, median, progress, write_result
from testbed.fig7 import V4, Fig7
from testbed.netns import Namespace, topology
from testbed.runner import Dime, running

NAME = "firstpacket"
TITLE = "First-packet cost (new flows through the daemon)"
GOAL_LATENCY_MS = 1.0
GOAL_FLOWS_PER_S = 5000.0

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5400)); s.listen(4096)
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

CLIENT = """
import json, socket, sys, time
addr, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lat = []
for _ in range(n):
    s = socket.socket(); t = time.perf_counter(); s.connect((addr, 5400))
    lat.append((time.perf_counter() - t) * 1000); s.close()
count, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    s = socket.socket(); s.connect((addr, 5400)); s.close(); count += 1
print(json.dumps({"latency_ms": lat, "flows_per_s": count / (time.perf_counter() - start)}))
"""


def _measure(fig: Fig7, n: int, seconds: float) -> dict[str, Any]:
    server = fig.ch.popen(PYTHON, "-c", SERVER, V4.c1.host, stdout=-1, stderr=-1)
    try:
        assert server.stdout is not None
        server.stdout.readline()
        out = fig.mh.run(PYTHON, "-c", CLIENT, V4.c1.host, str(n), str(seconds), timeout=300)
    finally:
        server.kill()
        server.wait()
    return dict(json.loads(out))


def _case(ctx: RunContext, mode: str | None, n: int, seconds: float) -> dict[str, Any]:
    with topology("fp") as topo:
        fig = Fig7.build(topo, V4)
        _sysctl_ports(fig.mh)
        if mode is None:
            return _measure(fig, n, seconds)
        hosts = [Dime.in_dir(fig.ch, ctx.tmp, "ch"), Dime.in_dir(fig.mh, ctx.tmp, "mh")]
        with running(hosts, "--dataplane", mode):
            return _measure(fig, n, seconds)


def _sysctl_ports(ns: Namespace) -> None:
    # Many short connections: let TIME_WAIT ports be reused, as a load tester would.
    ns.run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
    ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 60999")


def run(ctx: RunContext) -> Path:
    n = 5 if ctx.smoke else 500
    seconds = 0.2 if ctx.smoke else 5.0
    cases: dict[str, dict[str, Any]] = {}
    for label, mode in (("no dime", None), ("dime nft", "nft"), ("dime nfqueue", "nfqueue")):
        progress(f"first packet: {label}")
        raw = _case(ctx, mode, n, seconds)
        cases[label] = {
            "connect_ms_median": round(median(raw["latency_ms"]), 3),
            "flows_per_s": round(raw["flows_per_s"], 1),
        }
        progress(f"first packet: {label}: {cases[label]}")
    base = cases["no dime"]["connect_ms_median"]
    for label in ("dime nft", "dime nfqueue"):
        cases[label]["added_ms_median"] = round(cases[label]["connect_ms_median"] - base, 3)
    return write_result(
        ctx,
        NAME,
        {"connections_for_latency": n, "seconds_for_rate": seconds, "addresses": "Fig. 7, IPv4"},
        {"cases": cases, "goal_latency_ms": GOAL_LATENCY_MS, "goal_flows_per_s": GOAL_FLOWS_PER_S},
        rtt="no added delay (veth through the router namespace)",
        link_rate="unshaped veth",
    )


def report(doc: dict[str, Any], out: Path, md_dir: Path) -> str:
    meta, res = doc["meta"], doc["results"]
    m = meta["machine"]
    lines = [
        f"## {TITLE}",
        "",
        f"Command: `{meta['command']}` ({meta['date']}; {m['cpus']} CPUs, {m['cpu']}, "
        f"Linux {m['kernel']}). Link: {meta['link_rate']}; RTT: {meta['rtt']}.",
        "",
        "| case | median connect (ms) | added (ms) | new flows/s |",
        "|---|---|---|---|",
    ]
    for label, c in res["cases"].items():
        added = c.get("added_ms_median", "-")
        lines.append(f"| {label} | {c['connect_ms_median']} | {added} | {c['flows_per_s']} |")
    lines.append("")
    for label in ("dime nft", "dime nfqueue"):
        c = res["cases"][label]
        ok_l = c["added_ms_median"] <= res["goal_latency_ms"]
        ok_r = c["flows_per_s"] >= res["goal_flows_per_s"]
        lines.append(
            f"* {label}: added latency goal (<= {res['goal_latency_ms']} ms) "
            f"{'met' if ok_l else '**missed**'}; new-flow rate goal "
            f"(>= {res['goal_flows_per_s']:.0f}/s) {'met' if ok_r else '**missed**'}."
        )
    lines += [
        "",
        "Each new flow's first packet waits for the daemon: a Python callback, a "
        "socket-table entry and one libnftables batch (three map elements) before the "
        "verdict; in `nft` mode each end's SYN-ACK goes through the daemon too (its "
        "sequence number, for prompting stalled flows after an outage). One daemon "
        "handles one packet at a time in Python, which is what bounds the rate: the "
        "rate goal needs the kernel to learn flows itself (e.g. an nft `dynset` "
        "adding the flow's elements from the packet path), which dime does not do yet. "
        "The paper gives no figure for this.",
        "",
    ]
    return "\n".join(lines)
