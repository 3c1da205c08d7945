"""First-packet cost: what learning a new flow costs, and a busy server.

In ``nft`` mode the kernel learns a new flow to a known host by itself (the learn
chains of :mod:`stacktrans.nft`) and tells the daemon afterwards through NFLOG;
a flow to an unknown host passes at once too. In ``nfqueue`` mode every packet,
the first included, waits for the daemon. Measured MH -> CH on the Fig. 7 testbed
without added delay, dime on both ends:

* added connect latency: median ``connect()`` time with dime minus without, over
  sequential TCP connections;
* new flows per second: sequential TCP connections completed per second, with and
  without dime, and in ``nft`` mode with both daemons paused for it (the kernel's
  part alone); each process's CPU over that phase.

And a server case: the CH (dime or not) accepts connections from 1,000 client
addresses at once (on the MH's side, no dime there), as fast as two client
processes can open them; each client address is also a dime host of its own that
says HELLO to the CH first (:mod:`testbed.hello_load`), so the CH learns 1,000 peers.

Goals: median added latency <= 0.05 ms; new-flow rate >= 0.8 of no dime's.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from testbed.experiments.common import (
    PYTHON,
    RunContext,
    machine_line,
    median,
    progress,
    write_result,
)
from testbed.fig7 import V4, Fig7
from testbed.netns import Namespace, topology
from testbed.procs import py
from testbed.procstat import HZ, ProcCpu
from testbed.runner import Dime, running

NAME = "firstpacket"
TITLE = "First-packet cost (new flows through the daemon)"
GOAL_LATENCY_MS = 0.05
GOAL_RATE_RATIO = 0.8
#: The flow-notice counters kept per daemon (CH, MH) of each case with dime.
NOTICE_COUNTERS = (
    "flow_notices",
    "flow_notices_lost",
    "flow_notices_batched",
    "flow_notice_batches",
)
#: nft mode with both daemons stopped for the rate phase: the kernel's work alone.
PAUSED = "dime nft, daemons paused"
CLIENTS = 1000
CLIENT_NET = "10.77.0.0/16"

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5400)); s.listen(4096)
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

# The rate phase says when it starts and waits to exit until told (a line on stdin),
# so that its CPU time is read over exactly that phase.
CLIENT = """
import json, socket, sys, time
addr, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lat = []
for _ in range(n):
    s = socket.socket(); t = time.perf_counter(); s.connect((addr, 5400))
    lat.append((time.perf_counter() - t) * 1000); s.close()
print("rate", flush=True)
count, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    s = socket.socket(); s.connect((addr, 5400)); s.close(); count += 1
rate = count / (time.perf_counter() - start)
print(json.dumps({"latency_ms": lat, "flows_per_s": rate}), flush=True)
sys.stdin.readline()
"""
#: /proc/stat's first fields: the machine's CPU time by kind.
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _machine_ticks() -> dict[str, int]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return dict(zip(STAT_FIELDS, map(int, fields), strict=False))


class CpuMeter:
    """CPU time of some processes and of the whole machine between two reads, in %
    of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, int] = {}
        self._t0 = 0.0

    def _read(self) -> dict[str, int]:
        ticks = {name: ProcCpu(pid).ticks() for name, pid in self.pids.items()}
        ticks.update({f"machine {k}": v for k, v in _machine_ticks().items()})
        return ticks

    def start(self) -> None:
        self._start, self._t0 = self._read(), _now()

    def stop(self) -> dict[str, float]:
        end, dt = self._read(), _now() - self._t0
        return {k: round(100.0 * (end[k] - v) / HZ / dt, 1) for k, v in self._start.items()}


def _now() -> float:
    return os.times().elapsed


def _measure(
    fig: Fig7, n: int, seconds: float, daemons: dict[str, int], paused: bool = False
) -> dict[str, Any]:
    """Latency over ``n`` connections, then the rate for ``seconds``, with each
    process's CPU over the rate phase. ``paused``: the daemons are stopped for the
    rate phase (after the latency phase made the hosts known to each other)."""
    server = fig.ch.popen(PYTHON, "-c", SERVER, V4.c1.host, stdout=-1, stderr=-1)
    client = None
    try:
        assert server.stdout is not None
        server.stdout.readline()  # listening: the client's first connect must find it
        args = (V4.c1.host, str(n), str(seconds))
        client = fig.mh.popen(PYTHON, "-c", CLIENT, *args, stdin=-1, stdout=-1, stderr=-1)
        assert client.stdout is not None and client.stdin is not None
        meter = CpuMeter({"client": client.pid, "server": server.pid, **daemons})
        line = client.stdout.readline()
        assert line.strip() == b"rate", line + client.communicate(timeout=10)[1]
        with _paused(daemons, paused):
            meter.start()
            res = dict(json.loads(client.stdout.readline()))
            res["cpu_pct"] = meter.stop()
        client.stdin.close()
        client.wait(timeout=10)
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait()
    return res


@contextmanager
def _paused(pids: dict[str, int], paused: bool) -> Iterator[None]:
    """The daemons stopped (SIGSTOP) for the block if ``paused``: the kernel's work
    alone (its learn chains, conntrack, NFLOG copies nobody reads)."""
    if paused:
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if paused:
            for pid in pids.values():
                os.kill(pid, signal.SIGCONT)


def _case(
    ctx: RunContext, mode: str | None, n: int, seconds: float, paused: bool = False
) -> dict[str, Any]:
    with topology("fp") as topo:
        fig = Fig7.build(topo, V4)
        _sysctl_ports(fig.mh)
        if mode is None:
            return _measure(fig, n, seconds, {})
        hosts = [Dime.in_dir(fig.ch, ctx.tmp, "ch"), Dime.in_dir(fig.mh, ctx.tmp, "mh")]
        with running(hosts, "--dataplane", mode) as (ch, mh):
            daemons = {"dime ch": ch.pid, "dime mh": mh.pid}
            res = _measure(fig, n, seconds, daemons, paused)
            counters = [d.status()["counters"] for d in (ch, mh)]
            res["learned_by_kernel"] = [c.get("flows_learned_by_kernel") for c in counters]
            res["notices"] = [{k: c.get(k) for k in NOTICE_COUNTERS} for c in counters]
            return res


MANY = """
import json, socket, sys, time
addr, seconds, sources = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
count, errors, start = 0, 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    s = socket.socket(); s.bind((sources[count % len(sources)], 0))
    try:
        s.connect((addr, 5400)); count += 1
    except OSError:
        errors += 1
    s.close()
print(json.dumps({"connections": count, "errors": errors, "seconds": time.perf_counter() - start}))
"""


def client_addresses(n: int) -> list[str]:
    return [f"10.77.{i // 250}.{i % 250 + 1}" for i in range(n)]


def _add_clients(fig: Fig7, addrs: list[str]) -> None:
    """The client addresses on the MH's link, routed by the router."""
    batch = "".join(f"addr add {a}/32 dev m1\\n" for a in addrs)
    fig.mh.sh(f"printf '{batch}' | ip -batch -")
    fig.r.run("ip", "route", "add", CLIENT_NET, "via", V4.m1.host)


def _server_load(fig: Fig7, addrs: list[str], seconds: float) -> dict[str, Any]:
    server = fig.ch.popen(PYTHON, "-c", SERVER, V4.c1.host, stdout=-1, stderr=-1)
    try:
        assert server.stdout is not None
        server.stdout.readline()
        halves = [addrs[0::2], addrs[1::2]]
        clients = [
            fig.mh.popen(PYTHON, "-c", MANY, V4.c1.host, str(seconds), *half, stdout=-1, stderr=-1)
            for half in halves
        ]
        outs = [json.loads(c.communicate(timeout=seconds + 120)[0]) for c in clients]
    finally:
        server.kill()
        server.wait()
    total = sum(o["connections"] for o in outs)
    span = max(o["seconds"] for o in outs)
    return {
        "connections_per_s": round(total / span, 1),
        "errors": sum(o["errors"] for o in outs),
    }


def _hellos(fig: Fig7, addrs: list[str]) -> dict[str, Any]:
    proc = py(fig.mh, "-m", "testbed.hello_load", V4.c1.host, *addrs)
    out = proc.communicate(timeout=120)[0].decode()
    res = dict(json.loads(out.strip().splitlines()[-1]))
    seconds = res["seconds"]
    res["per_s"] = round(res["completed"] / seconds, 1) if seconds else 0.0
    return res


def _server_case(ctx: RunContext, with_dime: bool, n: int, seconds: float) -> dict[str, Any]:
    addrs = client_addresses(n)
    with topology("fs") as topo:
        fig = Fig7.build(topo, V4)
        _sysctl_ports(fig.mh)
        _add_clients(fig, addrs)
        if not with_dime:
            meter = CpuMeter({})
            meter.start()
            res = _server_load(fig, addrs, seconds)
            res["cpu_pct"] = meter.stop()
            return res
        with running([Dime.in_dir(fig.ch, ctx.tmp, "ch")]) as (ch,):
            meter = CpuMeter({"dime ch": ch.pid})
            meter.start()
            hellos = _hellos(fig, addrs)
            hellos["cpu_pct"] = meter.stop()
            meter.start()
            res = _server_load(fig, addrs, seconds)
            res["cpu_pct"] = meter.stop()
            status = ch.status()
        res["hellos"] = hellos
        wanted = (
            "peers",
            "packets_queued",
            "flow_notices",
            "flow_notices_lost",
            "flow_notices_batched",
            "flow_notice_batches",
            "flows_learned_by_kernel",
            "cookies_sent",
        )
        res["ch_counters"] = {k: v for k, v in status["counters"].items() if k in wanted}
        res["ch_counters"]["dropped"] = status["counters"].get("dropped", {})
        return res


def _sysctl_ports(ns: Namespace) -> None:
    # Many short connections: let TIME_WAIT ports be reused, as a load tester would.
    ns.run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
    ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 60999")


#: (label, dataplane mode or None for no dime, daemons paused for the rate phase)
CASES: tuple[tuple[str, str | None, bool], ...] = (
    ("no dime", None, False),
    ("dime nft", "nft", False),
    (PAUSED, "nft", True),
    ("dime nfqueue", "nfqueue", False),
)


def run(ctx: RunContext) -> Path:
    n = 5 if ctx.smoke else 500
    seconds = 0.2 if ctx.smoke else 5.0
    cases: dict[str, dict[str, Any]] = {}
    for label, mode, paused in CASES:
        progress(f"first packet: {label}")
        raw = _case(ctx, mode, n, seconds, paused)
        cases[label] = {
            "connect_ms_median": round(median(raw["latency_ms"]), 3),
            "flows_per_s": round(raw["flows_per_s"], 1),
            "cpu_pct": raw["cpu_pct"],
        }
        for key in ("learned_by_kernel", "notices"):
            if key in raw:
                cases[label][key] = raw[key]
        progress(f"first packet: {label}: {cases[label]}")
    base = cases["no dime"]
    for label in (c[0] for c in CASES[1:]):
        c = cases[label]
        c["added_ms_median"] = round(c["connect_ms_median"] - base["connect_ms_median"], 3)
        c["rate_ratio"] = round(c["flows_per_s"] / base["flows_per_s"], 3)
    clients = 20 if ctx.smoke else CLIENTS
    server: dict[str, Any] = {}
    for label, with_dime in (("no dime", False), ("dime nft", True)):
        progress(f"first packet: server, {clients} clients, {label}")
        server[label] = _server_case(ctx, with_dime, clients, seconds)
        progress(f"first packet: server, {label}: {server[label]}")
    return write_result(
        ctx,
        NAME,
        {
            "connections_for_latency": n,
            "seconds_for_rate": seconds,
            "addresses": "Fig. 7, IPv4",
            "server_clients": clients,
        },
        {
            "cases": cases,
            "server": server,
            "goal_latency_ms": GOAL_LATENCY_MS,
            "goal_rate_ratio": GOAL_RATE_RATIO,
        },
        rtt="no added delay (veth through the router namespace)",
        link_rate="unshaped veth",
    )


CPU_COLUMNS = (
    "client",
    "server",
    "dime mh",
    "dime ch",
    "machine user",
    "machine system",
    "machine softirq",
    "machine idle",
)


def _cpu_table(cases: dict[str, dict[str, Any]]) -> list[str]:
    """CPU over the rate phase, in % of one core (the machine's columns: of all its
    cores together), per case."""
    if not any("cpu_pct" in c for c in cases.values()):
        return []  # a results file from before CPU was measured
    head = " | ".join(CPU_COLUMNS)
    lines = [
        "CPU during the rate phase, % of one core (machine: all cores together, "
        "anything else running included):",
        "",
        f"| case | {head} |",
        "|---|" + "---|" * len(CPU_COLUMNS),
    ]
    for label, c in cases.items():
        cpu = c.get("cpu_pct", {})
        lines.append(f"| {label} | " + " | ".join(str(cpu.get(k, "-")) for k in CPU_COLUMNS) + " |")
    return lines


def _where_the_rate_goes(cases: dict[str, dict[str, Any]], goal: float) -> list[str]:
    """What the CPU columns and the paused case say about the missing rate."""
    nft, paused, base = cases["dime nft"], cases.get(PAUSED), cases["no dime"]
    cpu, cpu0 = nft.get("cpu_pct"), base.get("cpu_pct", {})
    if paused is None or not cpu:
        return []
    learned = nft.get("learned_by_kernel") or ["-"]
    return [
        "**Where the rate goes.** One client process opens the connections one after "
        "another, so the rate is the inverse of one connection's cost along the whole "
        "path, and whatever else runs on the two CPUs competes with it. Without dime "
        f"the client used {cpu0.get('client', '-')}% of a core (its system time "
        "includes most of the kernel's work for both ends: a veth delivers in the "
        f"sender's context). In `nft` mode the daemons used {cpu.get('dime mh', '-')}% "
        f"(MH) and {cpu.get('dime ch', '-')}% (CH) of a core, handling a notice and a "
        "socket's end per connection each, and the client got "
        f"{cpu.get('client', '-')}%. With both "
        "daemons paused for the rate phase (the kernel learns and logs as before; "
        f"nobody reads the copies) the rate is {paused['flows_per_s']} flows/s, "
        f"{paused['rate_ratio']} of no dime's: the kernel's part alone leaves the rate "
        f"below the goal ({goal}). It is conntrack, which our rules turn on in both "
        "namespaces (without dime nothing tracks connections there), the learn "
        "chains with their three `add`s, the `in`/`out` chains, and one NFLOG copy per "
        "connection at each end. The daemons' part is the rest: from "
        f"{paused['flows_per_s']} down to {nft['flows_per_s']} flows/s.",
        "",
        "Before this measurement the daemons were the larger part (5,017 flows/s, "
        "each daemon 64% of a core; py-spy on both during the rate phase): 52% of a "
        "daemon's time went to `Dataplane._refresh` walking every flow of the host at "
        "each new flow (quadratic in a host's flows), and most of the rest to adding "
        "the elements the kernel had just learned again through libnftables (about "
        "2 ms per batch of 25 flows, timed alone). Now a new flow on an address pair "
        "already in use leaves the host's translation alone, and a notice of a flow "
        "the kernel holds (log prefix `k`) adds nothing: "
        f"{learned[0]} flows of this run were the kernel's alone "
        "(`flows_learned_by_kernel`). What a notice still costs the daemon is reading "
        "and parsing it, asking IHMP for the host, and a socket-table entry.",
        "",
        "Why the rate did not rise with that: the daemons still used about half a "
        "core each, while the Python work of one notice, timed in one process, is "
        "about 27 µs (some 13% of a core at 4,800 notices/s). Each notice was then its own "
        "NFLOG message (queue threshold 1), waking the daemon for one `recv`; those "
        "wakeups were the suspect, hence the change below.",
        "",
        *_batching_text(nft),
    ]


#: The `dime nft` case alone (``_case``), run in turn with the code before the notices
#: were batched, after, and after with the destroy events read at most every 10 ms
#: (tried, left out), on the same machine within minutes (2026-12-03): new flows/s,
#: and each daemon's CPU per connection in µs (its % of a core over the rate phase
#: divided by the rate).
AB_RUNS = {
    "before": {"rates": (5252, 4937, 5215), "us_ch": (116, 128, 122), "us_mh": (110, 121, 111)},
    "after": {"rates": (6249, 5730, 6271), "us_ch": (96, 106, 94), "us_mh": (93, 95, 89)},
    "paced": {"rates": (5516, 6723, 5568), "us_ch": (106, 93, 105), "us_mh": (104, 76, 103)},
}


def _batching_text(nft: dict[str, Any]) -> list[str]:
    """What batching the notices changed, and what still limits the rate."""
    ch = (nft.get("notices") or [{}])[0]
    batched, batches = ch.get("flow_notices_batched"), ch.get("flow_notice_batches")
    if not batched or not batches:
        return []  # a results file from before the batching
    ab = {k: {m: median(list(v)) for m, v in r.items()} for k, r in AB_RUNS.items()}
    before, after, paced = ab["before"], ab["after"], ab["paced"]
    return [
        "**Notices in batches.** A notice of a flow the kernel holds (prefix `k`) "
        "only feeds the socket table, so it now goes to an NFLOG group of its own "
        "(`held_log_group`), which the daemon binds with a queue threshold of 64 "
        "notices, a 32 KiB buffer and a flush timeout of 10 ms: the kernel sends "
        "them together, and one wakeup and one `recv` read a whole batch. In this run "
        f"{batched} of the CH's {ch.get('flow_notices')} notices came so, "
        f"{batched / batches:.0f} per batch on average (`flow_notice_batches`); the "
        "others (a new host to greet, a flow the kernel does not hold) still come one "
        "by one at once, on `log_group`, and a new host's HELLO waits for nothing. "
        "A cheaper cut came with it: the daemon hands libnftables one command per "
        "set for a batch's elements instead of one per element (timed alone: 57% "
        "less time for the additions of 250 flows, 14% for their removal, nothing "
        "measurable for 25).",
        "",
        "What that changed: the `dime nft` case alone, run in turn with the code "
        "before and after on this machine "
        f"({len(AB_RUNS['before']['rates'])} runs each, within minutes; from one run "
        "of the whole experiment to another the rates here vary by up to 1.8 times, so "
        "one run of the whole experiment, as in the table above, compares nothing "
        "with an earlier one): median "
        f"{before['rates']:.0f} flows/s before, {after['rates']:.0f} after "
        f"({after['rates'] / before['rates'] - 1:+.0%}); each daemon's CPU per "
        f"connection, median {before['us_ch']:.0f} µs (CH) and {before['us_mh']:.0f} µs "
        f"(MH) before, {after['us_ch']:.0f} µs and {after['us_mh']:.0f} µs after. So "
        "a wakeup per notice cost the daemon some 20 µs, a fifth of its work per "
        "connection, not most of it (that saving includes the merged libnftables "
        "commands). Reading the sock_diag destroy events (one per "
        "connection at each end, each its own message, which the kernel cannot "
        "batch) at most every 10 ms, tried the same way, gained nothing measurable "
        f"({paced['rates']:.0f} flows/s, {paced['us_ch']:.0f} and {paced['us_mh']:.0f} "
        "µs) and was left out.",
        "",
        "What still limits the rate (py-spy on both daemons over the rate phase, with "
        "the notices batched): a notice's own work (parsing it, IHMP's `flow_started`, "
        "the socket-table entry) is about a fifth of a daemon's samples. The end of "
        "each connection costs more: its destroy event, the exact sock_diag lookup of "
        "its socket (`check_flows`, in a thread), and at the end whose socket is gone "
        "rather than in TIME_WAIT the removal of the flow's four elements through "
        "libnftables (about 35 µs a flow even in batches of 250), together about half "
        "of the CH daemon's samples. A cheaper read does not remove that; the kernel "
        "removing a flow's elements itself (elements with a timeout, say) would. And "
        "the kernel's own part, the paused case above, stays below the goal whatever "
        "the daemon does.",
        "",
    ]


def _hello_text(c: dict[str, Any]) -> list[str]:
    h, k = c.get("hellos", {}), c.get("ch_counters", {})
    if "cpu_pct" not in h:
        return []  # a results file from before the fix
    dropped = k.get("dropped") or {}
    refused = dropped.get("cookie_rate", 0)
    now = ", ".join(f"`{r}` {n}" for r, n in dropped.items()) or "none"
    cookies = (
        f"with the saves gone, the first HELLOs of all 1,000 hosts at once went over "
        f"it: {refused} cookies were refused, and those hosts said HELLO again after "
        "their retransmission timeout (0.5 s, then longer), which is the tail of the "
        "time above. That limit stays: it bounds what spoofed sources can have the CH "
        "reflect."
        if refused
        else "nor is it now."
    )
    return [
        "The HELLO rate was about 49/s before (898 of 1,000 in 18.2 s), with the CH's "
        "`dropped` counters empty: no limit on unverified sources was the cause (a "
        "source's budget, `unverified_rate` 5/s with a burst of 20, is far from what "
        "one HELLO and its cookie take; `max_half_open` bounds only hosts we greet "
        "first; `cookie_rate`, 500/s for all sources, was not reached). Measured in "
        "one process (1,000 engines saying HELLO to one), the CH's engine takes "
        "0.5 ms per HELLO, but the daemon saved the engine's whole state (a JSON of "
        "every peer) after each datagram that changed the HID table: 13 ms per HELLO "
        "on average over 1,000 peers, 26 ms at the end. It now saves once per burst "
        "of datagrams read together (up to 64), still before any answer leaves: "
        f"{h.get('completed', '-')} of {h.get('hosts', '-')} in "
        f"{round(h['seconds'], 2) if h.get('seconds') else '-'} s "
        f"({h.get('per_s', '-')}/s), the CH's daemon at "
        f"{h.get('cpu_pct', {}).get('dime ch', '-')}% of a core meanwhile. Dropped "
        f"now: {now}. `cookie_rate` was not the limit before; {cookies} No limit's "
        "default changed.",
        "",
    ]


def report(doc: dict[str, Any], out: Path, md_dir: Path) -> str:
    meta, res = doc["meta"], doc["results"]
    lines = [
        f"## {TITLE}",
        "",
        f"Command: `{meta['command']}` ({machine_line(meta)}). "
        f"Link: {meta['link_rate']}; RTT: {meta['rtt']}. "
        f"{doc['config']['connections_for_latency']} sequential connections for the "
        f"latency, {doc['config']['seconds_for_rate']} s of them for the rate.",
        "",
        "| case | median connect (ms) | added (ms) | new flows/s | ratio to no dime |",
        "|---|---|---|---|---|",
    ]
    for label, c in res["cases"].items():
        added = c.get("added_ms_median", "-")
        ratio = c.get("rate_ratio", "-")
        lines.append(
            f"| {label} | {c['connect_ms_median']} | {added} | {c['flows_per_s']} | {ratio} |"
        )
    lines += ["", *_cpu_table(res["cases"]), ""]
    for label in ("dime nft", "dime nfqueue"):
        c = res["cases"][label]
        ok_l = c["added_ms_median"] <= res["goal_latency_ms"]
        ok_r = c["rate_ratio"] >= res["goal_rate_ratio"]
        lines.append(
            f"* {label}: added latency goal (<= {res['goal_latency_ms']} ms) "
            f"{'met' if ok_l else '**missed**'}; new-flow rate goal "
            f"(>= {res['goal_rate_ratio']} of no dime's) {'met' if ok_r else '**missed**'}."
        )
    lines += [
        "",
        "In `nft` mode the kernel learns each new flow to a known host itself, in the "
        "packet path (the `learn` chains: an nft `add @set` of the flow and its inbound "
        "restoration, keyed by the HID the daemon put in the `learn` map for the pair "
        "of addresses), and a copy of the packet's headers goes to the daemon through "
        "NFLOG afterwards, for its socket table (for TCP, the SYN-ACK's, which carries "
        "both sequence numbers). No verdict waits for Python. A first packet to an "
        "unknown host passes at once too (nothing is translated for a host IHMP does "
        "not know) and its copy makes the daemon say HELLO. Only first packets the "
        "kernel cannot decide (to an address a known host left, from an address the "
        "peer does not reach, a host behind a NAT) are queued. In `nfqueue` mode every "
        "packet waits for the daemon, the first included.",
        "",
    ]
    lines += _where_the_rate_goes(res["cases"], res["goal_rate_ratio"])
    server = res.get("server")
    if server:
        n = doc["config"]["server_clients"]
        lines += [
            f"**Server case.** The CH accepts connections from {n} client addresses "
            "(routed to the MH's namespace, which runs no dime), opened as fast as two "
            "client processes can, for the same time as above. With dime, each client "
            "address is first a dime host of its own that says HELLO to the CH "
            "(`testbed/hello_load.py`: an IHMP engine and key per address, all at once), "
            "so the CH holds one peer per client while it accepts.",
            "",
            "| CH | accepted connections/s | failed connects | HELLOs completed | in (s) "
            "| HELLOs/s | CH peers | queued first packets | notices (lost) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, c in server.items():
            h = c.get("hellos", {})
            k = c.get("ch_counters", {})
            notices = (
                f"{k.get('flow_notices', '-')} ({k.get('flow_notices_lost', '-')})" if k else "-"
            )
            lines.append(
                f"| {label} | {c['connections_per_s']} | {c['errors']} | "
                f"{h.get('completed', '-')} of {h.get('hosts', '-')} | "
                f"{round(h['seconds'], 2) if h.get('seconds') else '-'} | "
                f"{h.get('per_s', '-')} | {k.get('peers', '-')} | "
                f"{k.get('packets_queued', '-')} | {notices} |"
            )
        base = server["no dime"]["connections_per_s"]
        ratio = server["dime nft"]["connections_per_s"] / base if base else 0.0
        lines += [
            "",
            f"Accepted connections/s with dime: {ratio:.3f} of without; no first packet "
            "was queued. The HELLO load ran for at most 30 s (the generator's "
            "deadline); 'in' is when the last exchange completed.",
            "",
            *_hello_text(server["dime nft"]),
        ]
    return "\n".join(lines)
