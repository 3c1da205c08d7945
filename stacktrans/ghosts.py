"""Ghost addresses and identifier routes: identifiers stay usable after they left.

When this host loses an address that live sockets are bound to, the address goes
back on ``lo`` as a /32 (or /128): a *ghost*. The sockets stay valid, inbound packets
restored to that identifier are delivered locally, and outbound ones leave with it
as source until the data plane rewrites it to the current locator. (There is no
``dummy`` interface on every kernel; ``lo`` always exists.)

A socket's route lookup happens before any rewrite, so every remote identifier that
is being rewritten must stay routable: if the kernel has no route to it any more,
a host route is added along the path of its current locator.

Both are removed when the last flow using them ends, and on shutdown. Everything we
add is recorded, so a later run (``dime down`` after a crash) can remove it.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from typing import Any

from ihmp.addr import IPAddress
from stacktrans.rtnl import RT_SCOPE_LINK, RT_SCOPE_UNIVERSE, RT_TABLE_MAIN, Rtnl

log = logging.getLogger("dime.ghosts")

ROUTE_PROTO = 0xD1  # marks routes that dime added ("proto 209")
#: Routes to identifiers of flows carried across IP versions live in a table of their
#: own, looked up after ``main`` (rule priority 32800, past main's 32766 and default's
#: 32767): they serve only while the identifier's version has no route at all, and
#: never stand in the way of one that comes back (the address event that says so).
CROSS_TABLE = 0xD1E9
CROSS_PRIORITY = 32800
SCOPE_ANY = 255  # RT_SCOPE_NOWHERE: a route delete that matches any scope


def _plen(addr: IPAddress) -> int:
    return 32 if addr.version == 4 else 128


@dataclass
class Ghosts:
    """Ghost addresses and identifier routes, reconciled against what is needed."""

    addresses: set[IPAddress] = field(default_factory=set)
    # identifier -> the locator whose path the route follows (None: a predecessor's)
    routes: dict[IPAddress, IPAddress | None] = field(default_factory=dict)
    # of those, the routes in CROSS_TABLE (a locator of the other IP version)
    cross: set[IPAddress] = field(default_factory=set)
    on_record: Callable[[], None] = lambda: None  # persist state after each change

    async def reconcile(
        self, want_ghosts: set[IPAddress], want_routes: dict[IPAddress, IPAddress]
    ) -> None:
        """Make ghosts and routes exactly what is wanted. Errors are logged, not raised."""
        with Rtnl() as ipr:
            lo = socket.if_nametoindex("lo")
            for addr in sorted(want_ghosts - self.addresses, key=str):
                await self._ghost(ipr, "add", lo, addr)
            for addr in sorted(self.addresses - want_ghosts, key=str):
                await self._ghost(ipr, "del", lo, addr)
            for rid in [r for r in self.routes if not _same(self.routes[r], want_routes.get(r))]:
                await self._route_del(ipr, rid)
            for rid in self.routes:
                self.routes[rid] = want_routes[rid]  # a predecessor's route is kept
            for rid, loc in want_routes.items():
                if rid not in self.routes:
                    await self._route_add(ipr, rid, loc)
        self.on_record()

    async def link_senders(self, ghosts: set[IPAddress]) -> dict[int, IPv4Address]:
        """ifindex -> an IPv4 address of that link (not ``lo``, not a ghost): what an
        ARP packet that would name a ghost as its sender names instead."""
        with Rtnl() as ipr:
            return _link_addresses(ipr, socket.if_nametoindex("lo"), ghosts)

    async def clear(self) -> None:
        await self.reconcile(set(), {})

    async def _ghost(self, ipr: Rtnl, verb: str, lo: int, addr: IPAddress) -> None:
        try:
            ipr.addr(verb, index=lo, address=str(addr), prefixlen=_plen(addr))
        except Exception as exc:  # netlink errors are reported, not fatal
            if verb == "add" and "exists" not in str(exc):
                log.warning("cannot keep %s on lo: %s", addr, exc)
                return
        if verb == "add":
            self.addresses.add(addr)
            log.info("ghost address %s kept on lo for its live flows", addr)
        else:
            self.addresses.discard(addr)
            log.info("ghost address %s removed from lo", addr)

    async def _route_add(self, ipr: Rtnl, rid: IPAddress, loc: IPAddress) -> None:
        across = loc.version != rid.version
        if not across and _routable(ipr, rid):
            return
        try:
            via = ipr.route_get(str(loc))
        except Exception as exc:
            log.warning("no route to locator %s: %s", loc, exc)
            return
        # A locator of the other IP version (a flow carried across): its link, no
        # gateway; the packets only need to reach the hook that queues them.
        gateway = via.get("RTA_GATEWAY") if not across else None
        try:
            if across:
                self._cross_rule(ipr, "add", rid.version)
            ipr.route(
                "add",
                str(rid),
                _plen(rid),
                ROUTE_PROTO,
                oif=via.get("RTA_OIF"),
                gateway=gateway,
                table=CROSS_TABLE if across else RT_TABLE_MAIN,
                scope=RT_SCOPE_UNIVERSE if gateway is not None else RT_SCOPE_LINK,
            )
            if across:
                self.cross.add(rid)
        except Exception as exc:
            log.warning("cannot add a route to identifier %s: %s", rid, exc)
            return
        self.routes[rid] = loc
        log.info("route to identifier %s added along locator %s", rid, loc)

    async def _route_del(self, ipr: Rtnl, rid: IPAddress) -> None:
        table = CROSS_TABLE if rid in self.cross else RT_TABLE_MAIN
        try:
            # (any scope: RT_SCOPE_NOWHERE, as iproute2 deletes)
            ipr.route("del", str(rid), _plen(rid), ROUTE_PROTO, table=table, scope=SCOPE_ANY)
        except Exception as exc:
            log.debug("route to %s already gone: %s", rid, exc)
        self.routes.pop(rid, None)
        if rid in self.cross:
            self.cross.discard(rid)
            if not any(a.version == rid.version for a in self.cross):
                self._cross_rule(ipr, "del", rid.version)

    @staticmethod
    def _cross_rule(ipr: Rtnl, verb: str, version: int) -> None:
        """The rule that looks CROSS_TABLE up after main, for IP ``version``."""
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        try:
            ipr.rule(verb, family, CROSS_TABLE, CROSS_PRIORITY, protocol=ROUTE_PROTO)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOENT):
                raise

    def state(self) -> dict[str, Any]:
        return {
            "ghosts": sorted(map(str, self.addresses)),
            "routes": sorted(map(str, self.routes)),
            "cross": sorted(map(str, self.cross)),
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], on_record: Callable[[], None] = lambda: None
    ) -> Ghosts:
        """What :meth:`state` recorded, ours again (a predecessor's, or to remove)."""
        c = cls(on_record=on_record)
        c.addresses = {ip_address(a) for a in state.get("ghosts", [])}
        c.routes = {ip_address(a): None for a in state.get("routes", [])}
        c.cross = {ip_address(a) for a in state.get("cross", [])}
        return c


def _link_addresses(ipr: Rtnl, lo: int, ghosts: set[IPAddress]) -> dict[int, IPv4Address]:
    """ifindex -> the first IPv4 address of each link but ``lo`` (ghosts left out)."""
    out: dict[int, IPv4Address] = {}
    try:
        for msg in ipr.addresses(socket.AF_INET):
            index = msg["index"]
            raw = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if index == lo or index in out or raw is None:
                continue
            addr = IPv4Address(raw)
            if addr not in ghosts:
                out[index] = addr
    except Exception as exc:  # the ARP sender rewrite is a nicety, never fatal
        log.warning("cannot list link addresses: %s", exc)
    return out


def _same(have: IPAddress | None, want: IPAddress | None) -> bool:
    """Whether a route we have (along ``have``; None: unknown) is the one wanted."""
    return want is not None and (have is None or have == want)


def _routable(ipr: Rtnl, addr: IPAddress) -> bool:
    try:
        ipr.route_get(str(addr))
    except Exception:  # "network unreachable" is the answer, not a failure
        return False
    return True
