"""Reachability classes of section III-B of the DIME paper.

From a local address, a remote address is *known reachable*, *known unreachable* or
*potentially reachable*:

* both public -> known reachable;
* both in the same private or link-local block (10/8, 172.16/12, 192.168/16,
  100.64/10, fc00::/7, 169.254/16) -> potentially reachable: only a probe can tell,
  since two sites may use the same private block;
* a private local address towards a public remote -> potentially reachable (a NAT
  may or may not be in the way);
* anything else (other family, a private block the local address is not in, a
  link-local block this host has no address in, loopback, multicast) -> known
  unreachable. These are never probed: the paper's 169.254 example.

"Public" means "not in a private or link block", so the documentation ranges used by
the testbed count as public, as they would on the Internet.
"""

from __future__ import annotations

import enum
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
    if rblock is not None and rblock == lblock:
        return Reach.POTENTIAL
    if rblock is None and lblock is not None and lblock in PRIVATE_BLOCKS:
        return Reach.POTENTIAL
    return Reach.UNREACHABLE


def best_path(
    remotes: list[IPAddress] | tuple[IPAddress, ...], locals_: list[IPAddress]
) -> tuple[Reach, IPAddress | None, IPAddress | None]:
    """The best (class, local, remote) pair; remotes and locals are tried in order."""
    best: tuple[Reach, IPAddress | None, IPAddress | None] = (Reach.UNREACHABLE, None, None)
    for remote in remotes:
        for local in locals_:
            reach = classify(remote, local)
            if reach > best[0]:
                best = (reach, local, remote)
    return best
