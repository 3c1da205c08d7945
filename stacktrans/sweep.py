"""Which flows are still alive: how socket-table entries die with their flow.

A TCP flow lives while the kernel still has its socket. A UDP flow lives while a UDP
socket is bound to its local port, on its local address or on the wildcard address:
connected sockets and also unconnected ones (``sendto``/``recvfrom`` servers), which
is why this reads every UDP socket and not only the connected ones. A UDP flow must
also still have its conntrack entry where conntrack runs (it does in ``nft`` mode):
that is its idle timeout (conntrack's UDP timeouts). In ``nfqueue`` mode the daemon
sees every packet and times UDP flows out itself. Flows are named by identifiers
everywhere, which is what sockets and conntrack see.

A sweep lists sockets with a lean sock_diag dump (:mod:`stacktrans.diag`: pyroute2
decodes 0.1 ms per socket, and ``/proc/net/udp`` grows with the square of the number
of sockets) and reads conntrack from ``nf_conntrack``'s text, pyroute2's ctnetlink
dump being the fallback (``nf_conntrack`` needs ``CONFIG_NF_CONNTRACK_PROCFS``);
pyroute2 dumps IPv4 conntrack only, so IPv6 UDP flows then have no idle timeout in
``nft`` mode. ``python -m testbed.sweep_cost`` measures each source.
"""

from __future__ import annotations

import logging
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

from stacktrans import diag
from stacktrans.adopt import endpoint_flow, proc_address, proc_flows, read_proc_net
from stacktrans.socket_table import TCP, UDP, FlowKey

IPAddress = IPv4Address | IPv6Address
log = logging.getLogger("dime.sweep")

ANY4, ANY6 = IPv4Address(0), IPv6Address(0)


def udp_bindings() -> set[tuple[IPAddress, int]]:
    """(local address, port) of every UDP socket of this namespace, wildcards included."""
    out: set[tuple[IPAddress, int]] = set()
    for name in ("udp", "udp6"):
        try:
            lines = read_proc_net(name)[1:]
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


def kernel_sockets() -> tuple[set[FlowKey], set[tuple[IPAddress, int]]]:
    """(TCP and connected UDP flows, (address, port) of every UDP socket).

    From a lean sock_diag dump (:mod:`stacktrans.diag`); from /proc where sock_diag
    cannot list a protocol (no ``udp_diag``).
    """
    flows: set[FlowKey] = set()
    bound: set[tuple[IPAddress, int]] = set()
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (TCP, UDP):
                for s in diag.dump(family, proto):
                    flow = endpoint_flow(proto, s.state, s.local, s.lport, s.remote, s.rport)
                    if flow is not None:
                        flows.add(flow)
                    if proto == UDP:
                        bound.add((_unmap(s.local), s.lport))
    except OSError as exc:
        log.debug("sock_diag dump failed (%s): reading /proc", exc)
        return _proc_sockets(), udp_bindings()
    return flows, bound


def _proc_sockets() -> set[FlowKey]:
    return {
        flow
        for family in (socket.AF_INET, socket.AF_INET6)
        for proto in (TCP, UDP)
        for flow in proc_flows(family, proto)
    }


def conntrack_udp() -> tuple[set[FlowKey], frozenset[int]] | None:
    """UDP conntrack entries, both orientations, and the IP versions they cover;
    None if conntrack is unavailable."""
    try:
        lines = read_proc_net("nf_conntrack")
    except OSError:
        v4 = conntrack_udp4()
        return None if v4 is None else (v4, frozenset({4}))
    out: set[FlowKey] = set()
    for line in lines:
        key = _conntrack_line(line)
        if key is not None:
            out.add(key)
            out.add(FlowKey(UDP, key.remote, key.rport, key.local, key.lport))
    return out, frozenset({4, 6})


def _conntrack_line(line: str) -> FlowKey | None:
    """The original tuple of a UDP line of nf_conntrack, as (src -> dst)."""
    fields = line.split()
    if len(fields) < 8 or fields[2] != "udp":
        return None
    tup: dict[str, str] = {}
    for field in fields[5:]:
        name, _, value = field.partition("=")
        if name in ("src", "dst", "sport", "dport") and name not in tup:
            tup[name] = value
    try:
        return FlowKey(
            UDP,
            ip_address(tup["src"]),
            int(tup["sport"]),
            ip_address(tup["dst"]),
            int(tup["dport"]),
        )
    except (KeyError, ValueError):
        return None


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
        self.flows, self.udp = kernel_sockets()
        ct = conntrack_udp() if use_conntrack else None
        self.ct: set[FlowKey] | None = ct[0] if ct is not None else None
        self.ct_versions: frozenset[int] = ct[1] if ct is not None else frozenset()

    def __contains__(self, key: object) -> bool:
        if key in self.flows:
            return True
        if not isinstance(key, FlowKey) or key.proto != UDP:
            return False
        if key.local.version in self.ct_versions and self.ct and key not in self.ct:
            return False  # conntrack forgot it: idle longer than its UDP timeout
        anys = (ANY4, ANY6) if key.local.version == 4 else (ANY6,)
        return (key.local, key.lport) in self.udp or any((a, key.lport) in self.udp for a in anys)


def alive_flows(use_conntrack: bool = True) -> Liveness:
    """Which flows the kernel still has sockets for. Blocking: call it from a thread."""
    return Liveness(use_conntrack)
