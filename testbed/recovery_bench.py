"""How the sender's TCP refills the path after a hard handoff, by direction of the data.

One dime hard handoff of the goodput experiment (:mod:`testbed.experiments.goodput`:
the Fig. 7 testbed, 20 Mbit/s, 30 ms each way, 5 s without an address) per run, with
the router's CH-side device captured. From the capture, counted from the MH's HANDOFF:

* how much of what the sender had sent before the handoff it sends again (lost in the
  outage: with data MH -> CH mostly ACKs are lost, with data CH -> MH the whole window
  in flight to the old address);
* the sender's data segments in each round trip after the HANDOFF (its window
  refilling after its retransmission timeout);
* the handoff gap of the run (:func:`testbed.handoff_gap.handoff_gap`).

Cases: IPv4 MH -> CH and CH -> MH with the kernel's default congestion control, and
CH -> MH with CUBIC (``iperf3 -C cubic``): whether the congestion control makes the
difference. Writes ``recovery.json`` and ``recovery.md`` in ``--out`` (default
testbed/results); the goodput report quotes them::

    python -m testbed.recovery_bench [--runs 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from statistics import median
from typing import Any

from ihmp.wire import MessageType
from testbed.capture import Packet, read_pcap
from testbed.experiments import goodput
from testbed.experiments.common import RunContext, finish_bench, write_bench
from testbed.iperf3 import PORT
from testbed.procs import ROOT

IHMP_PORT = 4731
SEGMENT = 1448  # the Fig. 7 links' MSS (MTU 1500, TCP timestamps)
ROUNDS = 10  # round trips counted after the HANDOFF
#: (path, congestion control: None for the kernel's default).
CASES: tuple[tuple[str, str | None], ...] = (
    ("v4 MH->CH", None),
    ("v4 CH->MH", None),
    ("v4 CH->MH", "cubic"),
)


def recovery(
    packets: Iterable[Packet], sender: set[str], rtt_s: float, rounds: int = ROUNDS
) -> dict[str, Any]:
    """What ``sender`` (its addresses) sent on its bulk connection (the one on the
    iperf3 port with the most data) after the first HANDOFF of the capture: segments
    again (below the highest sequence number sent before it), and per round trip."""
    packets = list(packets)
    ref = next(
        (
            p.t
            for p in packets
            if p.proto == 17
            and IHMP_PORT in (p.sport, p.dport)
            and len(p.payload) >= 2
            and p.payload[1] == MessageType.HANDOFF
        ),
        None,
    )
    if ref is None:
        raise ValueError("no HANDOFF in the capture")
    data = [
        p
        for p in packets
        if p.proto == 6 and p.src in sender and PORT in (p.sport, p.dport) and p.size > 0
    ]
    volume: dict[tuple[int, int], int] = {}
    for p in data:
        volume[(p.sport, p.dport)] = volume.get((p.sport, p.dport), 0) + p.size
    if not volume:
        raise ValueError("no data from the sender in the capture")
    bulk = max(volume, key=lambda k: volume[k])
    data = [p for p in data if (p.sport, p.dport) == bulk and p.seq is not None]
    isn = data[0].seq
    assert isn is not None

    def rel(p: Packet) -> int:
        assert p.seq is not None
        return (p.seq - isn) % 2**32  # a 15 s transfer stays far below a wrap

    before = [rel(p) + p.size for p in data if p.t < ref]
    sent_before = max(before, default=0)
    after = [p for p in data if p.t >= ref]
    resent = sum(min(rel(p) + p.size, sent_before) - rel(p) for p in after if rel(p) < sent_before)
    per_round = [0] * rounds
    for p in after:
        k = int((p.t - ref) / rtt_s)
        if k < rounds:
            per_round[k] += p.size
    return {
        "first_data_ms": round((after[0].t - ref) * 1000, 1) if after else None,
        "resent_segments": round(resent / SEGMENT),
        "segments_per_round": [round(b / SEGMENT) for b in per_round],
    }


def one(ctx: RunContext, path_key: str, cc: str | None, index: int) -> dict[str, Any]:
    path = next(p for p in goodput.PATHS if p.key == path_key)
    pcap = ctx.tmp / f"recovery-{path_key.replace(' ', '-').replace('>', '')}-{cc}-{index}.pcap"
    run = goodput.Run("dime", "hard", index, goodput.FULL, path, cc=cc, capture=pcap)
    label = f"{path_key} {cc or 'default'} run {index + 1}"
    res = goodput.one_run(ctx, run, label)
    plan = path.plan
    sender = {plan.c1.host} if path.reverse else {plan.m1.host, plan.m2.host}
    out: dict[str, Any] = {
        "path": path_key,
        "cc": cc or res.get("tcp_cc"),
        "run": index,
        "gap_s": res.get("gap_s"),
        "rtt_ms": res.get("rtt_ms"),
        "goodput_mbps": res.get("goodput_mbps"),
    }
    try:
        out.update(recovery(read_pcap(pcap), sender, (res.get("rtt_ms") or 61.0) / 1000))
    except (OSError, ValueError) as exc:
        out["error"] = str(exc)
    print(
        f"   {label}: gap {out['gap_s']}, resent {out.get('resent_segments')} segments, "
        f"per round {out.get('segments_per_round')}",
        flush=True,
    )
    return out


def run(ctx: RunContext, runs: int) -> dict[str, Any]:
    rows = [one(ctx, key, cc, i) for key, cc in CASES for i in range(runs)]
    ok = all("error" not in r and r["gap_s"] is not None for r in rows)
    return {"rounds": ROUNDS, "segment": SEGMENT, "runs": rows, "ok": ok}


def summary(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per case: the median gap, median segments sent again, and the per-round counts
    of every run."""
    cases: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in doc["runs"]:
        cases.setdefault((r["path"], r["cc"]), []).append(r)
    out = []
    for (path, cc), rows in cases.items():
        ok = [r for r in rows if "error" not in r]
        gaps = [r["gap_s"] for r in ok if r["gap_s"] is not None]
        out.append(
            {
                "path": path,
                "cc": cc,
                "runs": len(rows),
                "gap_ms": round(median(gaps) * 1000) if gaps else None,
                "resent": median([r["resent_segments"] for r in ok]) if ok else None,
                "rounds": [r["segments_per_round"] for r in ok],
            }
        )
    return out


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        "# After a hard handoff: how the sender refills the path",
        "",
        f"`{meta['command']}` ({meta['date']}, commit {meta.get('commit') or '?'}). "
        "One dime hard handoff of the goodput experiment per run (IPv4, 20 Mbit/s, "
        "30 ms each way), the router's CH-side device captured. Counted from the MH's "
        "HANDOFF: the segments the sender sent again (below the highest it had sent "
        f"before), and its data segments in each of the {doc['rounds']} round trips after "
        "the HANDOFF (each run's RTT; one list per run).",
        "",
        "| path | congestion control | runs | gap (median) | segments sent again "
        "| segments per round trip after the HANDOFF |",
        "|---|---|---|---|---|---|",
    ]
    for c in summary(doc):
        rounds = "; ".join(", ".join(str(n) for n in r) for r in c["rounds"])
        gap = "-" if c["gap_ms"] is None else f"{c['gap_ms']} ms"
        resent = "-" if c["resent"] is None else f"{c['resent']:g}"
        lines.append(f"| {c['path']} | {c['cc']} | {c['runs']} | {gap} | {resent} | {rounds} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m testbed.recovery_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=2, help="runs of each case")
    p.add_argument("--out", type=Path, default=ROOT / "testbed" / "results")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("must run as root (it creates network namespaces)")
    command = shlex.join(["python", "-m", "testbed.recovery_bench", *argv])
    tmp = Path(tempfile.mkdtemp(prefix="dime-recovery-"))
    ctx = RunContext(out=a.out, runs=a.runs, smoke=False, tmp=tmp, command=command)
    out = run(ctx, a.runs)
    js, md = write_bench(a.out, "recovery", "recovery", command, out, markdown)
    return finish_bench(js, md, out["ok"], tmp)


if __name__ == "__main__":
    raise SystemExit(main())
