"""An NFQUEUE served from the asyncio loop: our own small nfnetlink_queue client.

Why not the ``netfilterqueue`` binding (which this module used until issue 14): it
cannot set queue flags, so it cannot ask for GSO packets (``NFQA_CFG_F_GSO``: without
it the kernel cuts each 64 kB TCP segment into ~45 packets before queueing them, and
each one is a Python round trip) nor fail open; it gives one packet per callback and
sends one verdict per packet, one ``sendmsg`` each, with no batch verdicts; and it
hides ``NFQA_SKB_INFO``, which says whether a packet's checksum is partial. All we
need is a netlink socket, one config message and verdicts: a hundred lines.

What it does:

* binds queue ``num`` (``NFQNL_CFG_CMD_BIND``), whole packets (``NFQNL_COPY_PACKET``,
  range 65535), ``max_len`` packets at most in the kernel, flags ``NFQA_CFG_F_GSO``
  (GSO/GRO super-packets come as they are) and ``NFQA_CFG_F_FAIL_OPEN`` (a full queue
  lets packets pass rather than dropping them), in one config message;
* a large receive buffer (``SO_RCVBUFFORCE`` as root) and ``NETLINK_NO_ENOBUFS``: an
  overrun loses packets (the kernel counts them), never the socket;
* reads what is waiting (one packet per datagram: the kernel sends each on its own)
  up to a budget, then gives the verdicts in packet order, all in one ``sendmsg``: a
  run of packets passed unchanged is one ``NFQNL_MSG_VERDICT_BATCH`` ("accept every
  id up to N"), flushed before any packet with a verdict of its own (rewritten:
  ``NF_ACCEPT`` with ``NFQA_PAYLOAD``; :data:`DROP`: ``NF_DROP``), so that the kernel
  reinjects packets in the order they came;
* a packet whose checksum is partial (``NFQA_SKB_CSUMNOTREADY``: GSO packets, and
  most packets of local senders over veth) holds in its L4 checksum field the
  pseudo-header sum only. The kernel marks a packet it gets back with a payload
  ``CHECKSUM_NONE`` (``nfqnl_mangle``), so a rewritten partial packet must leave
  with a complete checksum: :func:`~stacktrans.packet.fill_l4_checksum` computes it
  (the handler's incremental update of that field is meaningless and overwritten).
  One exception saves that sum over 64 kB: a TCP GSO packet on its way out (hooks
  LOCAL_OUT, POST_ROUTING) is segmented on transmit, and ``tcp4/6_gso_segment``
  rewrites the pseudo-header checksum of a GSO packet that is not CHECKSUM_PARTIAL
  from its (rewritten) IP header first, so its field is never read (checked end to
  end: tests/test_nfqueue_netns.py). An inbound GSO packet (GRO) is delivered as it
  is: TCP then checks the whole checksum, so it is completed;
* a malformed message is counted (``malformed``) and skipped; a handler exception
  passes the packet unchanged and is counted (``errors``); a packet the kernel cut
  short (``NFQA_CAP_LEN``) is passed unchanged (a verdict would truncate it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable

from stacktrans import netlink as nl
from stacktrans.packet import RewriteError, fill_l4_checksum, parse

log = logging.getLogger("dime.queue")

Handler = Callable[[bytes], bytes | None]
#: What a handler returns for a packet that must go no further (a knock, or one it
#: replaced by a packet it injected itself).
DROP = b""

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NFQA_CAP_LEN, NFQA_SKB_INFO = 13, 14
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 0x1, 0x4
NFQA_SKB_CSUMNOTREADY, NFQA_SKB_GSO = 0x1, 0x2
NF_DROP, NF_ACCEPT = 0, 1
NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING = 0, 3, 4
SOL_NETLINK, NETLINK_NO_ENOBUFS = 270, 5
SO_SNDBUFFORCE = 32

COPY_RANGE = 0xFFFF
RCVBUF = 32 << 20
SNDBUF = 8 << 20
#: Packets read per wake-up before the verdicts go and the loop gets a turn.
BUDGET = 64
#: A verdict datagram is sent once it holds this many bytes (the kernel refuses one
#: larger than the socket's send buffer).
FLUSH_BYTES = 1 << 20

_NFGEN = struct.Struct("!BBH")  # family, version, resource id (the queue number)
_PACKET_HDR = struct.Struct("!IHB")  # packet id, hw protocol, hook
_VERDICT_HDR = struct.Struct("!II")  # verdict, packet id
_U32 = struct.Struct("!I")
_PACKET_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET


class QueueError(RuntimeError):
    pass


class Malformed(ValueError):
    pass


# -- messages we send -------------------------------------------------------------------


def _nfq(msg: int, num: int, attrs: bytes, flags: int = nl.NLM_F_REQUEST, seq: int = 0) -> bytes:
    payload = _NFGEN.pack(socket.AF_UNSPEC, 0, num) + attrs
    return nl.message((NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, payload)


def config_message(num: int, max_len: int, seq: int = 1) -> bytes:
    """Bind queue ``num``: whole packets, ``max_len`` at most, GSO and fail-open."""
    flags = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN
    attrs = (
        nl.attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))
        + nl.attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET))
        + nl.attr(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(max_len))
        + nl.attr(NFQA_CFG_FLAGS, _U32.pack(flags))
        + nl.attr(NFQA_CFG_MASK, _U32.pack(flags))
    )
    return _nfq(NFQNL_MSG_CONFIG, num, attrs, nl.NLM_F_REQUEST | nl.NLM_F_ACK, seq)


def unbind_message(num: int) -> bytes:
    cmd = nl.attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0))
    return _nfq(NFQNL_MSG_CONFIG, num, cmd)


def verdict_message(num: int, packet_id: int, verdict: int, *, batch: bool = False) -> bytes:
    """One packet's verdict (no payload), or with ``batch`` every queued id <= it."""
    hdr = nl.attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id))
    return _nfq(NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT, num, hdr)


def payload_verdict(num: int, packet_id: int, payload: bytes) -> list[bytes]:
    """``NF_ACCEPT`` with a new payload, as buffers for ``sendmsg`` (no copy of it)."""
    pad = -len(payload) % 4
    hdr = nl.attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(NF_ACCEPT, packet_id))
    size = nl.NLMSG.size + _NFGEN.size + len(hdr) + nl.NLA.size + len(payload) + pad
    head = (
        nl.NLMSG.pack(size, (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT, nl.NLM_F_REQUEST, 0, 0)
        + _NFGEN.pack(socket.AF_UNSPEC, 0, num)
        + hdr
        + nl.NLA.pack(nl.NLA.size + len(payload), NFQA_PAYLOAD)
    )
    return [head, payload, b"\0" * pad] if pad else [head, payload]


# -- messages we get --------------------------------------------------------------------


class Packet:
    """A queued packet as the kernel described it."""

    __slots__ = ("cut", "hook", "id", "payload", "skb_info")

    def __init__(
        self, packet_id: int, payload: bytes, skb_info: int, cut: bool, hook: int = 0
    ) -> None:
        self.id = packet_id
        self.payload = payload
        self.skb_info = skb_info
        self.cut = cut
        self.hook = hook

    def needs_checksum(self, new: bytes) -> bool:
        """Whether ``new``, this packet rewritten, must get its L4 checksum computed:
        its checksum was partial, and it is not a TCP GSO packet going out (whose
        segmentation sets the checksum up from the IP header)."""
        if not self.skb_info & NFQA_SKB_CSUMNOTREADY:
            return False
        if self.skb_info & NFQA_SKB_GSO and self.hook in (NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING):
            return not _is_plain_tcp(new)
        return True

    @property
    def partial(self) -> bool:
        """Its L4 checksum field holds the pseudo-header sum (CHECKSUM_PARTIAL)."""
        return bool(self.skb_info & NFQA_SKB_CSUMNOTREADY)


def parse_packet(frame: memoryview) -> Packet:
    """The NFQNL_MSG_PACKET in one netlink message (header included); Malformed if it
    has no packet header."""
    packet_id = -1
    payload = b""
    info = hook = 0
    cut = False
    for kind, value in nl.attributes(frame, nl.NLMSG.size + _NFGEN.size):
        if kind == NFQA_PACKET_HDR and len(value) >= _PACKET_HDR.size:
            packet_id, _, hook = _PACKET_HDR.unpack_from(value)
        elif kind == NFQA_PAYLOAD:
            payload = bytes(value)
        elif kind == NFQA_SKB_INFO and len(value) >= 4:
            info = _U32.unpack_from(value)[0]
        elif kind == NFQA_CAP_LEN:
            cut = True
    if packet_id < 0:
        raise Malformed("queued packet without NFQA_PACKET_HDR")
    return Packet(packet_id, payload, info, cut, hook)


def _is_plain_tcp(data: bytes) -> bool:
    """An IPv4 or IPv6 packet whose IP header is directly followed by TCP."""
    return len(data) > 40 and (
        (data[0] >> 4 == 4 and data[9] == 6) or (data[0] >> 4 == 6 and data[6] == 6)
    )


# -- the queue ----------------------------------------------------------------------------


class PacketQueue:
    """Queue ``num``: each packet goes through ``handler``, then is accepted (as it
    came or rewritten) or dropped (:data:`DROP`)."""

    def __init__(self, num: int, handler: Handler, *, max_len: int = 8192) -> None:
        self.num = num
        self.handler = handler
        self.max_len = max_len
        self.packets = 0
        self.errors = 0  # handler exceptions
        self.malformed = 0  # netlink messages we could not read
        self.rewritten = 0
        self.dropped = 0
        self.cut = 0  # packets the kernel copied only in part (passed unchanged)
        self.verdict_errors = 0  # the kernel refused a verdict
        self.overruns = 0  # ENOBUFS: packets lost before we read them
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray(COPY_RANGE + 4096)
        self._out: list[list[bytes]] = []  # verdict messages, each as buffers
        self._out_bytes = 0
        self._run = -1  # the last id of the run of unchanged packets not yet given

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            sock = nl.open_socket(nl.NETLINK_NETFILTER, rcvbuf=RCVBUF)
        except OSError as exc:
            raise QueueError(f"cannot open a netfilter netlink socket: {exc}") from exc
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            self._sock = sock
            self._configure(sock)
        except (OSError, QueueError) as exc:
            self._sock = None
            sock.close()
            if isinstance(exc, QueueError):
                raise
            raise QueueError(f"cannot set NFQUEUE {self.num} up: {exc}") from exc
        sock.setblocking(False)
        self._loop = loop
        loop.add_reader(sock.fileno(), self._on_readable)
        log.info("queue %d: bound (nfnetlink_queue client of our own: GSO, fail-open)", self.num)

    def _configure(self, sock: socket.socket) -> None:
        """Bind; packets that come before the acknowledgement are handled as usual."""
        sock.settimeout(5.0)
        sock.send(config_message(self.num, self.max_len, seq=1))
        while True:
            n = sock.recv_into(self._buf)
            for frame in nl.frames(bytes(self._buf[:n])):
                kind, seq = nl.NLMSG.unpack_from(frame)[1], nl.NLMSG.unpack_from(frame)[3]
                if kind == nl.NLMSG_ERROR and seq == 1:
                    code = nl.error_code(frame[nl.NLMSG.size :])
                    self._send_verdicts()
                    if code:
                        raise QueueError(
                            f"cannot bind NFQUEUE {self.num} ({errno.errorcode.get(code, code)}:"
                            f" {os.strerror(code)}): the kernel needs nfnetlink_queue "
                            "(CONFIG_NETFILTER_NETLINK_QUEUE), and no other program may use "
                            "that queue"
                        )
                    return
                self._message(frame)

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        try:
            self._send_verdicts(sock)
            sock.send(unbind_message(self.num))
        except OSError:
            pass  # closing the socket unbinds as well
        sock.close()

    # -- the reader ------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            for _ in range(BUDGET):
                try:
                    n = sock.recv_into(self._buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        self.overruns += 1
                        continue
                    log.warning("queue %d: recv failed: %s", self.num, exc)
                    break
                for frame in nl.frames(memoryview(self._buf)[:n]):
                    self._message(frame)
        finally:
            self._send_verdicts()

    def _message(self, frame: memoryview) -> None:
        kind = nl.NLMSG.unpack_from(frame)[1]
        if kind == nl.NLMSG_ERROR:
            if nl.error_code(frame[nl.NLMSG.size :]):
                self.verdict_errors += 1
            return
        if kind != _PACKET_TYPE:
            return
        try:
            pkt = parse_packet(frame)
        except (Malformed, struct.error, ValueError):
            self.malformed += 1
            return
        self.packets += 1
        new = None
        try:
            new = self.handler(pkt.payload)
            if new is not None and new != DROP:
                if pkt.cut:
                    self.cut += 1
                    new = None
                elif pkt.needs_checksum(new):
                    new = _complete(new)
        except Exception:  # a packet must never take the daemon down
            self.errors += 1
            new = None
            log.exception("queue %d: packet handler failed; packet passed unchanged", self.num)
        if new is None or new is pkt.payload:
            self._run = pkt.id
            return
        self._flush_run()
        if new == DROP:
            self.dropped += 1
            self._queue([verdict_message(self.num, pkt.id, NF_DROP)])
        else:
            self.rewritten += 1
            self._queue(payload_verdict(self.num, pkt.id, new))

    def _flush_run(self) -> None:
        if self._run >= 0:
            run, self._run = self._run, -1
            self._queue([verdict_message(self.num, run, NF_ACCEPT, batch=True)])

    def _queue(self, message: list[bytes]) -> None:
        self._out.append(message)
        self._out_bytes += sum(len(b) for b in message)
        if self._out_bytes >= FLUSH_BYTES or len(self._out) >= 300:  # (IOV_MAX: 1024)
            self._send(self._sock)

    def _send_verdicts(self, sock: socket.socket | None = None) -> None:
        self._flush_run()
        self._send(sock or self._sock)

    def _send(self, sock: socket.socket | None) -> None:
        out, self._out, self._out_bytes = self._out, [], 0
        if not out or sock is None:
            return
        try:
            _sendmsg(sock, [buf for message in out for buf in message])
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                self.verdict_errors += 1
                log.warning("queue %d: verdicts not sent (%s)", self.num, exc)
                return
            # A send buffer smaller than we asked for (not root): one at a time.
            for message in out:
                try:
                    _sendmsg(sock, message)
                except OSError as exc1:
                    self.verdict_errors += 1
                    log.warning("queue %d: a verdict not sent (%s)", self.num, exc1)


def _sendmsg(sock: socket.socket, bufs: list[bytes]) -> None:
    try:
        sock.sendmsg(bufs)
    except BlockingIOError:
        # The kernel takes verdicts synchronously; should it not, wait for room.
        sock.setblocking(True)
        try:
            sock.sendmsg(bufs)
        finally:
            sock.setblocking(False)


def _complete(data: bytes) -> bytes:
    """A rewritten packet whose checksum was partial, with its L4 checksum complete."""
    buf = bytearray(data)
    try:
        fill_l4_checksum(buf, parse(buf))
    except RewriteError:
        return data
    return bytes(buf)
