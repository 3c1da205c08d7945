"""Flow notices: copies of packets the kernel sends through NFLOG, never waiting.

In ``nft`` mode the kernel learns new flows itself (:mod:`stacktrans.nft`, the
``learn`` chains) and tells the daemon afterwards by logging the first packet, and
each SYN-ACK (its sequence number), to an NFLOG group: a copy of the headers goes
to this socket while the packet itself goes on at once. Nothing holds a verdict.

A minimal ``nfnetlink_log`` client: bind one group, read its packet messages from
the event loop, hand each packet's bytes and direction to a callback. When the
daemon falls behind and the socket's buffer overflows, the kernel drops notices
and the next read fails with ENOBUFS: the owner hears of it (``on_lost``) and
looks at the kernel's sockets itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable

from stacktrans.netlink import (
    EVENT_RCVBUF,
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    attr,
    attributes,
    error_code,
    message,
    messages,
    open_socket,
)

log = logging.getLogger("dime.nflog")

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = NFNL_SUBSYS_ULOG << 8
NFULNL_MSG_CONFIG = NFNL_SUBSYS_ULOG << 8 | 1
NFULA_CFG_CMD, NFULA_CFG_QTHRESH = 1, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULA_PACKET_HDR, NFULA_PAYLOAD, NFULA_PREFIX = 1, 9, 10
NF_INET_LOCAL_OUT = 3
_NFGEN = struct.Struct("!BBH")  # family, version, resource id (the group)
_PACKET_HDR = struct.Struct("!HBB")  # hardware protocol, hook, pad
#: ``on_packet(data, outbound, prefix)``: a logged packet's bytes (its headers),
#: whether it was leaving this host (output hook) or arriving (prerouting), and the
#: log rule's prefix ("" for none).
OnPacket = Callable[[bytes, bool, str], None]


class NflogError(RuntimeError):
    pass


def parse_packet(payload: memoryview) -> tuple[bytes, bool, str] | None:
    """(packet bytes, outbound, prefix) of one NFULNL_MSG_PACKET payload (after the
    netlink header), or None when it lacks the packet or its hook."""
    if len(payload) < _NFGEN.size:
        return None
    hook, data, prefix = None, None, ""
    for kind, value in attributes(payload, _NFGEN.size):
        if kind == NFULA_PACKET_HDR and len(value) >= _PACKET_HDR.size:
            hook = _PACKET_HDR.unpack_from(value)[1]
        elif kind == NFULA_PAYLOAD:
            data = bytes(value)
        elif kind == NFULA_PREFIX:
            prefix = bytes(value).split(b"\0", 1)[0].decode("ascii", "replace")
    if hook is None or data is None:
        return None
    return data, hook == NF_INET_LOCAL_OUT, prefix


def _config(group: int, command: int, seq: int) -> bytes:
    """Bind (or unbind) ``group``. Each notice is sent at once (queue threshold 1):
    the kernel's default holds up to 100 for up to a second, and a notice is what
    makes the daemon say HELLO to a new host."""
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, group) + attr(NFULA_CFG_CMD, bytes([command]))
    if command == NFULNL_CFG_CMD_BIND:
        body += attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1))
    return message(NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, body)


class FlowNotices:
    """NFLOG group ``group``, read from the event loop: each packet to ``on_packet``;
    ``on_lost()`` when the kernel dropped some (the socket overflowed)."""

    def __init__(
        self, group: int, on_packet: OnPacket, on_lost: Callable[[], None] | None = None
    ) -> None:
        self.group = group
        self.on_packet = on_packet
        self.on_lost = on_lost
        self.received = 0
        self.overflows = 0  # reads that found notices dropped (ENOBUFS)
        self.errors = 0  # handler failures
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        """Bind the group. NflogError says why not (no nfnetlink_log, or another
        program has the group)."""
        try:
            sock = open_socket(NETLINK_NETFILTER, rcvbuf=EVENT_RCVBUF)
        except OSError as exc:
            raise NflogError(f"no netfilter netlink socket: {exc}") from exc
        try:
            _request(sock, _config(self.group, NFULNL_CFG_CMD_BIND, 1))
        except (OSError, NflogError) as exc:
            sock.close()
            raise NflogError(
                f"cannot bind NFLOG group {self.group} ({exc}): the kernel needs "
                "nfnetlink_log (CONFIG_NETFILTER_NETLINK_LOG), and no other program "
                "may use that group"
            ) from exc
        sock.setblocking(False)
        self._sock = sock

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sock is None:
            self.open()
        assert self._sock is not None
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self.read)

    def stop(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()  # the kernel unbinds a group whose socket is gone
        self._sock = None

    def read(self) -> None:
        """Handle every notice waiting (called by the loop when the socket is readable)."""
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                if self.on_lost is not None:
                    self.on_lost()
                continue
            self.feed(data)

    def feed(self, data: bytes) -> None:
        for kind, _, payload in messages(data):
            if kind != NFULNL_MSG_PACKET:
                continue
            parsed = parse_packet(payload)
            if parsed is None:
                continue
            self.received += 1
            try:
                self.on_packet(*parsed)
            except Exception:  # a notice must never take the daemon down
                self.errors += 1
                log.exception("flow notice handler failed")


def _request(sock: socket.socket, msg: bytes) -> None:
    sock.settimeout(2.0)
    sock.send(msg)
    while True:
        for kind, _, payload in messages(sock.recv(1 << 16)):
            if kind == NLMSG_ERROR:
                code = error_code(payload)
                if code:
                    raise NflogError(errno.errorcode.get(code, str(code)))
                return


def available(group: int) -> str | None:
    """None when NFLOG group ``group`` can be bound here (tried, then let go); else
    why not."""
    notices = FlowNotices(group, lambda data, outbound, prefix: None)
    try:
        notices.open()
    except NflogError as exc:
        return str(exc)
    notices.stop()
    return None
