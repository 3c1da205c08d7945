"""Packets of carried flows handed to a link whole, the kernel cutting and summing them.

Why: a flow carried across IP versions (:mod:`stacktrans.carry`) is translated in user
space a packet at a time, and the kernel queues TCP's GSO packets whole (up to 64 kB).
A raw socket takes only packets that fit the path: a 64 kB packet would be cut into
~45 segments in Python, each summed there, and the peer's daemon would then get ~45
packets to translate instead of one. A packet socket with ``PACKET_VNET_HDR`` takes the
packet with a virtio-net header saying "segments of this size, checksum from here":
the kernel (or the NIC) cuts and sums it as it does the host's own TCP's.

* **out**: onto the link the route to the peer's locator takes, with the next hop's
  hardware address from the neighbour table. Ethernet-like links only (``ARPHRD_ETHER``);
  no route, no resolved neighbour yet, another kind of link or a failed send: False,
  and the caller takes the raw socket (whose packets also make the kernel resolve
  the neighbour). Such a packet skips the host's netfilter output hooks: dime's own
  rules have nothing for it (its addresses are already the wire's).
* **into**: onto ``lo``, where the kernel takes it in as received and delivers it to
  the flow's socket; a partial checksum there is one the stack trusts (as for its
  own loopback traffic). IPv4 only where ``rp_filter`` is not strict (1): strict
  reverse-path filtering drops a packet from a remote address arriving on ``lo``
  (read when first needed).

Which link and hardware addresses a locator pair takes is looked up once and kept
for :data:`KEEP` seconds (:data:`KEEP_MISS` when not usable), so a move or a new
neighbour is followed within that.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stacktrans.family import CSUM_AT, TCP, layout
from stacktrans.rtnl import Rtnl

log = logging.getLogger("dime.link_send")

SOL_PACKET, PACKET_VNET_HDR = 263, 15  # <linux/if_packet.h>
ARPHRD_ETHER = 1
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
#: struct virtio_net_hdr (<linux/virtio_net.h>): flags, gso_type, hdr_len, gso_size,
#: csum_start, csum_offset; little-endian, as virtio 1.0 and packet sockets on the
#: machines dime runs on (amd64, arm64).
VNET_HDR = struct.Struct("<BBHHHH")
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
TCP_CWR = 0x80
ETH_HLEN = 14
KEEP, KEEP_MISS = 1.0, 0.2


@dataclass(frozen=True)
class Way:
    """Where packets from a locator to a peer's go: a link and its frame header."""

    ifname: str
    frame: bytes  # destination and source hardware addresses


def vnet_header(packet: bytes, mtu: int | None) -> bytes | None:
    """The virtio-net header for ``packet`` (IPv4 without options or IPv6 without
    extension headers, TCP or UDP, its transport checksum field holding the
    pseudo-header's sum: :func:`stacktrans.family.to_ipv6` ``partial``) behind a
    14-byte frame header: checksum from the transport header on, and, for a TCP
    packet larger than ``mtu``, segments that fit it. None: not such a packet, or
    one of another protocol larger than ``mtu`` (only TCP is cut here). ``mtu``
    None: the packet goes whole (``lo``)."""
    v6, ip_len, proto, _, _ = layout(packet)
    if proto not in CSUM_AT or len(packet) < ip_len + CSUM_AT[proto] + 2:
        return None
    head = ip_len + ((packet[ip_len + 12] >> 4) * 4 if proto == TCP else 0)
    gso, gso_size = GSO_NONE, 0
    if mtu is not None and len(packet) > mtu:
        if proto != TCP or mtu <= head:
            return None
        gso, gso_size = (GSO_TCPV6 if v6 else GSO_TCPV4), mtu - head
        if packet[ip_len + 13] & TCP_CWR:
            gso |= GSO_ECN
    return VNET_HDR.pack(
        NEEDS_CSUM, gso, ETH_HLEN + head, gso_size, ETH_HLEN + ip_len, CSUM_AT[proto]
    )


def _strict_rp_filter() -> bool:
    """Whether IPv4 reverse-path filtering on ``lo`` is strict (the larger of "all"
    and the link's own value counts)."""
    values = []
    for name in ("all", "lo"):
        try:
            values.append(int(Path(f"/proc/sys/net/ipv4/conf/{name}/rp_filter").read_text()))
        except (OSError, ValueError):
            values.append(0)
    return max(values) == 1


class LinkSender:
    """Packet sockets (opened on first use) and the ways found for locator pairs."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._sock: socket.socket | None = None
        self._ways: dict[tuple[bytes, bytes], tuple[float, Way | None]] = {}
        self._lo_v4: bool | None = None  # IPv4 into lo allowed (rp_filter not strict)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def out(self, packet: bytes, mtu: int) -> bool:
        """Send ``packet`` (to a peer; partial checksum) onto its route's link, as
        segments that fit ``mtu``. False if it cannot go this way (nothing sent)."""
        v6, _, _, src, dst = layout(packet)
        way = self._way(src, dst, v6)
        if way is None:
            return False
        head = vnet_header(packet, mtu)
        if head is None:
            return False
        if not self._send(head + way.frame + _ethertype(v6) + packet, way.ifname, v6):
            self._ways.pop((src, dst), None)
            return False
        return True

    def into(self, packet: bytes) -> bool:
        """Deliver ``packet`` (to our own address; partial checksum) through ``lo``.
        False if it cannot go this way (nothing sent)."""
        v6 = packet[0] >> 4 == 6
        if not v6:
            if self._lo_v4 is None:
                self._lo_v4 = not _strict_rp_filter()
            if not self._lo_v4:
                return False
        head = vnet_header(packet, None)
        if head is None:
            return False
        return self._send(head + bytes(12) + _ethertype(v6) + packet, "lo", v6)

    def _way(self, src: bytes, dst: bytes, v6: bool) -> Way | None:
        now = self.clock()
        kept = self._ways.get((src, dst))
        if kept is not None and kept[0] > now:
            return kept[1]
        way = _find_way(src, dst, socket.AF_INET6 if v6 else socket.AF_INET)
        self._ways[(src, dst)] = (now + (KEEP if way else KEEP_MISS), way)
        return way

    def _send(self, frame: bytes, ifname: str, v6: bool) -> bool:
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
                self._sock = sock
            self._sock.sendto(frame, (ifname, ETH_P_IPV6 if v6 else ETH_P_IP))
        except OSError as exc:
            log.debug("packet to %s: %s", ifname, exc)
            return False
        return True


def _ethertype(v6: bool) -> bytes:
    return (ETH_P_IPV6 if v6 else ETH_P_IP).to_bytes(2, "big")


def _find_way(src: bytes, dst: bytes, family: int) -> Way | None:
    """The link and frame header of the route from ``src`` to ``dst`` now; None if
    it is not an Ethernet-like link or its next hop is not resolved."""
    s, d = socket.inet_ntop(family, src), socket.inet_ntop(family, dst)
    try:
        with Rtnl(timeout=1.0) as rtnl:
            route = rtnl.route_get(d, s)
            index = route.get("RTA_OIF")
            if index is None:
                return None
            link = rtnl.link(index)
            if link.get("type") != ARPHRD_ETHER or "IFLA_ADDRESS" not in link:
                return None
            lladdr = rtnl.neighbour(index, route.get("RTA_GATEWAY") or d)
    except OSError as exc:
        log.debug("route %s -> %s: %s", s, d, exc)
        return None
    if lladdr is None:
        return None
    frame = bytes.fromhex(lladdr.replace(":", "")) + bytes.fromhex(
        link["IFLA_ADDRESS"].replace(":", "")
    )
    return Way(link.get("IFLA_IFNAME", ""), frame)
