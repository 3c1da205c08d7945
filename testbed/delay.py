"""Link delay and rate for the testbed: netem where the kernel has it, else a delay line.

The project's kernels have no ``netem`` (see /work/shared/PLATFORM.md), so the router
namespace delays forwarded packets in user space: every forwarded IPv4 and IPv6
packet goes to an NFQUEUE (``iptables -A FORWARD -j NFQUEUE --queue-bypass``), and
this module, run as a process in the router, gives each one its ACCEPT verdict
``delay`` seconds after it arrived (a deferred verdict: the kernel keeps the packet,
user space only holds its id). One FIFO and one timer keep the order of the
packets; nothing blocks; every packet gets a verdict, also when something fails and
when the line stops. Each crossing of the router costs one delay, so a round trip
between two hosts on either side costs two: ``--delay-ms 30`` gives an RTT of about
60 ms, the paper's figure.

    python -m testbed.delay --queue N --delay-ms D     (inside the router namespace)

It installs the FORWARD rules itself once it listens, removes them when it stops
(SIGTERM or SIGINT), releases the packets it still holds and prints one JSON line of
statistics on stdout: packets, errors, the deepest the line got, how late the
verdicts came and the CPU it used.

Rate: :func:`emulate` also shapes the router's egress interfaces with ``tbf`` (or
puts ``tbf`` under ``netem`` where netem exists). The delay line sits in FORWARD,
before the egress qdisc, so the shaped queue sees the delayed packets.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.netns import CommandError, Namespace, read_line

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_QUEUE = 7
# Packets the kernel may hold for us at once: a 30 ms line at line rate in slow start
# holds a few hundred; far more than that only means something is wrong.
MAX_LEN = 16384
COPY_RANGE = 128  # bytes of each packet copied to user space: headers are plenty

RULE = ("FORWARD", "-j", "NFQUEUE", "--queue-num")


def _iptables(tool: str, op: str, queue: int) -> None:
    subprocess.run(
        [tool, "-w", op, *RULE, str(queue), "--queue-bypass"],
        check=True,
        capture_output=True,
        timeout=30,
    )


class DelayLine:
    """Deferred verdicts: a FIFO of (due, packet) and a single timer for its head."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.fifo: collections.deque[tuple[float, Any]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.packets = 0
        self.errors = 0
        self.max_depth = 0
        self.late_sum = 0.0
        self.late_max = 0.0
        self.batch_max = 0
        self.busy_max = 0.0
        self.late_1ms = 0  # verdicts more than 1 ms (5 ms) after they were due
        self.late_5ms = 0

    def on_packet(self, pkt: Any) -> None:
        """netfilterqueue's callback: hold the packet, never block, never raise."""
        now = self.loop.time()
        self.packets += 1
        try:
            pkt.retain()  # its data outlives this callback (netfilterqueue reuses the buffer)
        except Exception:
            self.errors += 1
        try:
            self.fifo.append((now + self.delay, pkt))
            if len(self.fifo) > self.max_depth:
                self.max_depth = len(self.fifo)
            if self.timer is None:
                self.timer = self.loop.call_at(now + self.delay, self.release)
        except Exception:
            self.errors += 1
            self._accept(pkt)

    def note_batch(self, packets: int, seconds: float) -> None:
        """One read of the queue: how many packets and how long (the loop is busy)."""
        if packets > self.batch_max:
            self.batch_max = packets
        if seconds > self.busy_max:
            self.busy_max = seconds

    def _accept(self, pkt: Any) -> None:
        try:
            pkt.accept()
        except Exception:  # e.g. the queue was unbound under us
            self.errors += 1

    def release(self) -> None:
        """Accept every packet that is due, in arrival order; re-arm for the next one."""
        self.timer = None
        now = self.loop.time()
        fifo = self.fifo
        while fifo and fifo[0][0] <= now:
            due, pkt = fifo.popleft()
            late = now - due
            self.late_sum += late
            if late > self.late_max:
                self.late_max = late
            if late > 0.001:
                self.late_1ms += 1
                if late > 0.005:
                    self.late_5ms += 1
            self._accept(pkt)
        if fifo:
            self.timer = self.loop.call_at(fifo[0][0], self.release)

    def flush(self) -> None:
        """Release everything at once (the line is stopping)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.fifo:
            self._accept(self.fifo.popleft()[1])

    def stats(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        released = max(self.packets - len(self.fifo), 1)
        return {
            "delay_ms": self.delay * 1000,
            "packets": self.packets,
            "errors": self.errors,
            "max_depth": self.max_depth,
            "late_mean_ms": round(self.late_sum / released * 1000, 3),
            "late_max_ms": round(self.late_max * 1000, 3),
            "late_over_1ms": self.late_1ms,
            "late_over_5ms": self.late_5ms,
            "batch_max": self.batch_max,
            "busy_max_ms": round(self.busy_max * 1000, 3),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        }


def realtime(priority: int) -> bool:
    """SCHED_FIFO for this process, so that busy CPUs do not make verdicts late.

    Safe here: the line sleeps in epoll between packets and uses a few percent of a
    core; the kernel's RT throttling still bounds it if something goes wrong."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError):
        return False
    return True


async def serve(
    queue: int, delay: float, rules: bool = True, rt_priority: int = 0
) -> dict[str, Any]:
    from netfilterqueue import COPY_PACKET, NetfilterQueue

    rt = realtime(rt_priority) if rt_priority > 0 else False
    loop = asyncio.get_running_loop()
    line = DelayLine(loop, delay)
    q = NetfilterQueue()
    q.bind(queue, line.on_packet, max_len=MAX_LEN, mode=COPY_PACKET, range=COPY_RANGE)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    installed: list[str] = []
    start = time.monotonic()
    try:

        def drain() -> None:
            before, t = line.packets, time.monotonic()
            q.run(False)
            line.note_batch(line.packets - before, time.monotonic() - t)

        loop.add_reader(q.get_fd(), drain)
        if rules:
            for tool in ("iptables", "ip6tables"):
                _iptables(tool, "-A", queue)
                installed.append(tool)
        print("ready", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for tool in installed:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _iptables(tool, "-D", queue)
        # Packets queued before the rules went away still arrive: serve them a moment.
        with contextlib.suppress(OSError):
            q.run(False)
        line.flush()
        loop.remove_reader(q.get_fd())
        q.unbind()
    out = line.stats()
    out["realtime"] = rt
    out["seconds"] = round(time.monotonic() - start, 3)
    out["cpu_pct"] = round(100 * out["cpu_s"] / max(out["seconds"], 1e-9), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.delay", description=__doc__.split("\n")[0])
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE, help="NFQUEUE number")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay per crossing")
    p.add_argument("--no-rules", action="store_true", help="do not install the FORWARD rules")
    p.add_argument(
        "--rt", type=int, default=0, metavar="PRIO", help="run SCHED_FIFO at this priority"
    )
    a = p.parse_args(argv)
    stats = asyncio.run(serve(a.queue, a.delay_ms / 1000, not a.no_rules, a.rt))
    print(json.dumps(stats), flush=True)
    return 0


# -- the testbed side: start it in a namespace, shape the links -----------------------------


def netem_available(ns: Namespace) -> bool:
    """Whether this kernel has netem (probed on the namespace's loopback)."""
    ns.run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
    if "netem" in ns.run("tc", "qdisc", "show", "dev", "lo", check=False):
        ns.run("tc", "qdisc", "del", "dev", "lo", "root", check=False)
        return True
    return False


def tbf_args(rate_mbit: float, limit_ms: float) -> list[str]:
    return [
        "tbf",
        "rate",
        f"{rate_mbit:g}mbit",
        "burst",
        "32kbit",
        "latency",
        f"{limit_ms:g}ms",
    ]


@dataclass
class Emulation:
    """Delay and rate on a router namespace's links; :meth:`stop` says what it did."""

    ns: Namespace
    mode: str  # "netem", "nfqueue" or "none" (no delay)
    delay_ms: float
    rate_mbit: float | None
    limit_ms: float | None
    devs: list[str]
    proc: subprocess.Popen[bytes] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "delay_mode": self.mode,
            "one_way_delay_ms": self.delay_ms,
            "rate_mbit": self.rate_mbit,
            "tbf_latency_ms": self.limit_ms,
            "shaped": self.devs if self.rate_mbit else [],
        }

    def stop(self, timeout: float = 10) -> dict[str, Any]:
        """Stop the delay line (if any); its statistics, also kept in ``stats``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return self.stats
        died = proc.poll() is not None
        if not died:
            proc.terminate()
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for line in reversed(out.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                self.stats = dict(json.loads(line))
                break
        else:
            self.stats = {"error": err.decode(errors="replace")[-500:]}
        if died:  # it stopped before it was told to: packets went through undelayed
            self.stats["died_early"] = True
        return self.stats

    def cpu_pct(self) -> float | None:
        """The delay line's CPU use so far (percent of one core), read from /proc."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
            started = int(fields[19])
        except (OSError, IndexError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        alive = uptime - started / hz
        return 100 * ticks / hz / alive if alive > 0 else None


def emulate(
    ns: Namespace,
    devs: list[str],
    delay_ms: float,
    rate_mbit: float | None = None,
    *,
    limit_ms: float | None = None,
    queue: int = DEFAULT_QUEUE,
    prefer: str = "auto",
    rt_priority: int = 10,
    ready_timeout: float = 15,
) -> Emulation:
    """Delay ``delay_ms`` on each crossing of router ``ns`` and shape egress ``devs``.

    ``prefer``: "auto" (netem if the kernel has it, else the NFQUEUE delay line),
    "netem" or "nfqueue". ``limit_ms`` is tbf's ``latency`` (its queue length as
    time at the rate; default one RTT, i.e. about a bandwidth-delay product).
    ``rt_priority``: the delay line's SCHED_FIFO priority (0: normal scheduling).
    """
    if limit_ms is None:
        limit_ms = max(2 * delay_ms, 20.0)
    mode = "none"
    if delay_ms > 0:
        mode = (
            "netem"
            if prefer == "netem" or (prefer == "auto" and netem_available(ns))
            else "nfqueue"
        )
    em = Emulation(ns, mode, delay_ms, rate_mbit, limit_ms if rate_mbit else None, list(devs))
    if mode == "netem":
        for dev in devs:
            ns.run(
                "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                "delay", f"{delay_ms:g}ms", "limit", "100000",
            )  # fmt: skip
            if rate_mbit:
                ns.run("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:",
                       *tbf_args(rate_mbit, limit_ms))  # fmt: skip
        return em
    if rate_mbit:
        for dev in devs:
            ns.run("tc", "qdisc", "replace", "dev", dev, "root", *tbf_args(rate_mbit, limit_ms))
    if mode == "nfqueue":
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        proc = ns.popen(
            sys.executable,
            "-m",
            "testbed.delay",
            "--queue",
            str(queue),
            "--delay-ms",
            f"{delay_ms:g}",
            "--rt",
            str(rt_priority),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(ROOT),
        )
        em.proc = proc
        _wait_ready(proc, ready_timeout)
    return em


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while True:
        line, rest = read_line(proc.stderr, max(deadline - time.monotonic(), 0))
        if line is None:
            seen += rest
            break
        if line.endswith("ready"):
            return
        seen += line.encode() + b"\n"
    proc.kill()
    _, err = proc.communicate()
    raise CommandError(f"delay line did not start: {(seen + err).decode(errors='replace')[-800:]}")


if __name__ == "__main__":
    raise SystemExit(main())
