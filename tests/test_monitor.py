"""Tests for dime.monitor: the handoff detector, the rtnetlink table, the monitor.

The detector and the table are pure and driven with a fake clock and dict-shaped
messages. The monitor itself runs in a subprocess inside a fresh namespace, printing
its events as JSON lines, while the test changes addresses with ``ip``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from ipaddress import IPv4Address, IPv6Address, ip_interface
from typing import ClassVar

import pytest

from dime.monitor import (
    IFA_F_DADFAILED,
    IFA_F_TENTATIVE,
    IFF_LOOPBACK,
    IFF_RUNNING,
    IFF_UP,
    Added,
    AddressMonitor,
    AddressTable,
    Handoff,
    HandoffDetector,
    IPInterface,
    Removed,
)
from stacktrans.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE
from testbed.netns import Namespace, Topology, topology

A = ip_interface("192.0.2.1/24")
B = ip_interface("198.51.100.1/24")
C = ip_interface("203.0.113.1/24")
A6 = ip_interface("2001:db8:1::1/64")
B6 = ip_interface("2001:db8:2::1/64")
W = 1.0


# == HandoffDetector, fake clock =======================================================


def test_added_is_reported_at_once() -> None:
    d = HandoffDetector(W)
    d.added(A, 0.0)
    assert d.poll(0.0) == [Added(A)]
    assert d.poll(10.0) == []
    assert d.deadline() is None


def test_hard_handoff_within_window() -> None:
    d = HandoffDetector(W, present=[A])
    d.removed(A, 10.0)
    assert d.poll(10.0) == []
    assert d.deadline() == 10.0 + W
    d.added(B, 10.0 + W * 0.9)
    assert d.poll(10.0 + W * 0.9) == [Handoff(A, B)]
    assert d.deadline() is None
    assert d.poll(100.0) == []  # no late Removed(A)
    assert set(d.present) == {B.ip}


def test_gap_longer_than_window_is_removed_then_added() -> None:
    d = HandoffDetector(W, present=[A])
    d.removed(A, 0.0)
    assert d.poll(W * 0.5) == []
    assert d.poll(W) == [Removed(A)]  # the window is [removal, removal + W)
    d.added(B, 5.0)
    assert d.poll(5.0) == [Added(B)]


def test_late_poll_keeps_the_order() -> None:
    # Nobody polled when the window expired: the removal still comes first.
    d = HandoffDetector(W, present=[A])
    d.removed(A, 0.0)
    d.added(B, 3.0)
    assert d.poll(3.0) == [Removed(A), Added(B)]


def test_soft_handoff_is_added_then_removed() -> None:
    d = HandoffDetector(W, present=[A])
    d.added(B, 0.0)
    assert d.poll(0.0) == [Added(B)]
    d.removed(A, 1.0)
    assert d.poll(1.0) == []
    assert d.poll(1.0 + W) == [Removed(A)]


def test_flap_reports_nothing() -> None:
    d = HandoffDetector(W, present=[A])
    d.removed(A, 0.0)
    d.added(A, 0.1)
    assert d.poll(0.1) == []
    assert d.deadline() is None
    assert d.poll(10.0) == []
    assert set(d.present) == {A.ip}


def test_flap_wins_over_handoff() -> None:
    d = HandoffDetector(W, present=[A, B])
    d.removed(A, 0.0)
    d.removed(B, 0.1)
    d.added(B, 0.2)  # B flapped; A is still pending
    assert d.poll(0.2) == []
    d.added(C, 0.3)
    assert d.poll(0.3) == [Handoff(A, C)]


def test_oldest_pending_removal_pairs_first() -> None:
    d = HandoffDetector(W, present=[A, B])
    d.removed(A, 0.0)
    d.removed(B, 0.1)
    d.added(C, 0.2)
    assert d.poll(0.2) == [Handoff(A, C)]
    assert d.poll(0.1 + W) == [Removed(B)]


def test_families_are_independent() -> None:
    d = HandoffDetector(W, present=[A, A6])
    d.removed(A, 0.0)
    d.added(B6, 0.1)  # IPv6 never replaces IPv4
    assert d.poll(0.1) == [Added(B6)]
    d.removed(A6, 0.2)
    d.added(B, 0.3)
    assert d.poll(0.3) == [Handoff(A, B)]
    assert d.poll(0.2 + W) == [Removed(A6)]


def test_duplicates_are_ignored() -> None:
    d = HandoffDetector(W)
    d.added(A, 0.0)
    d.added(A, 0.1)  # netlink re-announcing it (flags, lifetimes)
    d.removed(B, 0.2)  # never present
    assert d.poll(0.2) == [Added(A)]
    assert d.deadline() is None
    d.removed(A, 1.0)
    d.removed(A, 1.1)
    assert d.poll(1.0 + W) == [Removed(A)]


def test_removed_reports_the_announced_interface() -> None:
    d = HandoffDetector(W, present=[A])
    d.removed(ip_interface(f"{A.ip}/32"), 0.0)
    assert d.poll(W) == [Removed(A)]


def test_zero_window_disables_handoffs() -> None:
    d = HandoffDetector(0.0, present=[A])
    d.removed(A, 1.0)
    d.added(B, 1.0)
    assert d.poll(1.0) == [Removed(A), Added(B)]
    with pytest.raises(ValueError):
        HandoffDetector(-1.0)


# == AddressTable, dict-shaped messages ================================================

LO, ETH = 1, 2
UP = IFF_UP | IFF_RUNNING


def link(index: int, flags: int, event: str = "RTM_NEWLINK") -> dict[str, object]:
    return {"event": event, "index": index, "flags": flags}


def addr(index: int, cidr: str, flags: int = 0x80, event: str = "RTM_NEWADDR") -> dict[str, object]:
    iface = ip_interface(cidr)
    msg: dict[str, object] = {
        "event": event,
        "family": 2 if iface.version == 4 else 10,
        "index": index,
        "prefixlen": iface.network.prefixlen,
        "flags": flags & 0xFF,
        "IFA_ADDRESS": str(iface.ip),
        "IFA_FLAGS": flags,
    }
    if iface.version == 4:
        msg["IFA_LOCAL"] = str(iface.ip)
    return msg


def table_with(*msgs: dict[str, object], require_carrier: bool = True) -> AddressTable:
    t = AddressTable(require_carrier)
    for m in [link(LO, UP | IFF_LOOPBACK), link(ETH, UP), *msgs]:
        assert t.apply(m)
    return t


def test_table_filters() -> None:
    t = table_with(
        addr(LO, "127.0.0.1/8"),
        addr(LO, "192.0.2.99/32"),  # a ghost address on lo
        addr(ETH, "192.0.2.1/24"),
        addr(ETH, "fe80::1/64"),
        addr(ETH, "2001:db8::1/64"),
        addr(ETH, "2001:db8::2/64", flags=IFA_F_TENTATIVE),
        addr(ETH, "2001:db8::3/64", flags=IFA_F_DADFAILED | IFA_F_TENTATIVE),
        addr(ETH, "169.254.1.1/16"),  # IPv4 link-local is the engine's business
    )
    assert set(map(str, t.usable().values())) == {
        "192.0.2.1/24",
        "2001:db8::1/64",
        "169.254.1.1/16",
    }


def test_table_tentative_becomes_valid() -> None:
    t = table_with(addr(ETH, "2001:db8::2/64", flags=IFA_F_TENTATIVE | 0x80))
    assert t.usable() == {}
    t.apply(addr(ETH, "2001:db8::2/64", flags=0x80))
    assert list(t.usable()) == [IPv6Address("2001:db8::2")]


def test_table_point_to_point_uses_local() -> None:
    t = table_with()
    msg = addr(ETH, "10.0.0.1/32")
    msg["IFA_ADDRESS"] = "10.0.0.2"  # the peer
    t.apply(msg)
    assert list(t.usable()) == [IPv4Address("10.0.0.1")]


def test_table_link_state() -> None:
    t = table_with(addr(ETH, "192.0.2.1/24"))
    t.apply(link(ETH, IFF_UP))  # carrier lost; the kernel keeps the address
    assert t.usable() == {}
    t.apply(link(ETH, UP))
    assert list(t.usable()) == [A.ip]
    t.apply(link(ETH, 0, event="RTM_DELLINK"))
    t.apply(link(ETH, UP))
    assert t.usable() == {}  # the addresses went with the link

    t = table_with(addr(ETH, "192.0.2.1/24"), require_carrier=False)
    t.apply(link(ETH, 0))
    assert list(t.usable()) == [A.ip]


def test_table_address_on_unknown_link_waits_for_it() -> None:
    t = table_with(addr(7, "192.0.2.1/24"))
    assert t.usable() == {}
    t.apply(link(7, UP))
    assert list(t.usable()) == [A.ip]


def test_table_same_ip_on_two_links() -> None:
    t = table_with(link(3, UP), addr(ETH, "192.0.2.1/24"), addr(3, "192.0.2.1/24"))
    t.apply(addr(ETH, "192.0.2.1/24", event="RTM_DELADDR"))
    assert list(t.usable()) == [A.ip]


def test_table_odd_messages() -> None:
    t = table_with()
    assert not t.apply({"event": "RTM_NEWROUTE"})
    assert not t.apply({})
    with pytest.raises(ValueError):
        t.apply({"event": "RTM_NEWADDR", "index": ETH, "prefixlen": 24})
    with pytest.raises(ValueError):
        t.apply({"event": "RTM_NEWLINK", "index": "x", "flags": 0})


# == AddressMonitor without netlink: diffing and dispatch ==============================


def test_monitor_sync_pairs_and_survives_callbacks() -> None:
    seen: list[tuple[str, ...]] = []

    def boom(iface: IPInterface) -> None:
        raise RuntimeError("callback bug")

    mon = AddressMonitor(
        on_added=boom,
        on_removed=lambda i: seen.append(("removed", str(i))),
        on_handoff=lambda o, n: seen.append(("handoff", str(o), str(n))),
    )
    d = HandoffDetector(W, present=[A])
    # Found at start-up: A gone, B and C there. Removals are fed first, so A pairs.
    after = mon._sync(d, {A.ip: A}, {B.ip: B, C.ip: C}, 0.0)
    assert after == {B.ip: B, C.ip: C}
    assert seen == [("handoff", str(A), str(B))]  # Added(C) went to boom, logged
    mon._sync(d, after, {}, 0.0)
    mon._sync(d, {}, {}, W)
    assert sorted(seen[1:]) == [("removed", str(B)), ("removed", str(C))]


# == the real thing: a monitor in a namespace ==========================================

MONITOR_SCRIPT = r"""
import asyncio, json, sys
from dime.monitor import AddressMonitor

window = float(sys.argv[1])

def emit(*fields):
    print(json.dumps([str(f) for f in fields]), flush=True)

async def main():
    mon = AddressMonitor(
        lambda i: emit("added", i),
        lambda i: emit("removed", i),
        lambda old, new: emit("handoff", old, new),
        handoff_window=window,
    )
    known = await mon.current()
    emit("current", *known)
    await mon.run(known=known)

asyncio.run(main())
"""

CATCH_UP_SCRIPT = r"""
import asyncio, json, subprocess, sys
from dime.monitor import AddressMonitor

def emit(*fields):
    print(json.dumps([str(f) for f in fields]), flush=True)

async def main():
    mon = AddressMonitor(
        lambda i: emit("added", i),
        lambda i: emit("removed", i),
        lambda old, new: emit("handoff", old, new),
        handoff_window=float(sys.argv[1]),
    )
    known = await mon.current()
    emit("current", *known)
    # Changes while nobody listens.
    subprocess.run(["ip", "addr", "del", "10.0.0.1/24", "dev", "eth0"], check=True)
    subprocess.run(["ip", "addr", "add", "10.7.0.1/24", "dev", "eth0"], check=True)
    subprocess.run(["ip", "addr", "add", "2001:db8:7::1/64", "dev", "eth0", "nodad"], check=True)
    await mon.run(known=known)

asyncio.run(main())
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")

MW = 1.0  # the monitor's window: wide enough for two `ip` commands on a loaded host
GHOST = "192.0.2.99"  # an address this host left, kept on lo for its flows


class MonitorProcess:
    """The monitor in a namespace; its events, read with a timeout."""

    def __init__(self, ns: Namespace, script: str = MONITOR_SCRIPT) -> None:
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
        self.proc = ns.popen(
            sys.executable,
            "-c",
            script,
            str(MW),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.decode())

    def next(self, timeout: float = 10.0) -> list[str]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no event within {timeout}s; monitor alive: {self.proc.poll() is None}")
        event: list[str] = json.loads(line)
        return event

    def next_n(self, n: int) -> set[tuple[str, ...]]:
        return {tuple(self.next()) for _ in range(n)}

    def stop(self) -> str:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        return err.decode(errors="replace")


@pytest.fixture
def host() -> Iterator[tuple[Topology, Namespace]]:
    """Namespace "h" with eth0 and eth1, veths to namespace "p"."""
    with topology("mon") as topo:
        h, p = topo.add_ns("h"), topo.add_ns("p")
        topo.link(h, "eth0", p, "eth0")
        topo.link(h, "eth1", p, "eth1")
        yield topo, h


@pytest.mark.netns
@needs_root
@pytest.mark.timeout(120)
def test_monitor_in_namespace(host: tuple[Topology, Namespace]) -> None:
    _, h = host
    h.addr_add("eth0", "10.0.0.1/24")
    h.addr_add("eth0", "2001:db8:ff::1/64")
    h.addr_add("lo", "192.0.2.98/32")
    mon = MonitorProcess(h)
    try:
        # Loopback, lo and link-local addresses are not locators.
        assert mon.next() == ["current", "10.0.0.1/24", "2001:db8:ff::1/64"]

        h.addr_add("eth0", "10.1.0.1/24")
        assert mon.next() == ["added", "10.1.0.1/24"]

        # Hard handoff: one shell, so both changes land well within the window.
        h.sh("ip addr del 10.1.0.1/24 dev eth0 && ip addr add 10.2.0.1/24 dev eth1")
        assert mon.next() == ["handoff", "10.1.0.1/24", "10.2.0.1/24"]

        # The IPv4 addition does not complete the IPv6 removal; the IPv6 one does.
        h.sh(
            "ip addr del 2001:db8:ff::1/64 dev eth0"
            " && ip addr add 10.3.0.1/24 dev eth1"
            " && ip addr add 2001:db8:2::1/64 dev eth1 nodad"
        )
        assert mon.next() == ["added", "10.3.0.1/24"]
        assert mon.next() == ["handoff", "2001:db8:ff::1/64", "2001:db8:2::1/64"]

        # A ghost on lo is no locator: nothing, then a sentinel comes next. The same
        # address back on a real link (the host came back to a network it had
        # left) is one again.
        h.addr_add("lo", f"{GHOST}/32")
        h.addr_add("eth1", "203.0.113.1/24")
        assert mon.next() == ["added", "203.0.113.1/24"]
        h.addr_add("eth0", f"{GHOST}/24")
        assert mon.next() == ["added", f"{GHOST}/24"]

        # A flap, then (sentinel) an IPv6 address still in DAD and an IPv4 one: the
        # flap says nothing, the IPv6 address comes when DAD is over.
        h.sh("ip addr del 203.0.113.1/24 dev eth1 && ip addr add 203.0.113.1/24 dev eth1")
        h.run("sysctl", "-qw", "net.ipv6.conf.eth1.accept_dad=1")
        h.ip("addr", "add", "2001:db8:3::1/64", "dev", "eth1")  # DAD: about 1 s
        assert "2001:db8:3::1" in h.ip("-6", "addr", "show", "dev", "eth1", "tentative")
        h.addr_add("eth0", "10.4.0.1/24")
        assert mon.next() == ["added", "10.4.0.1/24"]
        assert mon.next() == ["added", "2001:db8:3::1/64"]
        assert "tentative" not in h.ip("-6", "addr", "show", "dev", "eth1")

        # A removal with nothing after it: reported when the window expires. A late
        # Removed of the flapped address would have come first (its window was older).
        start = time.monotonic()
        h.ip("addr", "del", "10.4.0.1/24", "dev", "eth0")
        assert mon.next() == ["removed", "10.4.0.1/24"]
        assert time.monotonic() - start >= MW * 0.9

        # The ghost on lo goes away: nothing; then a sentinel.
        h.ip("addr", "del", f"{GHOST}/32", "dev", "lo")
        h.addr_add("eth0", "10.5.0.1/24")
        assert mon.next() == ["added", "10.5.0.1/24"]
    finally:
        err = mon.stop()
    assert "Traceback" not in err, err


@pytest.mark.netns
@needs_root
@pytest.mark.timeout(120)
def test_monitor_link_down_and_up(host: tuple[Topology, Namespace]) -> None:
    topo, h = host
    p = topo.namespaces["p"]
    h.addr_add("eth0", "10.0.0.1/24")
    h.addr_add("eth1", "10.1.0.1/24")
    h.addr_add("eth1", "2001:db8:1::1/64")
    mon = MonitorProcess(h)
    try:
        current = mon.next()
        assert current[0] == "current"
        assert set(current[1:]) == {"10.0.0.1/24", "10.1.0.1/24", "2001:db8:1::1/64"}

        # Carrier lost (the peer end went down): the kernel keeps the addresses, but
        # they are unusable, so they are removed after the window.
        p.ip("link", "set", "eth1", "down")
        assert mon.next_n(2) == {("removed", "10.1.0.1/24"), ("removed", "2001:db8:1::1/64")}
        p.ip("link", "set", "eth1", "up")
        assert mon.next_n(2) == {("added", "10.1.0.1/24"), ("added", "2001:db8:1::1/64")}

        # Our end down: the kernel drops the IPv6 address, keeps the IPv4 one. A quick
        # down/up is a flap for IPv4; the IPv6 address is gone for good.
        h.sh("ip link set eth1 down && ip link set eth1 up")
        assert mon.next() == ["removed", "2001:db8:1::1/64"]
        h.addr_add("eth0", "10.9.0.1/24")
        assert mon.next() == ["added", "10.9.0.1/24"]
    finally:
        err = mon.stop()
    assert "Traceback" not in err, err


@pytest.mark.netns
@needs_root
@pytest.mark.timeout(60)
def test_monitor_reports_changes_since_current(host: tuple[Topology, Namespace]) -> None:
    """``run(known=...)`` reports what changed between current() and subscribing."""
    _, h = host
    h.addr_add("eth0", "10.0.0.1/24")
    mon = MonitorProcess(h, CATCH_UP_SCRIPT)
    try:
        assert mon.next() == ["current", "10.0.0.1/24"]
        assert mon.next_n(2) == {
            ("handoff", "10.0.0.1/24", "10.7.0.1/24"),
            ("added", "2001:db8:7::1/64"),
        }
    finally:
        err = mon.stop()
    assert "Traceback" not in err, err


# == AddressMonitor.run with a fake netlink socket: resync, bad messages, shutdown =====


class FakeIPRoute:
    """Stands in for stacktrans.rtnl.AsyncRtnl: dumps from ``dump``, broadcasts on demand."""

    dump: ClassVar[list[dict[str, object]]] = []
    sockets: ClassVar[list[FakeIPRoute]] = []

    def __init__(self) -> None:
        self.closed = False
        self.groups = 0
        self.feed: asyncio.Queue[list[dict[str, object]] | Exception] = asyncio.Queue()
        FakeIPRoute.sockets.append(self)

    async def bind(self, groups: int = 0) -> None:
        self.groups = groups

    async def get(self) -> AsyncIterator[dict[str, object]]:
        item = await self.feed.get()
        if isinstance(item, Exception):
            raise item
        for msg in item:
            yield msg

    async def _dump(self, event: str) -> AsyncIterator[dict[str, object]]:
        for msg in list(FakeIPRoute.dump):
            if msg["event"] == event:
                yield msg

    async def link(self, command: str) -> AsyncIterator[dict[str, object]]:
        return self._dump("RTM_NEWLINK")

    async def addr(self, command: str) -> AsyncIterator[dict[str, object]]:
        return self._dump("RTM_NEWADDR")

    def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> FakeIPRoute:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def test_monitor_run_with_fake_netlink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dime.monitor.AsyncRtnl", FakeIPRoute)
    FakeIPRoute.sockets = []
    FakeIPRoute.dump = [link(LO, UP | IFF_LOOPBACK), link(ETH, UP), addr(ETH, str(A))]

    async def scenario() -> None:
        events: asyncio.Queue[tuple[str, ...]] = asyncio.Queue()
        mon = AddressMonitor(
            lambda i: events.put_nowait(("added", str(i))),
            lambda i: events.put_nowait(("removed", str(i))),
            lambda o, n: events.put_nowait(("handoff", str(o), str(n))),
            handoff_window=0.05,
        )
        assert await mon.current() == [A]
        task = asyncio.create_task(mon.run())
        while not [s for s in FakeIPRoute.sockets if s.groups]:
            await asyncio.sleep(0.001)
        sock = next(s for s in FakeIPRoute.sockets if s.groups)

        async def next_event() -> tuple[str, ...]:
            return await asyncio.wait_for(events.get(), 5)

        sock.feed.put_nowait([addr(ETH, str(B))])
        assert await next_event() == ("added", str(B))

        # Garbage, then messages lost (ENOBUFS): a new dump finds A and B gone, C there.
        sock.feed.put_nowait([{"event": "RTM_NEWADDR", "index": ETH}, {"event": "RTM_NEWRULE"}])
        FakeIPRoute.dump = [link(LO, UP | IFF_LOOPBACK), link(ETH, UP), addr(ETH, str(C))]
        sock.feed.put_nowait(OSError(errno.ENOBUFS, "No buffer space available"))
        assert await next_event() == ("handoff", str(A), str(C))
        assert await next_event() == ("removed", str(B))

        # An IPv6 address still in DAD, then valid.
        sock.feed.put_nowait([addr(ETH, str(A6), flags=IFA_F_TENTATIVE)])
        sock.feed.put_nowait([addr(ETH, str(A6))])
        assert await next_event() == ("added", str(A6))

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sock.closed
        assert events.empty()

        # The socket dying is not hidden: run() raises.
        task = asyncio.create_task(mon.run())
        while not [s for s in FakeIPRoute.sockets if s.groups and not s.closed]:
            await asyncio.sleep(0.001)
        sock = next(s for s in FakeIPRoute.sockets if s.groups and not s.closed)
        sock.feed.put_nowait(OSError(errno.ECONNRESET, "gone"))
        with pytest.raises(OSError):
            await asyncio.wait_for(task, 5)
        assert sock.closed

    asyncio.run(scenario())


def test_soft_immediate_reports_the_end_of_a_soft_handoff_at_once() -> None:
    d = HandoffDetector(W, present=[A], soft_immediate=True)
    d.added(B, 0.0)
    assert d.poll(0.0) == [Added(B)]
    d.removed(A, 1.0)  # B is still there: nothing to wait for
    assert d.poll(1.0) == [Removed(A)]
    d.removed(B, 2.0)  # the last IPv4 address: wait for a replacement
    d.added(C, 2.1)
    assert d.poll(2.1) == [Handoff(B, C)]


def test_main_table_route_changes_call_on_routes_once_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Route messages of the main table (not dime's own copies, not the local table)
    call ``on_routes``; routes are subscribed to only when someone listens."""
    monkeypatch.setattr("dime.monitor.AsyncRtnl", FakeIPRoute)
    FakeIPRoute.sockets = []
    FakeIPRoute.dump = [link(LO, UP | IFF_LOOPBACK), link(ETH, UP), addr(ETH, str(A))]
    default = {"event": "RTM_NEWROUTE", "family": 2, "table": 254, "type": 1, "proto": 3}

    async def scenario() -> None:
        calls: asyncio.Queue[str] = asyncio.Queue()
        mon = AddressMonitor(
            lambda i: None,
            lambda i: None,
            lambda o, n: None,
            on_routes=lambda: calls.put_nowait("routes"),
        )
        task = asyncio.create_task(mon.run())
        while not [s for s in FakeIPRoute.sockets if s.groups]:
            await asyncio.sleep(0.001)
        sock = next(s for s in FakeIPRoute.sockets if s.groups)
        assert sock.groups & (RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        sock.feed.put_nowait([default | {"proto": 0xD1}, default | {"table": 255}])
        sock.feed.put_nowait([default])
        assert await asyncio.wait_for(calls.get(), 5) == "routes"
        sock.feed.put_nowait([default | {"event": "RTM_DELROUTE"}])
        assert await asyncio.wait_for(calls.get(), 5) == "routes"
        await asyncio.sleep(0.01)
        assert calls.empty()  # the two that were not main's called nothing
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        plain = AddressMonitor(lambda i: None, lambda i: None, lambda o, n: None)
        FakeIPRoute.sockets = []
        task = asyncio.create_task(plain.run())
        while not [s for s in FakeIPRoute.sockets if s.groups]:
            await asyncio.sleep(0.001)
        sock = next(s for s in FakeIPRoute.sockets if s.groups)
        assert not sock.groups & (RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
