"""The live handoff demo: a TCP transfer survives a hard handoff of the mobile host.

    sudo .venv/bin/python -m testbed.demo [--gap S] [--duration S] [--rate MBIT]
                                          [--dataplane auto|nft|nfqueue] [--ipv6]

It builds the paper's Fig. 7 testbed in network namespaces of its own (a mobile host
MH and a correspondent host CH, joined by a router R), starts ``dime up`` in the CH
and the MH, and sends a paced TCP stream MH -> CH. At a third of the transfer the MH
loses its address (and link); ``--gap`` seconds later it comes up on the other
subnet with a new address. The demo prints the rate arriving at the CH as it goes,
the daemons' IHMP events, and a verdict: did the connection survive, are the bytes
intact (SHA-256), what was the handoff gap (from the new address up to the first
100 ms with data at the CH, as :mod:`testbed.handoff_gap` defines it for the goodput
experiment too), what was the goodput. Exit status 0 when everything held, 1 otherwise.

The daemons run through :mod:`testbed.runner`, which also checks that ``dime down``
left no rules, queues or ghost addresses behind.

Nothing runs in the machine's own namespace: both daemons run inside the demo's
namespaces, and every namespace is deleted on exit, also on errors and Ctrl-C.
Addresses are documentation ranges (RFC 5737, RFC 3849).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from testbed.fig7 import V4, V6, Fig7, Plan
from testbed.handoff_gap import Gap, RxSampler, handoff_gap
from testbed.netns import CommandError, Namespace, add_rst_counter, rst_count, topology
from testbed.netns import read_line as pipe_line
from testbed.runner import Dime, DimeError, Status, down_all, stop_all, up_all

ROOT = Path(__file__).resolve().parent.parent
XFER = str(ROOT / "testbed" / "xfer.py")
PORT = 5001
TICK = 0.2  # s between two live rate lines
BAR_WIDTH = 30


# Counts TCP resets sent and received by a host (its own table, in the demo's
# namespaces only; deleted with them).
class DemoError(RuntimeError):
    """The demo cannot go on; the message says why (with log lines where useful)."""


def say(text: str = "") -> None:
    print(text, flush=True)


# -- the daemons -------------------------------------------------------------------------


@dataclass
class LogFollower:
    """The complete lines a daemon's log gained since the last call."""

    path: Path
    _offset: int = 0
    _partial: str = ""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        text = self._partial + data.decode(errors="replace")
        *lines, self._partial = text.split("\n")
        return lines


# IHMP and HID table lines from the daemons' logs worth showing live.
EVENT_WORDS = ("IHMP", "HID ", "handoff", "address up", "address down", "ghost", "prompted")
QUIET_WORDS = ("host key", "rewrite remote {} local {}", "dime up:", "flows prompted")


def log_event(line: str) -> tuple[float, str] | None:
    """``2026-.. 12:00:00,123 INFO dime: message`` -> (wall clock, message) for events."""
    parts = line.split(" ", 3)
    if len(parts) < 4 or ": " not in parts[3]:
        return None
    try:
        when = datetime.strptime(f"{parts[0]} {parts[1]}", "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None
    level, message = parts[2], parts[3].split(": ", 1)[1]
    if level in ("WARNING", "ERROR", "CRITICAL"):
        return when, f"{level}: {message}"
    if any(w in message for w in QUIET_WORDS) or not any(w in message for w in EVENT_WORDS):
        return None
    return when, message


# -- the handoff, in a thread ------------------------------------------------------------


@dataclass
class Handoff:
    """The MH's hard handoff and what the daemons said about it, filled in by a thread.

    Instants are kept in both clocks: the wall clock orders them with the daemons'
    log lines, the monotonic one with the CH's received-bytes samples."""

    fig: Fig7
    gap: float
    ch: Dime
    mh: Dime
    down_at: float | None = None  # wall clock: old address gone
    up_at: float | None = None  # wall clock: new address and default route configured
    down_mono: float | None = None  # the same two instants, monotonic
    up_mono: float | None = None
    ch_switched_at: float | None = None  # wall clock: the CH's HID has the new address
    ch_status: Status | None = None
    mh_status: Status | None = None
    error: str | None = None
    notes: list[tuple[float, str]] = field(default_factory=list)  # (wall clock, text)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        p = self.fig.plan
        try:
            self.fig.detach(self.fig.mh, "m1", p.m1)
            self.down_at, self.down_mono = time.time(), time.monotonic()
            self.notes.append((self.down_at, f"MH: {p.m1.host} and its link m1 gone"))
            if self.gap:
                time.sleep(self.gap)
            self.fig.attach(self.fig.mh, "m2", p.m2)
            self.up_at, self.up_mono = time.time(), time.monotonic()
            self.notes.append((self.up_at, f"MH: {p.m2.host} up on m2, default route via it"))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st = self.ch.try_status(timeout=10)
                if st and any(p.m2.host in h["active"] for h in st["hids"]):
                    self.ch_switched_at = time.time()
                    self.ch_status = st
                    break
                time.sleep(0.2)
            self.mh_status = self.mh.try_status(timeout=10)
        except (CommandError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()


# -- helpers -----------------------------------------------------------------------------


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One stderr line of ``proc``; DemoError after ``timeout`` seconds or at EOF."""
    assert proc.stderr is not None
    line, buf = pipe_line(proc.stderr, timeout)
    if line is not None:
        return line
    raise DemoError(f"{proc.args!r}: no line within {timeout:.0f} s ({buf!r})")


def wait_for(proc: subprocess.Popen[bytes], word: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while word not in read_line(proc, max(deadline - time.monotonic(), 0.01)):
        pass


def xfer(ns: Namespace, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return ns.popen(
        sys.executable,
        XFER,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(ROOT),
        start_new_session=True,
    )


def xfer_result(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    lines = out.decode(errors="replace").strip().splitlines()
    if not lines:
        return {"error": f"no result (stderr: {err.decode(errors='replace')[-500:].strip()})"}
    return dict(json.loads(lines[-1]))


def bar(rate: float, target: float) -> str:
    n = round(min(rate / target, 1.25) * BAR_WIDTH) if target > 0 else 0
    return "▇" * n


def mbit(nbytes: float, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6 if seconds > 0 else 0.0


def describe_hid(h: dict[str, Any]) -> str:
    key = (h.get("key") or "-")[:16]
    return (
        f"HID {h['hid']} {h['state']}: active [{' '.join(h['active']) or '-'}]"
        f" unreachable [{' '.join(h['unreachable']) or '-'}] key {key}"
    )


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C waits until it has."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# -- the demo ----------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool = True
    lines: list[tuple[str, str, str, bool]] = field(default_factory=list)

    def add(self, what: str, value: str, detail: str = "", ok: bool = True) -> None:
        self.lines.append((what, value, detail, ok))
        self.ok = self.ok and ok


class Demo:
    def __init__(self, args: argparse.Namespace, fig: Fig7, tmp: Path) -> None:
        self.args = args
        self.fig = fig
        self.plan: Plan = fig.plan
        self.tmp = tmp
        self.ch = Dime(fig.ch, tmp / "ch-state", tmp / "dime-ch.log", "CH")
        self.mh = Dime(fig.mh, tmp / "mh-state", tmp / "dime-mh.log", "MH")
        self.logs = {d.name: LogFollower(d.log) for d in (self.ch, self.mh)}
        self.outcome = Outcome()
        self.t0 = 0.0  # wall clock: the transfer's start
        self.t0_mono = 0.0  # the same, monotonic (the received-bytes samples' clock)
        self.sampler: RxSampler | None = None  # the CH's received bytes
        self._notes_shown = 0
        self._last_event: dict[str, str] = {}

    def stamp(self, when: float | None = None) -> str:
        return f"t={(time.time() if when is None else when) - self.t0:4.1f}s"

    def show_events(self, handoff: Handoff | None = None) -> None:
        """What the daemons logged and what the handoff did since the last call, in order
        of the time it happened (the daemons' log time stamps)."""
        events: list[tuple[float, str]] = []
        for d in (self.ch, self.mh):
            for line in self.logs[d.name].new_lines():
                ev = log_event(line)
                if ev is None or self._last_event.get(d.name) == ev[1]:
                    continue  # e.g. one event reported twice by the engine
                self._last_event[d.name] = ev[1]
                events.append((ev[0], f"[{d.name} dime] {ev[1]}"))
        if handoff is not None:
            new = handoff.notes[self._notes_shown :]
            self._notes_shown += len(new)
            events += [(when, f">>> {text}") for when, text in new]
        for when, text in sorted(events, key=lambda e: e[0]):
            say(f"  {self.stamp(when)}  {text}")

    def start_daemons(self) -> None:
        p = self.plan
        say(
            f"Fig. 7 testbed (IPv{p.family}): CH {p.c1.host} on c1 --- router --- "
            f"MH {p.m1.host} on m1 (later {p.m2.host} on m2)"
        )
        for ns in (self.fig.ch, self.fig.mh):
            add_rst_counter(ns)
        daemons = [self.ch, self.mh]
        for d, st in zip(daemons, up_all(daemons, "-v", "--dataplane", self.args.dataplane),
                         strict=True):  # fmt: skip
            self.logs[d.name].new_lines()  # start-up lines: in the log file, not on screen
            say(
                f"dime up in the {d.name}: pid {st['pid']}, dataplane {st['dataplane']}, "
                f"IHMP port {st['port']}, local {' '.join(st['local_addresses'])}"
            )

    def run(self) -> bool:
        a = self.args
        p = self.plan
        self.start_daemons()
        nbytes = int(a.rate * 1e6 / 8 * a.duration)
        timeout = max(30.0, a.gap + 30)
        server = xfer(
            self.fig.ch, "tcp-server", "--bind", p.c1.host, "--port", str(PORT),
            "--timeout", str(timeout),
        )  # fmt: skip
        wait_for(server, "listening", 10)
        # Read through the server's /proc entry: it is in the CH's namespace now.
        self.sampler = sampler = RxSampler(server.pid, "c1")
        sampler.start()
        self.t0, self.t0_mono = time.time(), time.monotonic()
        client = xfer(
            self.fig.mh, "tcp-client", "--connect", p.c1.host, "--port", str(PORT),
            "--bytes", str(nbytes), "--rate", str(a.rate), "--timeout", str(timeout),
        )  # fmt: skip
        wait_for(client, "ready", 10)
        say(
            f"\nTCP transfer MH -> CH ({p.c1.host}:{PORT}): {nbytes / 1e6:.1f} MB at "
            f"{a.rate:g} Mbit/s; hard handoff at t={a.duration / 3:.1f}s with a "
            f"{a.gap:g} s gap.\nEvery {TICK * 1000:.0f} ms: the rate arriving on the CH's "
            "interface (headers included); >>> the handoff; [.. dime] the daemons' log.\n"
        )
        handoff = Handoff(self.fig, a.gap, self.ch, self.mh)
        thread = threading.Thread(target=handoff.run, name="handoff", daemon=True)
        handoff_at = time.monotonic() + a.duration / 3
        deadline = time.monotonic() + a.duration + a.gap + timeout + 30
        last_t = time.monotonic()
        while client.poll() is None or server.poll() is None:
            time.sleep(max(0.0, last_t + TICK - time.monotonic()))
            now = last_t = time.monotonic()
            self.show_events(handoff)
            rate = sampler.rate_bps(TICK) / 1e6
            say(f"  {self.stamp()}  {rate:6.1f} Mbit/s  {bar(rate, a.rate)}")
            if not thread.is_alive() and not handoff.done.is_set() and now >= handoff_at:
                thread.start()
            if now > deadline:
                client.kill()
                server.kill()
                self.outcome.add("transfer", "timeout", "did not finish in time; killed", ok=False)
                break
        if thread.is_alive():
            thread.join(timeout=30)
        self.show_events(handoff)
        sent, got = xfer_result(client, 10), xfer_result(server, 10)
        sampler.stop()
        self.report_handoff(handoff)
        self.judge(sent, got, handoff, nbytes)
        self.stop_daemons()
        ok = self.print_verdict()
        if not ok:
            say("\nThe daemons' last log lines:")
            say(self.ch.log_tail(40))
            say(self.mh.log_tail(40))
        return ok

    def report_handoff(self, h: Handoff) -> None:
        p = self.plan
        say("\nWhat the daemons reported about the handoff:")
        if h.error:
            say(f"  the handoff failed: {h.error}")
            self.outcome.add("handoff", "failed", h.error, ok=False)
            return
        if h.up_at is None:
            say("  the handoff did not happen (the transfer ended first)")
            self.outcome.add("handoff", "none", "the transfer ended first", ok=False)
            return
        mh = h.mh_status
        if mh is not None:
            say(
                f"  MH  local addresses [{' '.join(mh['local_addresses'])}], "
                f"ghost addresses kept on lo [{' '.join(mh['ghosts']) or '-'}]"
            )
            for s in mh["sockets"]:
                say(f"      socket {s['proto']} {s['local']} -> {s['remote']} (HID {s['hid']})")
        if h.ch_status is not None and h.ch_switched_at is not None:
            took = (h.ch_switched_at - h.up_at) * 1000
            for hid in h.ch_status["hids"]:
                if p.m2.host in hid["active"]:
                    say(f"  CH  {describe_hid(hid)}")
            for s in h.ch_status["sockets"]:
                say(f"      socket {s['proto']} {s['local']} -> {s['remote']} (HID {s['hid']})")
            say(f"      (the CH had the MH at {p.m2.host} {took:.0f} ms after it came up)")
        else:
            say(f"  CH  never listed {p.m2.host} as the MH's active address")
            self.outcome.add("IHMP", "failed", f"the CH never learned {p.m2.host}", ok=False)

    def judge(self, sent: dict[str, Any], got: dict[str, Any], h: Handoff, nbytes: int) -> None:
        o = self.outcome
        try:
            resets = rst_count(self.fig.ch) + rst_count(self.fig.mh)
        except (CommandError, ValueError, KeyError):
            resets = -1
        errors = [f"{who}: {r['error']}" for who, r in (("MH", sent), ("CH", got)) if r["error"]]
        if resets:
            errors.append(f"{resets if resets > 0 else 'unknown number of'} TCP resets")
        if errors:
            o.add("connection survived", "NO", "; ".join(errors), ok=False)
        else:
            o.add("connection survived", "yes", "no socket error on either end, 0 TCP resets")
        same = (
            sent.get("bytes") == got.get("bytes") == nbytes
            and sent.get("sha256") == got.get("sha256")
            and sent.get("sha256") is not None
        )
        o.add(
            "bytes intact",
            "yes" if same else "NO",
            f"{sent.get('bytes', 0):,} bytes sent, {got.get('bytes', 0):,} received, "
            f"SHA-256 {'equal' if same else 'differs'} ({str(got.get('sha256', '-'))[:16]}…)",
            ok=same,
        )
        timeline: list[int] = list(got.get("timeline") or [])
        if h.up_mono is not None and h.down_mono is not None:
            o.add("handoff gap", *self.gap_text(h, timeline, float(got.get("start") or 0)))
        secs = float(sent.get("seconds") or len(timeline) / 10)
        if got.get("bytes"):
            o.add(
                "goodput",
                f"{mbit(got['bytes'], secs):.1f} Mbit/s",
                f"{got['bytes'] / 1e6:.1f} MB in {secs:.1f} s, paced at {self.args.rate:g} Mbit/s"
                " (the sender catches up after the gap)",
            )

    def gap(self, h: Handoff) -> Gap:
        """The handoff gap (:mod:`testbed.handoff_gap`) in the CH's received bytes."""
        assert self.sampler is not None and h.up_mono is not None and h.down_mono is not None
        samples = self.sampler.samples
        end = samples[-1][0] if samples else h.up_mono
        return handoff_gap(samples, h.up_mono, start=self.t0_mono, first_event=h.down_mono, end=end)

    def gap_text(self, h: Handoff, timeline: list[int], start: float) -> tuple[str, str]:
        """The gap and, for context, how long the receiving socket got no byte at all
        (its timeline: bytes per 100 ms since ``start``, wall clock) and how long the MH
        had no address."""
        assert h.up_at is not None and h.down_at is not None
        gap = self.gap(h).seconds
        value = "never" if gap is None else f"{gap * 1000:.0f} ms"
        first = max(int((h.down_at - start) * 10), 0)
        stall = next((i for i in range(first, len(timeline)) if timeline[i] == 0), None)
        back = next((i for i in range(stall or 0, len(timeline)) if timeline[i] > 0), None)
        if stall is None:
            silent = "no 100 ms without data at the CH"
        elif back is None:
            silent = "no data at the CH after the handoff"
        else:
            silent = f"the CH received nothing for {(back - stall) * 100} ms"
        return value, (
            "from the new address up to the middle of the first 100 ms with data at the CH\n"
            "(at least half the rate before the handoff)\n"
            f"{silent}; the MH had no address for {(h.up_at - h.down_at) * 1000:.0f} ms"
        )

    def stop_daemons(self) -> None:
        stopped = down_all([self.ch, self.mh])
        all_ok = all(st.ok for st in stopped)
        self.outcome.add(
            "daemons stopped",
            "yes" if all_ok else "NO",
            "dime down in CH and MH; no dime rules, queues or ghost addresses left"
            if all_ok
            else "; ".join(f"{st.name}: {st.describe()}" for st in stopped if not st.ok),
            ok=all_ok,
        )

    def print_verdict(self) -> bool:
        o = self.outcome
        width = max((len(w) for w, *_ in o.lines), default=0)
        say("\n" + "=" * 78)
        for what, value, detail, ok in o.lines:
            say(f"  {'✔' if ok else '✘'} {what:<{width}}  {value}")
            for line in detail.splitlines():
                say(f"    {'':<{width}}  {line}")
        say("=" * 78)
        say(f"RESULT: {'PASS' if o.ok else 'FAIL'}")
        return o.ok

    def abort_cleanup(self) -> None:
        """After an error or Ctrl-C: stop whatever daemon still runs, quietly."""
        if self.sampler is not None:
            self.sampler.stop()
        stop_all([self.ch, self.mh])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m testbed.demo",
        description="dime live demo: a TCP transfer survives a hard handoff of the mobile "
        "host (in network namespaces of its own; needs root)",
    )
    p.add_argument(
        "--gap",
        type=float,
        default=2.0,
        help="seconds between the old address going and the new one coming up (default 2.0)",
    )
    p.add_argument(
        "--duration", type=float, default=10.0, help="transfer duration, seconds (default 10)"
    )
    p.add_argument("--rate", type=float, default=50.0, help="sending rate, Mbit/s (default 50)")
    p.add_argument("--dataplane", choices=["auto", "nft", "nfqueue"], default="auto")
    p.add_argument("--ipv6", action="store_true", help="IPv6 addresses instead of IPv4")
    a = p.parse_args(argv)
    if not 0 <= a.gap <= 20:
        p.error("--gap must be between 0 and 20 seconds")
    if not 3 <= a.duration <= 300:
        p.error("--duration must be between 3 and 300 seconds")
    if not 0.5 <= a.rate <= 2000:
        p.error("--rate must be between 0.5 and 2000 Mbit/s")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("demo: must run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="dime-demo-"))
    ok = interrupted = False
    demo: Demo | None = None
    try:
        with topology("demo") as topo:
            try:
                fig = Fig7.build(topo, V6 if args.ipv6 else V4)
                demo = Demo(args, fig, tmp)
                ok = demo.run()
            except BaseException:
                with no_interrupts():
                    if demo is not None:
                        demo.abort_cleanup()
                raise
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the namespaces are gone
    except KeyboardInterrupt:
        print("\ninterrupted: daemons stopped, namespaces removed", file=sys.stderr)
        interrupted = True
        return 130
    except (DemoError, DimeError, CommandError, subprocess.TimeoutExpired) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        keep = not ok and not interrupted and any(tmp.glob("*.log"))
        shutil.rmtree(tmp / "ch-state", ignore_errors=True)
        shutil.rmtree(tmp / "mh-state", ignore_errors=True)
        if keep:
            print(f"daemon logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
