"""Knocks: one packet of a flow, sent by dime itself, that carries a FLOW_BIND.

When this host reaches a peer through a NAT after a move, the NAT gives each flow a
port of its own (``masquerade random-fully`` picks any). The peer can only learn
that port from a packet of the flow itself: the knock has the flow's protocol,
addresses and ports as its packets leave this host now (so the NAT maps it exactly
as it maps them), and its transport payload is ``KNOCK_MAGIC`` and a signed
FLOW_BIND (:meth:`ihmp.engine.IhmpEngine.flow_binding`). The peer's dime takes it
out of the flow (it never reaches an application) and, once IHMP has verified it,
sends the flow's packets to where the knock came from.

A TCP knock is a plain ACK segment: a NAT that meets it first (Linux conntrack)
picks the connection up mid-stream, with liberal window tracking, as it does for
any connection it did not see open; if it ever reached the peer's TCP, it would be
an out-of-window segment (answered with an ACK, never taken as data).
"""

from __future__ import annotations

import logging
import socket
import struct

from ihmp.addr import IPAddress
from stacktrans.packet import checksum
from stacktrans.socket_table import TCP, UDP

log = logging.getLogger("dime.knock")

_TCP_ACK = 0x10
_WINDOW = 0xFFFF


def _pseudo(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!IxxxB", length, proto)


def build(
    proto: int,
    src: IPAddress,
    sport: int,
    dst: IPAddress,
    dport: int,
    payload: bytes,
    *,
    seq: int = 0,
    ack: int = 0,
) -> bytes:
    """The knock as a whole IP packet (IPv4 with DF, or IPv6), checksums included."""
    if proto == TCP:
        head = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, _TCP_ACK, _WINDOW, 0, 0)
        csum_at = 16
    elif proto == UDP:
        head = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
        csum_at = 6
    else:
        raise ValueError(f"no knock for protocol {proto}")
    segment = bytearray(head + payload)
    csum = checksum(_pseudo(src, dst, proto, len(segment)) + segment)
    if proto == UDP and csum == 0:
        csum = 0xFFFF
    segment[csum_at : csum_at + 2] = csum.to_bytes(2, "big")
    if src.version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 0, 0x4000, 64, proto, 0,
            src.packed, dst.packed,
        )  # fmt: skip
        ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(segment), proto, 64, src.packed, dst.packed)
    return ip + bytes(segment)


class Knocker:
    """Sends knocks through raw sockets (one per IP version, opened on first use)."""

    def __init__(self) -> None:
        self._socks: dict[int, socket.socket] = {}
        self.sent = 0
        self.failed = 0

    def send(self, packet: bytes, dst: IPAddress) -> bool:
        try:
            sock = self._socks.get(dst.version)
            if sock is None:
                family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
                sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
                sock.setblocking(False)
                self._socks[dst.version] = sock
            sock.sendto(packet, (str(dst), 0))
        except OSError as exc:
            self.failed += 1
            log.warning("knock to %s not sent: %s", dst, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
