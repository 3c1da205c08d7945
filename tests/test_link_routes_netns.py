"""Per-address tables and policy rules on a real kernel: a host with two links to one
router (two default routes, metric 100 via link 1 and 200 via link 2), behind which
a server listens. LinkRoutes runs in this process, its netlink sockets opened in the
host's namespace (by a thread that enters it and ends: nothing else moves)."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

import pytest

from stacktrans.link_routes import LinkRoutes, LocalAddress, Selector
from stacktrans.rtnl import Rtnl
from testbed.netns import Namespace, topology
from testbed.procs import py, wait_for

pytestmark = pytest.mark.netns

A1, A2 = ip_address("10.91.1.2"), ip_address("10.91.2.2")
A2_6 = ip_address("2001:db8:2::2")
SERVER = "10.91.9.1"
CLONE_NEWNET = 0x40000000

LISTEN = """
import socket, sys, threading
def serve(port):
    s = socket.create_server(("10.91.9.1", port))
    while True:
        c, _ = s.accept()
        threading.Thread(target=lambda c=c: [None for _ in iter(lambda: c.recv(65536), b"")],
                         daemon=True).start()
for p in (22, 80):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("listening", file=sys.stderr, flush=True)
sys.stdin.read()
"""

#: Connect (bound to argv[3] if given) to the server's port argv[1], send argv[2]
#: bytes; print the source address the socket got.
CONNECT = """
import socket, sys
s = socket.socket()
if len(sys.argv) > 3:
    s.bind((sys.argv[3], 0))
s.settimeout(5)
s.connect(("10.91.9.1", int(sys.argv[1])))
s.sendall(b"x" * int(sys.argv[2]))
print(s.getsockname()[0])
s.close()
"""


@dataclass
class Bed:
    host: Namespace
    router: Namespace
    server: Namespace

    def rtnl(self) -> Rtnl:
        """An Rtnl whose socket lives in the host's namespace."""
        return _in_netns(self.host, Rtnl)

    def connect(self, port: int, nbytes: int = 60000, bind: str | None = None) -> str:
        """The source address of a TCP connection from the host to the server."""
        argv = ["-c", CONNECT, str(port), str(nbytes), *([bind] if bind else [])]
        proc = py(self.host, *argv)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
        return out.decode().strip()

    def rx_bytes(self) -> tuple[int, int]:
        """Bytes the router received on link 1 and link 2."""
        return _rx(self.router, "r1"), _rx(self.router, "r2")

    def state(self) -> list[list[Any]]:
        """Every rule and every route of the host, both families, order aside."""
        out = []
        for argv in (["rule"], ["route", "show", "table", "all"]):
            for fam in ("-4", "-6"):
                items = json.loads(self.host.ip("-j", fam, *argv))
                out.append(sorted(json.dumps(i, sort_keys=True) for i in items))
        return out


def _rx(ns: Namespace, dev: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/{dev}/statistics/rx_bytes"))


def _in_netns(ns: Namespace, make: type[Rtnl]) -> Rtnl:
    """``make()`` run in a thread that entered ``ns`` (setns moves only the calling
    thread); a socket keeps the namespace it was created in."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            box["out"] = make()
        except BaseException as exc:
            box["err"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "err" in box:
        raise box["err"]
    return box["out"]  # type: ignore[no-any-return]


@pytest.fixture
def bed() -> Iterator[Bed]:
    with topology("lr") as topo:
        host, router, server = topo.add_ns("h"), topo.add_ns("r"), topo.add_ns("s")
        topo.link(host, "h1", router, "r1")
        topo.link(host, "h2", router, "r2")
        topo.link(router, "r9", server, "s9")
        host.addr_add("h1", "10.91.1.2/24")
        host.addr_add("h2", "10.91.2.2/24")
        host.addr_add("h1", "2001:db8:1::2/64")
        host.addr_add("h2", "2001:db8:2::2/64")
        router.addr_add("r1", "10.91.1.1/24")
        router.addr_add("r2", "10.91.2.1/24")
        router.addr_add("r9", "10.91.9.254/24")
        server.addr_add("s9", "10.91.9.1/24")
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        server.ip("route", "add", "default", "via", "10.91.9.254")
        _default_routes(host)
        listener = py(server, "-c", LISTEN)
        try:
            wait_for(listener, "listening", 10)
            yield Bed(host, router, server)
        finally:
            listener.kill()
            listener.wait()


def _default_routes(host: Namespace) -> None:
    host.ip("route", "add", "default", "via", "10.91.1.1", "dev", "h1", "metric", "100")
    host.ip("route", "add", "default", "via", "10.91.2.1", "dev", "h2", "metric", "200")
    host.ip("-6", "route", "add", "default", "via", "2001:db8:1::1", "dev", "h1", "metric", "100")
    host.ip("-6", "route", "add", "default", "via", "2001:db8:2::1", "dev", "h2", "metric", "200")


def _addresses(host: Namespace) -> list[LocalAddress]:
    h1, h2 = (int(host.run("cat", f"/sys/class/net/{d}/ifindex")) for d in ("h1", "h2"))
    return [
        LocalAddress(A1, 24, h1),
        LocalAddress(A2, 24, h2),
        LocalAddress(ip_address("2001:db8:1::2"), 64, h1),
        LocalAddress(A2_6, 64, h2),
    ]


def _dev(route: str) -> str:
    words = route.split()
    return words[words.index("dev") + 1]


def _link_of(bed: Bed, port: int, bind: str | None = None) -> tuple[str, int]:
    """The source of a connection and the link (1 or 2) its 60 kB went through."""
    before = bed.rx_bytes()
    src = bed.connect(port, bind=bind)
    d1, d2 = (after - b for after, b in zip(bed.rx_bytes(), before, strict=True))
    assert max(d1, d2) > 60000 and min(d1, d2) < 10000, (d1, d2)
    return src, 1 if d1 > d2 else 2


def test_each_address_leaves_through_its_own_link_and_close_leaves_nothing(bed: Bed) -> None:
    before = bed.state()
    lr = LinkRoutes(open_rtnl=bed.rtnl)
    try:
        assert _link_of(bed, 80, bind=str(A2)) == (str(A2), 1)  # the kernel's default
        lr.update(_addresses(bed.host))
        assert _dev(bed.host.ip("route", "get", SERVER, "from", str(A2))) == "h2"
        assert _dev(bed.host.ip("route", "get", SERVER, "from", str(A1))) == "h1"
        assert _dev(bed.host.ip("-6", "route", "get", "2001:db8:9::1", "from", str(A2_6))) == "h2"
        assert _dev(bed.host.ip("route", "get", SERVER)) == "h1"  # no source: main
        rules = bed.host.ip("rule").splitlines() + bed.host.ip("-6", "rule").splitlines()
        ours = sorted(line.split(":", 1)[1].split() for line in rules if "proto 209" in line)
        assert len(ours) == 4  # exactly our four "from" rules
        assert all(r[:2] == ["from", r[1]] and r[2] == "lookup" for r in ours)
        assert _link_of(bed, 80, bind=str(A2)) == (str(A2), 2)
        assert _link_of(bed, 80, bind=str(A1)) == (str(A1), 1)
    finally:
        lr.close()
    assert bed.state() == before


def test_a_selector_sends_unbound_sockets_via_its_address_and_falls_back(bed: Bed) -> None:
    before = bed.state()
    lr = LinkRoutes(open_rtnl=bed.rtnl)
    try:
        lr.update(_addresses(bed.host))
        lr.set_selectors([Selector(proto=socket.IPPROTO_TCP, remote_port=22, via=(A2,))])
        assert "ipproto tcp dport 22 lookup 19729" in bed.host.ip("rule")
        assert _link_of(bed, 22) == (str(A2), 2)
        assert _link_of(bed, 80) == (str(A1), 1)

        bed.host.ip("link", "set", "h2", "down")
        # The kernel flushed link 2's routes from every table, ours included.
        assert bed.host.ip("route", "show", "table", "19729") == ""
        assert _link_of(bed, 22) == (str(A1), 1)
        lr.refresh()  # nothing to copy yet: no error, nothing added
        assert bed.host.ip("route", "show", "table", "19729") == ""

        bed.host.ip("link", "set", "h2", "up")
        # The IPv4 prefix route comes back by itself; the default routes, and the
        # IPv6 address (removed at link down, keep_addr_on_down being 0) are the
        # network manager's to add again (here: ours).
        bed.host.addr_add("h2", "2001:db8:2::2/64")
        bed.host.ip("route", "add", "default", "via", "10.91.2.1", "dev", "h2", "metric", "200")
        bed.host.ip("-6", "route", "add", "default", "via", "2001:db8:2::1", "dev", "h2",
                    "metric", "200")  # fmt: skip
        lr.refresh()
        assert _link_of(bed, 22) == (str(A2), 2)
        table6 = bed.host.ip("-6", "route", "show", "table", str(lr.table(A2_6)))
        assert "default via 2001:db8:2::1 dev h2" in table6
    finally:
        lr.close()
    assert bed.state() == before
