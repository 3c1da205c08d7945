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
    if entry.state is HidState.LEGACY:
        return HidTranslation(entry.hid, locators=locators)
    remote: dict[IPAddress, IPAddress] = {}
    local: dict[tuple[IPAddress, IPAddress], IPAddress] = {}
    usable_local = [a for a in entry.local if a in local_addresses]
    # Behind a NAT, each flow has a port of its own there: its flows are sent there
    # one by one, as their knocks come (SocketEntry.wire), never host-wide.
    natted = entry.behind(entry.locator) is not None
    # Nor is a flow named by a NAT's address (it started behind that NAT): other hosts
    # behind it have flows named by it too. Such a flow moves by its own knock.
    nat_ids = {public for public, _ in entry.nat}
    for lid, rid in pairs:
        if rid not in entry.active and not natted and rid not in nat_ids:
            rloc = _same_family(entry.active, rid)
            if rloc is not None:
                remote[rid] = rloc
        if entry.local and lid not in entry.local:
            lloc = _same_family(usable_local, lid)
            if lloc is not None and lloc != lid:
                local[(lid, rid)] = lloc
    return HidTranslation(entry.hid, remote, local, locators)
