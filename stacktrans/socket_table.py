"""The socket table: {flow, identifier addresses -> HID}, Fig. 3(a) of the DIME paper.

A flow is named as the application sees it: protocol, local identifier address and
port, remote identifier address and port. Each flow maps to the HID of its remote
host. Two indexes serve the two directions of the data plane:

* outbound: the flow key itself;
* inbound: (HID, IP version, protocol, remote port, local port). A packet's source locator gives
  the HID (any address of the host), and the HID with the ports gives the flow. That
  is why inbound translation is per flow and not per host: two sockets may know one
  host under two identifiers (the paper's s1/s2 case), and each gets the identifier
  it expects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from weakref import WeakValueDictionary

from ihmp.addr import IPAddress

TCP = 6
UDP = 17


@dataclass(frozen=True, slots=True)
class FlowKey:
    """A flow as its socket sees it (identifiers, not locators)."""

    proto: int
    local: IPAddress
    lport: int
    remote: IPAddress
    rport: int

    def __str__(self) -> str:
        name = {TCP: "tcp", UDP: "udp"}.get(self.proto, str(self.proto))
        return f"{name} {_ep(self.local, self.lport)} -> {_ep(self.remote, self.rport)}"


def _ep(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def endpoint(addr: IPAddress, port: int) -> str:
    """``addr:port`` (``[addr]:port`` for IPv6), as status output shows it."""
    return _ep(addr, port)


# (hid, IP version, proto, remote port, local port), packed into one int (see
# inbound_key()): a dual-stack host may use the same ports over IPv4 and IPv6. An
# int of a small HID is 32 bytes; the tuple was 80, one per flow.
InboundKey = int


def inbound_key(hid: int, version: int, proto: int, rport: int, lport: int) -> InboundKey:
    """The inbound index's key; distinct for distinct fields (HIDs are >= 0)."""
    return (((hid << 1 | (version == 6)) << 8 | proto) << 16 | rport) << 16 | lport


@dataclass(slots=True)
class SocketEntry:
    key: FlowKey
    hid: int
    created: float
    last_seen: float
    #: TCP: our side's initial sequence number as ``tcpi_bytes_acked`` counts from it
    #: (:func:`stacktrans.userspace.acked_from`: one more where we answered the SYN),
    #: if seen; what :mod:`stacktrans.rto_revert` needs to name ``snd_una``.
    isn: int | None = None
    #: TCP: the peer's initial sequence number (its SYN or SYN-ACK), if seen.
    peer_isn: int | None = None
    #: The peer is behind a NAT: the NAT's address and the port it gave this flow
    #: (learned from the flow's knock), which the flow's packets carry on the wire.
    #: None: the host's locator and the flow's own remote port.
    wire: tuple[IPAddress, int] | None = None
    #: The (NAT address, the host's own address behind it) ``wire`` was learned for:
    #: when the host moves behind the NAT, the flow needs a new knock.
    bound_to: tuple[IPAddress, IPAddress] | None = None
    #: A flow the peer started behind a NAT (its remote identifier is the NAT's): the
    #: port its own socket has, when an IHMP-aware NAT said (NAT_ENTRY). Its knocks
    #: name that port.
    peer_port: int | None = None
    #: Our local locator for this flow alone (a locator policy, ``dime move``), once
    #: the peer acknowledged it (FLOW_MOVE); None: the host's (its translation's).
    via: IPAddress | None = None
    #: The peer's locator for this flow alone: its FLOW_MOVE named it. Its packets go
    #: there (``wire``) while the address is one of the host's active ones.
    pinned: IPAddress | None = None
    #: The index of the policy rule that placed it (:mod:`stacktrans.policy`), if any.
    rule: int | None = None

    @property
    def wire_rport(self) -> int:
        """The remote port on the wire."""
        return self.wire[1] if self.wire is not None else self.key.rport

    @property
    def inbound_key(self) -> InboundKey:
        k = self.key
        return inbound_key(self.hid, k.remote.version, k.proto, self.wire_rport, k.lport)


class SocketTable:
    """Flows and their HIDs, indexed for both directions. Pure bookkeeping."""

    def __init__(self) -> None:
        self._by_key: dict[FlowKey, SocketEntry] = {}
        self._inbound: dict[InboundKey, SocketEntry] = {}
        self._by_hid: dict[int, dict[FlowKey, SocketEntry]] = {}
        # How many flows use each (local id, remote id) pair of a HID, and each local
        # id: what translations depend on, kept so they never walk every flow.
        self._pairs: dict[int, Counter[tuple[IPAddress, IPAddress]]] = {}
        self._lids: Counter[IPAddress] = Counter()
        # One address object per distinct address, shared by every flow's key: each
        # packet parse makes new ones (80 bytes each, two per flow). Weak: an address
        # no flow names any more is dropped (keyed by its bytes: a key is held strongly).
        self._interned: WeakValueDictionary[bytes, IPAddress] = WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[SocketEntry]:
        return iter(list(self._by_key.values()))

    def get(self, key: FlowKey) -> SocketEntry | None:
        return self._by_key.get(key)

    def inbound(
        self, hid: int, version: int, proto: int, rport: int, lport: int
    ) -> SocketEntry | None:
        return self._inbound.get(inbound_key(hid, version, proto, rport, lport))

    def flows_of(self, hid: int) -> list[SocketEntry]:
        return list(self._by_hid.get(hid, {}).values())

    def has_flows(self, hid: int) -> bool:
        return bool(self._by_hid.get(hid))

    def has_pair(self, hid: int, local: IPAddress, remote: IPAddress) -> bool:
        """Whether some flow of ``hid`` goes between ``local`` and ``remote``."""
        return (local, remote) in self._pairs.get(hid, ())

    def pairs_of(self, hid: int) -> set[tuple[IPAddress, IPAddress]]:
        """The distinct (local identifier, remote identifier) pairs of ``hid``'s flows."""
        return set(self._pairs.get(hid, ()))

    def add(self, key: FlowKey, hid: int, now: float) -> SocketEntry | None:
        """Record a new flow. Returns None if its inbound key is taken by another flow.

        That happens only when one local port talks to the same remote port of one
        host under two identifiers at once; the second flow then goes untranslated.
        """
        existing = self._by_key.get(key)
        if existing is not None:
            return existing
        key = self._intern(key)
        entry = SocketEntry(key, hid, now, now)
        if entry.inbound_key in self._inbound:
            return None
        self._by_key[key] = entry
        self._inbound[entry.inbound_key] = entry
        self._by_hid.setdefault(hid, {})[key] = entry
        self._pairs.setdefault(hid, Counter())[(key.local, key.remote)] += 1
        self._lids[key.local] += 1
        return entry

    def _intern(self, key: FlowKey) -> FlowKey:
        """``key``, with the addresses the table already holds (equal, shared)."""
        local = self._interned.setdefault(key.local.packed, key.local)
        remote = self._interned.setdefault(key.remote.packed, key.remote)
        if local is key.local and remote is key.remote:
            return key
        return FlowKey(key.proto, local, key.lport, remote, key.rport)

    def rebind(
        self,
        entry: SocketEntry,
        wire: tuple[IPAddress, int] | None,
        bound_to: tuple[IPAddress, IPAddress] | None,
    ) -> bool:
        """Carry ``entry``'s packets at ``wire`` (see :attr:`SocketEntry.wire`).
        False, and nothing changed, if another flow of the host has that port."""
        old = entry.inbound_key
        k = entry.key
        rport = wire[1] if wire is not None else k.rport
        new = inbound_key(entry.hid, k.remote.version, k.proto, rport, k.lport)
        holder = self._inbound.get(new)
        if holder is not None and holder is not entry:
            return False
        del self._inbound[old]
        entry.wire, entry.bound_to = wire, bound_to
        self._inbound[new] = entry
        return True

    def remove(self, key: FlowKey) -> SocketEntry | None:
        entry = self._by_key.pop(key, None)
        if entry is None:
            return None
        self._inbound.pop(entry.inbound_key, None)
        flows = self._by_hid.get(entry.hid)
        if flows is not None:
            flows.pop(key, None)
            if not flows:
                del self._by_hid[entry.hid]
        pairs = self._pairs[entry.hid]
        pairs[(key.local, key.remote)] -= 1
        if pairs[(key.local, key.remote)] <= 0:
            del pairs[(key.local, key.remote)]
        if not pairs:
            del self._pairs[entry.hid]
        self._lids[key.local] -= 1
        if self._lids[key.local] <= 0:
            del self._lids[key.local]
        return entry

    def remove_hid(self, hid: int) -> list[SocketEntry]:
        return [e for e in (self.remove(k) for k in list(self._by_hid.get(hid, {}))) if e]

    def is_local_identifier(self, addr: IPAddress) -> bool:
        """Whether some flow is bound to ``addr`` on this host."""
        return addr in self._lids

    def local_identifiers(self) -> set[IPAddress]:
        """Every local address some flow is bound to."""
        return set(self._lids)
