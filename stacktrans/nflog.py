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

Two groups, two sockets. The notices that need a prompt reaction (a flow the kernel
does not hold: a new host to greet, a flow for the daemon to add) come one netlink
message each, at once. The notices of flows the kernel holds already (learned in
the packet path) only feed the daemon's socket table: their group is bound with a
:class:`Batch`, so that the kernel gathers up to ``threshold`` of them in one
message, sent at the latest ``timeout_cs`` hundredths of a second after the first;
one read then hands the daemon a whole batch instead of one wakeup per notice.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

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
NFULA_CFG_CMD, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 3, 4, 5
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


@dataclass(frozen=True)
class Batch:
    """How the kernel may gather a group's notices: it sends its message when
    ``threshold`` notices are in it, when the next would not fit in ``bufsize``
    bytes, or ``timeout_cs`` hundredths of a second after its first, whichever
    comes first. (The kernel's own default: 100 notices, up to one second.)"""

    threshold: int = 64
    timeout_cs: int = 1
    bufsize: int = 32 << 10  # the kernel takes 4 KiB (a page) to 128 KiB

    @property
    def delay(self) -> float:
        """The longest a notice waits in the kernel, in seconds."""
        return self.timeout_cs / 100


#: The batching of the notices of flows the kernel holds: about 200 bytes each, 64 fit
#: in 32 KiB; 10 ms at most, well within the 50 ms after which the daemon looks up
#: flows whose end it heard of (a short flow's notice may come after its end).
HELD_BATCH = Batch()


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


def _config(group: int, command: int, seq: int, batch: Batch | None = None) -> bytes:
    """Bind (or unbind) ``group``. Without ``batch`` each notice is sent at once
    (queue threshold 1): the kernel's default holds up to 100 for up to a second,
    and such a notice is what makes the daemon say HELLO to a new host. With it,
    the kernel gathers notices as it says."""
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, group) + attr(NFULA_CFG_CMD, bytes([command]))
    if command == NFULNL_CFG_CMD_BIND:
        u32 = struct.Struct("!I").pack
        if batch is None:
            body += attr(NFULA_CFG_QTHRESH, u32(1))
        else:
            body += attr(NFULA_CFG_NLBUFSIZ, u32(batch.bufsize))
            body += attr(NFULA_CFG_TIMEOUT, u32(batch.timeout_cs))
            body += attr(NFULA_CFG_QTHRESH, u32(batch.threshold))
    return message(NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, body)


#: The read buffer: larger than any message the kernel sends us (a batch is at most
#: ``Batch.bufsize``, an unbatched notice one packet's head). Allocated once per
#: group, at its first read.
READ_SIZE = 1 << 16


class FlowNotices:
    """NFLOG group ``group``, read from the event loop: each packet to ``on_packet``;
    ``on_lost()`` when the kernel dropped some (the socket overflowed). ``batch``:
    let the kernel gather notices (:class:`Batch`); None: each at once."""

    def __init__(
        self,
        group: int,
        on_packet: OnPacket,
        on_lost: Callable[[], None] | None = None,
        batch: Batch | None = None,
    ) -> None:
        self.group = group
        self.on_packet = on_packet
        self.on_lost = on_lost
        self.batch = batch
        self.received = 0
        self.reads = 0  # datagrams read: one per notice, or per batch
        # Reads that found notices dropped (ENOBUFS), or cut short (a datagram
        # larger than the read buffer: its end is lost).
        self.overflows = 0
        self.errors = 0  # handler failures
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray()

    def open(self) -> None:
        """Bind the group. NflogError says why not (no nfnetlink_log, or another
        program has the group)."""
        try:
            sock = open_socket(NETLINK_NETFILTER, rcvbuf=EVENT_RCVBUF)
        except OSError as exc:
            raise NflogError(f"no netfilter netlink socket: {exc}") from exc
        try:
            _request(sock, _config(self.group, NFULNL_CFG_CMD_BIND, 1, self.batch))
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
        if not self._buf:
            self._buf = bytearray(READ_SIZE)
        buf = self._buf
        view = memoryview(buf)
        while True:
            try:
                # MSG_TRUNC: the datagram's whole length, even beyond the buffer.
                n = self._sock.recv_into(buf, len(buf), socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._lost("flow notices were dropped by the kernel (ENOBUFS)")
                continue
            self.reads += 1
            if n > len(buf):
                self._lost(f"a flow notice datagram of {n} bytes was cut to {len(buf)}")
                n = len(buf)  # (its whole messages are good)
            self.feed(view[:n])

    def _lost(self, why: str) -> None:
        log.debug("NFLOG group %d: %s", self.group, why)
        self.overflows += 1
        if self.on_lost is not None:
            self.on_lost()

    def feed(self, data: bytes | memoryview) -> None:
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


def available(group: int, batch: Batch | None = None) -> str | None:
    """None when NFLOG group ``group`` can be bound here, with ``batch`` (tried,
    then let go); else why not."""
    notices = FlowNotices(group, lambda data, outbound, prefix: None, batch=batch)
    try:
        notices.open()
    except NflogError as exc:
        return str(exc)
    notices.stop()
    return None
