"""Experiment 4: scale-free signaling. IHMP messages per handoff.

Two series, each a fresh testbed with dime on every host:

* one correspondent, 1, 100 and 1,000 concurrent TCP connections from the MH to it;
* 1, 10 and 50 correspondents, each its own namespace with its own dime, each with
  one TCP connection from the MH.

The MH then hands off (hard, its old address gone and the new one up at once), back
and forth between its two links, a fresh address each time. Every IHMP datagram
between the MH and its correspondents crosses the router's correspondent-side
bridge, where tcpdump counts them (and their types) from the handoff to 3 s after;
the daemons' own counters (``messages_sent``, summed over every host) are read
before and after as a second count. Goal: exactly 2 per correspondent (HANDOFF +
ACK), whatever the number of connections. After every handoff each connection
echoes a byte, to show that all of them moved.

Topology: the Fig. 7 MH and router, with the correspondents on a bridge in the
router (192.0.2.0/25, router 192.0.2.126) instead of the single CH link.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any

from testbed.capture import Capture
from testbed.experiments.common import (
    PYTHON,
    UNSHAPED,
    RunContext,
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
from testbed.fig7 import V4, Fig7, Move, Subnet, moves
from testbed.netns import Namespace, Topology, read_reply, topology
from testbed.runner import Dime, running, statuses

NAME = "signaling"
TITLE = "Scale-free signaling: IHMP messages per handoff"

CONNECTIONS = (1, 100, 1000)
PEERS = (1, 10, 50)
# Smoke mode: one configuration of each series (their first rows are the same one).
SMOKE_CONNECTIONS = (2,)
SMOKE_PEERS = (2,)
HANDOFFS = 3  # per configuration (1 in smoke mode)
WINDOW_S = 3.0  # counted from each handoff on
SMOKE_WINDOW_S = 0.5
SETTLE_S = 1.0  # after the HELLOs, before the first handoff
SMOKE_SETTLE_S = 0.2
#: The datagrams one correspondent's handoff takes, by type: the MH's HANDOFF, the
#: CH's challenge to the new address (PATH_PROBE) and the MH's answer (an ACK), and
#: the CH's ACK of the HANDOFF, which waits for that answer. The paper's exchange is
#: HANDOFF + ACK (2); the challenge (issue 10: no redirect without proof of
#: reachability) adds a round trip. Scale-free: the same at any number of connections.
GOAL_TYPES_PER_PEER = {"HANDOFF": 1, "PATH_PROBE": 1, "ACK": 2}
GOAL_PER_PEER = sum(GOAL_TYPES_PER_PEER.values())
ECHO_PORT = 7000
IHMP_PORT = 4731
TYPES = {
    1: "HELLO",
    2: "ACK",
    3: "PATH_PROBE",
    4: "ADDR_UP",
    5: "ADDR_UP_UNREACHABLE",
    6: "ADDR_DOWN",
    7: "ADDR_DOWN_UNREACHABLE",
    8: "HANDOFF",
    9: "HANDOFF_UNREACHABLE",
    10: "NAT_ENTRY",
}
PAPER = (
    "HIDs make one exchange per correspondent move every connection to it (III-A); "
    "the paper's signaling counts are in its reference [54], not in the paper"
)

# The correspondents' side: accept everything, echo every byte.
SERVER = r"""
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("", int(sys.argv[1])))
ls.listen(4096)
ls.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(ls, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            try:
                c, _ = ls.accept()
            except OSError:
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        try:
            data = c.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            sel.unregister(c)
            c.close()
            continue
        try:
            c.send(data)
        except OSError:
            pass
"""

# The MH's side: N idle connections to each address; "check" echoes one byte on each.
CLIENT = r"""
import resource, select, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, per, addrs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
conns = []
for a in addrs:
    for _ in range(per):
        conns.append(socket.create_connection((a, port), timeout=15))
for c in conns:
    c.setblocking(False)
print("ready", len(conns), flush=True)
for line in sys.stdin:
    pending = {}
    for c in conns:
        try:
            c.send(b"x")
            pending[c.fileno()] = c
        except OSError:
            pass
    deadline = time.monotonic() + 15
    alive = 0
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending.values())[:1000], [], [], 0.2)
        for c in ready:
            try:
                if c.recv(16):
                    alive += 1
            except OSError:
                pass
            pending.pop(c.fileno(), None)
    print("alive", alive, flush=True)
"""


# -- topology and many daemons --------------------------------------------------------------


@dataclasses.dataclass
class Star:
    topo: Topology
    fig: Fig7  # fig.mh and fig.r as in Fig. 7; fig.ch is the first correspondent
    peers: list[Namespace]
    addrs: list[str]
    bridge: str = "brc"


def build_star(topo: Topology, k: int) -> Star:
    """The Fig. 7 MH and R, and ``k`` correspondents on a bridge in R."""
    if not 1 <= k <= 120:
        raise ValueError("1..120 correspondents")
    r, mh = topo.add_ns("r"), topo.add_ns("mh")
    peers = [topo.add_ns(f"p{i}") for i in range(k)]
    for name in ("m1", "m2"):
        topo.link(mh, name, r, f"r{name}")
    for i, p in enumerate(peers):
        topo.link(p, "c1", r, f"rp{i}")
    topo.bridge(r, "brc", [f"rp{i}" for i in range(k)])
    r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    plan = V4
    r.addr_add("brc", f"{plan.c1.router}/{plan.c1.plen}")
    for name in ("m1", "m2"):
        sub: Subnet = getattr(plan, name)
        r.addr_add(f"r{name}", f"{sub.router}/{sub.plen}")
    addrs = []
    for i, p in enumerate(peers):
        addr = f"192.0.2.{1 + i}"
        p.addr_add("c1", f"{addr}/{plan.c1.plen}")
        p.ip("route", "replace", "default", "via", plan.c1.router, "dev", "c1")
        addrs.append(addr)
    fig = Fig7(topo, plan, peers[0], r, mh)
    fig.attach(mh, "m1", plan.m1)
    mh.ip("link", "set", "m2", "down")
    return Star(topo, fig, peers, addrs)


def sent(st: dict[str, Any]) -> int:
    return int(st.get("counters", {}).get("messages_sent", 0))


# -- one configuration ---------------------------------------------------------------------


def run_config(ctx: RunContext, k: int, per: int, handoffs: int) -> dict[str, Any]:
    """``k`` correspondents, ``per`` connections to each, ``handoffs`` handoffs."""
    label = f"{k} peer(s) x {per} connection(s)"
    res: dict[str, Any] = {"peers": k, "connections_per_peer": per, "handoffs": []}
    with topology(f"sg{k}x{per}"[:8]) as topo:
        progress(f"{NAME}: {label}: building")
        star = build_star(topo, k)
        fig, mh = star.fig, star.fig.mh
        hosts = [Dime.in_dir(mh, ctx.tmp, f"sg-{k}-{per}-mh")] + [
            Dime.in_dir(p, ctx.tmp, f"sg-{k}-{per}-p{i}") for i, p in enumerate(star.peers)
        ]
        servers: list[subprocess.Popen[str]] = []
        client: subprocess.Popen[str] | None = None
        with running(hosts, "-v") as procs:
            dmh, dpeers = procs[0], procs[1:]
            try:
                for p in star.peers:
                    s = p.popen(
                        PYTHON, "-c", SERVER, str(ECHO_PORT),
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True,
                    )  # fmt: skip
                    servers.append(s)
                for s in servers:
                    read_reply(s, 30, "echo server start")
                progress(f"{NAME}: {label}: opening {k * per} connection(s)")
                t_open = time.monotonic()
                client = mh.popen(
                    PYTHON, "-c", CLIENT, str(ECHO_PORT), str(per), *star.addrs,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                ready = read_reply(client, 120, "connections").split()
                res["connections"] = int(ready[1])
                res["open_s"] = round(time.monotonic() - t_open, 2)
                # Every correspondent known and its HELLO exchange over.
                st = dmh.wait_status(
                    lambda s: sum(h["state"] == "established" for h in s["hids"]) >= k,
                    timeout=60,
                    what=f"{k} peers established",
                )
                res["mh_socket_entries"] = len(st["sockets"])
                # Stray ACK retransmissions of the HELLOs must not fall in a window.
                time.sleep(SMOKE_SETTLE_S if ctx.smoke else SETTLE_S)
                for j, (fdev, fsub, tdev, tsub) in enumerate(moves(fig.plan, handoffs)):
                    progress(f"{NAME}: {label}: handoff {j + 1}/{handoffs}")
                    res["handoffs"].append(
                        one_handoff(ctx, star, dmh, dpeers, client, (fdev, fsub, tdev, tsub))
                    )
            finally:
                if client is not None:
                    client.kill()
                    client.wait()
                for s in servers:
                    s.kill()
                    s.wait()
    per_handoff = [h["wire_total"] for h in res["handoffs"]]
    res["wire_per_handoff_mean"] = round(mean(per_handoff), 2) if per_handoff else None
    res["wire_per_handoff_min"] = min(per_handoff) if per_handoff else None
    res["wire_per_handoff_max"] = max(per_handoff) if per_handoff else None
    res["wire_per_peer_mean"] = round(mean(per_handoff) / k, 3) if per_handoff else None
    ctr = [h["counters_total"] for h in res["handoffs"]]
    res["counters_per_handoff_mean"] = round(mean(ctr), 2) if ctr else None
    res["all_alive"] = all(h["alive"] == res.get("connections") for h in res["handoffs"])
    res["all_moved"] = all(h["peers_moved"] == k for h in res["handoffs"])
    # The goal is judged on the wire. The counters also count sends that failed
    # inside the MH (the new address is up a moment before its route: the engine
    # retries 10 ms later), which never became a datagram.
    res["goal_met"] = bool(per_handoff) and all(
        h["wire_by_type"] == {t: n * k for t, n in GOAL_TYPES_PER_PEER.items()}
        for h in res["handoffs"]
    )
    progress_done(
        f"   {label}: {res['wire_per_handoff_mean']} IHMP datagrams per handoff on the wire "
        f"({res['wire_per_peer_mean']} per peer), counters {res['counters_per_handoff_mean']}"
    )
    return res


def one_handoff(
    ctx: RunContext,
    star: Star,
    dmh: Dime,
    dpeers: list[Dime],
    client: subprocess.Popen[str],
    move: Move,
) -> dict[str, Any]:
    fig = star.fig
    fdev, fsub, tdev, tsub = move
    before = statuses([dmh, *dpeers])
    cap = Capture(fig.r, star.bridge, f"udp port {IHMP_PORT}", ctx.tmp / "sig.pcap")
    cap.start()
    t0 = time.monotonic()
    try:
        fig.detach(fig.mh, fdev, fsub)
        fig.attach(fig.mh, tdev, tsub)
        time.sleep(max(0.0, t0 + window(ctx) - time.monotonic()))
    finally:
        pkts = cap.stop()
    after = statuses([dmh, *dpeers])
    mh_addrs = {fsub.host, tsub.host}
    by_type: dict[str, int] = {}
    from_mh = to_mh = 0
    for p in pkts:
        if len(p.payload) >= 2:
            t = TYPES.get(p.payload[1], str(p.payload[1]))
            by_type[t] = by_type.get(t, 0) + 1
        if p.src in mh_addrs:
            from_mh += 1
        else:
            to_mh += 1
    moved = sum(1 for st in after[1:] if any(tsub.host in h["active"] for h in st.get("hids", [])))
    assert client.stdin is not None
    client.stdin.write("check\n")
    client.stdin.flush()
    alive = int(read_reply(client, 60, "echo check").split()[1])
    counters = [sent(a) - sent(b) for a, b in zip(after, before, strict=True)]
    return {
        "from": fsub.host,
        "to": tsub.host,
        "wire_total": len(pkts),
        "wire_from_mh": from_mh,
        "wire_to_mh": to_mh,
        "wire_by_type": by_type,
        "counters_total": sum(counters),
        "counters_mh": counters[0],
        "counters_peers": sum(counters[1:]),
        "not_sent_mh": counters[0] - from_mh,
        "retransmissions_mh": int(after[0].get("counters", {}).get("retransmissions", 0))
        - int(before[0].get("counters", {}).get("retransmissions", 0)),
        "peers_moved": moved,
        "alive": alive,
    }


def window(ctx: RunContext) -> float:
    return SMOKE_WINDOW_S if ctx.smoke else WINDOW_S


def run(ctx: RunContext) -> Path:
    conns = SMOKE_CONNECTIONS if ctx.smoke else CONNECTIONS
    peers = SMOKE_PEERS if ctx.smoke else PEERS
    handoffs = ctx.n(HANDOFFS)
    results: dict[str, Any] = {"connections": [], "peers": []}
    for n in conns:
        results["connections"].append(run_config(ctx, 1, n, handoffs))
    for k in peers:
        results["peers"].append(run_config(ctx, k, 1, handoffs))
    results["goal_met"] = all(c["goal_met"] for c in results["connections"] + results["peers"])
    config = {
        "connections": list(conns),
        "peers": list(peers),
        "handoffs_per_config": handoffs,
        "window_s": window(ctx),
        "handoff": "hard, gap 0: old address deleted and link down, new link up with a "
        "fresh address at once (dime's handoff window is 1 s)",
        "capture": "tcpdump on the router's correspondent-side bridge, udp port 4731",
        "dataplane": "auto (nft here)",
        "goal_per_peer": GOAL_PER_PEER,
    }
    path = write_result(
        ctx, NAME, config, results,
        **UNSHAPED,
    )  # fmt: skip
    plot(results, ctx.out / f"{NAME}.png", ctx.smoke)
    return path


def plot(results: dict[str, Any], path: Path, smoke: bool) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, xkey, xlabel in (
        (axes[0], "connections", "connections_per_peer", "TCP connections to one correspondent"),
        (axes[1], "peers", "peers", "correspondents (one connection each)"),
    ):
        rows = results[key]
        xs = list(range(len(rows)))
        wire = [r["wire_per_handoff_mean"] or 0 for r in rows]
        ctr = [r["counters_per_handoff_mean"] or 0 for r in rows]
        goal = [GOAL_PER_PEER * r["peers"] for r in rows]
        ax.bar([x - 0.2 for x in xs], wire, 0.4, label="on the wire (tcpdump)")
        ax.bar([x + 0.2 for x in xs], ctr, 0.4, label="daemon counters (incl. local retries)")
        ax.scatter(
            xs,
            goal,
            marker="_",
            s=900,
            color="k",
            zorder=3,
            label=f"goal: {GOAL_PER_PEER} per peer",
        )
        ax.set_xticks(xs, [str(r[xkey]) for r in rows])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("IHMP datagrams per handoff")
        ax.set_ylim(0, max([*wire, *ctr, *goal, 1]) * 1.45)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("IHMP signaling per MH handoff" + (" [smoke]" if smoke else ""), fontsize=10)
    save_figure(fig, path)


def report(doc: dict[str, Any], out: Path, md_dir: Path) -> str:
    meta, cfg, res = doc["meta"], doc["config"], doc["results"]
    lines = [f"## {TITLE}", "", *smoke_note(meta)]
    lines += [
        "IHMP datagrams per handoff of the MH, counted on the wire (tcpdump on the "
        "router's correspondent-side bridge, from the handoff to "
        f"{cfg['window_s']:g} s after) and by the daemons' own counters (messages sent, "
        "summed over the MH and every correspondent). Each correspondent is its own "
        f"namespace running dime. {cfg['handoffs_per_config']} handoff(s) per "
        f"configuration, back and forth between the MH's links; {cfg['handoff']}. After "
        "each handoff every connection echoes one byte.",
        "",
        f"* Command: `{meta['command']}`",
        f"* Machine: {machine_line(meta)}",
        f"* Link: {meta.get('link')}; no delay added; data plane {cfg['dataplane']}",
        "",
        f"![IHMP messages per handoff]({plot_path(out, md_dir, NAME + '.png')})",
        "",
        "| correspondents | connections each | IHMP per handoff (wire, mean) | min-max "
        "| per correspondent | counters | types seen | connections alive after | goal "
        "| paper |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["connections"] + res["peers"]:
        types: dict[str, int] = {}
        for h in row["handoffs"]:
            for t, c in h["wire_by_type"].items():
                types[t] = types.get(t, 0) + c
        nh = max(len(row["handoffs"]), 1)
        tstr = ", ".join(f"{t} {c / nh:g}" for t, c in sorted(types.items()))
        alive = ", ".join(str(h["alive"]) for h in row["handoffs"])
        goal = f"= {GOAL_PER_PEER * row['peers']}"
        met = "" if row["goal_met"] else " **missed**"
        lines.append(
            f"| {row['peers']} | {row['connections_per_peer']} "
            f"| {row['wire_per_handoff_mean']}{met} "
            f"| {row['wire_per_handoff_min']}-{row['wire_per_handoff_max']} "
            f"| {row['wire_per_peer_mean']} | {row['counters_per_handoff_mean']} | {tstr} "
            f"| {alive} of {row.get('connections')} | {goal} | scale-free |"
        )
    lines += [
        "",
        f"Paper: {PAPER}.",
        "",
        '"counters" is the sum of the daemons\' `messages_sent` over the handoff. It can '
        "exceed the wire count: it also counts a send the MH's kernel refused (the new "
        "address appears a moment before its default route, as with DHCP; the engine "
        "retries 10 ms later), which never became a datagram. The goal is judged on the "
        "wire.",
        "",
    ]
    if res["goal_met"]:
        lines.append(
            f"Verdict: met. Exactly {GOAL_PER_PEER} IHMP datagrams per correspondent in "
            "every handoff, independent of the number of connections: the MH's HANDOFF, "
            "the correspondent's challenge to the new address (PATH_PROBE), the MH's "
            "answer (ACK) and the correspondent's ACK of the HANDOFF, sent once the "
            "answer came back. The paper's exchange is HANDOFF + ACK (2, which dime sent "
            "before it proved addresses); the challenge and its answer are the price of "
            "no redirect without proof of reachability (issue 10)."
        )
    else:
        bad = [
            f"{r['peers']} peer(s) x {r['connections_per_peer']}: "
            f"{[h['wire_total'] for h in r['handoffs']]}"
            for r in res["connections"] + res["peers"]
            if not r["goal_met"]
        ]
        lines.append("Verdict: **missed** in " + "; ".join(bad) + ".")
    lines.append("")
    return "\n".join(lines)
