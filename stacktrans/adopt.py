"""The connections that already exist when the daemon starts, for adoption.

StackTrans must keep rewriting the packets of connections opened before it started,
or they would break at the first handoff. :func:`existing_flows` lists them through
the kernel's sock_diag interface (``NETLINK_SOCK_DIAG``, what ``ss`` uses), which
sees exactly the sockets of the calling thread's network namespace.

It is synchronous and blocks on a netlink round trip per family and protocol: call it
from a thread (``await asyncio.to_thread(existing_flows)``), never directly inside a
running event loop, where pyroute2's synchronous sockets do not work.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv6Address, ip_address

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import (
    SS_CLOSE_WAIT,
    SS_CLOSING,
    SS_ESTABLISHED,
    SS_FIN_WAIT1,
    SS_FIN_WAIT2,
    SS_LAST_ACK,
    SS_SYN_RECV,
    SS_SYN_SENT,
)

from stacktrans.socket_table import FlowKey

__all__ = ["TCP_ADOPT_STATES", "Flow", "diag_flow", "existing_flows", "proc_flows"]

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address

IPPROTO_TCP = 6
IPPROTO_UDP = 17

#: TCP states worth adopting: every state in which packets still flow between the two
#: ends. LISTEN has no peer; TIME_WAIT and CLOSE are over (a TIME_WAIT socket only
#: answers stray segments, which may as well be lost). CLOSING (both ends sent FIN at
#: once) is kept like FIN_WAIT1/LAST_ACK: our FIN still waits for its ACK.
TCP_ADOPT_STATES = frozenset(
    {
        SS_ESTABLISHED,
        SS_SYN_SENT,
        SS_SYN_RECV,
        SS_FIN_WAIT1,
        SS_FIN_WAIT2,
        SS_CLOSE_WAIT,
        SS_LAST_ACK,
        SS_CLOSING,
    }
)

# sock_diag filters on a bit mask of states. A connected UDP socket reports ESTABLISHED,
# but we decide on its remote end instead.
_TCP_MASK = sum(1 << s for s in TCP_ADOPT_STATES)
_ALL_STATES = (1 << 12) - 1


# A flow as its socket sees it; the socket table's own key, so adoption needs no
# conversion.
Flow = FlowKey


def existing_flows() -> list[Flow]:
    """List the TCP and connected UDP flows of the current network namespace.

    Contract:

    * TCP sockets in the states of :data:`TCP_ADOPT_STATES`; UDP sockets with a
      remote address and port (``connect()``-ed), whatever their state;
    * both ends fully known: a socket with an unspecified local or remote address,
      or remote port 0, is no flow;
    * IPv4 and IPv6; IPv4-mapped IPv6 addresses are given as IPv4;
    * flows with a loopback address at either end are left out (they never leave the
      host, so they have nothing to hand off);
    * each flow appears once, in the kernel's order (IPv4 TCP, IPv4 UDP, IPv6 TCP,
      IPv6 UDP);
    * the source is sock_diag. Where it says nothing for a family and protocol (as
      when ``udp_diag`` is not available: pyroute2 then returns an empty dump, not an
      error) or fails, ``/proc/thread-self/net/{tcp,udp}{,6}`` is read instead, which
      holds the same sockets in text form.

    Blocking: run it in a thread when an event loop is running.
    """
    flows: dict[Flow, None] = {}  # a dict keeps the order and drops duplicates
    ds = _diag_socket()
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            for proto in (IPPROTO_TCP, IPPROTO_UDP):
                for flow in _dump(ds, family, proto):
                    flows[flow] = None
    finally:
        if ds is not None:
            ds.close()
    return list(flows)


def _diag_socket() -> DiagSocket | None:
    ds = None
    try:
        ds = DiagSocket()
        ds.bind()
    except Exception as exc:
        log.warning("no sock_diag socket, reading /proc: %r", exc)
        if ds is not None:
            ds.close()
        return None
    return ds


def _dump(ds: DiagSocket | None, family: int, proto: int) -> list[Flow]:
    # sock_diag filters TCP by state for us; UDP states mean little, ask for all.
    states = _TCP_MASK if proto == IPPROTO_TCP else _ALL_STATES
    msgs = ()
    if ds is not None:
        try:
            msgs = ds.get_sock_stats(family=family, protocol=proto, states=states)
        except Exception as exc:  # NetlinkError, OSError, decoding errors
            log.warning("sock_diag dump of family %d proto %d: %r", family, proto, exc)
    if msgs:
        return list(_flows(msgs, proto))
    # Empty means "no socket" or "cannot dump" (pyroute2 hides the error); /proc knows.
    found = proc_flows(family, proto)
    if found:
        log.info("sock_diag listed nothing for family %d proto %d, /proc did", family, proto)
    return found


def proc_flows(family: int, proto: int) -> list[Flow]:
    """The flows of ``/proc/thread-self/net/{tcp,udp}{,6}``, filtered like sock_diag's.

    The fallback of :func:`existing_flows`; an unreadable file gives no flows.
    """
    name = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}[proto]
    if family == socket.AF_INET6:
        name += "6"
    try:
        lines = read_proc_net(name)[1:]  # the first line names the columns
    except OSError as exc:
        log.warning("cannot read /proc net %s: %s", name, exc)
        return []
    out = []
    for line in lines:
        try:
            # "sl local_address rem_address st ...": addresses as ADDR:PORT in hex.
            _, local, remote, state = line.split()[:4]
            laddr, lport = local.split(":")
            raddr, rport = remote.split(":")
            flow = endpoint_flow(
                proto,
                int(state, 16),
                proc_address(laddr),
                int(lport, 16),
                proc_address(raddr),
                int(rport, 16),
            )
        except (TypeError, ValueError) as exc:
            log.debug("skipping /proc line %r: %s", line, exc)
            continue
        if flow is not None:
            out.append(flow)
    return out


def endpoint_flow(
    proto: int, state: int, local: IPAddress, lport: int, remote: IPAddress, rport: int
) -> Flow | None:
    """The flow of a socket with these fields; None if it is not one worth translating
    (see :func:`existing_flows`' contract). A sweep asks this of 100k sockets."""
    if proto == IPPROTO_TCP and state not in TCP_ADOPT_STATES:
        return None
    local, remote = _unmap(local), _unmap(remote)
    if remote.is_unspecified or rport == 0 or local.is_unspecified:
        return None  # an unconnected UDP socket: no flow to speak of
    if local.is_loopback or remote.is_loopback:
        return None
    return Flow(proto=proto, local=local, lport=lport, remote=remote, rport=rport)


def read_proc_net(name: str) -> list[str]:
    """The lines of ``/proc/thread-self/net/<name>`` (OSError if unreadable).

    The kernel prints these tables a page per read() and walks its hash table from
    the start for each page, so listing n UDP sockets or conntrack entries costs
    about n^2: fine for a fallback, too slow for a sweep of 100k (:mod:`.diag`).
    """
    with open(f"/proc/thread-self/net/{name}") as f:
        return f.read().splitlines()


def proc_address(text: str) -> IPAddress:
    # The kernel prints the address in 32-bit words, each as a native-endian integer
    # (%08X of the __be32 in memory): converting back in native order restores the
    # network-order bytes.
    if len(text) not in (8, 32):
        raise ValueError(f"address {text!r}")
    raw = b"".join(
        int(text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(text), 8)
    )
    return ip_address(raw)


def _flows(msgs: Iterable[Mapping[str, object]], proto: int) -> Iterable[Flow]:
    for msg in msgs:
        try:
            flow = diag_flow(msg, proto)
        except (KeyError, TypeError, ValueError) as exc:
            # Not an inet_diag_msg we understand (an error, a truncated message...).
            log.debug("skipping sock_diag message %r: %s", msg, exc)
            continue
        if flow is not None:
            yield flow


def diag_flow(msg: Mapping[str, object], proto: int) -> Flow | None:
    """The flow of one sock_diag message (or /proc line as a dict); None if it is not
    one worth translating. Raises KeyError, TypeError or ValueError on a bad message."""
    header = msg.get("header")
    if isinstance(header, Mapping) and header.get("error") is not None:
        raise ValueError(f"error {header['error']}")
    if msg["idiag_family"] not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"family {msg['idiag_family']}")
    return endpoint_flow(
        proto,
        int(msg["idiag_state"]),  # type: ignore[call-overload]
        ip_address(str(msg["idiag_src"])),
        _port(msg["idiag_sport"]),
        ip_address(str(msg["idiag_dst"])),
        _port(msg["idiag_dport"]),
    )


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _port(value: object) -> int:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"port {value!r}")
    return value
