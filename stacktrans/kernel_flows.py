"""The kernel's sockets and conntrack entries, listed: the flows dime finds on a host.

Three questions, one module:

* adoption at start-up, :func:`existing_flows`: which TCP and connected UDP flows
  exist (StackTrans must keep rewriting the packets of connections opened before it
  started, or they would break at the first handoff);
* the liveness sweep, :func:`alive_flows`: which socket-table flows still live (see
  :class:`Liveness` for what "alive" means for TCP and UDP);
* :mod:`stacktrans.rto_revert`, :func:`tcp_progress`: ``tcp_info`` of chosen TCP
  sockets, after a path change.

Sources:

* **sock_diag** (``NETLINK_SOCK_DIAG``, what ``ss`` uses), which sees exactly the
  sockets of the calling thread's network namespace, through :class:`SockDiag`: a
  socket's endpoints and state sit at fixed offsets of the ``inet_diag_msg`` header
  and ``tcp_info`` at the kernel's ``struct tcp_info`` offsets, so ``struct`` reads
  them and nothing else decodes. A *dump* lists every socket of a family and
  protocol; an *exact lookup* (a request without ``NLM_F_DUMP`` naming one socket's
  addresses and ports) answers for that socket only, so :func:`tcp_progress` costs
  in proportion to the flows asked, not to the sockets of the host.
* **/proc** ``/proc/thread-self/net/{tcp,udp}{,6}``: the same sockets as text; the
  fallback where sock_diag fails or lists nothing for a family and protocol (no
  ``udp_diag``).
* **conntrack**, for the sweep's UDP idle timeouts: ``/proc/net/nf_conntrack`` text,
  pyroute2's ctnetlink dump as the fallback where that file is missing
  (``nf_conntrack`` needs ``CONFIG_NF_CONNTRACK_PROCFS``). pyroute2 dumps IPv4
  conntrack only, so IPv6 UDP flows then have no idle timeout in ``nft`` mode.

Measured costs (CPU seconds of one listing; ``python -m testbed.sweep_cost``,
``testbed/results/sweep_cost.json``, 19k UDP flows): sock_diag through pyroute2's
``DiagSocket``, which decoded each message into nested dicts, 2.6 (about 0.1 ms per
socket: 10 s for 100k), through this parser 0.6; ``/proc/net/{tcp,udp}{,6}`` 0.35,
but the kernel restarts its walk of the UDP table for every 4 KiB page it prints, so
that listing grows with the square of the number of sockets (tens of seconds at
100k); conntrack through pyroute2 4.5, from ``nf_conntrack`` 0.4 (the same restart
per page). Hence the lean sock_diag parser first and /proc as the fallback.
``tcp_info`` of 10 flows among 10k TCP sockets (measured once, in a namespace): 1.4 s
through pyroute2's dump of every socket, 0.6 ms by exact lookups.

Everything here is synchronous and blocks on netlink round trips or /proc reads:
call it from a thread (``await asyncio.to_thread(existing_flows)``), not from a
running event loop, which it would stall.
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from ihmp.addr import IPAddress, unmap
from stacktrans.netlink import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    attribute,
    error_code,
    message,
    messages,
)
from stacktrans.socket_table import TCP, UDP, FlowKey

__all__ = [
    "TCP_ADOPT_STATES",
    "DiagError",
    "DiagSocketInfo",
    "Flow",
    "Liveness",
    "SockDiag",
    "TcpProgress",
    "TcpState",
    "alive_flows",
    "conntrack_line",
    "conntrack_udp",
    "conntrack_udp4",
    "endpoint_flow",
    "existing_flows",
    "kernel_sockets",
    "parse_diag_msg",
    "parse_tcp_info",
    "proc_address",
    "proc_flows",
    "proc_sockets",
    "read_proc_net",
    "tcp_progress",
    "udp_bindings",
]

log = logging.getLogger("dime.kernel_flows")

# A flow as its socket sees it; the socket table's own key, so no conversion is needed.
Flow = FlowKey
# (local address, port) a UDP socket is bound to; the address may be a wildcard.
Binding = tuple[IPAddress, int]

FAMILIES = (socket.AF_INET, socket.AF_INET6)
PROTOCOLS = (TCP, UDP)


class TcpState(enum.IntEnum):
    """The kernel's TCP states (``include/net/tcp_states.h``), as sock_diag and /proc
    report them."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11


#: TCP states worth adopting: every state in which packets still flow between the two
#: ends. LISTEN has no peer; TIME_WAIT and CLOSE are over (a TIME_WAIT socket only
#: answers stray segments, which may as well be lost). CLOSING (both ends sent FIN at
#: once) is kept like FIN_WAIT1/LAST_ACK: our FIN still waits for its ACK.
TCP_ADOPT_STATES = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.SYN_SENT,
        TcpState.SYN_RECV,
        TcpState.FIN_WAIT1,
        TcpState.FIN_WAIT2,
        TcpState.CLOSE_WAIT,
        TcpState.LAST_ACK,
        TcpState.CLOSING,
    }
)

#: TCP states in which a flow dime translates is still alive: those worth adopting,
#: and TIME_WAIT. A socket in TIME_WAIT still answers the peer's retransmitted FIN
#: (its last ACK may have been lost in a handoff): without the translation that FIN
#: would come from an unknown locator and draw a reset.
TCP_LIVE_STATES = TCP_ADOPT_STATES | {TcpState.TIME_WAIT}

ALL_STATES = 0xFFFFFFFF


def _dump_states(proto: int, states: frozenset[int]) -> int:
    # sock_diag filters TCP by state for us (a bit mask of states); UDP states mean
    # little (a connected socket reports ESTABLISHED): ask for all, decide on the
    # remote end instead.
    return sum(1 << s for s in states) if proto == TCP else ALL_STATES


def endpoint_flow(
    proto: int,
    state: int,
    local: IPAddress,
    lport: int,
    remote: IPAddress,
    rport: int,
    states: frozenset[int] = TCP_ADOPT_STATES,
) -> Flow | None:
    """The flow of a socket with these fields; None if it is not one worth translating
    (see :func:`existing_flows`' contract; a TCP socket must be in one of ``states``).
    A sweep asks this of 100k sockets."""
    if proto == TCP and state not in states:
        return None
    local, remote = unmap(local), unmap(remote)
    if remote.is_unspecified or rport == 0 or local.is_unspecified:
        return None  # an unconnected UDP socket: no flow to speak of
    if local.is_loopback or remote.is_loopback:
        return None
    return Flow(proto=proto, local=local, lport=lport, remote=remote, rport=rport)


# == sock_diag ==========================================================================

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_INFO = 2  # the attribute holding struct tcp_info
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # "any socket with these addresses" (no cookie check)
#: Exact lookups sent at once. The kernel answers them all before send() returns, and
#: drops an answer that does not fit the socket's receive buffer (the next recv() then
#: fails with ENOBUFS). Measured with tcp_info and the default 208 KiB buffer: 128
#: answers fit, 256 did not.
LOOKUP_BATCH = 32

# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid.
_REQ = struct.Struct("=BBBBI")
# inet_diag_sockid: sport, dport, src, dst (4 or 16 bytes, zero-padded) in network
# order, then interface and cookie in host order (0 and all ones: the same either way).
_SOCKID = struct.Struct("!HH16s16sIII")
# inet_diag_msg: family, state, timer, retrans, sport, dport (network order), src, dst;
# then interface, cookie, expires, queues, uid, inode: 72 bytes in all.
_MSG = struct.Struct("=BBBB2H16s16s")
_MSG_SIZE = 72
_ALEN = {socket.AF_INET: 4, socket.AF_INET6: 16}

_address = functools.lru_cache(maxsize=4096)(ip_address)  # few distinct addresses


class DiagError(OSError):
    """The kernel refused a sock_diag request (e.g. no ``udp_diag`` for a dump)."""


@dataclass(frozen=True)
class TcpProgress:
    """What ``tcp_info`` says about one socket's retransmission state."""

    backoff: int  # icsk_backoff: how many times the timer doubled
    retransmits: int  # icsk_retransmits: unanswered retransmission timeouts in a row
    bytes_acked: int
    bytes_received: int = 0
    snd_wnd: int = 0  # the peer's window as TCP has it, in bytes (0: not reported)
    snd_wscale: int = 0
    unacked: int = 0  # segments sent and not yet acknowledged (in flight or lost)
    snd_mss: int = 0  # the segment size TCP sends, options it always carries excluded
    pmtu: int = 0  # the path MTU the socket uses
    timestamps: bool = False  # every segment carries the timestamp option (12 bytes)


@dataclass(frozen=True, slots=True)
class DiagSocketInfo:
    """One socket as sock_diag reports it (addresses as the kernel gives them:
    IPv4-mapped IPv6 addresses stay mapped)."""

    family: int
    state: int
    local: IPAddress
    lport: int
    remote: IPAddress
    rport: int
    tcp_info: TcpProgress | None = None  # only where asked for, and only TCP has it

    def flow(self, proto: int, states: frozenset[int] = TCP_ADOPT_STATES) -> Flow | None:
        """:func:`endpoint_flow` of this socket."""
        return endpoint_flow(
            proto, self.state, self.local, self.lport, self.remote, self.rport, states
        )


class SockDiag:
    """A ``NETLINK_SOCK_DIAG`` socket of the calling thread's network namespace.

    Blocking; OSError if sock_diag is unavailable. Close it (or use ``with``).
    """

    def __init__(self) -> None:
        self._nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        try:
            self._nl.bind((0, 0))
        except OSError:
            self._nl.close()
            raise
        self._seq = os.getpid() & 0xFFFF  # any start; answers are matched by seq

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._nl.close()

    def dump(self, family: int, protocol: int, states: int = ALL_STATES) -> list[DiagSocketInfo]:
        """Every socket of ``family`` and ``protocol`` whose state is in the bit mask
        ``states``. An AF_INET dump leaves out IPv6 sockets with IPv4-mapped addresses;
        the AF_INET6 dump has them. DiagError if the kernel refuses the dump."""
        seq = self._next_seq()
        self._nl.sendall(_request(seq, NLM_F_REQUEST | NLM_F_DUMP, family, protocol, states))
        out: list[DiagSocketInfo] = []
        while True:
            for kind, msg_seq, payload in messages(self._nl.recv(1 << 20)):
                if msg_seq != seq:
                    continue  # not an answer to this request
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    code = error_code(payload)
                    if code:
                        raise DiagError(code, f"sock_diag dump refused: {os.strerror(code)}")
                    return out
                if kind == SOCK_DIAG_BY_FAMILY:
                    info = _parsed(payload, with_tcp_info=False)
                    if info is not None:
                        out.append(info)

    def lookup_tcp(
        self, keys: Iterable[FlowKey], with_tcp_info: bool = False
    ) -> dict[FlowKey, DiagSocketInfo]:
        """The TCP sockets of ``keys``, by exact lookups: as many requests as keys,
        whatever the number of sockets on the host.

        A key is in the result only if its socket exists and :func:`endpoint_flow`
        gives that very key for it (so no TIME_WAIT, LISTEN or loopback socket):
        the kernel answers a lookup with no connected socket by the socket
        listening on the local port, if any. Keys of other protocols are ignored.
        The kernel's lookup also misses a socket bound to an interface
        (``SO_BINDTODEVICE``), as it is not asked for that interface.
        """
        found = self.lookup((k for k in keys if k.proto == TCP), with_tcp_info)
        return {key: info for key, info in found.items() if info.flow(TCP) == key}

    def lookup(
        self, keys: Iterable[FlowKey], with_tcp_info: bool = False
    ) -> dict[FlowKey, DiagSocketInfo]:
        """The socket the kernel would hand each key's packets to, by exact lookups,
        as it is (no filtering): for TCP the flow's socket in any state (TIME_WAIT
        included) or else a socket listening on its local port; for UDP the flow's
        connected socket or else one bound to its local port (on its local address
        or the wildcard). Keys with no such socket are not in the result; keys of
        other protocols are ignored. Without ``udp_diag`` the kernel answers every
        UDP lookup "no such socket" (see :func:`udp_lookups_work`)."""
        wanted = list(dict.fromkeys(k for k in keys if k.proto in PROTOCOLS))
        found: dict[FlowKey, DiagSocketInfo] = {}
        for i in range(0, len(wanted), LOOKUP_BATCH):
            asked = {self._next_seq(): key for key in wanted[i : i + LOOKUP_BATCH]}
            ext = 1 << (INET_DIAG_INFO - 1) if with_tcp_info else 0
            self._nl.sendall(b"".join(_lookup(seq, key, ext) for seq, key in asked.items()))
            for seq, info in self._answers(set(asked), with_tcp_info):
                found[asked[seq]] = info
        return found

    def udp_lookups_work(self) -> bool:
        """Whether the kernel can look UDP sockets up (it has ``udp_diag``): an empty
        dump (no state asked for) is refused where it has not."""
        try:
            self.dump(socket.AF_INET, UDP, states=0)
        except DiagError:
            return False
        return True

    def _answers(
        self, pending: set[int], with_tcp_info: bool
    ) -> Iterator[tuple[int, DiagSocketInfo]]:
        # Each exact request gets exactly one answer: the socket, or an error
        # (ENOENT: no such socket).
        while pending:
            for kind, seq, payload in messages(self._nl.recv(1 << 16)):
                if seq not in pending:
                    continue
                pending.discard(seq)
                if kind == NLMSG_ERROR:
                    code = error_code(payload)
                    if code not in (0, errno.ENOENT):
                        raise DiagError(code, f"sock_diag lookup refused: {os.strerror(code)}")
                elif kind == SOCK_DIAG_BY_FAMILY:
                    info = _parsed(payload, with_tcp_info)
                    if info is not None:
                        yield seq, info

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq


def _request(seq: int, flags: int, family: int, protocol: int, states: int,
             ext: int = 0, sockid: bytes = bytes(_SOCKID.size)) -> bytes:  # fmt: skip
    req = _REQ.pack(family, protocol, ext, 0, states) + sockid
    return message(SOCK_DIAG_BY_FAMILY, flags, seq, req)


def _lookup(seq: int, key: FlowKey, ext: int) -> bytes:
    """The exact-lookup request for ``key``'s socket. For TCP src is the local end;
    for UDP the remote one (the kernel's udp_diag swaps them, "for historical
    reasons", and looks up as for a packet from src to dst). An IPv4 key finds IPv6
    sockets with the IPv4-mapped addresses (or a dual-stack wildcard) too."""
    family = socket.AF_INET if key.local.version == 4 else socket.AF_INET6
    src, sport, dst, dport = key.local, key.lport, key.remote, key.rport
    if key.proto == UDP:
        src, sport, dst, dport = dst, dport, src, sport
    sockid = _SOCKID.pack(sport, dport, src.packed, dst.packed,
                          0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)  # fmt: skip
    return _request(seq, NLM_F_REQUEST, family, key.proto, ALL_STATES, ext, sockid)


def _parsed(payload: memoryview, with_tcp_info: bool) -> DiagSocketInfo | None:
    try:
        return parse_diag_msg(payload, with_tcp_info)
    except ValueError as exc:
        log.debug("skipping sock_diag message: %s", exc)
        return None


def parse_diag_msg(payload: bytes | memoryview, with_tcp_info: bool = False) -> DiagSocketInfo:
    """The socket of one ``inet_diag_msg`` (after its netlink header), and its
    ``tcp_info`` attribute if asked for. ValueError if it is not one."""
    if len(payload) < _MSG_SIZE:
        raise ValueError(f"inet_diag_msg of {len(payload)} bytes")
    family, state, _, _, sport, dport, src, dst = _MSG.unpack_from(payload)
    alen = _ALEN.get(family)
    if alen is None:
        raise ValueError(f"family {family}")
    info = None
    if with_tcp_info:
        raw = attribute(payload, _MSG_SIZE, INET_DIAG_INFO)
        info = None if raw is None else parse_tcp_info(raw)
    return DiagSocketInfo(
        family,
        state,
        _address(src[:alen]),
        socket.ntohs(sport),
        _address(dst[:alen]),
        socket.ntohs(dport),
        info,
    )


# Offsets in the kernel's struct tcp_info (include/uapi/linux/tcp.h).
_TCPI_RETRANSMITS, _TCPI_BACKOFF, _TCPI_OPTIONS, _TCPI_WSCALE = 2, 4, 5, 6  # __u8 each
_TCPI_SND_MSS, _TCPI_UNACKED, _TCPI_PMTU = 16, 24, 60  # __u32 each
_TCPI_OPT_TIMESTAMPS = 1
_TCPI_BYTES_ACKED, _TCPI_BYTES_RECEIVED = 120, 128  # __u64
_TCPI_SND_WND = 228  # __u32, the last field read (absent from older kernels)


def parse_tcp_info(raw: bytes) -> TcpProgress:
    """The fields of :class:`TcpProgress` from a ``struct tcp_info``. An older kernel's
    shorter struct leaves the fields it lacks 0."""

    def field(fmt: str, off: int) -> int:
        size = struct.calcsize(fmt)
        return int(struct.unpack_from(fmt, raw, off)[0]) if off + size <= len(raw) else 0

    # snd_wscale:4 is the first bit field of its byte: the low nibble where bit fields
    # fill a byte from its least significant bit (little-endian ABIs), else the high.
    wscales = field("=B", _TCPI_WSCALE)
    return TcpProgress(
        backoff=field("=B", _TCPI_BACKOFF),
        retransmits=field("=B", _TCPI_RETRANSMITS),
        bytes_acked=field("=Q", _TCPI_BYTES_ACKED),
        bytes_received=field("=Q", _TCPI_BYTES_RECEIVED),
        snd_wnd=field("=I", _TCPI_SND_WND),
        snd_wscale=wscales & 0x0F if sys.byteorder == "little" else wscales >> 4,
        unacked=field("=I", _TCPI_UNACKED),
        snd_mss=field("=I", _TCPI_SND_MSS),
        pmtu=field("=I", _TCPI_PMTU),
        timestamps=bool(field("=B", _TCPI_OPTIONS) & _TCPI_OPT_TIMESTAMPS),
    )


def tcp_progress(keys: Iterable[FlowKey]) -> dict[FlowKey, TcpProgress]:
    """``tcp_info`` of the TCP sockets of ``keys``, by exact sock_diag lookups.

    Costs in proportion to the keys asked, not to the sockets of the host. Keys with
    no socket worth translating (see :meth:`SockDiag.lookup_tcp`) and keys of other
    protocols are not in the result. OSError if sock_diag is unavailable. Blocking:
    call it from a thread.
    """
    with SockDiag() as diag:
        found = diag.lookup_tcp(keys, with_tcp_info=True)
    return {key: s.tcp_info for key, s in found.items() if s.tcp_info is not None}


# == adoption ===========================================================================


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
    * the source is sock_diag. Where it lists no socket for a family and protocol, or
      fails (as when ``udp_diag`` is not available), ``/proc/thread-self/net/
      {tcp,udp}{,6}`` is read instead, which holds the same sockets in text form.

    Blocking: run it in a thread when an event loop is running.
    """
    flows: dict[Flow, None] = {}  # a dict keeps the order and drops duplicates
    diag = _open_sock_diag()
    try:
        for family in FAMILIES:
            for proto in PROTOCOLS:
                for flow in _listed(diag, family, proto):
                    flows[flow] = None
    finally:
        if diag is not None:
            diag.close()
    return list(flows)


def _open_sock_diag() -> SockDiag | None:
    try:
        return SockDiag()
    except OSError as exc:
        log.warning("no sock_diag socket, reading /proc: %r", exc)
        return None


def _listed(diag: SockDiag | None, family: int, proto: int) -> list[Flow]:
    sockets: list[DiagSocketInfo] = []
    if diag is not None:
        try:
            sockets = diag.dump(family, proto, _dump_states(proto, TCP_ADOPT_STATES))
        except OSError as exc:
            log.warning("sock_diag dump of family %d proto %d: %r", family, proto, exc)
    if sockets:
        return [flow for s in sockets if (flow := s.flow(proto)) is not None]
    # Nothing listed means "no socket" or "cannot dump"; /proc knows which.
    found = proc_flows(family, proto)
    if found:
        log.info("sock_diag listed nothing for family %d proto %d, /proc did", family, proto)
    return found


# == /proc: the fallback ================================================================


def read_proc_net(name: str) -> list[str]:
    """The lines of ``/proc/thread-self/net/<name>`` (OSError if unreadable).

    The kernel prints these tables a page per read() and walks its hash table from
    the start for each page, so listing n UDP sockets or conntrack entries costs
    about n^2: fine for a fallback, too slow for a sweep of 100k (hence sock_diag).
    """
    with open(f"/proc/thread-self/net/{name}") as f:
        return f.read().splitlines()


def proc_address(text: str) -> IPAddress:
    """An address as ``/proc/net/{tcp,udp}{,6}`` prints it. ValueError if it is not one."""
    # The kernel prints the address in 32-bit words, each as a native-endian integer
    # (%08X of the __be32 in memory): converting back in native order restores the
    # network-order bytes.
    if len(text) not in (8, 32):
        raise ValueError(f"address {text!r}")
    raw = b"".join(
        int(text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(text), 8)
    )
    return ip_address(raw)


def _proc_table(family: int, proto: int) -> list[str]:
    """The socket lines of the /proc table of ``family`` and ``proto`` ([] if unreadable)."""
    name = {TCP: "tcp", UDP: "udp"}[proto] + ("6" if family == socket.AF_INET6 else "")
    try:
        return read_proc_net(name)[1:]  # the first line names the columns
    except OSError as exc:
        log.warning("cannot read /proc net %s: %s", name, exc)
        return []


def proc_flows(family: int, proto: int, states: frozenset[int] = TCP_ADOPT_STATES) -> list[Flow]:
    """The flows of ``/proc/thread-self/net/{tcp,udp}{,6}``, filtered like sock_diag's
    (TCP: in ``states``).

    The fallback of :func:`existing_flows`; an unreadable file gives no flows.
    """
    out = []
    for line in _proc_table(family, proto):
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
                states,
            )
        except (TypeError, ValueError) as exc:
            log.debug("skipping /proc line %r: %s", line, exc)
            continue
        if flow is not None:
            out.append(flow)
    return out


def proc_sockets() -> set[Flow]:
    """Every live flow of the /proc tables: the sweep's fallback for sock_diag."""
    return {
        flow
        for family in FAMILIES
        for proto in PROTOCOLS
        for flow in proc_flows(family, proto, TCP_LIVE_STATES)
    }


def udp_bindings() -> set[Binding]:
    """(local address, port) of every UDP socket of this namespace, wildcards included,
    from /proc."""
    out: set[Binding] = set()
    for family in FAMILIES:
        for line in _proc_table(family, UDP):
            try:
                addr, port = line.split()[1].split(":")
                out.add((unmap(proc_address(addr)), int(port, 16)))
            except (IndexError, ValueError):
                continue
    return out


# == liveness ===========================================================================

ANY4, ANY6 = IPv4Address(0), IPv6Address(0)


def kernel_sockets() -> tuple[set[Flow], set[Binding]]:
    """(TCP and connected UDP flows, (address, port) of every UDP socket).

    From sock_diag dumps; from /proc where sock_diag fails for any family or protocol
    (no ``udp_diag``).
    """
    flows: set[Flow] = set()
    bound: set[Binding] = set()
    try:
        with SockDiag() as diag:
            for family in FAMILIES:
                for proto in PROTOCOLS:
                    for s in diag.dump(family, proto, _dump_states(proto, TCP_LIVE_STATES)):
                        flow = s.flow(proto, TCP_LIVE_STATES)
                        if flow is not None:
                            flows.add(flow)
                        if proto == UDP:
                            bound.add((unmap(s.local), s.lport))
    except OSError as exc:
        log.debug("sock_diag dump failed (%s): reading /proc", exc)
        return proc_sockets(), udp_bindings()
    return flows, bound


class Liveness:
    """A snapshot of the kernel's sockets (and UDP conntrack), asked about flows.

    A TCP flow lives while the kernel still has its socket. A UDP flow lives while a
    UDP socket is bound to its local port, on its local address or on the wildcard
    address: connected sockets and also unconnected ones (``sendto``/``recvfrom``
    servers), which is why this reads every UDP socket and not only the connected
    ones. Where conntrack runs (``use_conntrack``: it does in ``nft`` mode) a UDP flow
    must also still have its conntrack entry: that is its idle timeout (conntrack's
    UDP timeouts). In ``nfqueue`` mode the daemon sees every packet and times UDP
    flows out itself. Flows are named by identifiers, which is what sockets and
    conntrack see.
    """

    def __init__(self, use_conntrack: bool = True) -> None:
        self.flows, self.udp = kernel_sockets()
        ct = conntrack_udp() if use_conntrack else None
        self.ct: set[Flow] | None = ct[0] if ct is not None else None
        self.ct_versions: frozenset[int] = ct[1] if ct is not None else frozenset()

    def why_missing(self, key: FlowKey) -> str:
        """For the log: why ``key`` counts as ended (the sweep's only evidence)."""
        if key.proto == UDP and self.ct and key not in self.ct:
            return "no conntrack entry"
        return "no socket"

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


# == conntrack ==========================================================================


def conntrack_udp() -> tuple[set[Flow], frozenset[int]] | None:
    """UDP conntrack entries, both orientations, and the IP versions they cover;
    None if conntrack is unavailable."""
    try:
        lines = read_proc_net("nf_conntrack")
    except OSError:
        v4 = conntrack_udp4()
        return None if v4 is None else (v4, frozenset({4}))
    out: set[Flow] = set()
    for line in lines:
        key = conntrack_line(line)
        if key is not None:
            out.add(key)
            out.add(FlowKey(UDP, key.remote, key.rport, key.local, key.lport))
    return out, frozenset({4, 6})


def conntrack_line(line: str) -> Flow | None:
    """The original tuple of a UDP line of nf_conntrack, as (src -> dst); None for
    any other line."""
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


def conntrack_udp4() -> set[Flow] | None:
    """IPv4 UDP conntrack entries, both orientations (pyroute2's ctnetlink dump);
    None if conntrack is unavailable."""
    # `dime up` keeps ssl and _hashlib out (dime.cli: memory); pyroute2 imports ssl.
    for name in ("ssl", "_hashlib"):
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
    from pyroute2 import Conntrack

    out: set[Flow] = set()
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
