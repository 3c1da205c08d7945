"""A rendezvous point in the testbeds: its own namespace on a router's link,
``dime rendezvous`` in it, and a hostile rendezvous point for the security tests.

* :func:`attach` adds a namespace ``rv`` with a stable address (10.53.0.1/24, or
  2001:db8:53::1/64) on a new link of a router namespace;
* :class:`RendezvousDaemon` runs ``dime rendezvous`` there, with the conventions of
  :class:`testbed.runner.Dime` (ready when its log says so, stopped with SIGTERM);
* what the rendezvous scenarios share (tests/test_rendezvous_netns.py and the
  benchmark :mod:`testbed.rendezvous_bench`): the daemons' config (:func:`config`),
  both Fig. 7 hosts moving at once (:func:`both_move`), a second network for the
  NAT testbed's CH and its move there (:func:`second_network_for_the_ch`,
  :func:`move_ch`), and the paced TCP transfers each way (:func:`fig7_transfers`,
  :func:`nat_transfers`);
* ``python -m testbed.rendezvous hostile --bind ADDR [--port N]`` is a rendezvous point that
  forwards every message three times: first with one byte of its payload changed
  (a tampered message), then as it came, then once more a second later (a replay).
  It prints one JSON line when ready, and at the end (SIGTERM) what it forwarded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from ipaddress import ip_address
from subprocess import Popen

from pyroute2 import IPRoute

from ihmp.rendezvous import RendezvousServer
from ihmp.wire import DEFAULT_PORT, MessageType, decode, encode
from testbed.fig7 import Fig7
from testbed.nat import B_TABLE, CH_ADDR, WAN1, NatLab
from testbed.netns import Namespace, Topology
from testbed.procs import ROOT, py, wait_for
from testbed.runner import Dime, Stopped

RV_V4 = ("10.53.0.1", "10.53.0.254", 24)  # (rendezvous point, router, prefix length)
RV_V6 = ("2001:db8:53::1", "2001:db8:53::fe", 64)
READY_LINE = "dime rendezvous:"


def attach(topo: Topology, router: Namespace, family: int = 4) -> Namespace:
    """A namespace ``rv`` on a new link ``rv0`` of ``router`` (link ``rrv`` there),
    its default route via the router."""
    addr, gw, plen = RV_V4 if family == 4 else RV_V6
    rv = topo.add_ns("rv")
    topo.link(rv, "rv0", router, "rrv")
    router.addr_add("rrv", f"{gw}/{plen}")
    rv.ip("link", "set", "rv0", "up")
    rv.addr_add("rv0", f"{addr}/{plen}", *(("nodad",) if family == 6 else ()))
    rv.ip(*(("-6",) if family == 6 else ()), "route", "add", "default", "via", gw)
    return rv


def address(family: int = 4) -> str:
    return RV_V4[0] if family == 4 else RV_V6[0]


@dataclass
class RendezvousDaemon(Dime):
    """``dime rendezvous ARGS`` in the background: :meth:`start`, :meth:`wait_ready`
    (its log says ``dime rendezvous:``), :meth:`terminate` (SIGTERM; its exit status)."""

    def start(self, *args: str) -> None:
        self.spawn("rendezvous", *args)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, object]:
        def ready() -> dict[str, object] | None:
            return {} if READY_LINE in self.log_text() else None

        return self.await_ready(ready, timeout, "dime rendezvous")

    def terminate(self, timeout: float = 30.0) -> Stopped:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        code = self.wait_exit(timeout)
        return Stopped(self.name, code, "SIGTERM", (), self.log_tail())


# -- what the scenarios share ---------------------------------------------------------------

RATE = 8.0  # Mbit/s of each paced TCP transfer
SECONDS = 5.0  # of traffic: the moves come after 2 s
NBYTES = int(RATE * 1e6 / 8 * SECONDS)
XFER = str(ROOT / "testbed" / "xfer.py")
NATFLOWS = str(ROOT / "testbed" / "natflows.py")
UP_PORT, DOWN_PORT = 5001, 5002  # MH -> CH, CH -> MH

Pair = tuple[Popen[bytes], Popen[bytes]]  # a transfer's (receiver, sender)


def config(rv_addr: str | None, deadline: float = 30.0, grace: float = 30.0) -> str:
    """A ``dime up`` config: the rendezvous point at ``rv_addr`` (None: none), IHMP's
    ``exchange_deadline`` and ``path_loss_grace``."""
    lines = [f'rendezvous = ["{rv_addr}"]'] if rv_addr else []
    lines += ["[ihmp]", f"exchange_deadline = {deadline}", f"path_loss_grace = {grace}"]
    return "\n".join(lines) + "\n"


class SlowMove(AssertionError):
    """Both hosts' moves took longer than they should have (a loaded machine)."""


def both_move(fig: Fig7, limit: float = 0.1) -> tuple[float, float]:
    """Both hosts lose their address, then both get the new one: all within 100 ms.
    Netlink sockets opened in both namespaces beforehand carry the changes (a
    process per change would take longer than that on a loaded machine). Returns
    when the first address went and the last new one was up (time.time());
    :class:`SlowMove` if that took ``limit`` s or more."""
    p = fig.plan
    hosts = ((fig.mh, "m1", p.m1, "m2", p.m2), (fig.ch, "c1", p.c1, "c2", p.c2))
    with contextlib.ExitStack() as stack:
        links = []
        for ns, old_dev, old, new_dev, new in hosts:
            ipr = stack.enter_context(IPRoute(netns=ns.name))
            old_i, new_i = ipr.link_lookup(ifname=old_dev)[0], ipr.link_lookup(ifname=new_dev)[0]
            links.append((ipr, old_i, old, new_i, new))
        lost = time.time()
        for ipr, old_i, old, _, _ in links:
            ipr.addr("del", index=old_i, address=old.host, prefixlen=old.plen)
            ipr.link("set", index=old_i, state="down")
        for ipr, _, _, new_i, new in links:
            ipr.link("set", index=new_i, state="up")
            ipr.addr("add", index=new_i, address=new.host, prefixlen=new.plen)
            ipr.route("replace", dst="default", gateway=new.router, oif=new_i,
                      family=socket.AF_INET6 if p.family == 6 else socket.AF_INET)  # fmt: skip
        up = time.time()
    if up - lost >= limit:
        raise SlowMove(f"the moves took {up - lost:.3f} s")
    return lost, up


# The NAT testbed's CH moves to another network, one router away.
CH_NET = ("192.0.2.1", "192.0.2.10", 24)  # (its router, the CH, prefix length)
ISP = "198.51.100.254"  # that router on the CH's first segment
CH_NEW = CH_NET[1]


def second_network_for_the_ch(lab: NatLab) -> None:
    """Another network for the CH, one router (``isp``) away from its segment: the
    CH's second interface ``eth1`` links to it, down until the CH moves there. The
    NAT router and eve reach it via ``isp``; what the MH sends there leaves its NAT
    from the same public address as before (a NAT has one)."""
    gw, _, plen = CH_NET
    isp = lab.topo.add_ns("isp")
    lab.topo.link(isp, "eth0", lab.sw, "isp")
    lab.sw.ip("link", "set", "isp", "master", "br0")
    isp.addr_add("eth0", f"{ISP}/24")
    lab.topo.link(lab.ch, "eth1", isp, "eth1")
    isp.addr_add("eth1", f"{gw}/{plen}")
    isp.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    isp.ip("route", "add", "default", "via", WAN1)
    lab.ch.ip("link", "set", "eth1", "down")
    for ns in (lab.r, lab.eve):
        ns.ip("route", "add", f"192.0.2.0/{plen}", "via", ISP)
    # NAT B's packets leave through wan2 (their own routing table).
    lab.r.ip("route", "add", f"192.0.2.0/{plen}", "via", ISP, "dev", "wan2", "table", str(B_TABLE))


def move_ch(lab: NatLab) -> tuple[float, float]:
    """The CH leaves its network (the address, then the link) for the other one:
    when the old address went and the new one was up (time.time())."""
    gw, addr, plen = CH_NET
    lost = time.time()
    lab.ch.addr_del("eth0", f"{CH_ADDR}/24")
    lab.ch.ip("link", "set", "eth0", "down")
    lab.ch.ip("link", "set", "eth1", "up")
    lab.ch.addr_add("eth1", f"{addr}/{plen}")
    lab.ch.ip("route", "replace", "default", "via", gw, "dev", "eth1")
    return lost, time.time()


def _paced(nbytes: int, rate: float, timeout: float) -> tuple[str, ...]:
    return ("--bytes", str(nbytes), "--rate", str(rate), "--timeout", f"{timeout:g}")


def tcp_transfer(
    sender: Namespace,
    receiver: Namespace,
    server_addr: str,
    port: int,
    nbytes: int = NBYTES,
    rate: float = RATE,
    timeout: float = 20,
) -> Pair:
    """A paced testbed.xfer TCP transfer ``sender`` -> ``receiver`` (the receiver
    serves at ``server_addr``), connected when this returns."""
    server = py(receiver, XFER, "tcp-server", "--bind", server_addr, "--port", str(port))
    wait_for(server, "listening", 10)
    client = py(sender, XFER, "tcp-client", "--connect", server_addr, "--port", str(port),
                *_paced(nbytes, rate, timeout))  # fmt: skip
    wait_for(client, "ready", 10)
    return server, client


def fig7_transfers(
    fig: Fig7, nbytes: int = NBYTES, rate: float = RATE, timeout: float = 20
) -> dict[str, Pair]:
    """A paced TCP transfer each way on Fig. 7 (each opened by its sender):
    ``"MH->CH"`` and ``"CH->MH"``."""
    p = fig.plan
    return {
        "MH->CH": tcp_transfer(fig.mh, fig.ch, p.c1.host, UP_PORT, nbytes, rate, timeout),
        "CH->MH": tcp_transfer(fig.ch, fig.mh, p.m1.host, DOWN_PORT, nbytes, rate, timeout),
    }


def nat_transfers(
    lab: NatLab, nbytes: int = NBYTES, rate: float = RATE, timeout: float = 20
) -> dict[str, Pair]:
    """A paced TCP transfer each way on the NAT testbed, both opened by the MH
    (behind the NAT): ``"MH->CH"`` (testbed.xfer) and ``"CH->MH"``
    (testbed.natflows tcp-send-server / tcp-recv-client)."""
    up = tcp_transfer(lab.mh, lab.ch, CH_ADDR, UP_PORT, nbytes, rate, timeout)
    sender = py(lab.ch, NATFLOWS, "tcp-send-server", "--bind", CH_ADDR, "--port", str(DOWN_PORT),
                *_paced(nbytes, rate, timeout))  # fmt: skip
    wait_for(sender, "listening", 10)
    receiver = py(lab.mh, NATFLOWS, "tcp-recv-client", "--connect", CH_ADDR,
                  "--port", str(DOWN_PORT), "--timeout", f"{timeout:g}")  # fmt: skip
    wait_for(receiver, "ready", 10)
    return {"MH->CH": up, "CH->MH": (receiver, sender)}


# -- a hostile rendezvous point ------------------------------------------------------------


def tampered(relayed: bytes) -> bytes:
    """The RELAYED ``relayed`` with the last byte of its payload's body changed (the
    signature left as it was)."""
    msg = decode(relayed)
    assert msg.payload is not None
    inner = bytearray(msg.payload)
    inner[-65] ^= 0x01  # the last byte before the 64-byte signature
    return encode(replace(msg, payload=bytes(inner)))


def hostile(bind: str, port: int) -> int:
    """Serve at ``bind``:``port`` as a rendezvous point that tampers with and replays
    what it forwards."""
    server = RendezvousServer()
    here = ip_address(bind)
    family = socket.AF_INET if here.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    sock.settimeout(0.2)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    forwarded = {"tampered": 0, "genuine": 0, "replayed": 0}
    replays: list[tuple[float, bytes, tuple[str, int]]] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                data, (src, sport, *_) = sock.recvfrom(2048)
            except TimeoutError:
                data = b""
            now = time.monotonic()
            if data:
                server.receive_datagram(data, ip_address(src), sport, here, now)
            for d in server.datagrams_to_send(now):
                to = (str(d.dst), d.dst_port or DEFAULT_PORT)
                if d.data[1] == MessageType.RELAYED:
                    sock.sendto(tampered(d.data), to)
                    forwarded["tampered"] += 1
                    replays.append((now + 1.0, d.data, to))
                    forwarded["genuine"] += 1
                sock.sendto(d.data, to)
            for r in [r for r in replays if r[0] <= now]:
                replays.remove(r)
                sock.sendto(r[1], r[2])
                forwarded["replayed"] += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    print(json.dumps({"ready": True, "port": port}), flush=True)
    while not stop.is_set():
        stop.wait(0.2)
    thread.join()
    print(json.dumps(forwarded), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.rendezvous")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hostile", help="a rendezvous point that tampers and replays")
    h.add_argument("--bind", required=True, help="the address to serve at")
    h.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = p.parse_args(argv)
    return hostile(args.bind, args.port)


if __name__ == "__main__":
    sys.exit(main())
