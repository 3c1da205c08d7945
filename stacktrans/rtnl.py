"""A small rtnetlink client: the links, addresses and routes dime reads and writes.

pyroute2 did this before; importing any part of it loads the whole package (22 MiB
of RSS, 70 ms), more than the rest of the daemon's code together. dime needs a
handful of messages, built and parsed here with :mod:`stacktrans.netlink`.

Messages come out as flat dicts, named like pyroute2's (``event``, the header
fields, attributes by their kernel names), so the callers' tables read them the
same way: ``{"event": "RTM_NEWADDR", "family": 2, "prefixlen": 24, "flags": 128,
"index": 2, "IFA_ADDRESS": "10.0.0.1", ...}``. Addresses are strings.

Errors are :class:`OSError` with the kernel's errno (``str()`` says e.g. "File
exists").
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, Final

from stacktrans.netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    attr,
    attributes,
    error_code,
    message,
    messages,
    open_socket,
)

__all__ = [
    "RTMGRP_IPV4_IFADDR",
    "RTMGRP_IPV4_ROUTE",
    "RTMGRP_IPV6_IFADDR",
    "RTMGRP_IPV6_ROUTE",
    "RTMGRP_LINK",
    "AsyncRtnl",
    "Rtnl",
]

# <linux/rtnetlink.h>
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_IFADDR: Final = 0x10
RTMGRP_IPV6_IFADDR: Final = 0x100
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV6_ROUTE: Final = 0x400
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400

IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFLA_ADDRESS, IFLA_IFNAME = 1, 3
RTA_SRC = 2
NDA_DST, NDA_LLADDR = 1, 2
# <linux/neighbour.h>: states whose link-layer address is no use
NUD_INCOMPLETE, NUD_FAILED, NUD_NONE = 0x01, 0x20, 0x00
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
RT_TABLE_MAIN, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RTN_UNICAST = 254, 0, 253, 1
# <linux/fib_rules.h>
FRA_DST, FRA_SRC, FRA_PRIORITY, FRA_TABLE, FRA_PROTOCOL = 1, 2, 6, 15, 21
FRA_IP_PROTO, FRA_SPORT_RANGE, FRA_DPORT_RANGE = 22, 23, 24
FR_ACT_TO_TBL = 1

_EVENTS: Final = {
    RTM_NEWLINK: "RTM_NEWLINK",
    RTM_DELLINK: "RTM_DELLINK",
    RTM_NEWADDR: "RTM_NEWADDR",
    RTM_DELADDR: "RTM_DELADDR",
    RTM_NEWROUTE: "RTM_NEWROUTE",
    RTM_DELROUTE: "RTM_DELROUTE",
    RTM_NEWRULE: "RTM_NEWRULE",
    RTM_NEWNEIGH: "RTM_NEWNEIGH",
}
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_NDMSG = struct.Struct("=BxxxiHBB")  # family, index, state, flags, type
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
# fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
_FIBRULE = struct.Struct("=BBBBBBBBI")
_PORTS = struct.Struct("=HH")  # fib_rule_port_range: start, end (host order)
_ROUTE_ADDRS: Final = {RTA_DST: "RTA_DST", RTA_GATEWAY: "RTA_GATEWAY", RTA_PREFSRC: "RTA_PREFSRC"}
_ROUTE_U32S: Final = {RTA_OIF: "RTA_OIF", RTA_PRIORITY: "RTA_PRIORITY", RTA_TABLE: "RTA_TABLE"}
_RULE_ADDRS: Final = {FRA_DST: "FRA_DST", FRA_SRC: "FRA_SRC"}
_RULE_PORTS: Final = {FRA_SPORT_RANGE: "FRA_SPORT_RANGE", FRA_DPORT_RANGE: "FRA_DPORT_RANGE"}
RECV_BUF = 1 << 16


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _ip(family: int, raw: bytes | memoryview) -> str:
    return socket.inet_ntop(family, bytes(raw))


def decode(kind: int, payload: memoryview) -> dict[str, Any] | None:
    """One link, address, route or rule message as a dict (see the module doc); None for
    any other kind, a truncated one, or an address or route of another family than
    IPv4 and IPv6 (a dump lists MCTP or Phonet addresses too). Never raises."""
    event = _EVENTS.get(kind)
    if event is None:
        return None
    try:
        return _decode(kind, event, payload)
    except (ValueError, struct.error):  # an attribute of the wrong length
        return None


def _decode(kind: int, event: str, payload: memoryview) -> dict[str, Any] | None:
    link = kind in (RTM_NEWLINK, RTM_DELLINK)
    if not link and len(payload) >= 1 and payload[0] not in (socket.AF_INET, socket.AF_INET6):
        return None
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        if len(payload) < _IFINFO.size:
            return None
        family, kind_, index, flags, _ = _IFINFO.unpack_from(payload)
        msg: dict[str, Any] = {"event": event, "family": family, "index": index, "flags": flags}
        msg["type"] = kind_  # ARPHRD_*
        for t, value in attributes(payload, _IFINFO.size):
            if t == IFLA_ADDRESS:
                msg["IFLA_ADDRESS"] = bytes(value).hex(":")
            elif t == IFLA_IFNAME:
                # Any bytes but "/", ":" and white space make a valid name.
                name = bytes(value).split(b"\0", 1)[0]
                msg["IFLA_IFNAME"] = name.decode(errors="surrogateescape")
        return msg
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        if len(payload) < _IFADDR.size:
            return None
        family, plen, flags, scope, index = _IFADDR.unpack_from(payload)
        msg = {"event": event, "family": family, "prefixlen": plen, "flags": flags}
        msg |= {"scope": scope, "index": index}
        for t, value in attributes(payload, _IFADDR.size):
            if t in (IFA_ADDRESS, IFA_LOCAL):
                msg["IFA_ADDRESS" if t == IFA_ADDRESS else "IFA_LOCAL"] = _ip(family, value)
            elif t == IFA_FLAGS and len(value) >= 4:
                msg["IFA_FLAGS"] = struct.unpack_from("=I", value)[0]
        return msg
    if kind == RTM_NEWRULE:
        return _decode_rule(event, payload)
    if kind == RTM_NEWNEIGH:
        return _decode_neigh(event, payload)
    return _decode_route(event, payload)


def _decode_route(event: str, payload: memoryview) -> dict[str, Any] | None:
    if len(payload) < _RTMSG.size:
        return None
    family, dst_len, _, _, table, proto, scope, rtype, _ = _RTMSG.unpack_from(payload)
    msg = {"event": event, "family": family, "dst_len": dst_len, "table": table}
    msg |= {"proto": proto, "scope": scope, "type": rtype}
    for t, value in attributes(payload, _RTMSG.size):
        if t in _ROUTE_ADDRS:
            msg[_ROUTE_ADDRS[t]] = _ip(family, value)
        elif t in _ROUTE_U32S and len(value) >= 4:
            msg[_ROUTE_U32S[t]] = struct.unpack_from("=I", value)[0]
    if "RTA_TABLE" in msg:  # the header holds only tables up to 255
        msg["table"] = msg["RTA_TABLE"]
    return msg


def _decode_rule(event: str, payload: memoryview) -> dict[str, Any] | None:
    if len(payload) < _FIBRULE.size:
        return None
    family, dst_len, src_len, _, table, _, _, action, _ = _FIBRULE.unpack_from(payload)
    msg = {"event": event, "family": family, "dst_len": dst_len, "src_len": src_len}
    msg |= {"table": table, "action": action}
    for t, value in attributes(payload, _FIBRULE.size):
        if t in _RULE_ADDRS:
            msg[_RULE_ADDRS[t]] = _ip(family, value)
        elif t in (FRA_PRIORITY, FRA_TABLE) and len(value) >= 4:
            msg["FRA_PRIORITY" if t == FRA_PRIORITY else "FRA_TABLE"] = struct.unpack_from(
                "=I", value
            )[0]
        elif t in (FRA_IP_PROTO, FRA_PROTOCOL) and len(value) >= 1:
            msg["FRA_IP_PROTO" if t == FRA_IP_PROTO else "FRA_PROTOCOL"] = value[0]
        elif t in _RULE_PORTS:
            msg[_RULE_PORTS[t]] = _PORTS.unpack_from(value)
    if "FRA_TABLE" in msg:  # the header holds only tables up to 255
        msg["table"] = msg["FRA_TABLE"]
    return msg


def _decode_neigh(event: str, payload: memoryview) -> dict[str, Any] | None:
    if len(payload) < _NDMSG.size:
        return None
    family, index, state, _, _ = _NDMSG.unpack_from(payload)
    msg = {"event": event, "family": family, "index": index, "state": state}
    for t, value in attributes(payload, _NDMSG.size):
        if t == NDA_DST:
            msg["NDA_DST"] = _ip(family, value)
        elif t == NDA_LLADDR:
            msg["NDA_LLADDR"] = bytes(value).hex(":")
    return msg


def _open(groups: int = 0) -> socket.socket:
    return open_socket(socket.NETLINK_ROUTE, groups)


class Rtnl:
    """Requests on a netlink socket of its own, answered before each call returns.

    The kernel answers rtnetlink requests at once, so a blocking socket (with a
    timeout, against the unexpected) costs the event loop well under a millisecond.
    """

    def __init__(self, timeout: float = 5.0) -> None:
        self._sock = _open()
        self._sock.settimeout(timeout)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, payload: bytes) -> list[dict[str, Any]]:
        """Send one request, return the messages of its answer (a dump's or a get's).

        Raises OSError with the kernel's errno if it refused."""
        self._seq += 1
        seq = self._seq
        self._sock.send(message(kind, NLM_F_REQUEST | flags, seq, payload))
        out: list[dict[str, Any]] = []
        while True:
            data = self._sock.recv(RECV_BUF)
            for mtype, mseq, body in messages(data):
                if mseq != seq:
                    continue  # an answer to an earlier request that timed out
                if mtype == NLMSG_ERROR:
                    code = error_code(body)
                    if code:
                        raise OSError(code, os.strerror(code))
                    return out  # the ACK
                if mtype == NLMSG_DONE:
                    return out
                decoded = decode(mtype, body)
                if decoded is not None:
                    out.append(decoded)
                if not flags & NLM_F_DUMP and not flags & NLM_F_ACK:
                    return out  # a get: one message is the answer

    # -- reads ------------------------------------------------------------------------

    def links(self) -> list[dict[str, Any]]:
        return self.request(RTM_GETLINK, NLM_F_DUMP, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0))

    def addresses(self, family: int = socket.AF_UNSPEC) -> list[dict[str, Any]]:
        return self.request(RTM_GETADDR, NLM_F_DUMP, _IFADDR.pack(family, 0, 0, 0, 0))

    def routes(self, family: int) -> list[dict[str, Any]]:
        """Every route of ``family`` in every table (``table`` says which)."""
        return self.request(RTM_GETROUTE, NLM_F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))

    def rules(self, family: int = socket.AF_UNSPEC) -> list[dict[str, Any]]:
        """Every policy routing rule of ``family`` (AF_UNSPEC: IPv4 and IPv6)."""
        return self.request(RTM_GETRULE, NLM_F_DUMP, _FIBRULE.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))

    def route_get(self, dst: str, src: str | None = None) -> dict[str, Any]:
        """The route the kernel picks to ``dst`` (``RTA_OIF``, ``RTA_GATEWAY`` if any),
        for packets from ``src`` if given (policy routing may choose by source).
        OSError (e.g. ENETUNREACH) if there is none."""
        family = _family(dst)
        full = 32 if family == socket.AF_INET else 128
        body = _RTMSG.pack(family, full, full if src else 0, 0, 0, 0, 0, 0, 0)
        body += attr(RTA_DST, socket.inet_pton(family, dst))
        if src:
            body += attr(RTA_SRC, socket.inet_pton(family, src))
        answer = self.request(RTM_GETROUTE, 0, body)
        if not answer:
            raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))
        return answer[0]

    def link(self, index: int) -> dict[str, Any]:
        """Link ``index`` (``type``: its ARPHRD_*, ``IFLA_ADDRESS``: its hardware
        address as "aa:bb:..."). OSError (ENODEV) if there is none."""
        answer = self.request(RTM_GETLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0))
        if not answer:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        return answer[0]

    def neighbour(self, index: int, address: str) -> str | None:
        """The link-layer address ("aa:bb:...") of neighbour ``address`` on link
        ``index``, if the kernel has a usable one (resolved, stale or permanent)."""
        family = _family(address)
        body = _NDMSG.pack(family, index, 0, 0, 0)
        body += attr(NDA_DST, socket.inet_pton(family, address))
        try:
            answer = self.request(RTM_GETNEIGH, 0, body)
        except OSError:
            return None  # (ENOENT: never heard of)
        if (
            not answer
            or answer[0]["state"] & (NUD_INCOMPLETE | NUD_FAILED)
            or answer[0]["state"] == NUD_NONE
        ):
            return None
        lladdr: str | None = answer[0].get("NDA_LLADDR")
        return lladdr

    # -- writes -----------------------------------------------------------------------

    def addr(self, verb: str, index: int, address: str, prefixlen: int) -> None:
        """Add (``"add"``) or delete (``"del"``) ``address/prefixlen`` on link ``index``."""
        family = _family(address)
        raw = socket.inet_pton(family, address)
        body = _IFADDR.pack(family, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
        if verb == "add":
            self.request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)
        else:
            self.request(RTM_DELADDR, NLM_F_ACK, body)

    def route(
        self,
        verb: str,
        dst: str,
        dst_len: int,
        proto: int,
        oif: int | None = None,
        gateway: str | None = None,
        *,
        table: int = RT_TABLE_MAIN,
        prefsrc: str | None = None,
        priority: int | None = None,
        scope: int = RT_SCOPE_UNIVERSE,
    ) -> None:
        """Add (``"add"``) or delete (``"del"``) a unicast route in ``table`` (a
        default route: ``dst`` "0.0.0.0" or "::" with ``dst_len`` 0)."""
        family = _family(dst)
        # Tables above 255 go in RTA_TABLE only, as iproute2 sends them.
        head = table if table < 256 else 0
        body = _RTMSG.pack(family, dst_len, 0, 0, head, proto, scope, RTN_UNICAST, 0)
        body += attr(RTA_DST, socket.inet_pton(family, dst))
        if table >= 256:
            body += attr(RTA_TABLE, struct.pack("=I", table))
        if oif is not None:
            body += attr(RTA_OIF, struct.pack("=I", oif))
        if gateway is not None:
            body += attr(RTA_GATEWAY, socket.inet_pton(_family(gateway), gateway))
        if prefsrc is not None:
            body += attr(RTA_PREFSRC, socket.inet_pton(family, prefsrc))
        if priority is not None:
            body += attr(RTA_PRIORITY, struct.pack("=I", priority))
        self._write(verb, RTM_NEWROUTE, RTM_DELROUTE, body)

    def rule(
        self,
        verb: str,
        family: int,
        table: int,
        priority: int,
        *,
        src: tuple[str, int] | None = None,
        dst: tuple[str, int] | None = None,
        ip_proto: int | None = None,
        sport: int | None = None,
        dport: int | None = None,
        protocol: int | None = None,
    ) -> None:
        """Add (``"add"``) or delete (``"del"``) the rule ``priority: [from SRC/LEN]
        [to DST/LEN] [ipproto P] [sport N] [dport N] lookup table``; ``protocol``
        marks who added it (``ip rule`` shows "proto N"). A delete removes the first
        rule that has every given attribute. Ports and ``ip_proto`` need Linux 4.17."""
        src_len = src[1] if src else 0
        dst_len = dst[1] if dst else 0
        head = table if table < 256 else 0
        body = _FIBRULE.pack(family, dst_len, src_len, 0, head, 0, 0, FR_ACT_TO_TBL, 0)
        body += attr(FRA_PRIORITY, struct.pack("=I", priority))
        body += attr(FRA_TABLE, struct.pack("=I", table))
        if src is not None:
            body += attr(FRA_SRC, socket.inet_pton(family, src[0]))
        if dst is not None:
            body += attr(FRA_DST, socket.inet_pton(family, dst[0]))
        if ip_proto is not None:
            body += attr(FRA_IP_PROTO, bytes([ip_proto]))
        if sport is not None:
            body += attr(FRA_SPORT_RANGE, _PORTS.pack(sport, sport))
        if dport is not None:
            body += attr(FRA_DPORT_RANGE, _PORTS.pack(dport, dport))
        if protocol is not None:
            body += attr(FRA_PROTOCOL, bytes([protocol]))
        self._write(verb, RTM_NEWRULE, RTM_DELRULE, body)

    def _write(self, verb: str, new: int, delete: int, body: bytes) -> None:
        if verb == "add":
            self.request(new, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)
        else:
            self.request(delete, NLM_F_ACK, body)


class AsyncRtnl:
    """What :class:`dime.monitor.AddressMonitor` needs, for the event loop: dumps of
    links and addresses, and the messages of the multicast groups it binds.

    ``get()`` yields the messages of one datagram, then ends; an overrun socket
    raises OSError(ENOBUFS) there (messages were lost).
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    async def bind(self, groups: int) -> None:
        self._sock = _open(groups)
        self._sock.setblocking(False)

    async def get(self) -> AsyncIterator[dict[str, Any]]:
        assert self._sock is not None, "bind() first"
        data = await asyncio.get_running_loop().sock_recv(self._sock, RECV_BUF)
        if not data:
            raise OSError(errno.ECONNRESET, "netlink socket closed")
        for kind, _, body in messages(data):
            decoded = decode(kind, body)
            if decoded is not None:
                yield decoded

    async def link(self, command: str) -> AsyncIterator[dict[str, Any]]:
        assert command == "dump"
        with Rtnl() as rtnl:
            return _aiter(rtnl.links())

    async def addr(self, command: str) -> AsyncIterator[dict[str, Any]]:
        assert command == "dump"
        with Rtnl() as rtnl:
            return _aiter(rtnl.addresses())

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    async def __aenter__(self) -> AsyncRtnl:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def _aiter(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item
