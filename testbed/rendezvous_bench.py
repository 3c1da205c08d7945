"""The rendezvous benchmark: how long the flows take to resume when the peer cannot
tell the mover where it went, and a rendezvous point forwards the news.

Four scenarios, each run on a testbed of its own (built, used, removed), with
``dime up`` in the CH and the MH and a paced TCP transfer each way (testbed.xfer,
testbed.natflows), every byte checked (SHA-256) and TCP resets counted:

1. *both move at once, rendezvous point*: the Fig. 7 testbed (:mod:`testbed.fig7`)
   with ``dime rendezvous`` in a namespace on its router (10.53.0.1, both daemons
   configured with it); 2 s into the transfers both hosts lose their address and get
   the new one within 100 ms (:func:`testbed.rendezvous.both_move`);
2. and 3. *the CH moves, the MH behind NAT A / NAT B*: the NAT testbed
   (:mod:`testbed.nat`), the MH behind the port-preserving NAT A or the
   port-randomizing NAT B, ``dime rendezvous`` on eve (198.51.100.66); both
   transfers opened by the MH; 2 s in, the CH moves to a network one router away
   (:func:`testbed.rendezvous.move_ch`);
4. *both move at once, no rendezvous point*: as 1. without one (IHMP's
   ``exchange_deadline`` 2 s, ``path_loss_grace`` 1.5 s): the connections cannot
   survive, and what is measured is how soon the senders' sockets fail (an error,
   not a hang).

Resume time (1. to 3.): seconds from the move to the middle of the first 100 ms
with data at the receiver after the outage (:func:`testbed.nat.resumed_tcp`).
Writes ``rendezvous.json`` and ``rendezvous.md`` in ``--out`` (default
testbed/results) and prints the table::

    python -m testbed.rendezvous_bench [--runs 5] [--out DIR]

``--runs`` runs of scenarios 1. to 3. each, at most two of 4. Exit status 0 when
every transfer of 1. to 3. arrived intact with no reset and resumed, and the
senders of 4. failed, else 1 (the daemons' log tails are printed, and the logs stay
in a temporary directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

from testbed import rendezvous
from testbed.experiments.common import finish_bench, write_bench
from testbed.fig7 import V4, Fig7
from testbed.nat import EVE_ADDR, SLOT, SUBNETS, NatLab, resumed_tcp
from testbed.netns import Namespace, add_rst_counter, rst_count, topology
from testbed.procs import ROOT, result
from testbed.rendezvous import (
    CH_NEW,
    RATE,
    SECONDS,
    Pair,
    RendezvousDaemon,
    SlowMove,
    both_move,
    config,
    fig7_transfers,
    move_ch,
    nat_transfers,
    second_network_for_the_ch,
)
from testbed.runner import Dime, Stopped, any_established, down_all, stop_all

NBYTES = int(RATE * 1e6 / 8 * SECONDS)
TIMEOUT = 20.0  # s: each transfer's own deadline (testbed.xfer --timeout)
BEFORE_MOVE = 2.0  # s of traffic before the move
FAIL_DEADLINE, FAIL_GRACE = 2.0, 1.5  # scenario 4's exchange_deadline, path_loss_grace
FAIL_RUNS = 2  # at most
MOVE_TRIES = 3  # both_move took 100 ms or more (a loaded machine): the run again
DIRECTIONS = ("MH->CH", "CH->MH")

SCENARIOS = {
    "rv-both": "both move at once, rendezvous point",
    "rv-nat-A": "the CH moves, MH behind NAT A",
    "rv-nat-B": "the CH moves, MH behind NAT B",
}
NO_RV = ("no-rv-both", "both move at once, no rendezvous point")


@dataclass
class Bed:
    """One run's daemons and traffic processes, in ``tmp``."""

    tmp: Path
    daemons: list[Dime] = field(default_factory=list)
    rv: RendezvousDaemon | None = None
    procs: list[Popen[bytes]] = field(default_factory=list)

    def up(self, ns: Namespace, name: str, text: str) -> Dime:
        cfg = self.tmp / f"{name}.toml"
        cfg.write_text(text)
        d = Dime.in_dir(ns, self.tmp, name)
        self.daemons.append(d)
        d.up("-v", "--config", str(cfg))
        return d

    def serve_rendezvous(self, ns: Namespace) -> RendezvousDaemon:
        rv = RendezvousDaemon(ns, self.tmp / "state-rv", self.tmp / "dime-rv.log", "rv")
        self.rv = rv
        rv.start("-v")
        rv.wait_ready()
        return rv

    def track(self, pairs: dict[str, Pair]) -> dict[str, Pair]:
        for pair in pairs.values():
            self.procs += pair
        return pairs

    def logs(self) -> str:
        parts = [d.log_tail(40) for d in self.daemons]
        if self.rv is not None:
            parts.append(self.rv.log_tail(20))
        return "\n".join(parts)

    def down(self) -> list[Stopped]:
        """``dime down`` in the hosts, SIGTERM to the rendezvous point: how each went."""
        stopped = down_all(self.daemons)
        if self.rv is not None:
            stopped.append(self.rv.terminate())
        return stopped

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        stop_all(self.daemons)
        if self.rv is not None:
            self.rv.terminate()


def registered(st: dict[str, Any]) -> bool:
    return any_established(st) and bool(st["rendezvous"]) and st["rendezvous"][0]["registered"]


def collect(pairs: dict[str, Pair]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each transfer as its sender and its receiver saw it (their results), and the
    receivers' results."""
    transfers, received = {}, {}
    for name, (receiver, sender) in pairs.items():
        sent, got = result(sender, 120), result(receiver, 120)
        received[name] = got
        transfers[name] = {
            "bytes_sent": sent["bytes"],
            "bytes_received": got["bytes"],
            "intact": sent["sha256"] == got["sha256"] and sent["bytes"] == got["bytes"] == NBYTES,
            "error": sent["error"] or got["error"],
        }
    return transfers, received


def resumed(
    tmp: Path,
    hosts: Callable[[Bed], tuple[Namespace, Namespace, Dime, Dime]],
    start: Callable[[], dict[str, Pair]],
    move: Callable[[], tuple[float, float]],
    after: Callable[[Dime, Dime, RendezvousDaemon | None], dict[str, Any]],
) -> dict[str, Any]:
    """One run of a scenario where the flows survive: ``hosts`` starts the daemons
    (the CH's and the MH's namespaces and daemons), ``start`` the transfers, ``move``
    moves (lost, up), ``after`` says what else the daemons saw. Its record."""
    b = Bed(tmp)
    with _logs_on_failure(b):
        ch_ns, mh_ns, ch, mh = hosts(b)
        pairs = b.track(start())
        for d in (ch, mh):
            d.wait_status(registered, what="established and registered")
        time.sleep(BEFORE_MOVE)
        lost, up = move()
        transfers, received = collect(pairs)
        resets = {"ch": rst_count(ch_ns), "mh": rst_count(mh_ns)}
        extra = after(ch, mh, b.rv)
        for ns in (ch_ns, mh_ns):
            # Counted: back to 0, as when dime up took the state it must leave as it found.
            ns.run("nft", "reset", "counters", "table", "inet", "dmrst")
        stopped = b.down()
    resume = {name: resumed_tcp(received[name], up, lost) for name in DIRECTIONS}
    around = {name: around_move(received[name], lost) for name in DIRECTIONS}
    ok = (
        all(t["intact"] and not t["error"] for t in transfers.values())
        and not any(resets.values())
        and all(r is not None for r in resume.values())
        and all(s.ok for s in stopped)
    )
    if not ok:
        print(b.logs(), file=sys.stderr)
    return {
        "resume": resume,
        "move_took": round(up - lost, 3),
        "transfers": transfers,
        "resets": resets,
        "received_around_move": around,
        **extra,
        "daemons_stopped": {s.name: s.describe() for s in stopped},
        "ok": ok,
    }


def around_move(received: dict[str, Any], lost: float) -> dict[str, Any]:
    """The bytes a receiver got in each 100 ms from 0.5 s before the move to 2 s
    after (``from``: the first slot's start, seconds from the move)."""
    timeline: list[int] = received["timeline"]
    first = max(int((lost - received["start"]) / SLOT) - 5, 0)
    return {
        "from": round(received["start"] + first * SLOT - lost, 3),
        "bytes_per_100ms": timeline[first : first + 25],
    }


def relays(ch: Dime, mh: Dime) -> dict[str, int]:
    counters = [d.status()["counters"] for d in (ch, mh)]
    return {k: sum(c[k] for c in counters) for k in ("relays_sent", "relayed_received")}


def run_both(tmp: Path, tag: str) -> dict[str, Any]:
    """Scenario 1: Fig. 7, both hosts move at once, a rendezvous point."""
    with topology(tag) as topo:
        fig = Fig7.build(topo, V4)
        rv_ns = rendezvous.attach(topo, fig.r)
        for ns in (fig.ch, fig.mh):
            add_rst_counter(ns)

        def hosts(b: Bed) -> tuple[Namespace, Namespace, Dime, Dime]:
            b.serve_rendezvous(rv_ns)
            text = config(rendezvous.address())
            return fig.ch, fig.mh, b.up(fig.ch, "ch", text), b.up(fig.mh, "mh", text)

        def after(ch: Dime, mh: Dime, rv: RendezvousDaemon | None) -> dict[str, Any]:
            assert rv is not None
            rv_counters = json.loads(rv.cli("status", "--json").stdout)["counters"]
            return {"relays": {**relays(ch, mh), "rendezvous_relayed": rv_counters["relayed"]}}

        def start() -> dict[str, Pair]:
            return fig7_transfers(fig, NBYTES, RATE, TIMEOUT)

        return resumed(tmp, hosts, start, lambda: both_move(fig), after)


def run_nat(tmp: Path, tag: str, nat: str) -> dict[str, Any]:
    """Scenarios 2 and 3: the NAT testbed, the MH behind NAT ``nat``, the CH moves;
    the rendezvous point on eve."""
    with topology(tag) as topo:
        lab = NatLab.build(topo, start=nat)
        second_network_for_the_ch(lab)
        for ns in (lab.ch, lab.mh):
            add_rst_counter(ns)

        def hosts(b: Bed) -> tuple[Namespace, Namespace, Dime, Dime]:
            b.serve_rendezvous(lab.eve)
            text = config(EVE_ADDR)
            return lab.ch, lab.mh, b.up(lab.ch, "ch", text), b.up(lab.mh, "mh", text)

        def after(ch: Dime, mh: Dime, rv: RendezvousDaemon | None) -> dict[str, Any]:
            st = mh.status()
            return {
                "mh_observed_as": st["rendezvous"][0]["observed_as"],
                "nat_public": SUBNETS[nat].seen_as(lab.addr),
                "mh_learned_ch_new": [h["active"][:1] for h in st["hids"]] == [[CH_NEW]],
                "relays": relays(ch, mh),
            }

        def start() -> dict[str, Pair]:
            return nat_transfers(lab, NBYTES, RATE, TIMEOUT)

        return resumed(tmp, hosts, start, lambda: move_ch(lab), after)


@contextlib.contextmanager
def _logs_on_failure(b: Bed) -> Iterator[None]:
    """Around one run: the daemons' logs printed if it fails (not for a move that was
    too slow: it is run again); the testbed's processes stopped in any case."""
    try:
        yield
    except SlowMove:
        raise
    except BaseException:
        print(b.logs(), file=sys.stderr)
        raise
    finally:
        b.cleanup()


def run_no_rv(tmp: Path, tag: str) -> dict[str, Any]:
    """Scenario 4: Fig. 7, both hosts move at once, no rendezvous point: when each
    end of the transfers ended after the move, and how."""
    with topology(tag) as topo:
        fig = Fig7.build(topo, V4)
        b = Bed(tmp)
        with _logs_on_failure(b):
            text = config(None, FAIL_DEADLINE, FAIL_GRACE)
            ch, mh = b.up(fig.ch, "ch", text), b.up(fig.mh, "mh", text)
            pairs = b.track(fig7_transfers(fig, NBYTES, RATE, TIMEOUT))
            for d in (ch, mh):
                d.wait_status(any_established)
            time.sleep(1.0)
            lost, up = both_move(fig)
            ends = {
                (name, role): p
                for name, pair in pairs.items()
                for role, p in zip(("receiver", "sender"), pair, strict=True)
            }
            ended: dict[tuple[str, str], float] = {}
            while len(ended) < len(ends) and time.time() - lost < 60:
                for key, p in ends.items():
                    if key not in ended and p.poll() is not None:
                        ended[key] = round(time.time() - lost, 2)
                time.sleep(0.01)
            got = {key: result(p, 10) for key, p in ends.items()}
            dropped = {
                d.name: d.status()["hids"] == [] and "lost its last path" in d.log_text()
                for d in (ch, mh)
            }
            stopped = b.down()
    failed = {name: ended.get((name, "sender")) for name in DIRECTIONS}
    ok = all(failed.values()) and all(got[(n, "sender")]["error"] for n in DIRECTIONS)
    if not ok:
        print(b.logs(), file=sys.stderr)
    return {
        "sender_failed_after": failed,
        "receiver_ended_after": {name: ended.get((name, "receiver")) for name in DIRECTIONS},
        "errors": {f"{name} {role}": got[(name, role)]["error"] for name, role in ends},
        "move_took": round(up - lost, 3),
        "peer_dropped": dropped,
        "daemons_stopped": {s.name: s.describe() for s in stopped},
        "ok": ok,
    }


def attempt(
    what: str, run: Callable[[Path, str], dict[str, Any]], tag: str, tmp: Path
) -> dict[str, Any]:
    """One run, ``run(its temporary directory, its topology's tag)`` (again when the
    moves were too slow); its record, or the error."""
    last = ""
    for i in range(MOVE_TRIES):
        run_tmp = tmp / f"{tag}-{i}"
        run_tmp.mkdir(parents=True)
        try:
            return {**run(run_tmp, tag), "tries": i + 1}
        except SlowMove as exc:
            print(f"{what}: {exc}, again", file=sys.stderr)
            last = str(exc)
        except Exception as exc:  # recorded: the run failed
            traceback.print_exc()
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "tries": i + 1}
    return {"ok": False, "error": f"SlowMove: {last}", "tries": MOVE_TRIES}


def run(tmp: Path, runs: int) -> dict[str, Any]:
    plans: dict[str, Callable[[Path, str], dict[str, Any]]] = {
        "rv-both": run_both,
        "rv-nat-A": lambda t, tag: run_nat(t, tag, "A"),
        "rv-nat-B": lambda t, tag: run_nat(t, tag, "B"),
        NO_RV[0]: run_no_rv,
    }
    names = {**SCENARIOS, NO_RV[0]: NO_RV[1]}
    scenarios: dict[str, Any] = {key: {"what": names[key], "runs": []} for key in plans}
    # Interleaved, a run of each in turn: a slow spell of the machine spreads over all.
    for i in range(runs):
        for key, fn in plans.items():
            if key == NO_RV[0] and i >= FAIL_RUNS:
                continue
            print(f"{names[key]}: run {i + 1}/{runs}", file=sys.stderr, flush=True)
            rec = attempt(key, fn, f"{key.replace('-', '')}{i}", tmp)
            scenarios[key]["runs"].append(rec)
            print(f"  {_brief(rec)}", file=sys.stderr, flush=True)
    for key, s in scenarios.items():
        field_ = "sender_failed_after" if key == NO_RV[0] else "resume"
        s["summary"] = summary([r.get(field_, {}) for r in s["runs"]], len(s["runs"]))
    return {
        "config": {
            "runs": runs,
            "rate_mbit": RATE,
            "bytes": NBYTES,
            "seconds_before_move": BEFORE_MOVE,
            "transfer_timeout": TIMEOUT,
            "no_rv": {"exchange_deadline": FAIL_DEADLINE, "path_loss_grace": FAIL_GRACE},
        },
        "scenarios": scenarios,
        "ok": all(r["ok"] for s in scenarios.values() for r in s["runs"]),
    }


def _brief(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"FAILED: {rec['error'].splitlines()[0]}"
    values = rec.get("resume") or rec.get("sender_failed_after") or {}
    cells = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
    return f"{cells}  ({'ok' if rec['ok'] else 'NOT ok'})"


def summary(values: list[dict[str, float | None]], n: int) -> dict[str, dict[str, Any]]:
    """Per direction: median, min, max of the runs that measured it, and how many did."""
    out = {}
    for name in DIRECTIONS:
        got = [x for v in values if (x := v.get(name)) is not None]
        out[name] = {
            "n": len(got),
            "of": n,
            "median": round(statistics.median(got), 2) if got else None,
            "min": min(got) if got else None,
            "max": max(got) if got else None,
            "all": [v.get(name) for v in values],
        }
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    meta, cfg = doc["meta"], doc["config"]
    m = meta["machine"]
    sc = doc["scenarios"]
    lines = [
        "# Rendezvous points: resume time after a move the peer could not be told of",
        "",
        f"`{meta['command']}`",
        "",
        f"{m['cpu'] or m['arch']} ({m['cpus']} CPUs), Linux {m['kernel']}, Python "
        f"{m['python']}; {meta['date']}; dime at {meta.get('commit') or '?'}. "
        f"Each run on a fresh testbed, `dime up` in the CH and the MH, a paced TCP transfer "
        f"each way at {cfg['rate_mbit']:g} Mbit/s ({cfg['bytes']} bytes, SHA-256 checked, "
        f"TCP resets counted), the move {cfg['seconds_before_move']:g} s in. "
        f"Both move at once: the Fig. 7 testbed (testbed/fig7.py), `dime rendezvous` on a third "
        f"link of its router ({rendezvous.address()}), both hosts' old addresses gone and new "
        f"ones up within 100 ms. The CH moves: the NAT testbed (testbed/nat.py), the MH behind "
        f"NAT A (masquerade, port-preserving) or NAT B (fully random), `dime rendezvous` on eve "
        f"({EVE_ADDR}), both transfers opened by the MH, the CH to a network one router away "
        f"({CH_NEW}).",
        "",
        "Resume time: seconds from the move to the middle of the first 100 ms with data at the "
        "receiver after the outage (0.00: no 100 ms without data, the outage was shorter than "
        "testbed.xfer's resolution). Runs resumed: runs where data came after the move; a run "
        "is ok when besides every byte arrived intact, with no TCP reset.",
        "",
        "| scenario | direction | runs resumed | median (s) | min (s) | max (s) | every run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in SCENARIOS:
        s = sc[key]
        ok = sum(1 for r in s["runs"] if r["ok"])
        for name in DIRECTIONS:
            v = s["summary"][name]
            every = ", ".join(_fmt(x) for x in v["all"])
            lines.append(
                f"| {s['what']} | {name.replace('->', ' -> ')} | {v['n']}/{v['of']} | "
                f"{_fmt(v['median'])} | {_fmt(v['min'])} | {_fmt(v['max'])} | {every} |"
            )
        if ok < len(s["runs"]):
            lines.append(f"| ({s['what']}: {len(s['runs']) - ok} run(s) NOT ok) | | | | | | |")
    s = sc[NO_RV[0]]
    nc = cfg["no_rv"]
    lines += [
        "",
        f"{s['what'].capitalize()} (`exchange_deadline` {nc['exchange_deadline']:g} s, "
        f"`path_loss_grace` {nc['path_loss_grace']:g} s): the connections cannot survive; seconds "
        "from the move until each sender's socket failed.",
        "",
        "| run | MH -> CH sender | CH -> MH sender | errors |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(s["runs"], 1):
        if "error" in r:
            lines.append(f"| {i} | - | - | run failed: {r['error'].splitlines()[0]} |")
            continue
        f = r["sender_failed_after"]
        by_error: dict[str, list[str]] = {}
        for end, error in r["errors"].items():
            by_error.setdefault(error or "no error", []).append(end)
        errors = "; ".join(f"{', '.join(ends)}: {e}" for e, ends in by_error.items())
        lines.append(
            f"| {i} | failed after {_fmt(f['MH->CH'])} s | failed after {_fmt(f['CH->MH'])} s "
            f"| {errors} |"
        )
    bad = [
        f"{sc[k]['what']} run {i}: {r.get('error') or _what_broke(r)}"
        for k in sc
        for i, r in enumerate(sc[k]["runs"], 1)
        if not r["ok"]
    ]
    lines += ["", f"Result: {'PASS' if doc['ok'] else 'FAIL'}.", *(f"- {b}" for b in bad), ""]
    return "\n".join(lines)


def _what_broke(r: dict[str, Any]) -> str:
    """What made a run that ran to its end not ok."""
    what = [
        f"{name} {'broken' if not t['intact'] else 'failed'} at {t['bytes_received']} of "
        f"{t['bytes_sent']} bytes sent ({t['error']})"
        for name, t in r.get("transfers", {}).items()
        if t["error"] or not t["intact"]
    ]
    what += [f"{n} TCP resets in the {h.upper()}" for h, n in (r.get("resets") or {}).items() if n]
    what += [f"{n} did not resume" for n, v in r.get("resume", {}).items() if v is None]
    failed = r.get("sender_failed_after", {})
    what += [f"{n} sender did not fail" for n, v in failed.items() if not v]
    what += [f"{n}: {v}" for n, v in r.get("daemons_stopped", {}).items() if "left behind" in v]
    return "; ".join(what) or "?"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m testbed.rendezvous_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=5, help="runs of each scenario")
    p.add_argument("--out", type=Path, default=ROOT / "testbed" / "results")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error("--runs must be at least 1")
    if os.geteuid() != 0:
        p.error("must run as root (it creates network namespaces)")
    command = shlex.join(["python", "-m", "testbed.rendezvous_bench", *argv])
    tmp = Path(tempfile.mkdtemp(prefix="dime-rv-bench-"))
    try:
        out = run(tmp, a.runs)
    except KeyboardInterrupt:
        print(f"interrupted; logs kept in {tmp}", file=sys.stderr)
        return 130
    js, md = write_bench(a.out, "rendezvous", "rendezvous", command, out, markdown)
    return finish_bench(js, md, out["ok"], tmp)


if __name__ == "__main__":
    raise SystemExit(main())
