"""Netlink framing shared by dime's own kernel clients (sock_diag, NFLOG, ctnetlink).

Only what the standard library lacks: splitting a datagram into messages and
finding attributes. Each client parses its own payloads; pyroute2 stays where its
decoders are worth their cost (ctnetlink events of ``dime nat``).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NETLINK_NETFILTER = 12

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLA = struct.Struct("=HH")  # attribute length (header included), type
NLA_TYPE_MASK = 0x3FFF  # without the nested / byte-order flags
SO_RCVBUFFORCE = 33  # not in Python's socket module
#: The receive buffer of sockets that take bursts from the kernel (events, notices:
#: room for about 30,000 NFLOG notices while the daemon is busy); what overflows it
#: is lost (ENOBUFS).
EVENT_RCVBUF = 8 << 20


def frames(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """Each whole netlink message (header included) in one datagram. A truncated
    message ends the walk: nothing after it can be trusted."""
    view = memoryview(data)
    off = 0
    while off + NLMSG.size <= len(data):
        length = NLMSG.unpack_from(data, off)[0]
        if length < NLMSG.size or off + length > len(data):
            return
        yield view[off : off + length]
        off += (length + 3) & ~3


def messages(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(type, seq, payload) of each netlink message in one datagram."""
    for frame in frames(data):
        _, kind, _, seq, _ = NLMSG.unpack_from(frame)
        yield kind, seq, frame[NLMSG.size :]


def error_code(payload: memoryview) -> int:
    """The errno of an NLMSG_ERROR or NLMSG_DONE message (0: none)."""
    if len(payload) < 4:
        return 0
    return -int(struct.unpack_from("=i", payload)[0])


def attributes(data: bytes | memoryview, off: int = 0) -> Iterator[tuple[int, memoryview]]:
    """(type, payload) of each attribute from ``off`` on; stops at a malformed one."""
    view = memoryview(data)
    while off + NLA.size <= len(view):
        length, kind = NLA.unpack_from(view, off)
        if length < NLA.size or off + length > len(view):
            return
        yield kind & NLA_TYPE_MASK, view[off + NLA.size : off + length]
        off += (length + 3) & ~3


def attribute(data: bytes | memoryview, off: int, wanted: int) -> bytes | None:
    """The payload of the first attribute of type ``wanted`` from ``off`` on."""
    return next((bytes(value) for kind, value in attributes(data, off) if kind == wanted), None)


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = NLA.pack(NLA.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return NLMSG.pack(NLMSG.size + len(payload), kind, flags, seq, 0) + payload


def open_socket(protocol: int, groups: int = 0, *, rcvbuf: int | None = None) -> socket.socket:
    """A netlink socket of ``protocol`` bound to the multicast ``groups``; with
    ``rcvbuf``, that receive buffer (beyond the sysctl's limit where we may: root
    has SO_RCVBUFFORCE). OSError if the kernel refuses; nothing is left open then."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.bind((0, groups))
        if rcvbuf is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    except OSError:
        sock.close()
        raise
    return sock
