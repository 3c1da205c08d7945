"""Putting the packets of flows carried across IP versions back into the kernel.

A packet of such a flow was queued, translated to the other IP version
(:mod:`stacktrans.family`, its TCP checksum left partial) and dropped; its
translation goes in whole through a packet socket where it can
(:mod:`stacktrans.link_send`: the kernel cuts and sums it), else through a raw
socket (``IPPROTO_RAW``: we give the IP header, checksums complete), marked
:data:`~stacktrans.nft.INJECT_MARK` so that nothing of ours queues, learns or
translates it again:

* **out**: to the peer's locator, routed like any packet of this host;
* **in**: to our own identifier, which the kernel delivers to the flow's socket
  (through ``lo``; conntrack takes it as the connection's own).

IPv6's header is 20 bytes longer than IPv4's: a full-size IPv4 segment does not fit
the IPv6 path. A TCP packet that does not is cut into segments
(:func:`stacktrans.family.segment`, which also takes GSO packets apart), and the
flow's own stack is told the path MTU its segments must fit (an ICMP "fragmentation
needed" / "packet too big" quoting the segment, :func:`stacktrans.rto_revert.ptb_message`),
so that its next segments fit whole: no black hole, and after one round trip no
segment cut in two.
"""

from __future__ import annotations

import logging
import socket
import time

from ihmp.addr import IPAddress
from stacktrans.family import GROWTH, complete, segment
from stacktrans.link_send import LinkSender
from stacktrans.nft import INJECT_MARK
from stacktrans.rto_revert import MIN_PMTU, error_message, ptb_message
from stacktrans.socket_table import TCP, FlowKey

log = logging.getLogger("dime.carry")

IP_MTU, IPV6_MTU = 14, 24  # <linux/in.h>, <linux/in6.h>: a connected socket's path MTU
DEFAULT_MTU = 1500


class Carrier:
    """Raw sockets (opened on first use), the packet sockets' sender, and what they
    sent."""

    def __init__(self, link: LinkSender | None = None) -> None:
        self.link = link if link is not None else LinkSender(time.monotonic)
        self._socks: dict[tuple[int, int], socket.socket] = {}
        self._mtu: dict[IPAddress, int] = {}
        self.sent = 0  # packets put back into the kernel, whichever way
        self.whole = 0  # of which through a packet socket
        self.failed = 0
        self.mtu_prompts = 0
        self.mtu_heard_count = 0  # path MTUs routers reported for carried packets
        self.errors_passed = 0  # other ICMP errors about carried packets, passed on

    def close(self) -> None:
        self.link.close()
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

    def out(self, packet: bytes, dst: IPAddress, key: FlowKey, seq: int | None) -> None:
        """Send ``packet`` (to the peer's locator ``dst``; a TCP checksum may be
        partial) for flow ``key`` (as its socket sees it; ``seq``: the TCP sequence
        number of the packet it was)."""
        mtu = self.path_mtu(dst)
        # A segment the flow's own path takes whole, which grew past this one: its
        # stack must know (a GSO packet, far larger, is the kernel's to cut anyway).
        grew = mtu < len(packet) <= mtu + GROWTH
        if grew and key.proto == TCP and seq is not None:
            self._prompt_mtu(key, seq, mtu)
        if self.link.out(packet, mtu):
            self.sent += 1
            self.whole += 1
            return
        parts = segment(packet, mtu) if len(packet) > mtu else [complete(packet)]
        for part in parts:
            self._send(part, dst)

    def into(self, packet: bytes, dst: IPAddress) -> None:
        """Deliver ``packet`` (a TCP checksum may be partial) to our own address
        ``dst`` (the flow's identifier)."""
        if self.link.into(packet):
            self.sent += 1
            self.whole += 1
            return
        self._send(complete(packet), dst)

    def mtu_heard(self, dst: IPAddress, mtu: int, key: FlowKey, seq: int | None) -> None:
        """A router on the way to ``dst`` reported ``mtu`` (an ICMP error quoting a
        packet of flow ``key`` we carried; ``seq``: its TCP sequence number): packets
        to ``dst`` fit it from now on, and the flow's own stack is told its share."""
        mtu = max(mtu, MIN_PMTU[dst.version])
        if mtu >= self.path_mtu(dst):
            return
        self._mtu[dst] = mtu
        self.mtu_heard_count += 1
        if key.proto == TCP and seq is not None:
            self._prompt_mtu(key, seq, mtu)

    def path_mtu(self, dst: IPAddress) -> int:
        """The route's MTU towards ``dst`` (asked once: a connected UDP socket's),
        or less where a router said so (:meth:`mtu_heard`)."""
        mtu = self._mtu.get(dst)
        if mtu is None:
            family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
            level, name = (
                (socket.IPPROTO_IP, IP_MTU) if dst.version == 4 else (socket.IPPROTO_IPV6, IPV6_MTU)
            )
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.connect((str(dst), 9))
                    mtu = probe.getsockopt(level, name)
            except OSError:
                mtu = DEFAULT_MTU
            self._mtu[dst] = mtu
        return mtu

    def error(self, key: FlowKey, seq: int | None, kind: int, code: int) -> None:
        """Send an ICMP error ``kind``/``code`` of ``key.local``'s IP version about a
        packet of flow ``key`` to whoever sent that packet (``key.local``): our own
        flow's stack (``key`` as its socket sees it), or the peer (``key`` as the
        packet came on the wire, from the peer's locator)."""
        if self._tell(key, error_message(key, seq or 0, kind, code)):
            self.errors_passed += 1

    def _prompt_mtu(self, key: FlowKey, seq: int, mtu: int) -> None:
        """Tell the flow's stack its segments must fit ``mtu`` once translated."""
        own = max(
            mtu - GROWTH if key.local.version == 4 else mtu + GROWTH, MIN_PMTU[key.local.version]
        )
        if self._tell(key, ptb_message(key, seq, own)):
            self.mtu_prompts += 1

    def _tell(self, key: FlowKey, message: bytes) -> bool:
        """Send the ICMP(v6) ``message`` to ``key.local`` (from our own address:
        a socket matches the quote, not the sender)."""
        try:
            self._sock(key.local.version, icmp=True).sendto(message, (str(key.local), 0))
        except OSError as exc:
            log.debug("ICMP error for %s: %s", key, exc)
            return False
        return True

    def _send(self, packet: bytes, dst: IPAddress) -> None:
        try:
            self._sock(dst.version).sendto(packet, (str(dst), 0))
            self.sent += 1
        except OSError as exc:
            self.failed += 1
            if self.failed & (self.failed - 1) == 0:  # (1st, 2nd, 4th, ...: not a flood)
                log.warning("carrying a packet to %s: %s (%d lost)", dst, exc, self.failed)

    def _sock(self, version: int, icmp: bool = False) -> socket.socket:
        sock = self._socks.get((version, icmp))
        if sock is None:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            proto = socket.IPPROTO_RAW
            if icmp:
                proto = socket.IPPROTO_ICMP if version == 4 else socket.IPPROTO_ICMPV6
            sock = socket.socket(family, socket.SOCK_RAW, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, INJECT_MARK)
            sock.setblocking(False)
            self._socks[(version, icmp)] = sock
        return sock
