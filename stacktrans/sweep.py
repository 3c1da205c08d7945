"""Which flows are still alive: how socket-table entries die with their flow.

A TCP flow lives while the kernel still has its socket (sock_diag). A UDP flow lives
while a UDP socket is bound to its local port, on its local address or on the
wildcard address: connected sockets (sock_diag lists them as flows) and also
unconnected ones (``sendto``/``recvfrom`` servers), which is why this reads every
UDP socket and not only the connected ones. An IPv4 UDP flow must also still have
its conntrack entry when conntrack runs here (it does in ``nft`` mode): that is its
idle timeout (conntrack's UDP timeouts). pyroute2 dumps only IPv4 conntrack, so
IPv6 UDP flows of a socket that stays bound have no idle timeout in ``nft`` mode;
in ``nfqueue`` mode the daemon sees every packet and times them out itself.
Flows are named by identifiers everywhere, which is what sockets and conntrack see.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv6Address

from stacktrans.adopt import existing_flows, proc_address
from stacktrans.socket_table import UDP, FlowKey

IPAddress = IPv4Address | IPv6Address
log = logging.getLogger("dime.sweep")

ANY4, ANY6 = IPv4Address(0), IPv6Address(0)


def udp_bindings() -> set[tuple[IPAddress, int]]:
    """(local address, port) of every UDP socket of this namespace, wildcards included."""
    out: set[tuple[IPAddress, int]] = set()
    for name in ("udp", "udp6"):
        try:
            with open(f"/proc/thread-self/net/{name}") as f:
                lines = f.readlines()[1:]
        except OSError as exc:
            log.debug("cannot read %s: %s", name, exc)
            continue
        for line in lines:
            try:
                addr, port = line.split()[1].split(":")
                out.add((_unmap(proc_address(addr)), int(port, 16)))
            except (IndexError, ValueError):
                continue
    return out


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def conntrack_udp4() -> set[FlowKey] | None:
    """IPv4 UDP conntrack entries, both orientations; None if conntrack is unavailable."""
    from pyroute2 import Conntrack

    out: set[FlowKey] = set()
    try:
        with Conntrack() as ct:
            for entry in ct.dump():
                orig = entry.get_attr("CTA_TUPLE_ORIG")
                ip, proto = orig.get_attr("CTA_TUPLE_IP"), orig.get_attr("CTA_TUPLE_PROTO")
                if proto.get_attr("CTA_PROTO_NUM") != UDP:
                    continue
                src = IPv4Address(ip.get_attr("CTA_IP_V4_SRC"))
                dst = IPv4Address(ip.get_attr("CTA_IP_V4_DST"))
                sport = proto.get_attr("CTA_PROTO_SRC_PORT")
                dport = proto.get_attr("CTA_PROTO_DST_PORT")
                out.add(FlowKey(UDP, src, sport, dst, dport))
                out.add(FlowKey(UDP, dst, dport, src, sport))
    except Exception as exc:  # no conntrack here: sockets decide alone
        log.debug("conntrack dump failed: %s", exc)
        return None
    return out


class Liveness:
    """A snapshot of the kernel's sockets (and IPv4 UDP conntrack), asked about flows."""

    def __init__(self, use_conntrack: bool = True) -> None:
        self.flows = set(existing_flows())
        self.udp = udp_bindings()
        self.ct = conntrack_udp4() if use_conntrack else None

    def __contains__(self, key: object) -> bool:
        if key in self.flows:
            return True
        if not isinstance(key, FlowKey) or key.proto != UDP:
            return False
        if key.local.version == 4 and self.ct and key not in self.ct:
            return False  # conntrack forgot it: idle longer than its UDP timeout
        anys = (ANY4, ANY6) if key.local.version == 4 else (ANY6,)
        return (key.local, key.lport) in self.udp or any((a, key.lport) in self.udp for a in anys)


def alive_flows() -> Liveness:
    """Which flows the kernel still has sockets for. Blocking: call it from a thread."""
    return Liveness()
