"""What ``dime nat`` needs from the kernel of a NAT router: the NAT's new mappings,
as conntrack reports them (ctnetlink NEW events, no polling), and the IHMP the
router forwards (an NFQUEUE on mangle FORWARD), on which it sets NS and from which
it learns which hosts run dime. The protocol is :mod:`ihmp.natagent`; the daemon
is :mod:`dime.natd`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterator
from ipaddress import ip_address

from ihmp.addr import IPAddress
from ihmp.flows import NatMapping
from stacktrans.netlink import NETLINK_NETFILTER, frames
from stacktrans.nfqueue import PacketQueue, QueueError
from stacktrans.nft import Nft, NftError
from stacktrans.packet import RewriteError, parse, set_udp_payload_bits
from stacktrans.queue_rules import ForwardIhmpRule, QueueRulesError
from stacktrans.service import StartError

log = logging.getLogger("dime.nat")

NF_NETLINK_CONNTRACK_NEW = 0x1  # the multicast group's bit
_NS_BIT = 0x01  # IHMP header byte 2 (flags): NS


def _tuple(attr: object) -> tuple[int, IPAddress, int, IPAddress, int] | None:
    """(proto, src, sport, dst, dport) of a CTA_TUPLE_* attribute (pyroute2's parse)."""
    ip = attr.get_attr("CTA_TUPLE_IP")  # type: ignore[attr-defined]
    proto = attr.get_attr("CTA_TUPLE_PROTO")  # type: ignore[attr-defined]
    if ip is None or proto is None:
        return None
    src = ip.get_attr("CTA_IP_V4_SRC") or ip.get_attr("CTA_IP_V6_SRC")
    dst = ip.get_attr("CTA_IP_V4_DST") or ip.get_attr("CTA_IP_V6_DST")
    num, sport, dport = (proto.get_attr(f"CTA_PROTO_{k}") for k in ("NUM", "SRC_PORT", "DST_PORT"))
    if None in (src, dst, num, sport, dport):
        return None
    return num, ip_address(src), sport, ip_address(dst), dport


def mappings(data: bytes) -> Iterator[tuple[NatMapping, IPAddress, int]]:
    """The source-NAT mappings in a batch of ctnetlink NEW events: (mapping, remote
    address, remote port) for each TCP/UDP entry whose source the NAT translated."""
    from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

    for frame in frames(data):
        msg = nfct_msg(bytes(frame))
        try:
            msg.decode()
            orig = _tuple(msg.get_attr("CTA_TUPLE_ORIG"))
            reply = _tuple(msg.get_attr("CTA_TUPLE_REPLY"))
        except Exception:
            continue
        if orig is None or reply is None or orig[0] not in (6, 17):
            continue
        proto, src, sport, dst, dport = orig
        outside, outside_port = reply[3], reply[4]  # where replies go: the NAT's side
        if (outside, outside_port) != (src, sport):
            yield NatMapping(proto, src, sport, outside, outside_port), dst, dport


class ConntrackEvents:
    """ctnetlink's NEW events, read from the event loop."""

    def __init__(self, on_batch: Callable[[bytes], None]) -> None:
        self.on_batch = on_batch
        self.lost = 0  # event batches the kernel dropped (ENOBUFS)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((0, NF_NETLINK_CONNTRACK_NEW))
        sock.setblocking(False)
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                data = self._sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    log.warning("conntrack events lost (the kernel's buffer overflowed)")
                    continue
                raise
            self.on_batch(data)


class ForwardedIhmp:
    """IHMP this router forwards: NS set on each datagram, its two ends reported to
    ``on_crossed``. Serves NFQUEUE ``queue`` (``ihmp_port`` either way)."""

    def __init__(
        self, queue: int, ihmp_port: int, on_crossed: Callable[[IPAddress, IPAddress], None]
    ) -> None:
        self.rule = ForwardIhmpRule(queue, ihmp_port)
        self.queue = PacketQueue(queue, self._on_packet)
        self.on_crossed = on_crossed
        self.forwarded = 0
        self._nft: Nft | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._nft = Nft()
            self.rule.install(self._nft)
            self.queue.start(loop)
        except (NftError, QueueRulesError, QueueError) as exc:
            self.stop()
            raise StartError(str(exc)) from exc

    def stop(self) -> None:
        self.queue.stop()
        self.rule.remove(self._nft)

    def _on_packet(self, data: bytes) -> bytes | None:
        try:
            info = parse(data)
        except RewriteError:
            return None
        self.forwarded += 1
        self.on_crossed(ip_address(info.src), ip_address(info.dst))
        buf = bytearray(data)
        return bytes(buf) if set_udp_payload_bits(buf, info, 2, _NS_BIT) else None
