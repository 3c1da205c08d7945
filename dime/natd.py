"""``dime nat``: the IHMP-aware NAT of the paper (III-D), on a Linux NAT router.

One asyncio loop, as ``dime up``'s daemon:

* **conntrack events** (ctnetlink, the NEW group; no polling): each new mapping the
  NAT makes (a source address or port translated) goes to the agent, which sends a
  NAT_ENTRY to the flow's other end if both ends run dime;
* **forwarded IHMP** (an NFQUEUE on mangle FORWARD, UDP ``port`` either way): NS is
  set on each datagram (the one bit a signature does not cover), and the two ends
  are remembered as dime hosts;
* **the agent's UDP socket** (``nat_port``, not the IHMP port, whose public side is
  the hosts' behind the NAT): ACKs of NAT_ENTRY, and challenges from peers checking
  that the agent's key receives at the NAT's address.

The protocol is :class:`ihmp.natagent.NatAgent` (sans I/O). SIGTERM or SIGINT stop it
and remove its rule.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address

from dime import keystore
from dime.config import Config, state_dir
from dime.transport import IhmpTransport
from ihmp.addr import IPAddress
from ihmp.natagent import NatAgent
from ihmp.wire import NatMapping
from stacktrans.nfqueue import PacketQueue
from stacktrans.nft import Nft
from stacktrans.packet import RewriteError, parse, set_udp_payload_bits
from stacktrans.queue_rules import ForwardIhmpRule
from stacktrans.service import check_privileges

log = logging.getLogger("dime.nat")

NETLINK_NETFILTER = 12
NF_NETLINK_CONNTRACK_NEW = 0x1  # the multicast group's bit
_NLMSG = struct.Struct("=IHHII")
_NS_BIT = 0x01  # IHMP header byte 2: flags; NS


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

    pos = 0
    while pos + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, pos)[0]
        if length < _NLMSG.size or pos + length > len(data):
            return
        msg = nfct_msg(data[pos : pos + length])
        pos += (length + 3) & ~3
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


class NatDaemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.agent: NatAgent | None = None
        self.transport: IhmpTransport | None = None
        self.events = ConntrackEvents(self._on_events)
        self.rule = ForwardIhmpRule(config.nat_port, config.port)
        self.queue = PacketQueue(config.nat_port, self._on_forwarded)
        self.forwarded = 0
        self.nft: Nft | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        check_privileges()
        self.loop = asyncio.get_running_loop()
        key, _ = keystore.load_or_create_host_key(state_dir(self.config))
        self.agent = NatAgent(
            key=key,
            counter_start=int(time.time() * 1e6),
            rng=random.SystemRandom(),
            ihmp_port=self.config.port,
        )
        try:
            self.transport = IhmpTransport(self.config.nat_port, self._on_datagram)
            self.transport.open(self.loop)
            self.events.open(self.loop)
            self.nft = Nft()
            self.rule.install(self.nft)
            self.queue.start(self.loop)
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self._stop.set)
            log.info(
                "dime nat: IHMP-aware NAT up (agent port %d, NS on forwarded IHMP port %d, key %s)",
                self.config.nat_port,
                self.config.port,
                keystore.public_hex(key),
            )
            await self._stop.wait()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self.queue.stop()
        self.rule.remove(self.nft)
        self.events.close()
        if self.transport is not None:
            self.transport.close()
        if self.agent is not None:
            log.info("dime nat: stopped; %s", self.agent.counters)

    def _now(self) -> float:
        return time.monotonic()

    # -- inputs -------------------------------------------------------------------------

    def _on_events(self, data: bytes) -> None:
        assert self.agent is not None
        for mapping, remote, remote_port in mappings(data):
            self.agent.mapping_created(mapping, remote, remote_port, self._now())
        self._pump()

    def _on_forwarded(self, data: bytes) -> bytes | None:
        """A forwarded IHMP datagram: NS set, its two ends noted."""
        try:
            info = parse(data)
        except RewriteError:
            return None
        assert self.agent is not None
        self.forwarded += 1
        self.agent.ihmp_crossed(ip_address(info.src), ip_address(info.dst))
        buf = bytearray(data)
        return bytes(buf) if set_udp_payload_bits(buf, info, 2, _NS_BIT) else None

    def _on_datagram(self, data: bytes, src: IPAddress, port: int, dst: IPAddress) -> None:
        assert self.agent is not None
        self.agent.receive_datagram(data, src, dst, port, self._now())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        assert self.agent is not None
        self.agent.handle_timer(self._now())
        self._pump()

    def _pump(self) -> None:
        assert self.agent is not None and self.transport is not None and self.loop is not None
        for d in self.agent.datagrams_to_send(self._now()):
            self.transport.send(d.data, d.src, d.dst, d.dst_port)
        deadline = self.agent.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            delay = max(deadline - self._now(), 0.0)
            self._timer = self.loop.call_later(delay, self._on_timer)
