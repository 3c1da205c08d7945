"""Flow death as the kernel announces it: destroyed sockets, forgotten conntrack entries.

The liveness sweep (:func:`stacktrans.kernel_flows.alive_flows`) lists every socket
and, in ``nft`` mode, every conntrack entry to find the few flows that ended: seconds
of CPU at 100k flows. Here the kernel says which ones instead:

* **sock_diag destroy groups** (``NETLINK_SOCK_DIAG``, ``SKNLGRP_INET{,6}_{TCP,UDP}
  _DESTROY``): the ``inet_diag_msg`` of every TCP and UDP socket of the namespace as
  it is freed. A TCP socket is freed when it closes or enters TIME_WAIT (the
  TIME_WAIT socket that replaces it is no full socket and announces nothing);
* **conntrack destroy events** (``NETLINK_NETFILTER``, ``NFNLGRP_CONNTRACK_DESTROY``),
  in ``nft`` mode, where a UDP flow served by an unconnected socket ends when
  conntrack forgets it (its UDP timeout), as the sweep has it. With the kernel's
  default ``nf_conntrack_events = 2`` only entries created while a listener is
  bound report their end: the daemon binds before it adopts flows.

An event only makes a flow a *suspect* (:class:`Suspects`): the service then asks
the kernel about each suspect by exact sock_diag lookups
(:func:`stacktrans.kernel_flows.check_flows`), whose cost is per suspect, not per
socket, and which keep the sweep's meaning of "alive": a TCP flow in TIME_WAIT still
lives (checked again once TIME_WAIT is over: no event says so), a UDP flow lives
while a socket receives its packets.

Verified on Linux 6.18 in a namespace: all four destroy groups fire (TCP and UDP,
IPv4 and IPv6, with the ``INET_DIAG_PROTOCOL`` attribute), and conntrack reports UDP
entries timing out. Events can be lost (the socket's buffer overflows: ENOBUFS): the
owner hears of it and sweeps in full.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import socket
import struct
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from ihmp.addr import IPAddress, unmap
from stacktrans.kernel_flows import (
    NETLINK_SOCK_DIAG,
    SOCK_DIAG_BY_FAMILY,
    TCP_LIVE_STATES,
    DiagSocketInfo,
    SockDiag,
    TcpState,
    parse_diag_msg,
)
from stacktrans.netlink import (
    EVENT_RCVBUF,
    NETLINK_NETFILTER,
    attribute,
    attributes,
    messages,
    open_socket,
)
from stacktrans.socket_table import TCP, UDP, FlowKey

__all__ = [
    "Death",
    "DeathWatch",
    "Fate",
    "Suspects",
    "check_flows",
    "parse_conntrack_destroy",
    "parse_socket_destroy",
]

log = logging.getLogger("dime.flow_death")
#: Datagrams one wake-up of the event loop reads from a destroy-event socket.
READ_BURST = 64

# include/uapi/linux/sock_diag.h
SKNLGRP_INET_TCP_DESTROY, SKNLGRP_INET_UDP_DESTROY = 1, 2
SKNLGRP_INET6_TCP_DESTROY, SKNLGRP_INET6_UDP_DESTROY = 3, 4
SOCK_GROUPS = (
    SKNLGRP_INET_TCP_DESTROY,
    SKNLGRP_INET_UDP_DESTROY,
    SKNLGRP_INET6_TCP_DESTROY,
    SKNLGRP_INET6_UDP_DESTROY,
)
INET_DIAG_MSG_SIZE = 72
INET_DIAG_PROTOCOL = 10  # u8 attribute: the destroy message's only word on the protocol

# include/uapi/linux/netfilter/nfnetlink*.h
NFNLGRP_CONNTRACK_DESTROY = 3
IPCTNL_MSG_CT_DELETE = 1 << 8 | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
NFGENMSG_SIZE = 4

#: Room for about 20,000 destroy messages while the daemon is busy (a TCP one carries
#: tcp_info: ~400 bytes).
#: Linux's TCP_TIMEWAIT_LEN: how long a TIME_WAIT socket lives (a fixed 60 s).
TIME_WAIT_S = 60.0


# == events ===============================================================================


@dataclass(frozen=True, slots=True)
class Death:
    """What one event says ended. ``conntrack``: a conntrack entry's flow (as its
    original tuple, src -> dst); else a socket: its ends, where an unconnected
    socket's remote end is unspecified, port 0. IPv4-mapped addresses are unmapped."""

    proto: int
    local: IPAddress
    lport: int
    remote: IPAddress
    rport: int
    conntrack: bool = False

    @property
    def connected(self) -> bool:
        return not self.remote.is_unspecified and self.rport != 0

    def key(self) -> FlowKey:
        return FlowKey(self.proto, self.local, self.lport, self.remote, self.rport)


def parse_socket_destroy(payload: bytes | memoryview) -> Death | None:
    """The socket of one sock_diag destroy message (after its netlink header); None
    for one that is no TCP or UDP socket. ValueError if malformed."""
    info = parse_diag_msg(payload)
    raw = attribute(payload, INET_DIAG_MSG_SIZE, INET_DIAG_PROTOCOL)
    if raw is None or len(raw) < 1:
        raise ValueError("no INET_DIAG_PROTOCOL attribute")
    if raw[0] not in (TCP, UDP):
        return None
    local, remote = unmap(info.local), unmap(info.remote)
    return Death(raw[0], local, info.lport, remote, info.rport)


def parse_conntrack_destroy(payload: bytes | memoryview) -> Death | None:
    """The UDP flow of one conntrack destroy event (after its netlink header), by its
    original tuple; None for other protocols. ValueError if malformed."""
    if len(payload) < NFGENMSG_SIZE:
        raise ValueError(f"ctnetlink message of {len(payload)} bytes")
    orig = attribute(payload, NFGENMSG_SIZE, CTA_TUPLE_ORIG)
    if orig is None:
        raise ValueError("no CTA_TUPLE_ORIG")
    ip, proto = attribute(orig, 0, CTA_TUPLE_IP), attribute(orig, 0, CTA_TUPLE_PROTO)
    if ip is None or proto is None:
        raise ValueError("tuple without addresses or protocol")
    fields = dict(attributes(proto))
    num = fields.get(CTA_PROTO_NUM)
    if num is None or len(num) < 1:
        raise ValueError("tuple without a protocol number")
    if num[0] != UDP:
        return None
    addrs = {kind: bytes(value) for kind, value in attributes(ip)}
    src, dst = (
        _tuple_address(addrs, CTA_IP_V4_SRC, CTA_IP_V6_SRC),
        _tuple_address(addrs, CTA_IP_V4_DST, CTA_IP_V6_DST),
    )
    sport, dport = fields.get(CTA_PROTO_SRC_PORT), fields.get(CTA_PROTO_DST_PORT)
    if sport is None or dport is None or len(sport) != 2 or len(dport) != 2:
        raise ValueError("UDP tuple without ports")
    return Death(UDP, src, struct.unpack("!H", sport)[0], dst, struct.unpack("!H", dport)[0], True)


def _tuple_address(addrs: dict[int, bytes], v4: int, v6: int) -> IPAddress:
    if len(addrs.get(v4, b"")) == 4:
        return IPv4Address(addrs[v4])
    if len(addrs.get(v6, b"")) == 16:
        return IPv6Address(addrs[v6])
    raise ValueError("tuple without an address")


class DeathWatch:
    """The destroy groups, read from the event loop: each :class:`Death` to
    ``on_death``; ``on_lost()`` when the kernel dropped some (ENOBUFS).

    ``conntrack``: also conntrack's destroy events (nft mode). :meth:`start` raises
    OSError when the socket groups cannot be joined; conntrack events are optional
    (:attr:`conntrack_events` says whether they come).
    """

    def __init__(
        self,
        on_death: Callable[[Death], None],
        on_lost: Callable[[], None],
        conntrack: bool = False,
    ) -> None:
        self.on_death = on_death
        self.on_lost = on_lost
        self.want_conntrack = conntrack
        self.conntrack_events = False
        self.events = 0  # deaths heard (of TCP and UDP sockets and UDP conntrack entries)
        self.lost = 0  # reads that found events dropped (ENOBUFS)
        self.malformed = 0  # messages that could not be parsed, or failed their handler
        self._socks: list[tuple[socket.socket, Callable[[bytes | memoryview], Death | None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        mask = sum(1 << (g - 1) for g in SOCK_GROUPS)
        diag = _subscribed(NETLINK_SOCK_DIAG, mask)
        self._socks.append((diag, parse_socket_destroy))
        if self.want_conntrack:
            why = _conntrack_events_off()
            try:
                if why is not None:
                    raise OSError(why)
                ct = _subscribed(NETLINK_NETFILTER, 1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
            except OSError as exc:
                log.warning(
                    "no conntrack destroy events (%s): idle UDP flows wait for a sweep", exc
                )
            else:
                self._socks.append((ct, parse_conntrack_destroy))
                self.conntrack_events = True
        self._loop = loop
        for sock, parse in self._socks:
            loop.add_reader(sock.fileno(), self.read, sock, parse)

    def stop(self) -> None:
        for sock, _ in self._socks:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()

    def read(
        self, sock: socket.socket, parse: Callable[[bytes | memoryview], Death | None]
    ) -> None:
        """Handle the events waiting on ``sock``, at most :data:`READ_BURST`
        datagrams (the reader is called again for the rest: a flood of ends must not
        starve the event loop); never raises."""
        for _ in range(READ_BURST):
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    log.warning("reading destroy events: %s", exc)
                    return
                self.lost += 1
                self.on_lost()
                continue
            self.feed(data, parse)

    def feed(self, data: bytes, parse: Callable[[bytes | memoryview], Death | None]) -> None:
        for kind, _, payload in messages(data):
            if kind not in (SOCK_DIAG_BY_FAMILY, IPCTNL_MSG_CT_DELETE):
                continue
            try:
                death = parse(payload)
                if death is not None:
                    self.events += 1
                    self.on_death(death)
            except Exception as exc:  # an event must never take the daemon down
                self.malformed += 1
                log.debug("skipping destroy event: %r", exc)


def _subscribed(protocol: int, groups: int) -> socket.socket:
    sock = open_socket(protocol, groups, rcvbuf=EVENT_RCVBUF)
    sock.setblocking(False)
    return sock


def _conntrack_events_off() -> str | None:
    """Why conntrack sends no events here (``nf_conntrack_events = 0``), or None."""
    path = Path("/proc/sys/net/netfilter/nf_conntrack_events")
    try:
        return "net.netfilter.nf_conntrack_events = 0" if path.read_text().strip() == "0" else None
    except OSError:
        return None  # conntrack not loaded yet: dime's rules load it, events default on


# == suspects =============================================================================


class Fate(enum.Enum):
    """What an exact lookup found for a suspect flow."""

    GONE = "gone"  # no socket would take its packets
    CONNECTED = "connected"  # its own socket (TCP: in a state worth translating)
    LINGERING = "lingering"  # TCP: a closing socket is left (TIME_WAIT, mostly)
    BOUND = "bound"  # UDP: only an unconnected socket takes its packets
    UNKNOWN = "unknown"  # the kernel cannot be asked (no udp_diag): the sweep decides


@dataclass(slots=True)
class _Suspicion:
    due: float
    conntrack_at: float | None  # when conntrack said it ended (else a socket did)


class Suspects:
    """Flows an event put in doubt, until an exact lookup settles them. Sans-I/O.

    ``add`` them; ``take(now)`` the ones due for a lookup; ``settle`` the lookup's
    answers, which returns the flows that ended. A TCP flow left lingering (TIME_WAIT)
    is due again once TIME_WAIT is over. A UDP flow only an unconnected socket serves has ended when
    conntrack said so, and lives on when a socket said so (the server is still there).
    """

    def __init__(self) -> None:
        self._due: dict[FlowKey, _Suspicion] = {}

    def __len__(self) -> int:
        return len(self._due)

    def add(self, keys: Iterable[FlowKey], now: float, conntrack: bool = False) -> None:
        for key in keys:
            old = self._due.get(key)
            ct_at = now if conntrack else (old.conntrack_at if old else None)
            self._due[key] = _Suspicion(now, ct_at)

    def next_due(self) -> float | None:
        return min((s.due for s in self._due.values()), default=None)

    def take(self, now: float) -> dict[FlowKey, float | None]:
        """The suspects due by ``now`` (removed), each with when conntrack said it
        ended (None: a socket did)."""
        due = {k: s.conntrack_at for k, s in self._due.items() if s.due <= now}
        for key in due:
            del self._due[key]
        return due

    def settle(
        self, taken: dict[FlowKey, float | None], fates: dict[FlowKey, Fate], now: float
    ) -> dict[FlowKey, float | None]:
        """Those of ``taken`` that ended (with their conntrack time); lingering flows
        become due again after TIME_WAIT."""
        ended: dict[FlowKey, float | None] = {}
        for key, ct_at in taken.items():
            fate = fates.get(key, Fate.UNKNOWN)
            if fate is Fate.GONE or (fate is Fate.BOUND and ct_at is not None):
                ended[key] = ct_at
            elif fate is Fate.LINGERING and key not in self._due:
                self._due[key] = _Suspicion(now + TIME_WAIT_S + 1.0, ct_at)
        return ended


_CLOSING = frozenset(
    {
        TcpState.FIN_WAIT1,
        TcpState.FIN_WAIT2,
        TcpState.TIME_WAIT,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
    }
)


def check_flows(keys: Collection[FlowKey]) -> dict[FlowKey, Fate]:
    """The :class:`Fate` of each key, by exact sock_diag lookups (a cost per key,
    whatever the number of sockets). OSError if sock_diag is unavailable. Blocking:
    call it from a thread."""
    with SockDiag() as diag:
        udp_ok = diag.udp_lookups_work()
        found = diag.lookup(k for k in keys if udp_ok or k.proto == TCP)
    return {key: _fate(key, found.get(key), udp_ok) for key in keys}


def _fate(key: FlowKey, info: DiagSocketInfo | None, udp_ok: bool) -> Fate:
    if key.proto == UDP and not udp_ok:
        return Fate.UNKNOWN
    if info is None:
        return Fate.GONE
    if key.proto == TCP:
        if info.flow(TCP, TCP_LIVE_STATES) != key:
            return Fate.GONE  # a listener on its port, or another socket: not the flow's
        # After its destroy event a flow still found closing is a TIME_WAIT socket
        # (which reports FIN_WAIT2 while the peer has not closed): nothing will say
        # when it goes. An open one is a new socket, whose own end will be heard.
        return Fate.LINGERING if info.state in _CLOSING else Fate.CONNECTED
    return Fate.CONNECTED if info.flow(UDP) == key else Fate.BOUND
