"""The DIME paper's Fig. 7 testbed, in network namespaces.

A mobile host (MH) and a correspondent host (CH), each with two interfaces, joined
through a router namespace (R) that serves a separate subnet on each of the four
links, the paper's R1 and R2 (and two more for the CH, so that both hosts can
move). One interface of each host is in use at a time; a move takes the host's
address away with its link and brings up the other subnet, as a laptop changing
networks would. In the address plans ``V4`` and ``V6`` (the default), addresses are
documentation ranges only, public as far as IHMP can tell::

    CH =(c1 192.0.2.0/25 | c2 192.0.2.128/25)= R =(m1 198.51.100.0/24 | m2 203.0.113.0/24)= MH

``PRIVATE`` is a routed private network (a campus or a corporate one): each link in
a private block, the MH's two in other blocks than the CH's and than each other,
joined by R with no NAT. Between any two of them IHMP can tell only that a path is
potentially reachable (section III-B), and probes it::

    CH =(c1 10.0.0.0/24 | c2 10.0.1.0/24)= R =(m1 172.16.1.0/24 | m2 192.168.2.0/24)= MH

The paper's two routers and the switch joining them are one router namespace here:
R1's subnet (m1) and R2's (m2) are two of R's links, and R forwards between them
and the CH as the switch and the two routers would.

As a command, for trying dime by hand (``ip netns exec fig7-mh dime up`` ...)::

    python -m testbed.fig7 up [--ipv6]     # namespaces fig7-ch, fig7-r, fig7-mh
    python -m testbed.fig7 down            # removes them, whatever runs inside

``up`` removes what it built if building fails or is interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

from testbed.netns import Namespace, Topology, build_named, remove_named


@dataclass(frozen=True)
class Subnet:
    prefix: str
    router: str
    host: str
    plen: int

    def host_cidr(self) -> str:
        return f"{self.host}/{self.plen}"


@dataclass(frozen=True)
class Plan:
    family: int
    c1: Subnet
    c2: Subnet
    m1: Subnet
    m2: Subnet


V4 = Plan(
    4,
    Subnet("192.0.2.0/25", "192.0.2.126", "192.0.2.1", 25),
    Subnet("192.0.2.128/25", "192.0.2.254", "192.0.2.129", 25),
    Subnet("198.51.100.0/24", "198.51.100.254", "198.51.100.2", 24),
    Subnet("203.0.113.0/24", "203.0.113.254", "203.0.113.2", 24),
)
V6 = Plan(
    6,
    Subnet("2001:db8:c1::/64", "2001:db8:c1::fe", "2001:db8:c1::1", 64),
    Subnet("2001:db8:c2::/64", "2001:db8:c2::fe", "2001:db8:c2::1", 64),
    Subnet("2001:db8:1::/64", "2001:db8:1::fe", "2001:db8:1::2", 64),
    Subnet("2001:db8:2::/64", "2001:db8:2::fe", "2001:db8:2::2", 64),
)
# Routed private blocks, no NAT: the CH in 10/8, the MH moving from 172.16/12 to
# 192.168/16.
PRIVATE = Plan(
    4,
    Subnet("10.0.0.0/24", "10.0.0.254", "10.0.0.1", 24),
    Subnet("10.0.1.0/24", "10.0.1.254", "10.0.1.1", 24),
    Subnet("172.16.1.0/24", "172.16.1.254", "172.16.1.2", 24),
    Subnet("192.168.2.0/24", "192.168.2.254", "192.168.2.2", 24),
)


#: The IPv6 side of a dual-stack V4 testbed (Fig7.add_ipv6): the CH's and MH's first links.
DUAL = {
    "ch": Subnet("2001:db8:c1::/64", "2001:db8:c1::fe", "2001:db8:c1::1", 64),
    "mh": Subnet("2001:db8:1::/64", "2001:db8:1::fe", "2001:db8:1::2", 64),
}


@dataclass
class Fig7:
    topo: Topology
    plan: Plan
    ch: Namespace
    r: Namespace
    mh: Namespace
    events: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def build(cls, topo: Topology, plan: Plan = V4) -> Fig7:
        ch, r, mh = topo.add_ns("ch"), topo.add_ns("r"), topo.add_ns("mh")
        for host, names in ((ch, ("c1", "c2")), (mh, ("m1", "m2"))):
            for name in names:
                topo.link(host, name, r, f"r{name}")
        r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        r.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        for name in ("c1", "c2", "m1", "m2"):
            sub: Subnet = getattr(plan, name)
            r.addr_add(f"r{name}", f"{sub.router}/{sub.plen}")
        fig = cls(topo, plan, ch, r, mh)
        fig.attach(ch, "c1", plan.c1)
        fig.attach(mh, "m1", plan.m1)
        ch.ip("link", "set", "c2", "down")
        mh.ip("link", "set", "m2", "down")
        return fig

    def add_ipv6(self) -> dict[str, str]:
        """Make the CH's and the MH's first links dual-stack (an IPv4 plan): IPv6
        addresses on c1 and m1 and the router's sides, with default routes. Returns
        the hosts' IPv6 addresses by name ("ch", "mh")."""
        assert self.plan.family == 4
        for host, dev, v6 in ((self.ch, "c1", DUAL["ch"]), (self.mh, "m1", DUAL["mh"])):
            self.r.ip("-6", "addr", "add", f"{v6.router}/64", "dev", f"r{dev}", "nodad")
            host.ip("-6", "addr", "add", f"{v6.host}/64", "dev", dev, "nodad")
            host.ip("-6", "route", "replace", "default", "via", v6.router)
        return {name: sub.host for name, sub in DUAL.items()}

    def _ip(self, ns: Namespace, *args: str) -> None:
        ns.ip(*(("-6",) if self.plan.family == 6 else ()), *args)

    def attach(self, ns: Namespace, dev: str, sub: Subnet) -> None:
        """Bring ``dev`` up with the host's address on ``sub`` and a default route."""
        ns.ip("link", "set", dev, "up")
        ns.addr_add(dev, sub.host_cidr())
        self._ip(ns, "route", "replace", "default", "via", sub.router, "dev", dev)
        self.events.append((time.monotonic(), f"{ns.name}: {sub.host} up on {dev}"))

    def detach(self, ns: Namespace, dev: str, sub: Subnet) -> None:
        """The host leaves the link: its address goes, then the link."""
        ns.addr_del(dev, sub.host_cidr())
        ns.ip("link", "set", dev, "down")
        self.events.append((time.monotonic(), f"{ns.name}: {sub.host} down on {dev}"))

    # -- moves -------------------------------------------------------------------------

    def hard_handoff_mh(self, gap: float = 0.0) -> None:
        """MH: old address gone first, the new one ``gap`` seconds later."""
        self.detach(self.mh, "m1", self.plan.m1)
        if gap:
            time.sleep(gap)
        self.attach(self.mh, "m2", self.plan.m2)

    def soft_handoff_mh(self, overlap: float = 0.0) -> None:
        """MH: the new address first, the old one gone ``overlap`` seconds later."""
        self.attach(self.mh, "m2", self.plan.m2)
        if overlap:
            time.sleep(overlap)
        self.detach(self.mh, "m1", self.plan.m1)

    def hard_handoff_ch(self, gap: float = 0.0) -> None:
        self.detach(self.ch, "c1", self.plan.c1)
        if gap:
            time.sleep(gap)
        self.attach(self.ch, "c2", self.plan.c2)


Move = tuple[str, Subnet, str, Subnet]  # (from dev, from subnet, to dev, to subnet)


def moves(plan: Plan, count: int) -> list[Move]:
    """``count`` hard handoffs of the MH back and forth between m1 and m2, each to a
    fresh IPv4 address (so that no peer can mistake a move for a return)."""
    out = []
    cur_dev, cur = "m1", plan.m1
    for j in range(count):
        to_dev = "m2" if cur_dev == "m1" else "m1"
        base: Subnet = getattr(plan, to_dev)
        host = base.host.rsplit(".", 1)
        to = dataclasses.replace(base, host=f"{host[0]}.{int(host[1]) + 1 + j // 2}")
        out.append((cur_dev, cur, to_dev, to))
        cur_dev, cur = to_dev, to
    return out


# -- as a command ------------------------------------------------------------------------

NAME_PREFIX = "fig7"
SHORT_NAMES = ("ch", "r", "mh")


def up(plan: Plan) -> Fig7:
    """Build the testbed with fixed names; on any failure (or Ctrl-C), remove it."""
    return build_named(NAME_PREFIX, lambda topo: Fig7.build(topo, plan))


def down() -> list[str]:
    """Remove the namespaces ``up`` made (killing what runs in them); their names."""
    return remove_named(NAME_PREFIX, SHORT_NAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m testbed.fig7", description="Build or remove the Fig. 7 testbed."
    )
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--ipv6", action="store_true", help="IPv6 addresses instead of IPv4")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("must run as root (it creates network namespaces)")
    if a.action == "down":
        gone = down()
        print(f"removed {', '.join(gone)}" if gone else "nothing to remove")
        return 0
    if down():
        print("removed an earlier fig7 testbed first", file=sys.stderr)
    fig = up(V6 if a.ipv6 else V4)
    pl = fig.plan
    print(
        f"fig7 up: CH {pl.c1.host} ({fig.ch.name}), router {fig.r.name}, "
        f"MH {pl.m1.host} on m1 ({fig.mh.name}); m2 ({pl.m2.host}) and c2 are down.\n"
        f"Try: ip netns exec {fig.mh.name} dime up   (and the same in {fig.ch.name})\n"
        f"Move the MH: ip -n {fig.mh.name} addr del {pl.m1.host_cidr()} dev m1; "
        f"ip -n {fig.mh.name} link set m2 up; "
        f"ip -n {fig.mh.name} addr add {pl.m2.host_cidr()} dev m2; "
        f"ip -n {fig.mh.name} route replace default via {pl.m2.router}\n"
        "Remove: python -m testbed.fig7 down"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
