"""The NAT move benchmark: how long the flows take to resume after each move.

Builds the NAT testbed (:mod:`testbed.nat`), starts ``dime up`` in the CH and the MH,
opens a paced TCP transfer each way (testbed.xfer) and a UDP request/response stream
MH -> CH (testbed.natflows), and moves the MH once through the sequence
:data:`testbed.nat.MOVES` (public -> A -> A' -> B -> public), a hard handoff each
(``--gap`` s without an address), ``--dwell`` s apart. For each move it records the
resume time: from the new address up to the first data at the CH (MH -> CH), at the
MH (CH -> MH), and to the first UDP answer. Writes ``nat.json`` and ``nat.md``
(``nat-aware.*`` with ``--aware``) in ``--out`` (default testbed/results) and prints
the table::

    python -m testbed.nat bench [--dwell 4] [--gap 0.2] [--rate 4] [--aware] [--out DIR]

``--aware`` runs ``dime nat`` in the router (the IHMP-aware NAT). Exit status 0 when
every byte arrived intact with no reset and data resumed after every move, else 1
(the daemons' log tails are printed, and the logs stay in a temporary directory).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.experiments.common import finish_bench, write_bench
from testbed.nat import (
    CH_ADDR,
    MOVES,
    NAT_A,
    NAT_B,
    SUBNETS,
    NatDaemon,
    NatLab,
    resumed_tcp,
    resumed_udp,
)
from testbed.netns import Namespace, add_rst_counter, rst_count, topology
from testbed.procs import ROOT, py, result, wait_for
from testbed.runner import Dime, DimeError, down_all, stop_all, up_all

XFER = str(ROOT / "testbed" / "xfer.py")
NATFLOWS = str(ROOT / "testbed" / "natflows.py")
UP_PORT, DOWN_PORT, UDP_PORT = 5001, 5002, 5300


def run(tmp: Path, dwell: float, gap: float, rate: float, aware: bool) -> dict[str, Any]:
    seconds = 1.0 + len(MOVES) * (gap + dwell) + 3
    nbytes = int(rate * 1e6 / 8 * seconds)
    procs: list[subprocess.Popen[bytes]] = []
    with topology("natbench") as topo:
        lab = NatLab.build(topo)
        for ns in (lab.ch, lab.mh):
            add_rst_counter(ns)
        daemons = [Dime.in_dir(lab.ch, tmp, "ch"), Dime.in_dir(lab.mh, tmp, "mh")]
        nat: NatDaemon | None = None
        try:
            if aware:
                lab.open_ihmp()
                nat = NatDaemon.in_dir(lab.r, tmp, "r")
                nat.up()
            up_all(daemons, "-v")

            def start(ns: Namespace, *args: str, word: str) -> subprocess.Popen[bytes]:
                proc = py(ns, *args)
                procs.append(proc)
                wait_for(proc, word, 10)
                return proc

            xfer = ("--bytes", str(nbytes), "--rate", str(rate), "--timeout", "20", "--hold-open")
            up_srv = start(lab.ch, XFER, "tcp-server", "--bind", CH_ADDR, "--port", str(UP_PORT),
                           word="listening")  # fmt: skip
            up_cli = start(lab.mh, XFER, "tcp-client", "--connect", CH_ADDR,
                           "--port", str(UP_PORT), *xfer, word="ready")  # fmt: skip
            dn_srv = start(lab.mh, XFER, "tcp-server", "--bind", lab.addr,
                           "--port", str(DOWN_PORT), word="listening")  # fmt: skip
            dn_cli = start(lab.ch, XFER, "tcp-client", "--connect", lab.addr,
                           "--port", str(DOWN_PORT), *xfer, word="ready")  # fmt: skip
            echo = start(lab.ch, NATFLOWS, "udp-echo", "--bind", CH_ADDR, "--port", str(UDP_PORT),
                         word="listening")  # fmt: skip
            udp_cli = start(lab.mh, NATFLOWS, "udp-client", "--connect", CH_ADDR,
                            "--port", str(UDP_PORT), word="ready")  # fmt: skip
            time.sleep(1.0)
            for subnet, host in MOVES:
                lab.move_to(subnet, host, gap=gap)
                time.sleep(dwell)
            sent_up, sent_dn = result(up_cli, 120), result(dn_cli, 120)
            got_up, got_dn = result(up_srv, 120), result(dn_srv, 120)
            end = time.time()
            udp_cli.terminate()
            udp = result(udp_cli, 30)
            echo.terminate()
            result(echo, 30)
            resets = {"ch": rst_count(lab.ch), "mh": rst_count(lab.mh)}
            stopped = down_all(daemons) + ([nat.terminate()] if nat is not None else [])
        except BaseException as exc:
            if not isinstance(exc, DimeError):  # (a DimeError has the log tail in it)
                for d in [*daemons, *([nat] if nat else [])]:
                    print(d.log_tail(40), file=sys.stderr)
            print(f"logs kept in {tmp}", file=sys.stderr)
            raise
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            stop_all([*daemons, *([nat] if nat else [])])
    moves = []
    for i, m in enumerate(lab.moves):
        by = lab.moves[i + 1].lost if i + 1 < len(lab.moves) else end
        row: dict[str, Any] = {
            "move": m.what,
            "subnet": m.subnet,
            "address": m.new,
            "seen_as": SUBNETS[m.subnet].seen_as(m.new),
            "resume_up": resumed_tcp(got_up, m.up),
            "resume_down": resumed_tcp(got_dn, m.up),
            "resume_udp": resumed_udp(udp["reply_times"], m.up),
        }
        row["resumed_in_time"] = all(
            row[k] is not None and m.up + row[k] < by
            for k in ("resume_up", "resume_down", "resume_udp")
        )
        moves.append(row)
    transfers = {
        name: {
            "bytes_sent": sent["bytes"],
            "bytes_received": got["bytes"],
            "intact": sent["sha256"] == got["sha256"] and sent["bytes"] == got["bytes"] == nbytes,
            "error": sent["error"] or got["error"],
        }
        for name, sent, got in (("up", sent_up, got_up), ("down", sent_dn, got_dn))
    }
    ok = (
        all(t["intact"] and not t["error"] for t in transfers.values())
        and not any(resets.values())
        and all(m["resumed_in_time"] for m in moves)
        and all(s.ok for s in stopped)
    )
    if not ok:
        for d in [*daemons, *([nat] if nat else [])]:
            print(d.log_tail(40), file=sys.stderr)
    return {
        "config": {"rate_mbit": rate, "dwell": dwell, "gap": gap, "bytes": nbytes, "aware": aware},
        "moves": moves,
        "transfers": transfers,
        "udp": {k: udp[k] for k in ("sent", "received", "send_errors")},
        "resets": resets,
        "daemons_stopped": {s.name: s.describe() for s in stopped},
        "ok": ok,
    }


def _fmt(v: float | None) -> str:
    return "no data" if v is None else f"{v:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    meta, cfg = doc["meta"], doc["config"]
    m = meta["machine"]
    lines = [
        "# Flows across NATs: resume time after each move",
        "",
        f"`{meta['command']}`",
        "",
        f"{m['cpu'] or m['arch']} ({m['cpus']} CPUs), Linux {m['kernel']}, Python "
        f"{m['python']}; {meta['date']}; dime at {meta.get('commit') or '?'}. "
        f"NAT testbed (testbed/nat.py): CH {CH_ADDR}; NAT A masquerade (port-preserving) "
        f"as {NAT_A.public}, NAT B masquerade fully-random as {NAT_B.public}"
        f"{', the router running `dime nat`' if cfg['aware'] else ''}. "
        f"TCP each way at {cfg['rate_mbit']:g} Mbit/s ({cfg['bytes']} bytes), UDP "
        f"request/response MH -> CH every 50 ms; hard handoffs ({cfg['gap']:g} s without an "
        f"address), {cfg['dwell']:g} s apart.",
        "",
        "Resume time: seconds from the MH's new address up to the middle of the first 100 ms "
        "with data at the receiver (TCP; 0.00: data in the same 100 ms as the new address), "
        "or to the first UDP answer.",
        "",
        "| move | CH sees the MH as | MH -> CH TCP (s) | CH -> MH TCP (s) | UDP (s) |",
        "|---|---|---|---|---|",
    ]
    for row in doc["moves"]:
        lines.append(
            f"| {row['move']} | {row['seen_as']} | {_fmt(row['resume_up'])} | "
            f"{_fmt(row['resume_down'])} | {_fmt(row['resume_udp'])} |"
        )
    t = doc["transfers"]
    intact = ", ".join(
        f"{name} {'intact' if v['intact'] else 'NOT intact'}"
        f"{' (' + v['error'] + ')' if v['error'] else ''}"
        for name, v in t.items()
    )
    lines += [
        "",
        f"Transfers: {intact}; TCP resets: CH {doc['resets']['ch']}, MH {doc['resets']['mh']}; "
        f"UDP: {doc['udp']['received']} answers to {doc['udp']['sent']} requests.",
        f"Result: {'PASS' if doc['ok'] else 'FAIL'}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m testbed.nat bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dwell", type=float, default=4.0, help="seconds between two moves")
    p.add_argument("--gap", type=float, default=0.2, help="seconds without an address")
    p.add_argument("--rate", type=float, default=4.0, help="Mbit/s of each TCP transfer")
    p.add_argument("--aware", action="store_true", help="run `dime nat` in the router")
    p.add_argument("--out", type=Path, default=ROOT / "testbed" / "results")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("must run as root (it creates network namespaces)")
    command = shlex.join(["python", "-m", "testbed.nat", "bench", *argv])
    tmp = Path(tempfile.mkdtemp(prefix="dime-nat-bench-"))
    try:
        out = run(tmp, a.dwell, a.gap, a.rate, a.aware)
    except DimeError as exc:  # a daemon did not start or answer: its log tail says why
        print(f"nat bench: {exc}", file=sys.stderr)
        return 1
    name = "nat-aware" if a.aware else "nat"
    js, md = write_bench(a.out, name, "nat", command, out, markdown)
    return finish_bench(js, md, out["ok"], tmp)


if __name__ == "__main__":
    raise SystemExit(main())
