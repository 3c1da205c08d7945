"""Policy routing for a multihomed host: each local address leaves through its own link.

With two default routes Linux picks the one of lowest metric whatever the source
address, so a packet that dime rewrote to leave from address A (the nft output
chain is ``type route``: the kernel routes it again) would leave through another
link than A's. And a policy that sends a new, unbound socket's traffic "via" A needs
the kernel's route lookup to give that socket A as its source.

So each local address A gets a routing table of its own, ``table_base + slot``,
with copies of the main table's default routes and on-link prefix route through
A's interface, each with ``src A``; and the rules (``ip rule``)::

    priority_base       from A lookup T_A        (one per address)
    priority_base + 1.. [ipproto P] [to NET] [dport N] [sport N] lookup T_V
                                                 (one per selector and "via" V)
    32766               lookup main              (the kernel's)

The ``from`` rules come first: a packet whose source is already A (a bound or
connected socket, a rewritten packet) must leave through A's link, whatever a
selector says. A new unbound socket's lookup has no source yet, so it skips them
and hits the first matching selector; that table's routes carry ``src A``, so the
socket takes A. A table without a route to the destination (its link went down and
the kernel flushed its routes) does not stop the lookup: the next rule decides (the
next "via" address, then main).

Rules and routes carry protocol 209 (``proto 209`` in ``ip rule`` and ``ip
route``), so what a crashed run left behind can be found. The module is
synchronous; each call makes a few netlink requests, answered at once.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from typing import Any, TypeVar

from ihmp.addr import IPAddress, IPNetwork, addr_key
from stacktrans.rtnl import RT_TABLE_MAIN, RTN_UNICAST, Rtnl

__all__ = ["LinkRoutes", "LocalAddress", "Route", "Rule", "Selector"]

log = logging.getLogger("dime.link_routes")

PROTO = 0xD1  # marks dime's routes and rules ("proto 209"), as the ghosts' routes
TABLE_BASE = 0x4D10  # 19728: the table of slot 0
PRIORITY_BASE = 0x4D10  # the "from" rules; selectors follow, below main's 32766
MAIN_PRIORITY = 32766

T = TypeVar("T")


@dataclass(frozen=True)
class LocalLink:
    """The link a local address is on: its name, its index, the address's prefix."""

    name: str
    index: int
    prefixlen: int


@dataclass(frozen=True)
class LocalAddress:
    """An address of this host, on the link of index ``ifindex``."""

    address: IPAddress
    prefixlen: int
    ifindex: int

    @property
    def network(self) -> IPNetwork:
        return ip_network((self.address, self.prefixlen), strict=False)


@dataclass(frozen=True)
class Selector:
    """Traffic a policy sends via some of this host's addresses, tried in order.
    None matches anything; ports are the remote (``remote_port``, the destination
    port of outbound packets) and the local one."""

    proto: int | None = None
    remote: IPNetwork | None = None
    remote_port: int | None = None
    local_port: int | None = None
    via: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class Route:
    """One route in one of our tables, as the kernel dumps it back (so what we added
    can be compared with what is there)."""

    dst: str  # "0.0.0.0" or "::" for a default route
    dst_len: int
    table: int
    oif: int
    gateway: str | None
    prefsrc: str
    metric: int
    scope: int


@dataclass(frozen=True)
class Rule:
    """One rule ``priority: [from SRC] [to DST] [ipproto] [sport] [dport] lookup table``."""

    family: int
    priority: int
    table: int
    src: tuple[str, int] | None = None
    dst: tuple[str, int] | None = None
    ip_proto: int | None = None
    sport: int | None = None
    dport: int | None = None


def assign_slots(old: dict[IPAddress, int], addresses: Iterable[IPAddress]) -> dict[IPAddress, int]:
    """A slot for each address: the one it had, else the lowest free one. Slots are
    stable while an address stays, and reused after it left."""
    present = set(addresses)
    slots = {a: s for a, s in old.items() if a in present}
    used = set(slots.values())
    free = (s for s in range(len(present) + 1) if s not in used)
    for a in sorted(present - slots.keys(), key=addr_key):
        slots[a] = next(free)
    return slots


def routes_wanted(
    addresses: Iterable[LocalAddress], tables: dict[IPAddress, int], main: Iterable[dict[str, Any]]
) -> set[Route]:
    """For each address, the main table's routes through its link that it needs in
    its table: default routes via a gateway, and the prefix route of its network.
    ``main``: route dumps as :meth:`Rtnl.routes` gives them (other tables skipped)."""
    out: set[Route] = set()
    mains = [r for r in main if r.get("table") == RT_TABLE_MAIN and r.get("type") == RTN_UNICAST]
    for local in addresses:
        for r in mains:
            if r.get("RTA_OIF") == local.ifindex and _copied(r, local):
                out.add(_copy(r, local, tables[local.address]))
    return out


def _copied(route: dict[str, Any], local: LocalAddress) -> bool:
    if route["family"] != (socket.AF_INET if local.address.version == 4 else socket.AF_INET6):
        return False
    if route["dst_len"] == 0:
        return "RTA_GATEWAY" in route
    net = local.network
    return (
        "RTA_GATEWAY" not in route
        and route["dst_len"] == net.prefixlen
        and route.get("RTA_DST") == str(net.network_address)
    )


def _copy(route: dict[str, Any], local: LocalAddress, table: int) -> Route:
    return Route(
        dst=route.get("RTA_DST", _any(local.address)),
        dst_len=route["dst_len"],
        table=table,
        oif=local.ifindex,
        gateway=route.get("RTA_GATEWAY"),
        prefsrc=str(local.address),
        metric=route.get("RTA_PRIORITY", 0),
        scope=route["scope"],
    )


def rules_wanted(
    tables: dict[IPAddress, int], selectors: Sequence[Selector], priority_base: int
) -> set[Rule]:
    """The ``from`` rule of each address (priority ``priority_base``), then one rule
    per selector and "via" address that has a table, in order, at contiguous
    priorities from ``priority_base + 1`` (one count for both families: each rule
    has a priority of its own, in the policy's order). Rules that would reach main's priority
    are dropped (and logged)."""
    out = {
        Rule(_family(a), priority_base, t, src=(str(a), a.max_prefixlen)) for a, t in tables.items()
    }
    priority = priority_base + 1
    for sel in selectors:
        for via in sel.via:
            if via not in tables or (sel.remote and sel.remote.version != via.version):
                continue
            if priority >= MAIN_PRIORITY:
                log.warning("too many selector rules: %s via %s left out", sel, via)
                continue
            out.add(_selector_rule(sel, via, tables[via], priority))
            priority += 1
    return out


def _selector_rule(sel: Selector, via: IPAddress, table: int, priority: int) -> Rule:
    dst = (str(sel.remote.network_address), sel.remote.prefixlen) if sel.remote else None
    return Rule(
        _family(via),
        priority,
        table,
        dst=dst,
        ip_proto=sel.proto,
        sport=sel.local_port,
        dport=sel.remote_port,
    )


def route_of(msg: dict[str, Any]) -> Route | None:
    """A dumped route as a :class:`Route` (None if it has no output link or source)."""
    if "RTA_OIF" not in msg or "RTA_PREFSRC" not in msg:
        return None
    unspecified = "0.0.0.0" if msg["family"] == socket.AF_INET else "::"
    return Route(
        dst=msg.get("RTA_DST", unspecified),
        dst_len=msg["dst_len"],
        table=msg["table"],
        oif=msg["RTA_OIF"],
        gateway=msg.get("RTA_GATEWAY"),
        prefsrc=msg["RTA_PREFSRC"],
        metric=msg.get("RTA_PRIORITY", 0),
        scope=msg["scope"],
    )


def preferred_sources(
    dsts: Iterable[IPAddress], open_rtnl: Callable[[], Rtnl] = Rtnl
) -> dict[IPAddress, IPAddress]:
    """The source address the kernel's routing picks towards each of ``dsts`` (what a
    new unbound socket would use: ``ip route get DST``'s ``src``). A destination
    without a route, or whose route names no source, is left out."""
    out: dict[IPAddress, IPAddress] = {}
    with open_rtnl() as ipr:
        for dst in dsts:
            try:
                src = ipr.route_get(str(dst)).get("RTA_PREFSRC")
            except OSError:  # unreachable now: no preference
                continue
            if src is not None:
                out[dst] = ip_address(src)
    return out


def is_routing_change(msg: dict[str, Any]) -> bool:
    """Whether a route message (:mod:`stacktrans.rtnl`'s decoding) may change where
    the main table sends a peer's packets from: a unicast route of the main table
    that is not one of ours (ours are copies in tables of their own)."""
    return (
        msg.get("event") in ("RTM_NEWROUTE", "RTM_DELROUTE")
        and msg.get("table") == RT_TABLE_MAIN
        and msg.get("type") == RTN_UNICAST
        and msg.get("proto") != PROTO
    )


def clear_leftovers(open_rtnl: Callable[[], Rtnl] = Rtnl) -> int:
    """Remove the rules and routes a run that did not stop cleanly left (marked
    :data:`PROTO`, in our tables and at our priorities). Returns how many."""
    ours = range(TABLE_BASE, TABLE_BASE + 0x10000)
    removed = 0
    with open_rtnl() as ipr:
        for msg in _dump(ipr.rules, socket.AF_UNSPEC):
            rule = rule_of(msg)
            if rule.table in ours and PRIORITY_BASE <= rule.priority < MAIN_PRIORITY:
                removed += _apply(_rule, ipr, "del", rule)
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in _dump(ipr.routes, family):
                route = route_of(msg)
                if route is not None and route.table in ours and msg.get("proto") == PROTO:
                    removed += _apply(_route, ipr, "del", route)
    return removed


def rule_of(msg: dict[str, Any]) -> Rule:
    """A dumped rule as a :class:`Rule`."""

    def prefix(key: str, length: str) -> tuple[str, int] | None:
        return (msg[key], msg[length]) if key in msg else None

    sport, dport = msg.get("FRA_SPORT_RANGE"), msg.get("FRA_DPORT_RANGE")
    return Rule(
        msg["family"],
        msg.get("FRA_PRIORITY", 0),
        msg["table"],
        src=prefix("FRA_SRC", "src_len"),
        dst=prefix("FRA_DST", "dst_len"),
        ip_proto=msg.get("FRA_IP_PROTO"),
        sport=sport[0] if sport else None,
        dport=dport[0] if dport else None,
    )


@dataclass
class LinkRoutes:
    """The per-address tables and the rules, kept as the addresses, the main table's
    routes and the selectors say. Every call applies only the difference between
    what is wanted and what we added (and the kernel still has); a refused netlink
    request is logged, and the rest goes on. Only what we added is ever removed."""

    table_base: int = TABLE_BASE
    priority_base: int = PRIORITY_BASE
    open_rtnl: Callable[[], Rtnl] = Rtnl
    _addresses: dict[IPAddress, LocalAddress] = field(default_factory=dict)
    _selectors: tuple[Selector, ...] = ()
    _slots: dict[IPAddress, int] = field(default_factory=dict)
    _routes: set[Route] = field(default_factory=set)  # added, as far as we know
    _rules: set[Rule] = field(default_factory=set)

    def table(self, address: IPAddress) -> int | None:
        """The table of ``address`` (None: not a known address)."""
        slot = self._slots.get(address)
        return None if slot is None else self.table_base + slot

    def update(self, addresses: Iterable[LocalAddress]) -> None:
        """The local addresses are now ``addresses`` (all of them); reads the main
        table again too, like :meth:`refresh`."""
        self._addresses = {a.address: a for a in addresses}
        self._slots = assign_slots(self._slots, self._addresses)
        self.refresh()

    def set_selectors(self, selectors: Sequence[Selector]) -> None:
        """The policy's selectors are now ``selectors``, first match first."""
        self._selectors = tuple(selectors)
        self.refresh()

    def refresh(self) -> None:
        """Read the main table's routes (a gateway may have come after its address,
        a link may have come back) and what is left of ours, then apply the
        difference."""
        with self.open_rtnl() as ipr:
            self._sync(ipr, *self._wanted(ipr))

    def close(self) -> None:
        """Remove every rule and route we added."""
        self._addresses, self._slots = {}, {}
        with self.open_rtnl() as ipr:
            self._forget_removed(ipr)
            self._sync(ipr, set(), set())
        self._routes.clear()  # what the kernel refused to delete is not retried
        self._rules.clear()

    def _wanted(self, ipr: Rtnl) -> tuple[set[Route], set[Rule]]:
        main = self._forget_removed(ipr)
        tables = {a: self.table_base + s for a, s in self._slots.items()}
        routes = routes_wanted(self._addresses.values(), tables, main)
        return routes, rules_wanted(tables, self._selectors, self.priority_base)

    def _forget_removed(self, ipr: Rtnl) -> list[dict[str, Any]]:
        """Forget what we added that is gone (the kernel flushes the routes through
        a link that goes down), so that it is added again; the routes dumped."""
        dumped = _dump(ipr.routes, socket.AF_INET) + _dump(ipr.routes, socket.AF_INET6)
        self._routes &= {r for r in map(route_of, dumped) if r is not None}
        self._rules &= {rule_of(m) for m in _dump(ipr.rules, socket.AF_UNSPEC)}
        return dumped

    def _sync(self, ipr: Rtnl, routes: set[Route], rules: set[Rule]) -> None:
        # Routes first out and in (a route whose gateway changed keeps its key: the
        # old one must go before the new one can be added); rules are added before
        # the stale ones go, so a lookup never misses both.
        for r in _ordered(self._routes - routes):
            if _apply(_route, ipr, "del", r):
                self._routes.discard(r)
        for r in _ordered(routes - self._routes):
            if _apply(_route, ipr, "add", r):
                self._routes.add(r)
        for u in sorted(rules - self._rules, key=_rule_key):
            if _apply(_rule, ipr, "add", u):
                self._rules.add(u)
        for u in sorted(self._rules - rules, key=_rule_key):
            if _apply(_rule, ipr, "del", u):
                self._rules.discard(u)


def _apply(do: Callable[[Rtnl, str, T], None], ipr: Rtnl, verb: str, item: T) -> bool:
    """Whether ``item`` is now added (``verb`` "add") or gone ("del"); a refusal
    is logged."""
    try:
        do(ipr, verb, item)
    except OSError as exc:
        log.warning("%s %s: %s", verb, item, exc)
        return verb == "del" and exc.errno in (errno.ENOENT, errno.ESRCH)
    return True


def _dump(read: Callable[[int], list[dict[str, Any]]], family: int) -> list[dict[str, Any]]:
    try:
        return read(family)
    except OSError as exc:  # e.g. IPv6 disabled
        log.warning("dump of family %d: %s", family, exc)
        return []


def _ordered(routes: set[Route]) -> list[Route]:
    # Prefix routes before default routes: a gateway must be reachable in the table
    # when its route is added (the kernel also looks elsewhere, but why rely on it).
    return sorted(routes, key=lambda r: (r.gateway is not None, r.table, r.dst, r.metric))


def _rule_key(rule: Rule) -> tuple[int, int, int]:
    return (rule.priority, rule.family, rule.table)


def _route(ipr: Rtnl, verb: str, r: Route) -> None:
    ipr.route(
        verb,
        r.dst,
        r.dst_len,
        PROTO,
        oif=r.oif,
        gateway=r.gateway,
        table=r.table,
        prefsrc=r.prefsrc,
        priority=r.metric,
        scope=r.scope,
    )


def _rule(ipr: Rtnl, verb: str, u: Rule) -> None:
    ipr.rule(
        verb,
        u.family,
        u.table,
        u.priority,
        src=u.src,
        dst=u.dst,
        ip_proto=u.ip_proto,
        sport=u.sport,
        dport=u.dport,
        protocol=PROTO,
    )


def _family(addr: IPAddress) -> int:
    return int(socket.AF_INET if addr.version == 4 else socket.AF_INET6)


def _any(addr: IPAddress) -> str:
    return "0.0.0.0" if addr.version == 4 else "::"
