"""Prompt TCP to retransmit at once when a host's path comes back (RFC 6069).

While a host has no path (a hard handoff: the old address is gone, the new one not
yet there), TCP's retransmissions fail and its retransmission timer backs off
exponentially: 0.2, 0.4, ... 3.2 s. When the path is back, the next retransmission
may still be seconds away; the flow sits idle although it could send. MPTCP avoids
this by opening a new subflow; dime keeps the same socket.

RFC 6069 lets an ICMP "host unreachable" (or "net unreachable") about the oldest
unacknowledged segment undo one step of backoff; Linux (``tcp_ld_RTO_revert``) then
retransmits at once if the reverted timer has already expired. Linux does this for
IPv4 only (``tcp_v6_err`` ignores it: measured, ``tests/test_rto_revert.py``), so
IPv6 flows are left to their timers; :func:`revert_message` still builds the ICMPv6
form the RFC describes. dime knows the moment the path is back (the translation of the
host changed), so it sends its own stack one such ICMP error per backoff step of
each affected flow, through a raw socket to the flow's local identifier (it never
leaves the host).

The quote must carry the exact ``snd_una``. ``tcp_info`` has no ``snd_una`` but has
``bytes_acked``, which counts the SYN too: ``snd_una = ISN + bytes_acked`` (mod
2^32). The ISN is the sequence number of the SYN or SYN-ACK the socket sent, which
the packet path sees in both data-plane modes. Flows adopted at start-up have no
known ISN and are left to their timers. A quote with a stale ``snd_una`` is ignored
by the kernel (it must equal ``snd_una`` exactly), so a wrong guess costs nothing.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from stacktrans.adopt import diag_flow
from stacktrans.socket_table import TCP, FlowKey

log = logging.getLogger("dime.rto")

IPAddress = IPv4Address | IPv6Address

ICMP_DEST_UNREACH, ICMP_HOST_UNREACH = 3, 1
ICMP6_DEST_UNREACH, ICMP6_ADDR_UNREACH = 1, 3
#: The kernel's backoff never exceeds this in practice (TCP_RTO_MAX / TCP_RTO_MIN ~ 2^10).
MAX_STEPS = 16
#: IP versions whose TCP implements RFC 6069 in Linux.
PROMPTED_VERSIONS = frozenset({4})
_INET_DIAG_INFO = 2  # attribute number; its request bit is 1 << (2 - 1)


@dataclass(frozen=True)
class TcpProgress:
    """What ``tcp_info`` says about one socket's retransmission state."""

    backoff: int  # icsk_backoff: how many times the timer doubled
    retransmits: int  # icsk_retransmits: unanswered timeouts in a row
    bytes_acked: int


def snd_una(isn: int, bytes_acked: int) -> int:
    return (isn + bytes_acked) & 0xFFFFFFFF


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def _quote(key: FlowKey, seq: int) -> bytes:
    """The head of a segment of ``key`` as the socket sent it: IP header + 8 bytes."""
    tcp8 = struct.pack("!HHI", key.lport, key.rport, seq)
    if key.local.version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, TCP, 0, key.local.packed, key.remote.packed
        )
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        return ip + tcp8
    # payload length 20: the quoted segment was at least a bare TCP header
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 20, TCP, 64, key.local.packed, key.remote.packed)
    return ip6 + tcp8


def revert_message(key: FlowKey, seq: int) -> bytes:
    """The ICMP(v6) error (no IP header) that reverts one backoff step of ``key``.

    ICMPv6's checksum is left 0: the kernel fills it in for raw ICMPv6 sockets.
    """
    quote = _quote(key, seq)
    if key.local.version == 4:
        head = struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, 0, 0)
        csum = _checksum(head + quote)
        return head[:2] + struct.pack("!H", csum) + head[4:] + quote
    return struct.pack("!BBHI", ICMP6_DEST_UNREACH, ICMP6_ADDR_UNREACH, 0, 0) + quote


def tcp_progress(keys: Iterable[FlowKey]) -> dict[FlowKey, TcpProgress]:
    """``tcp_info`` of the TCP sockets of ``keys`` (sock_diag). Blocking: use a thread."""
    from pyroute2 import DiagSocket

    wanted = {k for k in keys if k.proto == TCP}
    out: dict[FlowKey, TcpProgress] = {}
    families = {socket.AF_INET if k.local.version == 4 else socket.AF_INET6 for k in wanted}
    with DiagSocket() as ds:
        ds.bind()
        for family in families:
            for msg in ds.get_sock_stats(family=family, extensions=1 << (_INET_DIAG_INFO - 1)):
                key = _key_of(msg)
                if key is None or key not in wanted:
                    continue
                info = msg.get_attr("INET_DIAG_INFO")
                if info is None:
                    continue
                out[key] = TcpProgress(
                    int(info.get("tcpi_backoff", 0)),
                    int(info.get("tcpi_retransmits", 0)),
                    int(info.get("tcpi_bytes_acked", 0)),
                )
    return out


def _key_of(msg: Mapping[str, object]) -> FlowKey | None:
    try:
        return diag_flow(msg, TCP)
    except (KeyError, TypeError, ValueError):
        return None


def prompt(flows: Iterable[tuple[FlowKey, int]]) -> int:
    """Make the backed-off TCP flows among ``flows`` ((key, ISN) pairs) retransmit
    now. Returns how many were prompted. Blocking (sock_diag): use a thread.

    A flow is prompted only if its timer has backed off and it waits for an ACK;
    one ICMP error per backoff step (the kernel undoes one step per message).
    """
    isns = {key: isn for key, isn in flows if key.local.version in PROMPTED_VERSIONS}
    if not isns:
        return 0
    progress = tcp_progress(isns)
    log.debug("retransmission state of %d flows: %s", len(isns), progress)
    sent = 0
    socks: dict[int, socket.socket] = {}
    try:
        for key, p in progress.items():
            if p.backoff <= 0 or p.retransmits <= 0:
                continue
            msg = revert_message(key, snd_una(isns[key], p.bytes_acked))
            sock = socks.get(key.local.version) or _raw_socket(key.local.version)
            socks[key.local.version] = sock
            try:
                for _ in range(min(p.backoff, MAX_STEPS)):
                    sock.sendto(msg, (str(key.local), 0))
            except OSError as exc:
                log.warning("could not prompt %s to retransmit: %s", key, exc)
                continue
            log.info("prompted %s to retransmit (backoff %d)", key, p.backoff)
            sent += 1
    finally:
        for sock in socks.values():
            sock.close()
    return sent


def _raw_socket(version: int) -> socket.socket:
    if version == 4:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    return socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
