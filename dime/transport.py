"""IHMP's UDP sockets: the only place where IHMP datagrams meet the network.

One socket per family, bound to the IHMP port on every address. Each received
datagram's destination address comes from IP_PKTINFO / IPV6_PKTINFO; each sent one
names its source address the same way, because IHMP must send from the exact
address the engine chose (the peer's tables are keyed by it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

from ihmp.addr import IPAddress

log = logging.getLogger("dime.transport")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python does not export it
_IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex

Receiver = Callable[[bytes, IPAddress, int, IPAddress], None]  # data, src, port, dst


class IhmpTransport:
    def __init__(self, port: int, on_datagram: Receiver) -> None:
        self.port = port
        self.on_datagram = on_datagram
        self._socks: dict[int, socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.send_errors = 0

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        v4.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        for sock, bind in ((v4, ("0.0.0.0", self.port)), (v6, ("::", self.port))):
            # IP_FREEBIND: send from addresses that come and go under our feet.
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15), 1)
            try:
                sock.bind(bind)
            except OSError as exc:
                v4.close()
                v6.close()
                raise OSError(f"cannot bind the IHMP port {self.port}: {exc.strerror}") from exc
            sock.setblocking(False)
        self._socks = {4: v4, 6: v6}
        for sock in self._socks.values():
            loop.add_reader(sock.fileno(), self._readable, sock)

    def close(self) -> None:
        for sock in self._socks.values():
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded: let the loop serve others between bursts
            try:
                data, anc, _flags, addr = sock.recvmsg(2048, socket.CMSG_SPACE(64))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                log.debug("IHMP socket: %s", exc)
                continue
            dst = _pktinfo_dst(anc)
            if dst is None:
                continue
            try:
                src = ip_address(addr[0].split("%")[0])
            except ValueError:
                continue
            self.on_datagram(data, src, addr[1], dst)

    def send(self, data: bytes, src: IPAddress, dst: IPAddress, port: int | None) -> bool:
        """Send one datagram from ``src``; False if the host could not send it at all."""
        sock = self._socks.get(dst.version)
        if sock is None:
            return False
        if dst.version == 4:
            cmsg = (socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, src.packed, bytes(4)))
        else:
            cmsg = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(src.packed, 0))
        try:
            sock.sendmsg([data], [cmsg], 0, (str(dst), port or self.port))
        except OSError as exc:
            # No route, or the source address just went away: IHMP retransmits.
            self.send_errors += 1
            log.debug("IHMP send %s -> %s failed: %s", src, dst, exc)
            return False
        return True


def _pktinfo_dst(anc: list[tuple[int, int, bytes]]) -> IPAddress | None:
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            _, _, addr = _IN_PKTINFO.unpack_from(data)
            return IPv4Address(addr)
        if (
            level == socket.IPPROTO_IPV6
            and kind == socket.IPV6_PKTINFO
            and len(data) >= _IN6_PKTINFO.size
        ):
            addr6, _ = _IN6_PKTINFO.unpack_from(data)
            return IPv6Address(addr6)
    return None
