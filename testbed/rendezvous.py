"""A rendezvous point in the testbeds: its own namespace on a router's link,
``dime rendezvous`` in it, and a hostile rendezvous point for the security tests.

* :func:`attach` adds a namespace ``rv`` with a stable address (10.53.0.1/24, or
  2001:db8:53::1/64) on a new link of a router namespace;
* :class:`RendezvousDaemon` runs ``dime rendezvous`` there, with the conventions of
  :class:`testbed.runner.Dime` (ready when its log says so, stopped with SIGTERM);
* ``python -m testbed.rendezvous hostile --bind ADDR [--port N]`` is a rendezvous point that
  forwards every message three times: first with one byte of its payload changed
  (a tampered message), then as it came, then once more a second later (a replay).
  It prints one JSON line when ready, and at the end (SIGTERM) what it forwarded.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from ipaddress import ip_address

from ihmp.rendezvous import RendezvousServer
from ihmp.wire import DEFAULT_PORT, MessageType, decode, encode
from testbed.netns import Namespace, Topology
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
