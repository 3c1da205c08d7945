"""The testbed's link delay: the NFQUEUE delay line (netem where the kernel has it).

The unit tests drive :class:`testbed.delay.DelayLine` with fake packets and a fake
clock; the netns tests run it in the router of the Fig. 7 testbed and check the RTT
it gives and that a TCP transfer through it arrives intact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.delay import ROOT, DelayLine, Emulation, emulate
from testbed.fig7 import V4, V6, Fig7, Plan
from testbed.netns import topology
from tests.netns_util import add_rst_counter, check_transfer, tcp_transfer

D_MS = 25.0
ROUTER_DEVS = ["rc1", "rc2", "rm1", "rm2"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


# -- the delay line itself, no kernel -----------------------------------------------------


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Any]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, cb: Any) -> Any:
        handle = FakeHandle(when, cb)
        self.timers.append((when, handle))
        return handle

    def advance(self, to: float) -> None:
        """Run every timer due by ``to``, in time order, as asyncio would."""
        while True:
            due = [t for t in self.timers if t[0] <= to and not t[1].cancelled]
            if not due:
                break
            when, h = min(due, key=lambda t: t[0])
            self.timers.remove((when, h))
            self.now = max(self.now, when)
            h.cb()
        self.now = to


class FakeHandle:
    def __init__(self, when: float, cb: Any) -> None:
        self.when, self.cb, self.cancelled = when, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class FakePacket:
    def __init__(self, n: int, log: list[tuple[int, float]], loop: FakeLoop, fail: bool = False):
        self.n, self.log, self.loop, self.fail = n, log, loop, fail
        self.verdicts = 0

    def retain(self) -> None:
        if self.fail:
            raise RuntimeError("no payload")

    def accept(self) -> None:
        self.verdicts += 1
        self.log.append((self.n, self.loop.now))
        if self.fail:
            raise RuntimeError("queue gone")


def test_delay_line_keeps_order_and_delays_every_packet() -> None:
    loop = FakeLoop()
    line = DelayLine(loop, 0.030)  # type: ignore[arg-type]
    log: list[tuple[int, float]] = []
    pkts = []
    # Bursts with identical arrival times, and packets spread out.
    arrivals = [0.0, 0.0, 0.0, 0.001, 0.0015, 0.010, 0.010, 0.040, 0.041]
    for n, t in enumerate(arrivals):
        loop.advance(t)
        p = FakePacket(n, log, loop)
        pkts.append(p)
        line.on_packet(p)
    loop.advance(1.0)
    assert [n for n, _ in log] == list(range(len(arrivals)))
    for (n, released), t in zip(log, arrivals, strict=True):
        assert released >= t + 0.030 - 1e-9, (n, released, t)
        assert released <= t + 0.030 + 0.002, (n, released, t)
    assert all(p.verdicts == 1 for p in pkts)
    assert not line.fifo and line.errors == 0
    assert line.stats()["packets"] == len(arrivals)


def test_delay_line_always_gives_a_verdict() -> None:
    loop = FakeLoop()
    line = DelayLine(loop, 0.050)  # type: ignore[arg-type]
    log: list[tuple[int, float]] = []
    bad = FakePacket(0, log, loop, fail=True)
    good = FakePacket(1, log, loop)
    line.on_packet(bad)  # retain() and accept() raise: counted, never propagated
    line.on_packet(good)
    loop.advance(0.060)
    assert bad.verdicts == 1 and good.verdicts == 1
    assert line.errors == 2
    # Stopping releases what is still held, at once.
    held = [FakePacket(n, log, loop) for n in range(2, 5)]
    for p in held:
        line.on_packet(p)
    line.flush()
    assert all(p.verdicts == 1 for p in held)
    assert not line.fifo and line.timer is None


# -- in the Fig. 7 testbed ----------------------------------------------------------------


def _ping(ns: Any, addr: str, count: int = 10) -> tuple[float, float]:
    out = ns.run("ping", "-c", str(count), "-i", "0.1", "-q", addr, check=False, timeout=30)
    for line in out.splitlines():
        if "min/avg/max" in line:
            parts = line.split("=")[1].split("/")
            return float(parts[0]), float(parts[1])
    raise AssertionError(f"ping {addr} failed:\n{out}")


@pytest.fixture
def bed(request: pytest.FixtureRequest) -> Iterator[tuple[Fig7, Emulation]]:
    plan: Plan = getattr(request, "param", V4)
    with topology("delay") as topo:
        fig = Fig7.build(topo, plan)
        em = emulate(fig.r, ROUTER_DEVS, D_MS, 20.0)
        try:
            yield fig, em
        finally:
            em.stop()


@pytest.mark.netns
@needs_root
@pytest.mark.parametrize("bed", [V4, V6], ids=["v4", "v6"], indirect=True)
def test_rtt_is_at_least_twice_the_delay(bed: tuple[Fig7, Emulation]) -> None:
    fig, em = bed
    base_min, _ = _ping(fig.mh, fig.plan.c1.host)
    assert base_min >= 2 * D_MS, f"RTT {base_min} ms < 2 x {D_MS} ms ({em.mode})"
    assert base_min < 2 * D_MS + 500, f"RTT {base_min} ms: the line holds packets too long"
    if em.mode == "nfqueue":
        rules = fig.r.run("iptables", "-S", "FORWARD") + fig.r.run("ip6tables", "-S", "FORWARD")
        assert rules.count("NFQUEUE") == 2
        stats = em.stop()
        assert stats["packets"] >= 20 and stats["errors"] == 0, stats
        # Stopped: its rules are gone and forwarding works without it.
        assert "NFQUEUE" not in fig.r.run("iptables", "-S", "FORWARD")
        assert "NFQUEUE" not in fig.r.run("ip6tables", "-S", "FORWARD")
        after_min, _ = _ping(fig.mh, fig.plan.c1.host, count=5)
        assert after_min < 2 * D_MS, after_min


@pytest.mark.netns
@needs_root
@pytest.mark.parametrize("bed", [V4], ids=["v4"], indirect=True)
def test_tcp_through_the_delay_line_is_intact(bed: tuple[Fig7, Emulation]) -> None:
    fig, em = bed
    for ns in (fig.ch, fig.mh):
        add_rst_counter(ns)
    nbytes = 6_000_000  # about 2.5 s at the shaped 20 Mbit/s
    server, client = tcp_transfer(fig.mh, fig.ch, fig.plan.c1.host, nbytes, rate=0)
    try:
        check_transfer((fig.ch, fig.mh), server, client, nbytes, em.mode)
    finally:
        for p in (server, client):
            if p.poll() is None:
                p.kill()
    stats = em.stop()
    if em.mode == "nfqueue":
        assert stats["errors"] == 0, stats
        assert stats["packets"] > nbytes // 1500, stats


def test_delay_line_cli_refuses_a_missing_delay() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.delay"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "--delay-ms" in proc.stderr
