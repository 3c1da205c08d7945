"""The HID table: one entry per remote host. IHMP keeps it; StackTrans follows it.

A HID is an internal index for a remote host. It is never sent on the wire. Each entry
keeps three address sets, as in Fig. 3(b) of the DIME paper:

* **active**: the peer's addresses this host can reach. The first one is the
  *preferred locator*, the one StackTrans puts on the wire.
* **unreachable**: the peer's addresses this host cannot reach (yet).
* **local**: this host's addresses the peer can reach. It mirrors the peer's own
  active set for this host, and IHMP picks its Host ID field from it.

Beyond the paper, each entry also keeps the peer's **retired** addresses: those it
withdrew (a HANDOFF's old addresses, ADDR_DOWN). They are no longer used to reach
it, but the peer may still name one as its Host ID, and its packets may still come
from one until it learns that we applied the withdrawal (a packet in flight, or
sent before our ACK reached it): they still identify the host.

The IHMP engine owns the table and is its only writer. Every change goes through an
explicit operation (``add_active``, ``mark_unreachable``, ``remove_local``,
``transition``, ...). Each operation that changes something hands one
:class:`HostChanged` (before and after snapshots) to the table's sink, which is the
engine's event queue: that is how a change leaves IHMP, in order with the engine's
other events, and how StackTrans learns of it. An operation that would change
nothing emits nothing.

Invariants (checked by the tests):

* an address of a remote host is in at most one entry, and in at most one of its
  ``active``/``unreachable``/``retired`` sets; an address that becomes active or
  unreachable for any host is no longer retired anywhere;
* :meth:`HidTable.lookup` finds an entry from any of its active or unreachable
  addresses in O(1), :meth:`HidTable.lookup_retired` from a retired one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from ipaddress import ip_address
from typing import Any

from ihmp.addr import IPAddress, addr_key
from ihmp.states import INITIAL, HidState, Trigger, next_state

__all__ = [
    "ChangeKind",
    "FlowOrigin",
    "HidState",
    "HidTable",
    "HidTableError",
    "HostChanged",
    "HostEntry",
    "HostSnapshot",
]


class ChangeKind(enum.Enum):
    """What a :class:`HostChanged` reports."""

    CREATED = "created"
    UPDATED = "updated"  # address sets changed
    STATE = "state"  # state changed
    KEY = "key"  # bound key changed
    REMOVED = "removed"


class FlowOrigin(enum.Enum):
    """How StackTrans came upon a new flow, which may make a new host
    (:meth:`ihmp.engine.IhmpEngine.flow_started`)."""

    OUTBOUND = "outbound"  # its first packet was ours: an application chose the peer
    INBOUND = "inbound"  # its first packet came in: its source is only a claim
    ADOPTED = "adopted"  # it existed before this daemon (a restart resumed)


class HidTableError(ValueError):
    """An operation that would break the table's invariants."""


@dataclass
class HostEntry:
    """One remote host. Mutate it only through :class:`HidTable` operations."""

    hid: int
    active: list[IPAddress] = field(default_factory=list)
    unreachable: set[IPAddress] = field(default_factory=set)
    local: list[IPAddress] = field(default_factory=list)
    key: bytes | None = None
    state: HidState = HidState.HELLO_PENDING
    retired: set[IPAddress] = field(default_factory=set)
    #: Active (or retired) addresses that are (were) a NAT's public side, each with
    #: the host's own address behind it (the source it encoded). Such a locator is
    #: per flow: the NAT gives each flow a port of its own, learned from the flow's
    #: knock; and flows named by it (started behind it) are never moved host-wide,
    #: since other hosts behind that NAT may have flows named by it too.
    nat: dict[IPAddress, IPAddress] = field(default_factory=dict)

    @property
    def locator(self) -> IPAddress | None:
        """The preferred locator, or None when no address is reachable."""
        return self.active[0] if self.active else None

    def addresses(self) -> set[IPAddress]:
        """Every remote address of this host (active and unreachable)."""
        return set(self.active) | self.unreachable

    @classmethod
    def of(cls, snapshot: HostSnapshot) -> HostEntry:
        """A mutable entry holding what ``snapshot`` holds."""
        return cls(**_convert(snapshot, _MUTABLE))

    def snapshot(self) -> HostSnapshot:
        """An immutable copy, safe to hand to StackTrans and the status output."""
        return HostSnapshot(**_convert(self, _FROZEN))


#: How the address sets of an entry and a snapshot convert into each other.
_MUTABLE: dict[str, Callable[[Any], Any]] = {
    "active": list, "unreachable": set, "local": list, "retired": set, "nat": dict
}  # fmt: skip
_FROZEN: dict[str, Callable[[Any], Any]] = {
    "active": tuple, "unreachable": frozenset, "local": tuple, "retired": frozenset,
    "nat": lambda d: tuple(sorted(d.items(), key=lambda kv: addr_key(kv[0]))),
}  # fmt: skip


def _convert(obj: HostEntry | HostSnapshot, kinds: dict[str, Callable[[Any], Any]]) -> Any:
    return {f.name: kinds.get(f.name, lambda v: v)(getattr(obj, f.name)) for f in fields(HostEntry)}


@dataclass(frozen=True)
class HostSnapshot:
    """An immutable view of a :class:`HostEntry` at one moment."""

    hid: int
    active: tuple[IPAddress, ...]
    unreachable: frozenset[IPAddress]
    local: tuple[IPAddress, ...]
    key: bytes | None
    state: HidState
    retired: frozenset[IPAddress] = frozenset()
    nat: tuple[tuple[IPAddress, IPAddress], ...] = ()  # (public side, host's own address)

    @property
    def locator(self) -> IPAddress | None:
        return self.active[0] if self.active else None

    def behind(self, addr: IPAddress | None) -> IPAddress | None:
        """The host's own address behind ``addr``, if ``addr`` is a NAT's public side."""
        return next((private for public, private in self.nat if public == addr), None)

    def addresses(self) -> set[IPAddress]:
        return set(self.active) | self.unreachable

    def sources(self) -> frozenset[IPAddress]:
        """Every address its packets may come from: active, unreachable and retired."""
        return frozenset(self.active) | self.unreachable | self.retired

    def to_json(self) -> dict[str, Any]:
        return {
            "hid": self.hid,
            "active": [str(a) for a in self.active],
            "unreachable": [str(a) for a in sorted(self.unreachable, key=addr_key)],
            "local": [str(a) for a in self.local],
            "key": self.key.hex() if self.key is not None else None,
            "state": self.state.value,
            "retired": [str(a) for a in sorted(self.retired, key=addr_key)],
            "nat": {str(public): str(private) for public, private in self.nat},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostSnapshot:
        """Raises KeyError, TypeError or ValueError for data :meth:`to_json` did not make."""
        key = data.get("key")
        return cls(
            hid=int(data["hid"]),
            active=tuple(ip_address(a) for a in data["active"]),
            unreachable=frozenset(ip_address(a) for a in data["unreachable"]),
            local=tuple(ip_address(a) for a in data["local"]),
            key=bytes.fromhex(key) if key is not None else None,
            state=HidState(data["state"]),
            retired=frozenset(ip_address(a) for a in data.get("retired", [])),
            nat=tuple((ip_address(a), ip_address(b)) for a, b in data.get("nat", {}).items()),
        )


@dataclass(frozen=True)
class HostChanged:
    """One change of one entry. ``before`` is None for CREATED, ``after`` for REMOVED.

    An IHMP engine event (see :mod:`ihmp.events`).
    """

    kind: ChangeKind
    hid: int
    before: HostSnapshot | None
    after: HostSnapshot | None
    reason: str = ""


Sink = Callable[[HostChanged], None]


class HidTable:
    """The table of remote hosts, indexed by HID and by every remote address.

    ``sink`` receives every change, synchronously, in the order they happen.
    """

    def __init__(self, sink: Sink | None = None) -> None:
        self._entries: dict[int, HostEntry] = {}
        self._by_addr: dict[IPAddress, int] = {}
        self._by_retired: dict[IPAddress, int] = {}
        self._next_hid = 1
        self._sink: Sink = sink if sink is not None else (lambda change: None)

    # -- reading -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[HostEntry]:
        return iter(list(self._entries.values()))

    def __contains__(self, hid: object) -> bool:
        return hid in self._entries

    def get(self, hid: int) -> HostEntry:
        """The entry of ``hid``; KeyError when there is none."""
        return self._entries[hid]

    def lookup(self, addr: IPAddress) -> HostEntry | None:
        """The entry that owns remote address ``addr`` (active or unreachable), O(1)."""
        hid = self._by_addr.get(addr)
        return None if hid is None else self._entries[hid]

    def lookup_retired(self, addr: IPAddress) -> HostEntry | None:
        """The entry that retired ``addr`` (see the module doc), O(1)."""
        hid = self._by_retired.get(addr)
        return None if hid is None else self._entries[hid]

    def snapshot(self) -> list[HostSnapshot]:
        return [e.snapshot() for e in self._entries.values()]

    # -- operations ----------------------------------------------------------------

    def create(self, active: Iterable[IPAddress], trigger: Trigger) -> HostEntry:
        """Create an entry for a new remote host with the given active addresses, in
        the state :data:`~ihmp.states.INITIAL` gives ``trigger``."""
        addrs = list(dict.fromkeys(active))
        for addr in addrs:
            self._check_free(addr, None)
        reason = trigger.value
        entry = HostEntry(hid=self._next_hid, active=addrs, state=INITIAL[trigger])
        for addr in addrs:
            self._unretire(addr, entry.hid)
        self._next_hid += 1
        self._entries[entry.hid] = entry
        for addr in addrs:
            self._by_addr[addr] = entry.hid
        self._sink(HostChanged(ChangeKind.CREATED, entry.hid, None, entry.snapshot(), reason))
        return entry

    def restore(self, host: HostSnapshot, *, reason: str = "restored") -> HostEntry:
        """Re-create an entry exactly as a predecessor saved it (same HID and state).

        Only for resuming after a restart: the one operation that sets a state
        without a transition, since the state was reached through them before.
        """
        if host.hid in self._entries:
            raise HidTableError(f"HID {host.hid} exists")
        for addr in host.addresses():
            self._check_free(addr, None)
        entry = HostEntry.of(host)
        entry.retired -= set(self._by_retired)  # another host's since
        self._entries[entry.hid] = entry
        for addr in entry.addresses():
            self._by_addr[addr] = entry.hid
        for addr in entry.retired:
            self._by_retired[addr] = entry.hid
        self._next_hid = max(self._next_hid, entry.hid + 1)
        self._sink(HostChanged(ChangeKind.CREATED, entry.hid, None, entry.snapshot(), reason))
        return entry

    def remove(self, hid: int, *, reason: str = "") -> None:
        """Forget a remote host (e.g. its last path is lost). Unknown HIDs are ignored."""
        entry = self._entries.pop(hid, None)
        if entry is None:
            return
        for addr in entry.addresses():
            self._by_addr.pop(addr, None)
        for addr in entry.retired:
            self._by_retired.pop(addr, None)
        self._sink(HostChanged(ChangeKind.REMOVED, hid, entry.snapshot(), None, reason))

    def add_active(
        self, hid: int, addr: IPAddress, *, prefer: bool = False, reason: str = ""
    ) -> bool:
        """Make ``addr`` an active address of ``hid`` (moving it out of unreachable).

        With ``prefer`` it becomes the preferred locator. Returns whether anything
        changed. Raises HidTableError if ``addr`` belongs to another host.
        """
        entry = self._entries[hid]
        self._check_free(addr, hid)
        if _placed(entry.active, addr, prefer):
            return False
        with self._updating(entry, reason):
            entry.unreachable.discard(addr)
            _place(entry.active, addr, prefer)
            self._by_addr[addr] = hid
            self._unretire(addr, hid)
        return True

    def mark_unreachable(self, hid: int, addr: IPAddress, *, reason: str = "") -> bool:
        """Record ``addr`` as an address of ``hid`` this host cannot reach."""
        entry = self._entries[hid]
        self._check_free(addr, hid)
        if addr in entry.unreachable:
            return False
        with self._updating(entry, reason):
            if addr in entry.active:
                entry.active.remove(addr)
            entry.unreachable.add(addr)
            self._by_addr[addr] = hid
            self._unretire(addr, hid)
        return True

    def remove_address(
        self, hid: int, addr: IPAddress, *, retire: bool = False, reason: str = ""
    ) -> bool:
        """The remote host no longer owns ``addr``: drop it from both remote sets;
        with ``retire``, the host itself withdrew it: keep it as retired."""
        entry = self._entries[hid]
        if addr not in entry.active and addr not in entry.unreachable:
            return False
        with self._updating(entry, reason):
            if addr in entry.active:
                entry.active.remove(addr)
            entry.unreachable.discard(addr)
            self._by_addr.pop(addr, None)
            if not retire:
                entry.nat.pop(addr, None)
            if retire:
                entry.retired.add(addr)
                self._by_retired[addr] = hid
        return True

    def set_nat(
        self, hid: int, public: IPAddress, private: IPAddress | None, *, reason: str = ""
    ) -> bool:
        """Record that ``public``, an address of ``hid``, is a NAT in front of the
        host's own ``private`` address (None: it is the host's own)."""
        entry = self._entries[hid]
        if entry.nat.get(public) == private:
            return False
        with self._updating(entry, reason):
            if private is None:
                del entry.nat[public]
            else:
                entry.nat[public] = private
        return True

    def add_local(
        self, hid: int, addr: IPAddress, *, prefer: bool = False, reason: str = ""
    ) -> bool:
        """Record that the remote host can reach this host at ``addr``."""
        entry = self._entries[hid]
        if _placed(entry.local, addr, prefer):
            return False
        with self._updating(entry, reason):
            _place(entry.local, addr, prefer)
        return True

    def remove_local(self, hid: int, addr: IPAddress, *, reason: str = "") -> bool:
        """The remote host can no longer reach this host at ``addr``."""
        entry = self._entries[hid]
        if addr not in entry.local:
            return False
        with self._updating(entry, reason):
            entry.local.remove(addr)
        return True

    def transition(self, hid: int, trigger: Trigger) -> bool:
        """Move ``hid`` to the state :data:`~ihmp.states.TRANSITIONS` gives ``trigger``.

        Returns whether the state changed; raises TransitionError for a pair the
        table does not allow.
        """
        entry = self._entries[hid]
        state = next_state(entry.state, trigger)
        reason = trigger.value
        if entry.state is state:
            return False
        before = entry.snapshot()
        entry.state = state
        self._sink(HostChanged(ChangeKind.STATE, hid, before, entry.snapshot(), reason))
        return True

    def bind_key(self, hid: int, key: bytes | None, *, reason: str = "") -> bool:
        """Bind the raw 32-byte Ed25519 public key ``key`` to ``hid`` (None unbinds)."""
        entry = self._entries[hid]
        if entry.key == key:
            return False
        before = entry.snapshot()
        entry.key = key
        self._sink(HostChanged(ChangeKind.KEY, hid, before, entry.snapshot(), reason))
        return True

    # -- helpers -------------------------------------------------------------------

    def _unretire(self, addr: IPAddress, hid: int) -> None:
        """``addr`` is in use again (by ``hid``): no host has it as a retired address.

        Called inside ``hid``'s own update; another host's is a change of its own.
        """
        owner = self._by_retired.pop(addr, None)
        if owner is None:
            return
        other = self._entries[owner]
        if owner == hid:
            other.retired.discard(addr)
            return
        with self._updating(other, f"address taken by HID {hid}"):
            other.retired.discard(addr)

    def _check_free(self, addr: IPAddress, hid: int | None) -> None:
        owner = self._by_addr.get(addr)
        if owner is not None and owner != hid:
            raise HidTableError(f"{addr} already belongs to HID {owner}")

    @contextmanager
    def _updating(self, entry: HostEntry, reason: str) -> Iterator[None]:
        """Snapshot before, notify UPDATED after, but only if something changed."""
        before = entry.snapshot()
        yield
        after = entry.snapshot()
        if after != before:
            self._sink(HostChanged(ChangeKind.UPDATED, entry.hid, before, after, reason))


def _placed(addrs: list[IPAddress], addr: IPAddress, prefer: bool) -> bool:
    """Whether ``addr`` is in ``addrs`` already, first if ``prefer``."""
    return addr in addrs and (not prefer or addrs[0] == addr)


def _place(addrs: list[IPAddress], addr: IPAddress, prefer: bool) -> None:
    """Put ``addr`` in ``addrs`` once: first if ``prefer``, else where it was or last."""
    if prefer:
        if addr in addrs:
            addrs.remove(addr)
        addrs.insert(0, addr)
    elif addr not in addrs:
        addrs.append(addr)
