"""What to rewrite for one remote host: derived from its HID entry and its flows.

A :class:`HidTranslation` is the whole data-plane consequence of one HID entry. It
is recomputed whenever the entry, its flows or this host's addresses change, and
the data plane applies the difference in one update, however many flows the host
has: the outbound rewrites are keyed by identifier, not by flow.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from ihmp.addr import IPAddress
from ihmp.hosts import HidState, HostSnapshot


@dataclass(frozen=True)
class HidTranslation:
    hid: int
    # Remote identifier -> the locator to put on the wire instead.
    remote: dict[IPAddress, IPAddress] = field(default_factory=dict)
    # (local identifier, remote identifier) -> the local locator to send from instead.
    local: dict[tuple[IPAddress, IPAddress], IPAddress] = field(default_factory=dict)
    # Every address the remote host's packets may come from (its retired ones too:
    # packets in flight across its handoff): they belong to this HID.
    locators: frozenset[IPAddress] = frozenset()
    # (local address, remote address) pairs a new flow between which the kernel may
    # learn by itself (nft mode): for these, what this module would compute with the
    # flow added is what it computes now, so no decision of the daemon is missed.
    learnable: frozenset[tuple[IPAddress, IPAddress]] = frozenset()
    # (local identifier, remote identifier) -> (local locator, remote locator) of the
    # other IP version: the flows between them have no locator of their own version
    # left at one end or the other, and are carried across (stacktrans.family) in
    # user space, packet by packet.
    cross: dict[tuple[IPAddress, IPAddress], tuple[IPAddress, IPAddress]] = field(
        default_factory=dict
    )

    def outbound(self, lid: IPAddress, rid: IPAddress) -> tuple[IPAddress | None, IPAddress | None]:
        """(new source, new destination) for a packet lid -> rid; None = unchanged."""
        return self.local.get((lid, rid)), self.remote.get(rid)


def _same_family(addrs: Iterable[IPAddress], like: IPAddress) -> IPAddress | None:
    return next((a for a in addrs if a.version == like.version), None)


def compute(
    entry: HostSnapshot,
    pairs: Iterable[tuple[IPAddress, IPAddress]],
    local_addresses: Collection[IPAddress],
) -> HidTranslation:
    """The rewrites ``entry`` implies for its flows' (local id, remote id) ``pairs``.

    A remote identifier is rewritten only when it is no longer an active address of
    the host; a local identifier only when the host cannot reach us at it (it left
    this host, or the peer never verified it). Legacy hosts are never rewritten:
    there is nobody to agree the addresses with.
    """
    locators = entry.sources()
    learnable = _learnable(entry, local_addresses)
    if entry.state is HidState.LEGACY:
        return HidTranslation(entry.hid, locators=locators, learnable=learnable)
    remote: dict[IPAddress, IPAddress] = {}
    local: dict[tuple[IPAddress, IPAddress], IPAddress] = {}
    usable_local = [a for a in entry.local if a in local_addresses]
    # Behind a NAT, each flow has a port of its own there: its flows are sent there
    # one by one, as their knocks come (SocketEntry.wire), never host-wide.
    natted = entry.behind(entry.locator) is not None
    # Nor is a flow named by a NAT's address (it started behind that NAT): other hosts
    # behind it have flows named by it too. Such a flow moves by its own knock.
    nat_ids = {public for public, _ in entry.nat}
    cross: dict[tuple[IPAddress, IPAddress], tuple[IPAddress, IPAddress]] = {}
    for lid, rid in pairs:
        rloc = rid if rid in entry.active else _same_family(entry.active, rid)
        if rloc is not None and rloc != rid and not natted and rid not in nat_ids:
            remote[rid] = rloc
        lloc = lid if not entry.local or lid in entry.local else _same_family(usable_local, lid)
        if lloc is not None and lloc != lid:
            local[(lid, rid)] = lloc
        if (rloc is None or lloc is None) and not natted and rid not in nat_ids:
            # Nothing of the flow's own version left at one end: the other version's,
            # if both ends have one (the host is not behind a NAT: ports are its own).
            other = _other_family(entry, usable_local, lid)
            if other is not None:
                cross[(lid, rid)] = other
    return HidTranslation(entry.hid, remote, local, locators, learnable, cross)


def _other_family(
    entry: HostSnapshot, usable_local: list[IPAddress], lid: IPAddress
) -> tuple[IPAddress, IPAddress] | None:
    """(local locator, remote locator) of the IP version other than ``lid``'s."""
    rloc = next((a for a in entry.active if a.version != lid.version), None)
    if rloc is None:
        return None
    lloc = _same_family(usable_local, rloc)
    return (lloc, rloc) if lloc is not None else None


def _learnable(
    entry: HostSnapshot, local_addresses: Collection[IPAddress]
) -> frozenset[tuple[IPAddress, IPAddress]]:
    """The (local, remote) pairs of :attr:`HidTranslation.learnable`.

    A new flow changes nothing of :func:`compute`'s result when its remote address
    is an active one (never rewritten) and its local address one the host reaches
    (never rewritten), or when the host is legacy (nothing is). A host behind a NAT
    has none: its flows wait for knocks, which the daemon matches. Addresses the
    host retired are left out too: IHMP gives a new flow to such an address to a new
    host (whoever has the address now).
    """
    if entry.nat:
        return frozenset()
    if entry.state is HidState.LEGACY:
        remotes: Iterable[IPAddress] = entry.addresses()
        locals_: Iterable[IPAddress] = local_addresses
    else:
        remotes = entry.active
        locals_ = entry.local or local_addresses
    return frozenset((lid, rid) for rid in remotes for lid in locals_ if lid.version == rid.version)
