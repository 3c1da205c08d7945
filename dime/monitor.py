"""This host's addresses, watched through netlink and turned into IHMP address events.

Three layers, so that everything but the socket is testable without a kernel:

:class:`HandoffDetector`
    Pure timing logic with an injected clock: address additions and removals in,
    :class:`Added` / :class:`Removed` / :class:`Handoff` events out.
:class:`AddressTable`
    What rtnetlink said about links and addresses (RTM_NEWLINK/DELLINK,
    RTM_NEWADDR/DELADDR, as :mod:`stacktrans.rtnl` decodes them), and which addresses
    of it are usable locators right now.
:class:`AddressMonitor`
    The asyncio part: dumps and subscribes with :class:`stacktrans.rtnl.AsyncRtnl`, keeps an
    :class:`AddressTable`, feeds the differences to a :class:`HandoffDetector` and
    calls the daemon's callbacks.

Which addresses count (:meth:`AddressTable.usable`): not loopback, not on a loopback
link (``lo``), not IPv6 link-local, not multicast or unspecified, not IPv6 tentative
(DAD still running) or dadfailed; and, unless ``require_carrier=False``, on a link that
is up and has carrier (``IFF_UP`` and ``IFF_RUNNING``). The last rule is what makes
unplugging a cable or losing a Wi-Fi association a removal: the kernel keeps IPv4
addresses on a link that went down, but no packet can use them.

Addresses are identified by their IP alone: the same IP on two links is one locator,
and a change of prefix length alone is no event.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_interface
from typing import Final

from ihmp.addr import IPAddress, IPInterface
from stacktrans.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    AsyncRtnl,
)
from stacktrans.service import LocalLink, is_routing_change

__all__ = [
    "Added",
    "AddressEvent",
    "AddressMonitor",
    "AddressTable",
    "Handoff",
    "HandoffDetector",
    "Removed",
]

log = logging.getLogger(__name__)

NetlinkMessage = Mapping[str, object]

# <linux/if.h> and <linux/if_addr.h>
IFF_UP: Final = 0x1
IFF_LOOPBACK: Final = 0x8
IFF_RUNNING: Final = 0x40
IFA_F_DADFAILED: Final = 0x08
IFA_F_TENTATIVE: Final = 0x40

_GROUPS: Final = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_LINK
# Routes too: a new default route moves flows to its source (config follow_routes).
_ROUTE_GROUPS: Final = RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE


# == events and the pure detector ======================================================


@dataclass(frozen=True)
class Added:
    """An address appeared, with no removal of its family pending."""

    iface: IPInterface


@dataclass(frozen=True)
class Removed:
    """An address disappeared and nothing of its family replaced it within the window."""

    iface: IPInterface


@dataclass(frozen=True)
class Handoff:
    """``old`` disappeared and ``new``, of the same family, appeared within the window."""

    old: IPInterface
    new: IPInterface


AddressEvent = Added | Removed | Handoff


class HandoffDetector:
    """Turns address additions and removals, with their times, into address events.

    Contract (times are seconds of any monotonic clock, passed in by the caller):

    * :meth:`added` of an address with no removal of its family pending yields
      :class:`Added` at once;
    * with ``soft_immediate``, :meth:`removed` of an address while another of its
      family is present (a soft handoff ending) yields :class:`Removed` at once;
    * otherwise :meth:`removed` starts a window of ``window`` seconds. An addition of the same
      family strictly within it yields :class:`Handoff` ``(old, new)`` and nothing
      else; an addition of the very same IP (a flap) yields nothing at all; when the
      window expires with neither, :class:`Removed`. With several removals of a family
      pending, an addition pairs with the oldest. IPv4 and IPv6 never pair;
    * the detector keeps the set of present addresses: adding a present IP or removing
      an absent one is a no-op (netlink re-announces addresses on every flag or
      lifetime change);
    * events are queued and returned by :meth:`poll` in the order they happened,
      expiries included: every call first expires what is due at ``now``, so a caller
      that is late to poll still gets ``Removed(a)`` before a later ``Added(b)``.
      :meth:`deadline` says when to poll next.

    ``window`` 0 turns handoff detection off: every removal is reported as such.
    """

    def __init__(
        self,
        window: float,
        present: Iterable[IPInterface] = (),
        *,
        soft_immediate: bool = False,
    ) -> None:
        if window < 0:
            raise ValueError("window must be >= 0")
        self.window = window
        self.soft_immediate = soft_immediate
        self._present: dict[IPAddress, IPInterface] = {}
        for iface in present:
            self._present[iface.ip] = iface
        self._pending: list[tuple[IPInterface, float]] = []  # (removed, deadline), by time
        self._events: list[AddressEvent] = []

    @property
    def present(self) -> dict[IPAddress, IPInterface]:
        """The addresses considered present now (a copy)."""
        return dict(self._present)

    def added(self, iface: IPInterface, now: float) -> None:
        """``iface`` appeared at ``now``."""
        self._expire(now)
        ip = iface.ip
        if ip in self._present:
            return
        self._present[ip] = iface
        for i, (old, _) in enumerate(self._pending):
            if old.ip == ip:
                del self._pending[i]  # a flap: it is back, nobody needs to know
                return
        for i, (old, _) in enumerate(self._pending):
            if old.version == iface.version:
                del self._pending[i]
                self._events.append(Handoff(old, iface))
                return
        self._events.append(Added(iface))

    def removed(self, iface: IPInterface, now: float) -> None:
        """``iface`` disappeared at ``now``."""
        self._expire(now)
        old = self._present.pop(iface.ip, None)
        if old is None:
            return
        if self.soft_immediate and any(p.version == old.version for p in self._present.values()):
            # The end of a soft handoff: the host still has an address of this family,
            # so waiting for a replacement would only delay the ADDR_DOWN (and the
            # flows bound to the old address) by a whole window.
            self._events.append(Removed(old))
            return
        # Report the interface as it was announced, whatever the removal carries.
        self._pending.append((old, now + self.window))

    def poll(self, now: float) -> list[AddressEvent]:
        """Return, and forget, the events that happened up to ``now``."""
        self._expire(now)
        events, self._events = self._events, []
        return events

    def deadline(self) -> float | None:
        """When the next pending removal expires, or None if none is pending."""
        return min((d for _, d in self._pending), default=None)

    def _expire(self, now: float) -> None:
        keep = []
        for old, deadline in self._pending:
            if deadline <= now:
                self._events.append(Removed(old))
            else:
                keep.append((old, deadline))
        self._pending = keep


# == rtnetlink state ===================================================================


@dataclass(frozen=True)
class _Addr:
    index: int
    iface: IPInterface
    flags: int


def _eligible(ip: IPAddress, flags: int) -> bool:
    """Whether an address may be a locator, judging from itself alone."""
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified:
        return False
    if isinstance(ip, IPv6Address):
        # Link-local needs a scope; tentative/dadfailed cannot be used as a source.
        return not ip.is_link_local and not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
    return True


def _int(msg: NetlinkMessage, key: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int):
        raise ValueError(f"{key}: {value!r}")
    return value


class AddressTable:
    """Links and addresses as rtnetlink reports them, and the usable addresses.

    :meth:`apply` takes messages as :mod:`stacktrans.rtnl` decodes them (a mapping with ``event``,
    the header fields and the attributes by name); plain dicts shaped the same work,
    which is how the tests drive it. Other messages are ignored.
    """

    def __init__(self, require_carrier: bool = True) -> None:
        self.require_carrier = require_carrier
        self._links: dict[int, int] = {}  # ifindex -> IFF_* flags
        self._names: dict[int, str] = {}  # ifindex -> name
        self._addrs: dict[tuple[int, IPAddress], _Addr] = {}

    def apply(self, msg: NetlinkMessage) -> bool:
        """Update from one message. Returns False if it was not one we track.

        Raises ValueError (or KeyError/TypeError) for a malformed message of a kind we
        track; the caller logs it and goes on.
        """
        event = msg.get("event")
        if event == "RTM_NEWLINK":
            self._links[_int(msg, "index")] = _int(msg, "flags")
            name = msg.get("IFLA_IFNAME")
            if isinstance(name, str):
                self._names[_int(msg, "index")] = name
        elif event == "RTM_DELLINK":
            index = _int(msg, "index")
            self._links.pop(index, None)
            self._names.pop(index, None)
            # The kernel also sends RTM_DELADDR for them, but do not rely on it.
            for key in [k for k in self._addrs if k[0] == index]:
                del self._addrs[key]
        elif event in ("RTM_NEWADDR", "RTM_DELADDR"):
            addr = self._parse_addr(msg)
            key = (addr.index, addr.iface.ip)
            if event == "RTM_NEWADDR":
                self._addrs[key] = addr
            else:
                self._addrs.pop(key, None)
        else:
            return False
        return True

    def usable(self) -> dict[IPAddress, IPInterface]:
        """The addresses that are usable locators now, by IP (see the module doc)."""
        out: dict[IPAddress, IPInterface] = {}
        for addr in self._addrs.values():
            if self._link_ok(addr.index) and _eligible(addr.iface.ip, addr.flags):
                out.setdefault(addr.iface.ip, addr.iface)
        return out

    def links(self) -> dict[IPAddress, LocalLink]:
        """Each usable address's link: its name and index, and the prefix length."""
        out: dict[IPAddress, LocalLink] = {}
        for addr in self._addrs.values():
            if self._link_ok(addr.index) and _eligible(addr.iface.ip, addr.flags):
                name = self._names.get(addr.index, "")
                out.setdefault(
                    addr.iface.ip, LocalLink(name, addr.index, addr.iface.network.prefixlen)
                )
        return out

    def _link_ok(self, index: int) -> bool:
        flags = self._links.get(index)
        if flags is None:
            # Not known (yet): the kernel announces a link before its addresses, so
            # this is transient; do not guess whether it is the loopback.
            return False
        if flags & IFF_LOOPBACK:
            return False
        up = IFF_UP | IFF_RUNNING  # administratively up, and with carrier
        return not self.require_carrier or flags & up == up

    @staticmethod
    def _parse_addr(msg: NetlinkMessage) -> _Addr:
        # IFA_LOCAL is our end on a point-to-point link, where IFA_ADDRESS is the peer;
        # otherwise only IFA_ADDRESS is there (always so for IPv6 without a peer).
        raw = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if not isinstance(raw, str):
            raise ValueError(f"no address in {msg.get('event')}")
        iface = ip_interface(f"{raw}/{_int(msg, 'prefixlen')}")
        # IFA_FLAGS holds all 32 bits; the 8-bit header field only the low ones.
        flags = msg.get("IFA_FLAGS")
        if not isinstance(flags, int):
            flags = _int(msg, "flags")
        return _Addr(_int(msg, "index"), iface, flags)


# == the asyncio monitor ===============================================================


def _apply(table: AddressTable, msg: NetlinkMessage) -> None:
    try:
        table.apply(msg)
    except Exception as exc:
        # Never let one odd message stop the monitor.
        log.debug("ignoring netlink message %r: %r", msg, exc)


class _Resync:
    """Queue marker: messages may have been lost, dump everything again."""


_RESYNC: Final = _Resync()


class AddressMonitor:
    """Watches this host's addresses and reports them to the IHMP engine's user.

    ``on_added(iface)``, ``on_removed(iface)`` and ``on_handoff(old, new)`` are called
    from the event loop running :meth:`run`, as the :class:`HandoffDetector` decides
    with ``handoff_window``; an exception in a callback is logged and the monitor
    goes on. ``require_carrier``: see the module doc. A ghost address (on ``lo``) is
    never reported; the same address back on a real link is, like any other.

    Typical use::

        addrs = await monitor.current()   # seed the engine
        task = asyncio.create_task(monitor.run(known=addrs))

    Passing ``known`` closes the gap between the two calls: whatever changed since is
    reported as events when monitoring starts.
    """

    def __init__(
        self,
        on_added: Callable[[IPInterface], object],
        on_removed: Callable[[IPInterface], object],
        on_handoff: Callable[[IPInterface, IPInterface], object],
        handoff_window: float = 1.0,
        *,
        require_carrier: bool = True,
        soft_immediate: bool = False,
        on_routes: Callable[[], object] | None = None,
    ) -> None:
        if handoff_window < 0:
            raise ValueError("handoff_window must be >= 0")
        self.soft_immediate = soft_immediate
        self.on_added = on_added
        self.on_removed = on_removed
        self.on_handoff = on_handoff
        self.handoff_window = handoff_window
        self.require_carrier = require_carrier
        #: Called (no arguments) after the main routing table changed, and after a
        #: resync (messages may have been lost); None: routes are not watched.
        self.on_routes = on_routes
        #: The links and addresses as last heard (read :meth:`AddressTable.links`).
        self.table = AddressTable(require_carrier)

    async def current(self) -> list[IPInterface]:
        """The usable addresses now (see the module doc).

        One netlink dump on a socket of its own; in the kernel's order.
        """
        table = self.table = await self._dump()
        return list(table.usable().values())

    async def run(
        self,
        known: Iterable[IPInterface] | None = None,
        on_synced: Callable[[], object] = lambda: None,
    ) -> None:
        """Monitor until cancelled; the netlink socket is closed on the way out.

        ``known``: the addresses the caller already knows about (typically what
        :meth:`current` returned). The differences between them and what is found when
        monitoring starts are reported like any change. None: what is found is taken
        as known, silently.

        ``on_synced()`` is called once those first differences are reported.

        Lost netlink messages (socket overrun, ENOBUFS) or undecodable ones trigger a
        fresh dump, whose differences are reported like any change. Raises only if
        the netlink socket itself fails.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        ipr = AsyncRtnl()
        reader: asyncio.Task[None] | None = None
        try:
            # Subscribe before dumping: a change that races with the dump then shows up
            # as a message after it, where re-announcing what we have is a no-op.
            await ipr.bind(groups=_GROUPS | (_ROUTE_GROUPS if self.on_routes else 0))
            reader = asyncio.create_task(self._read(ipr, queue))
            table = self.table = await self._dump()
            usable = table.usable()
            seen = usable if known is None else {i.ip: i for i in known}
            detector = HandoffDetector(
                self.handoff_window,
                seen.values(),
                soft_immediate=self.soft_immediate,
            )
            seen = self._sync(detector, seen, usable, loop.time())
            on_synced()
            while True:
                deadline = detector.deadline()
                item: object = None
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await queue.get()
                except TimeoutError:
                    pass
                if isinstance(item, BaseException):
                    raise item
                routed = False
                if item is _RESYNC:
                    table = self.table = await self._dump()
                    routed = True
                elif isinstance(item, Mapping):
                    _apply(table, item)
                    routed = is_routing_change(dict(item))
                seen = self._sync(detector, seen, table.usable(), loop.time())
                if routed:
                    self._routes_changed()
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            ipr.close()

    def _sync(
        self,
        detector: HandoffDetector,
        before: dict[IPAddress, IPInterface],
        after: dict[IPAddress, IPInterface],
        now: float,
    ) -> dict[IPAddress, IPInterface]:
        """Feed the difference to the detector, dispatch what it says; return ``after``."""
        # Removals first, so that a removal and an addition found in one diff (at
        # start-up with ``known``, after a resync) pair up as a handoff.
        for ip, iface in before.items():
            if ip not in after:
                detector.removed(iface, now)
        for ip, iface in after.items():
            if ip not in before:
                detector.added(iface, now)
        for event in detector.poll(now):
            self._dispatch(event)
        return after

    def _routes_changed(self) -> None:
        if self.on_routes is None:
            return
        try:
            self.on_routes()
        except Exception:
            log.exception("route change callback failed")

    def _dispatch(self, event: AddressEvent) -> None:
        log.debug("address event %s", event)
        try:
            if isinstance(event, Added):
                self.on_added(event.iface)
            elif isinstance(event, Removed):
                self.on_removed(event.iface)
            else:
                self.on_handoff(event.old, event.new)
        except Exception:
            log.exception("address event callback failed for %s", event)

    @staticmethod
    async def _read(ipr: AsyncRtnl, queue: asyncio.Queue[object]) -> None:
        """Move broadcast messages from the socket to ``queue``, forever."""
        while True:
            try:
                # get() yields the messages of one datagram, then ends.
                async for msg in ipr.get():
                    queue.put_nowait(msg)
            except Exception as exc:
                code = getattr(exc, "code", None) or getattr(exc, "errno", None)
                if code == errno.ECONNRESET:
                    # The socket is gone: nothing more will come.
                    queue.put_nowait(exc)
                    return
                # ENOBUFS (we were too slow, messages were dropped) or a message that
                # does not decode: either way the rest of the datagram is lost.
                log.debug("netlink receive error, resyncing: %r", exc)
                queue.put_nowait(_RESYNC)

    async def _dump(self) -> AddressTable:
        table = AddressTable(self.require_carrier)
        async with AsyncRtnl() as ipr:
            # Links first, so that every address finds its link.
            async for msg in await ipr.link("dump"):
                _apply(table, msg)
            async for msg in await ipr.addr("dump"):
                _apply(table, msg)
        return table
