"""The user-space path: what the daemon does with each packet queued to it.

In ``nfqueue`` mode every TCP/UDP packet comes here and is rewritten here. In
``nft`` mode only first packets of flows (to learn them) and ICMP errors (whose
quoted header the kernel cannot rewrite) come here.

Outbound packets carry identifiers and leave with locators; inbound packets arrive
with locators and must reach the socket with its identifiers. An ICMP error about
a flow gets its quoted packet translated too, so that path MTU discovery and
"port unreachable" reach the right socket.

Plain ``struct`` work through :mod:`stacktrans.packet`; never scapy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

from ihmp.addr import IPAddress
from ihmp.flows import KNOCK_MAGIC
from ihmp.hosts import FlowOrigin
from stacktrans.carry import Carrier
from stacktrans.dataplane import Dataplane
from stacktrans.family import icmp_across, to_ipv4, to_ipv6
from stacktrans.nfqueue import DROP
from stacktrans.packet import (
    PacketInfo,
    RewriteError,
    l4_payload,
    parse,
    parse_head,
    rewrite_addresses,
    rewrite_inner_addresses,
    rewrite_ports,
)
from stacktrans.socket_table import TCP, UDP, FlowKey, SocketEntry

log = logging.getLogger("dime.packet")

TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10


def _addr(raw: bytes) -> IPAddress:
    return ip_address(raw)


def _starts_flow(info: PacketInfo) -> bool:
    """Whether an unknown flow's packet may create a socket-table entry."""
    if info.proto == UDP:
        return True
    # A reset or a FIN of a flow we never saw must not create one.
    return info.proto == TCP and not info.tcp_flags & (TCP_RST | TCP_FIN)


#: ``on_knock(source, source port, FLOW_BIND bytes)``: a knock came in (the daemon
#: has IHMP verify it, and binds the flow if it holds).
OnKnock = Callable[[IPAddress, int, bytes], None]


def _knock(data: bytes, info: PacketInfo) -> bytes | None:
    """The FLOW_BIND a knock carries, if this packet is one."""
    if info.proto == TCP and info.tcp_flags & TCP_SYN:
        return None
    if l4_payload(data, info, len(KNOCK_MAGIC)) != KNOCK_MAGIC:
        return None  # (every packet comes here in nfqueue mode: 8 bytes looked at)
    return l4_payload(data, info)[len(KNOCK_MAGIC) :]


class UserspacePath:
    """Translate one queued packet. Returns new bytes, None to pass it unchanged, or
    :data:`~stacktrans.nfqueue.DROP` (a knock: for dime, not for an application)."""

    def __init__(
        self,
        dataplane: Dataplane,
        clock: Callable[[], float],
        on_knock: OnKnock | None = None,
        carrier: Carrier | None = None,
    ) -> None:
        """``carrier``: where packets carried across IP versions go back into the
        kernel (raw sockets); None: nowhere, they are dropped (tests, which must not
        send anything from the host's own network namespace)."""
        self.tr = dataplane
        self.clock = clock
        self.on_knock = on_knock
        self.translated = 0
        self.knocks = 0
        self.notices = 0
        #: Flows carried across IP versions: their packets, translated, go back in here.
        self.carrier = carrier
        self.carried = 0  # packets translated across IP versions, both ways
        self.not_carried = 0  # packets of such flows that could not be (fragments, ...)

    # -- outbound -------------------------------------------------------------------

    def outbound(self, data: bytes) -> bytes | None:
        try:
            info = parse(data)
        except RewriteError:
            return None
        if info.proto in (TCP, UDP) and info.l4_offset >= 0:
            return self._outbound_flow(data, info)
        if info.inner is not None and info.inner.proto in (TCP, UDP):
            return self._outbound_icmp(data, info, info.inner)
        return None

    def _outbound_flow(self, data: bytes, info: PacketInfo) -> bytes | None:
        key = FlowKey(info.proto, _addr(info.src), info.sport, _addr(info.dst), info.dport)
        entry = self.tr.sockets.get(key)
        if entry is None:
            if not _starts_flow(info) or _knock(data, info) is not None:
                return None  # our own knock is no flow
            entry = self.tr.flow_seen(key, self.clock())
            if entry is None:
                return None
        else:
            entry.last_seen = self.clock()
        if info.tcp_flags & TCP_SYN and (seq := _seq(data, info)) is not None:
            entry.isn = acked_from(seq, answered=bool(info.tcp_flags & TCP_ACK))
        cross = self.tr.cross_of(entry)
        if cross is not None:
            return self._carry(data, cross[0], cross[1], entry.key, _seq(data, info))
        return self._rewrite(data, info, entry, key.local, key.remote)

    def _carry(
        self, data: bytes, src: IPAddress, dst: IPAddress, key: FlowKey, seq: int | None
    ) -> bytes:
        """Send ``data`` on as a packet of the other IP version, src -> dst (out to the
        peer, or into our own stack); the original goes no further."""
        new = None
        if isinstance(src, IPv6Address) and isinstance(dst, IPv6Address):
            new = to_ipv6(data, src, dst, partial=True)
        elif isinstance(src, IPv4Address) and isinstance(dst, IPv4Address):
            new = to_ipv4(data, src, dst, partial=True)
        if new is None or self.carrier is None:
            self.not_carried += 1
            return DROP
        self.carried += 1
        if dst == key.local:
            self.carrier.into(new, dst)
        else:
            self.carrier.out(new, dst, key, seq)
        return DROP

    def _outbound_icmp(self, data: bytes, info: PacketInfo, inner: PacketInfo) -> bytes | None:
        # Our stack complains about a packet it received: the quote holds the
        # peer's flow as our socket saw it (identifiers), remote -> local.
        key = FlowKey(inner.proto, _addr(inner.dst), inner.dport, _addr(inner.src), inner.sport)
        entry = self.tr.sockets.get(key)
        if entry is None:
            return None
        cross = self.tr.cross_of(entry)
        if cross is not None:
            return self._carry_icmp_out(data, info, inner, entry, cross)
        tr = self.tr.translation(entry.hid)
        if tr is None:
            return None
        lloc, rloc = tr.outbound(key.local, key.remote)
        if lloc is None and rloc is None:
            return None
        buf = bytearray(data)
        rewrite_inner_addresses(buf, info, _raw(rloc), _raw(lloc))
        outer_src = lloc if _addr(info.src) == key.local else None
        outer_dst = rloc if _addr(info.dst) == key.remote else None
        rewrite_addresses(buf, info, _raw(outer_src), _raw(outer_dst))
        return bytes(buf)

    def _carry_icmp_out(
        self,
        data: bytes,
        info: PacketInfo,
        inner: PacketInfo,
        entry: SocketEntry,
        cross: tuple[IPAddress, IPAddress],
    ) -> bytes | None:
        """Our stack's ICMP error about a packet of a flow carried across goes to the
        peer in the wire's IP version, quoting that packet as it came (the peer's
        locator to ours): the peer's daemon passes it on to its socket."""
        mapped = _counterpart(data, info)
        if mapped is None or self.carrier is None:
            return DROP  # (it would go to an address of a version that is gone)
        key = entry.key
        wire = FlowKey(key.proto, cross[1], key.rport, cross[0], key.lport)
        seq = _seq(data, inner) if inner.proto == TCP else None
        self.carrier.error(wire, seq, *mapped)
        return DROP

    # -- notices (nft mode) -----------------------------------------------------------

    def observe(self, data: bytes, outbound: bool, in_kernel: bool = False) -> None:
        """A flow notice: the head of a packet the kernel has already passed (the
        ``learn`` chains of :mod:`stacktrans.nft`), with the addresses and ports its
        socket sees, leaving this host or arriving. Learn its flow (asking IHMP for its
        host: a new one is greeted). A TCP connection's notice is its SYN-ACK, which
        carries both ends' ISNs (for prompting): its own, and the SYN's acknowledged;
        and whoever sent it did not open the connection. ``in_kernel``: the kernel
        holds the flow's elements already (see :meth:`Dataplane.flow_seen`)."""
        try:
            info = parse_head(data)
        except RewriteError:
            return
        if info.proto not in (TCP, UDP) or info.l4_offset < 0:
            return
        src, dst = _addr(info.src), _addr(info.dst)
        if outbound:
            key = FlowKey(info.proto, src, info.sport, dst, info.dport)
        else:
            key = FlowKey(info.proto, dst, info.dport, src, info.sport)
        syn_ack = info.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
        now = self.clock()
        entry = self.tr.sockets.get(key)
        if entry is None:
            if not _starts_flow(info):
                return
            opened_here = outbound != syn_ack
            origin = FlowOrigin.OUTBOUND if opened_here else FlowOrigin.INBOUND
            entry = self.tr.flow_seen(key, now, origin, in_kernel)
            if entry is None:
                return
        else:
            entry.last_seen = now
        if info.tcp_flags & TCP_SYN:
            sent = _seq(data, info)  # the sender's ISN
            acked = _ack(data, info) if syn_ack else None
            opener = None if acked is None else (acked - 1) & 0xFFFFFFFF  # the SYN's
            mine, theirs = (sent, opener) if outbound else (opener, sent)
            if mine is not None:
                entry.isn = acked_from(mine, answered=outbound and syn_ack)
            if theirs is not None:
                entry.peer_isn = theirs
        self.notices += 1

    # -- inbound --------------------------------------------------------------------

    def inbound(self, data: bytes) -> bytes | None:
        try:
            info = parse(data)
        except RewriteError:
            return None
        if info.proto in (TCP, UDP) and info.l4_offset >= 0:
            return self._inbound_flow(data, info)
        if info.inner is not None and info.inner.proto in (TCP, UDP):
            return self._inbound_icmp(data, info, info.inner)
        return None

    def _inbound_flow(self, data: bytes, info: PacketInfo) -> bytes | None:
        src, dst = _addr(info.src), _addr(info.dst)
        knock = _knock(data, info)
        if knock is not None:
            self.knocks += 1
            if self.on_knock is not None:
                self.on_knock(src, info.sport, knock)
            return DROP
        hid = self.tr.host_of(src)
        entry = None
        if hid is not None:
            entry = self.tr.sockets.inbound(hid, info.version, info.proto, info.sport, info.dport)
            if entry is None and not info.tcp_flags & TCP_SYN:
                # A flow of the host in the other IP version, carried across: by our
                # translation, or by the peer's before ours followed (a packet from a
                # verified address of the host, with the flow's own ports).
                other = 10 - info.version  # (4 <-> 6)
                entry = self.tr.sockets.inbound(hid, other, info.proto, info.sport, info.dport)
                if entry is not None:
                    entry.last_seen = self.clock()
                    return self._carry(data, entry.key.remote, entry.key.local, entry.key, None)
        if entry is None:
            if (
                hid is not None
                and not info.tcp_flags & TCP_SYN
                and self.tr.awaits_knock(hid, src, info.proto, info.dport)
            ):
                return DROP  # its knock is late (or lost): the peer sends again
            if _starts_flow(info):
                entry = self.tr.flow_seen(
                    FlowKey(info.proto, dst, info.dport, src, info.sport),
                    self.clock(),
                    FlowOrigin.INBOUND,
                )
                if entry is not None and info.tcp_flags & TCP_SYN:
                    entry.peer_isn = _seq(data, info)
            return None
        entry.last_seen = self.clock()
        if info.tcp_flags & TCP_SYN:
            entry.peer_isn = _seq(data, info)
        new_src = entry.key.remote if entry.key.remote != src else None
        new_dst = entry.key.local if entry.key.local != dst else None
        port = entry.key.rport if entry.key.rport != info.sport else None
        if new_src is None and new_dst is None and port is None:
            return None
        buf = bytearray(data)
        rewrite_addresses(buf, info, _raw(new_src), _raw(new_dst))
        if port is not None:
            rewrite_ports(buf, info, port, None)
        self.translated += 1
        return bytes(buf)

    def _inbound_icmp(self, data: bytes, info: PacketInfo, inner: PacketInfo) -> bytes | None:
        # The quote is our own packet as it went out (locators), local -> remote.
        hid = self.tr.host_of(_addr(inner.dst))
        if hid is None:
            return None
        entry = self.tr.sockets.inbound(hid, inner.version, inner.proto, inner.dport, inner.sport)
        if entry is None:
            return self._carried_icmp(data, info, inner, hid)
        lid, rid = entry.key.local, entry.key.remote
        inner_src, inner_dst = _addr(inner.src), _addr(inner.dst)
        if lid == inner_src and rid == inner_dst:
            return None  # nothing translated on this flow
        buf = bytearray(data)
        rewrite_inner_addresses(
            buf,
            info,
            _raw(lid if lid != inner_src else None),
            _raw(rid if rid != inner_dst else None),
        )
        # Outer: to our locator -> to our identifier; from the peer's locator (the
        # peer itself complains) -> from its identifier. A router's address stays.
        outer_dst = lid if _addr(info.dst) == inner_src and lid != inner_src else None
        outer_src = rid if _addr(info.src) == inner_dst and rid != inner_dst else None
        rewrite_addresses(buf, info, _raw(outer_src), _raw(outer_dst))
        self.translated += 1
        return bytes(buf)

    def _carried_icmp(
        self, data: bytes, info: PacketInfo, inner: PacketInfo, hid: int
    ) -> bytes | None:
        """An ICMP error quoting a packet we carried across (the wire's IP version,
        from our locator to the peer's) goes to the carried flow's own stack in its
        version: a path MTU it reports, less the headers' growth; an unreachable or
        time exceeded, as its counterpart (:func:`stacktrans.family.icmp_across`).
        Anything else is left to the kernel, which finds no socket for it."""
        other = 10 - inner.version
        entry = self.tr.sockets.inbound(hid, other, inner.proto, inner.dport, inner.sport)
        if entry is None or self.carrier is None or self.tr.cross_of(entry) is None:
            return None
        seq = _seq(data, inner) if inner.proto == TCP else None
        mtu = _reported_mtu(data, info)
        if mtu is not None:
            self.carrier.mtu_heard(_addr(inner.dst), mtu, entry.key, seq)
            return DROP
        mapped = _counterpart(data, info)
        if mapped is None:
            return None
        self.carrier.error(entry.key, seq, *mapped)
        return DROP

    # -- shared ---------------------------------------------------------------------

    def _rewrite(
        self,
        data: bytes,
        info: PacketInfo,
        entry: SocketEntry,
        lid: IPAddress,
        rid: IPAddress,
    ) -> bytes | None:
        tr = self.tr.translation(entry.hid)
        lloc, rloc = tr.outbound(lid, rid) if tr is not None else (None, None)
        if entry.via is not None:  # a locator of its own (policy, `dime move`)
            lloc = entry.via
        if entry.wire is not None:  # behind a NAT: where its knock came from
            buf = bytearray(data)
            rewrite_addresses(buf, info, _raw(lloc), _raw(entry.wire[0]))
            rewrite_ports(buf, info, None, entry.wire[1])
            self.translated += 1
            return bytes(buf)
        if lloc is None and rloc is None:
            return None
        buf = bytearray(data)
        rewrite_addresses(buf, info, _raw(lloc), _raw(rloc))
        self.translated += 1
        return bytes(buf)


def _counterpart(data: bytes, info: PacketInfo) -> tuple[int, int] | None:
    """The (type, code) in the other IP version of the ICMP error ``data``, if any."""
    at = info.l4_offset
    return icmp_across(info.version, data[at], data[at + 1]) if len(data) > at + 1 else None


def _reported_mtu(data: bytes, info: PacketInfo) -> int | None:
    """The MTU an ICMP "fragmentation needed" or ICMPv6 "packet too big" reports."""
    at = info.l4_offset
    if len(data) < at + 8:
        return None
    if info.version == 4 and data[at] == 3 and data[at + 1] == 4:
        return int.from_bytes(data[at + 6 : at + 8], "big")
    if info.version == 6 and data[at] == 2:
        return int.from_bytes(data[at + 4 : at + 8], "big")
    return None


def _seq(data: bytes, info: PacketInfo) -> int | None:
    """The TCP sequence number of a packet, if its header holds one."""
    at = info.l4_offset + 4
    return int.from_bytes(data[at : at + 4], "big") if len(data) >= at + 4 else None


def _ack(data: bytes, info: PacketInfo) -> int | None:
    """The TCP acknowledgement number of a packet, if its header holds one."""
    at = info.l4_offset + 8
    return int.from_bytes(data[at : at + 4], "big") if len(data) >= at + 4 else None


def _raw(addr: IPAddress | None) -> bytes | None:
    return None if addr is None else addr.packed


def acked_from(isn: int, *, answered: bool) -> int:
    """The sequence number our socket's ``tcpi_bytes_acked`` counts from, given our
    ISN: a socket that sent the SYN counts its SYN as acknowledged; one that answered
    a SYN (a passive open) starts counting after its SYN-ACK (measured on Linux 6.18:
    after 1000 bytes each way, 1001 at the client, 1000 at the server)."""
    return (isn + 1) & 0xFFFFFFFF if answered else isn
