"""Make TCP send at once when a host's path comes back or changes, not at its timer.

While a host has no path (a hard handoff: the old address is gone, the new one not
yet there), TCP's transmissions fail and its timer backs off exponentially: 0.2,
0.4, ... 3.2 s. When the path is back, the next attempt may still be seconds away;
the flow sits idle although it could send. MPTCP avoids this by opening a new
subflow; dime keeps the same socket, and knows the moment the path is back (the
host's translation changed). It then tells its own stack, with packets that never
leave the host (raw sockets, addressed to the flow's local identifier):

* **Retransmission timer** (data was in flight: ``tcpi_retransmits`` > 0). RFC 6069
  lets an ICMP "host unreachable" about the oldest unacknowledged segment undo one
  step of backoff; Linux (``tcp_ld_RTO_revert``) then retransmits at once if the
  reverted timer has expired. One message per backoff step. Linux does this for
  IPv4 only (``tcp_v6_err`` ignores it: measured, ``tests/test_rto_revert.py``).
* **Probe timer** (nothing was in flight, new data failed to go out: the timer that
  probes a closed window runs instead, ``tcpi_retransmits`` = 0). Any acceptable ACK
  from the peer stops it, clears the backoff and lets TCP send what is queued
  (``tcp_ack_probe``). dime sends the socket a pure ACK as the peer would: its
  sequence number is the peer's next byte, it acknowledges what is already
  acknowledged, and it advertises the window TCP already has, so nothing but the
  timer changes. Both IP versions.

Sequence numbers: ``tcp_info`` has no ``snd_una``/``rcv_nxt`` but has byte counts;
``snd_una = ISN + bytes_acked`` and ``rcv_nxt = peer ISN + 1 + bytes_received`` (mod
2^32). ``bytes_acked`` counts the SYN only where the socket sent it: for a socket
that answered one, the packet path records ISN + 1 (``userspace.acked_from``). It
records both ISNs from the SYN and SYN-ACK of each flow. Flows adopted at start-up
have no known ISNs and are left to their timers. A wrong guess costs nothing: the
kernel ignores an ICMP error that does not quote a sequence number in flight, and
answers an ACK outside its window with one duplicate ACK.

When the *peer* moved and its old locator is gone (its address went down, or it
handed off), what this host sent to the old locator while the news travelled is lost,
before any timer has backed off. Two prompts, both IP versions, for flows of such a
host (``FlowSeq.peer_lost``):

* **Retransmit now** (data in flight: ``tcpi_unacked`` > 0, no backoff yet). Without a
  prompt TCP waits for its tail-loss probe or its retransmission timer (at least
  200 ms + RTT on Linux): nothing else tells it the window is gone. An ICMP "packet too
  big" / "fragmentation needed" quoting ``snd_una`` with an MTU one byte smaller than
  the one the socket uses makes Linux (``tcp_v4_mtu_reduced`` / ``tcp_v6_mtu_reduced``)
  mark every full-sized segment in flight lost and retransmit them at once, *without*
  reducing the congestion window (``tcp_simple_retransmit``: a loss that is no sign of
  congestion). Only full-sized segments are marked: a bulk flow's window, where a
  stall costs most; an application's short writes wait for the timer. The price:
  segments one byte shorter for the flow, and for ten minutes
  (the kernel's PMTU expiry) for other flows to that identifier; 0.07 % per move.
  The same message retransmits a flow whose retransmission timer backed off over IPv6,
  where RFC 6069 is not implemented.
* **Acknowledge again** (the ACKs we sent to the old locator were lost). A zero-length
  segment from the peer far outside the receive window makes TCP answer at once with
  a duplicate ACK (``tcp_send_dupack``, at most one per 500 ms and socket) and is
  otherwise dropped. That ACK, through the new translation, tells the peer everything
  we received: its window opens at once rather than at its timer.
"""

from __future__ import annotations

import enum
import logging
import socket
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from stacktrans.kernel_flows import TcpProgress, tcp_progress
from stacktrans.packet import checksum
from stacktrans.socket_table import TCP, FlowKey

log = logging.getLogger("dime.rto")


ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, ICMP_FRAG_NEEDED = 3, 1, 4
ICMP6_DEST_UNREACH, ICMP6_ADDR_UNREACH, ICMP6_PACKET_TOO_BIG = 1, 3, 2
#: The smallest path MTU each IP version's TCP accepts from ICMP (Linux's
#: ``ip_rt_min_pmtu`` default; IPv6's minimum link MTU).
MIN_PMTU = {4: 552, 6: 1280}
#: IP and TCP header bytes without options, per IP version.
HEADERS = {4: 20 + 20, 6: 40 + 20}
TIMESTAMP_OPTION = 12  # the timestamp option as TCP pads it
LOGGED_FLOWS = 8  # prompts of at most this many flows are logged one by one
#: How far past the right edge of any receive window (at most 2^30 bytes) a segment
#: that is only there to draw an ACK claims to start.
OUT_OF_WINDOW = 0x60000000
#: The kernel's backoff never exceeds this in practice (TCP_RTO_MAX / TCP_RTO_MIN ~ 2^10).
MAX_STEPS = 16
#: IP versions whose TCP implements RFC 6069 in Linux.
REVERT_VERSIONS = frozenset({4})
TCP_ACK_FLAG = 0x10


@dataclass(frozen=True)
class FlowSeq:
    """A TCP flow and its initial sequence numbers, as the packet path saw them;
    ``peer_lost``: the peer's old locator is gone, and with it what we sent there."""

    key: FlowKey
    isn: int
    peer_isn: int | None
    peer_lost: bool = False


class Remedy(enum.Enum):
    REVERT = "icmp"  # RFC 6069 ICMP errors: retransmission timer (IPv4)
    ACK = "ack"  # a pure ACK: probe timer
    RETRANSMIT = "ptb"  # a path MTU one byte smaller: what is in flight, again, now
    REACK = "reack"  # an out-of-window segment: our ACK, again, now


def remedies(flow: FlowSeq, p: TcpProgress) -> list[Remedy]:
    """What makes this flow send now: nothing, or one remedy per direction of data."""
    if p.backoff > 0:
        what = _backed_off(flow, p)
        return [what] if what is not None else []
    if not flow.peer_lost:
        return []  # its timer has not backed off and nothing it sent was lost
    found = []
    if p.unacked > 0 and ptb_mtu(flow.key, p) is not None:
        found.append(Remedy.RETRANSMIT)
    if flow.peer_isn is not None:
        found.append(Remedy.REACK)
    return found


def _backed_off(flow: FlowSeq, p: TcpProgress) -> Remedy | None:
    if p.retransmits > 0:
        if flow.key.local.version in REVERT_VERSIONS:
            return Remedy.REVERT
        return Remedy.RETRANSMIT if ptb_mtu(flow.key, p) is not None else None
    # An ACK must advertise the window TCP has: without it, it would close the window.
    if flow.peer_isn is None or p.snd_wnd <= 0:
        return None
    return Remedy.ACK


def ptb_mtu(key: FlowKey, p: TcpProgress) -> int | None:
    """The MTU that makes TCP's segments exactly one byte shorter, or None if the
    kernel would not take it (below its minimum) or if it is not the path MTU less
    one byte (segments capped by the peer's MSS)."""
    if p.snd_mss <= 0 or p.pmtu <= 0:
        return None
    # Computed from the segment size: the MTU whose segments are one byte shorter.
    mtu = p.snd_mss - 1 + HEADERS[key.local.version] + (TIMESTAMP_OPTION if p.timestamps else 0)
    # Only one byte below the path's: the kernel keeps it for every flow to that
    # identifier (ten minutes). Where the peer's MSS caps segments far below what
    # the path allows, that would cost other flows much more: no message.
    if mtu < MIN_PMTU[key.local.version] or mtu != p.pmtu - 1:
        return None
    return mtu


def snd_una(isn: int, bytes_acked: int) -> int:
    return (isn + bytes_acked) & 0xFFFFFFFF


def rcv_nxt(peer_isn: int, bytes_received: int) -> int:
    return (peer_isn + 1 + bytes_received) & 0xFFFFFFFF


def _quote(key: FlowKey, seq: int) -> bytes:
    """The head of a packet of ``key`` as the socket sent it: IP header + 8 bytes (a
    TCP segment's ports and sequence number ``seq``; a UDP datagram's header)."""
    if key.proto == TCP:
        l4 = struct.pack("!HHI", key.lport, key.rport, seq)
    else:
        l4 = struct.pack("!HHHH", key.lport, key.rport, 8, 0)
    if key.local.version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45, 0, 40 if key.proto == TCP else 28, 0, 0x4000, 64, key.proto, 0,
            key.local.packed, key.remote.packed,
        )  # fmt: skip
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return ip + l4
    # payload length: the quoted segment was at least a bare TCP (UDP) header
    plen = 20 if key.proto == TCP else 8
    ip6 = struct.pack(
        "!IHBB16s16s", 6 << 28, plen, key.proto, 64, key.local.packed, key.remote.packed
    )
    return ip6 + l4


def error_message(key: FlowKey, seq: int, kind: int, code: int, rest: int = 0) -> bytes:
    """An ICMP (IPv4 flow) or ICMPv6 (IPv6 flow) error of ``kind`` and ``code`` (no IP
    header) quoting a packet of ``key`` (``seq``: a TCP segment's sequence number),
    ``rest`` in its 4-byte field after the checksum (an MTU, say). ICMPv6's checksum
    is left 0: the kernel fills it in for raw ICMPv6 sockets."""
    head = struct.pack("!BBHI", kind, code, 0, rest)
    quote = _quote(key, seq)
    if key.local.version == 4:
        head = head[:2] + struct.pack("!H", checksum(head + quote)) + head[4:]
    return head + quote


def ptb_message(key: FlowKey, seq: int, mtu: int) -> bytes:
    """The ICMP "fragmentation needed" / ICMPv6 "packet too big" (no IP header) that
    sets ``key``'s path MTU to ``mtu``. ICMPv6's checksum is left 0 (the kernel's)."""
    if key.local.version == 4:
        return error_message(key, seq, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu)
    return error_message(key, seq, ICMP6_PACKET_TOO_BIG, 0, mtu)


def revert_message(key: FlowKey, seq: int) -> bytes:
    """The ICMP(v6) error (no IP header) that reverts one backoff step of ``key``.

    ICMPv6's checksum is left 0: the kernel fills it in for raw ICMPv6 sockets.
    """
    if key.local.version == 4:
        return error_message(key, seq, ICMP_DEST_UNREACH, ICMP_HOST_UNREACH)
    return error_message(key, seq, ICMP6_DEST_UNREACH, ICMP6_ADDR_UNREACH)


def ack_packet(key: FlowKey, seq: int, ack: int, window: int) -> bytes:
    """A pure ACK from the peer to ``key``'s socket: IP header included, checksums done."""
    src, dst = key.remote.packed, key.local.packed
    tcp = struct.pack(
        "!HHIIBBHHH", key.rport, key.lport, seq, ack, 5 << 4, TCP_ACK_FLAG, window, 0, 0
    )
    if key.local.version == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, TCP, len(tcp))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(tcp), TCP)
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    if key.local.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, TCP, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), TCP, 64, src, dst)
    return ip + tcp


def prompt(flows: Iterable[FlowSeq]) -> Counter[Remedy]:
    """Give each TCP flow of a host whose path changed what makes it send now (see
    the module's docstring). Returns how many prompts of each remedy were given. Blocking
    (sock_diag lookups of these flows only: :func:`.kernel_flows.tcp_progress`): call
    it from a thread.
    """
    wanted = {f.key: f for f in flows}
    done: Counter[Remedy] = Counter()
    if not wanted:
        return done
    progress = tcp_progress(wanted)
    # A line per flow where a move has few (the demo shows them); a summary (the
    # caller's) where it has thousands.
    level = logging.INFO if len(wanted) <= LOGGED_FLOWS else logging.DEBUG
    log.debug("timer state of %d flows: %s", len(wanted), progress)
    with _RawSockets() as socks:
        for key, p in progress.items():
            flow = wanted[key]
            for what in remedies(flow, p):
                try:
                    _apply(what, flow, p, socks)
                except OSError as exc:
                    log.warning("could not prompt %s: %s", key, exc)
                    continue
                log.log(level, "prompted %s to send (%s, backoff %d)", key, what.value, p.backoff)
                done[what] += 1
    return done


def _apply(what: Remedy, flow: FlowSeq, p: TcpProgress, socks: _RawSockets) -> None:
    key, dst = flow.key, (str(flow.key.local), 0)
    una = snd_una(flow.isn, p.bytes_acked)
    version = key.local.version
    if what is Remedy.REVERT:
        msg = revert_message(key, una)
        for _ in range(min(p.backoff, MAX_STEPS)):
            socks.icmp(version).sendto(msg, dst)
        return
    if what is Remedy.RETRANSMIT:
        mtu = ptb_mtu(key, p)
        assert mtu is not None
        socks.icmp(version).sendto(ptb_message(key, una, mtu), dst)
        return
    assert flow.peer_isn is not None
    nxt = rcv_nxt(flow.peer_isn, p.bytes_received)
    window = min(p.snd_wnd >> p.snd_wscale, 0xFFFF)
    if what is Remedy.REACK:
        # Dropped before its ACK field is looked at: only its sequence number matters.
        nxt = (nxt + OUT_OF_WINDOW) & 0xFFFFFFFF
    socks.raw(version).sendto(ack_packet(key, nxt, una, window), dst)


class _RawSockets:
    """Raw sockets opened on first use, closed on exit."""

    def __init__(self) -> None:
        self._socks: dict[tuple[str, int], socket.socket] = {}

    def __enter__(self) -> _RawSockets:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self._socks.values():
            sock.close()

    def icmp(self, version: int) -> socket.socket:
        if version == 4:
            return self._get("icmp", socket.AF_INET, socket.IPPROTO_ICMP)
        return self._get("icmp", socket.AF_INET6, socket.IPPROTO_ICMPV6)

    def raw(self, version: int) -> socket.socket:
        """IPPROTO_RAW: we give the IP header (IPv6 too, on Linux)."""
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        return self._get("raw", family, socket.IPPROTO_RAW)

    def _get(self, kind: str, family: int, proto: int) -> socket.socket:
        sock = self._socks.get((kind, family))
        if sock is None:
            sock = self._socks[(kind, family)] = socket.socket(family, socket.SOCK_RAW, proto)
        return sock
