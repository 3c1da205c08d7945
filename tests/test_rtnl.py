"""The rtnetlink client: decoding of the kernel's messages, and read-only requests
in this namespace (the loopback link, its address, the route to it)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from stacktrans import rtnl
from stacktrans.netlink import attr, messages


def _addr_msg(kind: int, family: int, ip: str, plen: int, flags: int, index: int) -> bytes:
    raw = socket.inet_pton(family, ip)
    body = struct.pack("=BBBBI", family, plen, flags & 0xFF, 0, index)
    body += attr(rtnl.IFA_ADDRESS, raw) + attr(rtnl.IFA_FLAGS, struct.pack("=I", flags))
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_address_messages_decode_like_the_monitor_reads_them() -> None:
    data = _addr_msg(rtnl.RTM_NEWADDR, socket.AF_INET6, "2001:db8::1", 64, 0x140, 3)
    data += _addr_msg(rtnl.RTM_DELADDR, socket.AF_INET, "10.0.0.1", 24, 0x80, 2)
    got = [rtnl.decode(kind, body) for kind, _, body in messages(data)]
    assert got == [
        {"event": "RTM_NEWADDR", "family": socket.AF_INET6, "prefixlen": 64, "flags": 0x40,
         "scope": 0, "index": 3, "IFA_ADDRESS": "2001:db8::1", "IFA_FLAGS": 0x140},
        {"event": "RTM_DELADDR", "family": socket.AF_INET, "prefixlen": 24, "flags": 0x80,
         "scope": 0, "index": 2, "IFA_ADDRESS": "10.0.0.1", "IFA_FLAGS": 0x80},
    ]  # fmt: skip


def test_other_and_truncated_messages_are_skipped() -> None:
    assert rtnl.decode(rtnl.RTM_GETLINK, memoryview(b"\0" * 16)) is None
    assert rtnl.decode(rtnl.RTM_NEWADDR, memoryview(b"\0" * 4)) is None


def test_other_families_odd_names_and_bad_lengths_never_raise() -> None:
    # An MCTP address (family 45, one byte), as an AF_UNSPEC dump lists it.
    mctp = struct.pack("=BBBBI", 45, 0, 0, 0, 7) + attr(rtnl.IFA_ADDRESS, b"\x08")
    assert rtnl.decode(rtnl.RTM_NEWADDR, memoryview(mctp)) is None
    # An IPv4 address attribute of the wrong length.
    bad = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 2) + attr(rtnl.IFA_ADDRESS, b"\1\2")
    assert rtnl.decode(rtnl.RTM_NEWADDR, memoryview(bad)) is None
    # A link name that is not UTF-8 (the kernel allows any bytes but "/", ":", space).
    link = struct.pack("=BxHiII", 0, 1, 9, 0, 0) + attr(rtnl.IFLA_IFNAME, b"wl\xff0\0")
    msg = rtnl.decode(rtnl.RTM_NEWLINK, memoryview(link))
    assert msg is not None and msg["IFLA_IFNAME"] == b"wl\xff0".decode(errors="surrogateescape")


def test_reads_the_loopback_link_address_and_route() -> None:
    lo = socket.if_nametoindex("lo")
    with rtnl.Rtnl() as r:
        links = {m["index"]: m for m in r.links()}
        assert links[lo]["IFLA_IFNAME"] == "lo"
        addrs = [m for m in r.addresses(socket.AF_INET) if m["index"] == lo]
        assert any(m.get("IFA_LOCAL") == "127.0.0.1" for m in addrs)
        assert r.route_get("127.0.0.1")["RTA_OIF"] == lo


def test_a_refused_request_raises_the_kernels_errno() -> None:
    # Deleting an address of an unknown family: refused, never done.
    with rtnl.Rtnl() as r, pytest.raises(OSError) as exc:
        r.request(rtnl.RTM_DELADDR, rtnl.NLM_F_ACK, struct.pack("=BBBBI", 99, 0, 0, 0, 0))
    assert exc.value.errno in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP, errno.EINVAL)
