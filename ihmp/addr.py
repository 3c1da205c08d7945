"""Address types used across dime: the one place the IP unions are defined.

``ipaddress`` has separate classes per family; every module of dime works with
either, so these unions are the types of identifiers and locators everywhere.
"""

from __future__ import annotations

from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

IPAddress = IPv4Address | IPv6Address
IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network


def addr_key(addr: IPAddress) -> tuple[int, bytes]:
    """A sort key that orders addresses of both families deterministically."""
    return (addr.version, addr.packed)


def usable(addr: IPAddress) -> bool:
    """Whether ``addr`` can be a locator at all (not loopback, multicast, unspecified)."""
    return not (addr.is_loopback or addr.is_multicast or addr.is_unspecified)


def unmap(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as the IPv4 address it maps."""
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr
