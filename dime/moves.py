"""`dime move`: which flows a request names, and which of our addresses it moves them to.

A flow is named as ``dime status`` prints it, ``PROTO LOCAL REMOTE`` (``tcp
198.51.100.2:41080 192.0.2.1:5001``, IPv6 as ``[addr]:port``), or every flow to a
peer by its address (the remote identifier). ``via`` is one of our addresses or an
interface, whose address of each flow's IP version is taken. Every error is one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import ip_address
from typing import Any

from ihmp.addr import IPAddress
from stacktrans.service import TCP, UDP, FlowKey, LocalLink, endpoint

PROTOS = {"tcp": TCP, "udp": UDP}


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """``addr:port`` or ``[addr]:port``. Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not addr:port: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 endpoint is [addr]:port: {text!r}")
    try:
        return ip_address(host), int(port)
    except ValueError:
        raise ValueError(f"not an address: {host!r}") from None


def parse_flow(text: str) -> FlowKey:
    """``PROTO LOCAL REMOTE``, as ``dime status`` prints a flow. Raises ValueError."""
    parts = text.split()
    if len(parts) != 3 or parts[0].lower() not in PROTOS:
        raise ValueError(f"a flow is 'PROTO LOCAL REMOTE' (tcp|udp, addr:port): {text!r}")
    (local, lport), (remote, rport) = parse_endpoint(parts[1]), parse_endpoint(parts[2])
    return FlowKey(PROTOS[parts[0].lower()], local, lport, remote, rport)


def describe(key: FlowKey) -> str:
    proto = "tcp" if key.proto == TCP else "udp"
    return f"{proto} {endpoint(key.local, key.lport)} {endpoint(key.remote, key.rport)}"


def select(request: Mapping[str, Any], flows: Iterable[FlowKey]) -> list[FlowKey]:
    """The flows a request names (``flow`` or ``peer``). Raises ValueError."""
    flow, peer = request.get("flow"), request.get("peer")
    if (flow is None) == (peer is None):
        raise ValueError("name a flow (--flow) or a peer (--peer)")
    known = set(flows)
    if flow is not None:
        key = parse_flow(str(flow))
        if key not in known:
            raise ValueError(f"no flow {describe(key)} (see dime status)")
        return [key]
    try:
        addr = ip_address(str(peer))
    except ValueError:
        raise ValueError(f"not an address: {peer!r}") from None
    found = sorted((k for k in known if k.remote == addr), key=describe)
    if not found:
        raise ValueError(f"no flow to {addr} (see dime status)")
    return found


def resolve(
    via: str, links: Mapping[IPAddress, LocalLink], keys: Iterable[FlowKey]
) -> dict[FlowKey, IPAddress]:
    """Our address each flow goes to: ``via`` itself, or the address of the flow's IP
    version on interface ``via``. Raises ValueError."""
    try:
        addr: IPAddress | None = ip_address(via)
    except ValueError:
        addr = None
    if addr is not None and addr not in links:
        raise ValueError(f"{addr} is not an address of this host")
    if addr is None and not any(link.name == via for link in links.values()):
        raise ValueError(f"no interface {via!r} with a usable address")
    out: dict[FlowKey, IPAddress] = {}
    for key in keys:
        on = [addr] if addr is not None else [a for a, link in links.items() if link.name == via]
        same = [a for a in on if a.version == key.local.version]
        if not same:
            raise ValueError(f"{via} has no IPv{key.local.version} address for {describe(key)}")
        out[key] = key.local if key.local in same else same[0]
    return out
