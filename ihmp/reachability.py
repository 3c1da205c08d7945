"""Reachability classes of section III-B of the DIME paper.

From a local address, a remote address is *known reachable*, *known unreachable* or
*potentially reachable*. The classes decide what to try first, not what never to try:

* both public -> known reachable;
* anything else of the same family that can be routed at all -> potentially
  reachable: a private address in the same block, in another block (corporate and
  campus networks route between private blocks), a private address towards a public
  one or the reverse (a NAT, or a routed private network, may be in the way). Only a
  probe can tell, and the engine probes them;
* another family, loopback, multicast, unspecified, or a link-local address (either
  end) unless both ends are in the same link-local block -> known unreachable: no
  router carries it, whatever the network. These are never probed: the paper's
  169.254 example.

Beyond the classes, only *evidence* makes a potentially reachable path unreachable:
the engine passes the (local, remote) pairs whose probes went unanswered to
:func:`best_path` as ``dead``.

"Public" means "not in a private or link block", so the documentation ranges used by
the testbed count as public, as they would on the Internet.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Iterable
from ipaddress import ip_network

from ihmp.addr import IPAddress, IPNetwork, usable

PRIVATE_BLOCKS: tuple[IPNetwork, ...] = tuple(
    ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
LINK_BLOCKS: tuple[IPNetwork, ...] = (ip_network("169.254.0.0/16"), ip_network("fe80::/10"))


class Reach(enum.IntEnum):
    """Ordered from worst to best, so ``max`` picks the best class."""

    UNREACHABLE = 0
    POTENTIAL = 1
    REACHABLE = 2


def block_of(addr: IPAddress) -> IPNetwork | None:
    """The private or link-local block ``addr`` falls in, or None if it is public."""
    for net in PRIVATE_BLOCKS + LINK_BLOCKS:
        if addr.version == net.version and addr in net:
            return net
    return None


def advertisable(addr: IPAddress) -> bool:
    """Whether IHMP tells peers about ``addr``.

    IPv6 link-local addresses are left out: they mean nothing without a scope.
    """
    return usable(addr) and not (addr.version == 6 and addr.is_link_local)


def classify(remote: IPAddress, local: IPAddress) -> Reach:
    """How reachable ``remote`` is when sending from ``local``."""
    if remote.version != local.version or not usable(remote) or not usable(local):
        return Reach.UNREACHABLE
    rblock, lblock = block_of(remote), block_of(local)
    if rblock is None and lblock is None:
        return Reach.REACHABLE
    if (rblock in LINK_BLOCKS or lblock in LINK_BLOCKS) and rblock != lblock:
        return Reach.UNREACHABLE  # link-local: never beyond its own link
    return Reach.POTENTIAL


def best_path(
    remotes: Iterable[IPAddress],
    locals_: Iterable[IPAddress],
    dead: Container[tuple[IPAddress, IPAddress]] = (),
) -> tuple[Reach, IPAddress | None, IPAddress | None]:
    """The best (class, local, remote) pair; remotes and locals are tried in order.
    ``dead`` (local, remote) pairs are known unreachable: their probes went
    unanswered."""
    best: tuple[Reach, IPAddress | None, IPAddress | None] = (Reach.UNREACHABLE, None, None)
    best_rank = (Reach.UNREACHABLE, 0)
    locals_ = list(locals_)
    for remote in remotes:
        for local in locals_:
            if (local, remote) in dead:
                continue
            reach = classify(remote, local)
            rank = (reach, _affinity(remote, local))
            if reach > Reach.UNREACHABLE and rank > best_rank:
                best, best_rank = (reach, local, remote), rank
    return best


def _affinity(remote: IPAddress, local: IPAddress) -> int:
    """Among potentially reachable pairs, the likelier first: the same private block
    (one site, or a NAT's inside), then two private blocks (a routed private
    network), then private and public (a NAT)."""
    rblock, lblock = block_of(remote), block_of(local)
    if rblock is not None and rblock == lblock:
        return 2
    return 1 if rblock is not None and lblock is not None else 0
