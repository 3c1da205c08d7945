"""HELLOs from many addresses at once: a load of new dime peers for one host.

Run inside a namespace that holds the client addresses (``python -m
testbed.hello_load TARGET ADDR...``): each address is a dime host of its own (an
IHMP engine with its own key, sans I/O, over a real UDP socket bound to the
address and the IHMP port), and all say HELLO to TARGET at once; retransmissions
and cookies as IHMP does them. Prints one JSON line: how many exchanges completed
and over how long.
"""

from __future__ import annotations

import contextlib
import json
import random
import resource
import selectors
import socket
import sys
import time
from ipaddress import ip_address, ip_interface

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ihmp.addr import IPAddress
from ihmp.engine import EngineConfig, IhmpEngine
from ihmp.hosts import HidState
from ihmp.keys import LocalKeys

PORT = 4731


def main() -> None:
    target = ip_address(sys.argv[1])
    addrs = [ip_address(a) for a in sys.argv[2:]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (max(soft, len(addrs) + 64), max(hard, len(addrs) + 64))
    )
    sel = selectors.DefaultSelector()
    engines: dict[IPAddress, tuple[IhmpEngine, socket.socket]] = {}
    start = time.monotonic()
    addr: IPAddress
    for i, addr in enumerate(addrs):
        keys = LocalKeys()
        keys.set_local_key(Ed25519PrivateKey.generate(), "*")
        engine = IhmpEngine(
            local_keys=keys,
            counter_start=1 + i,
            rng=random.Random(i),
            config=EngineConfig(),
            local_addresses=[ip_interface(f"{addr}/32")],
        )
        sock = socket.socket(
            socket.AF_INET6 if addr.version == 6 else socket.AF_INET, socket.SOCK_DGRAM
        )
        sock.bind((str(addr), PORT))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, addr)
        engines[addr] = (engine, sock)
        engine.flow_started(target, addr, time.monotonic())
    done: dict[IPAddress, float] = {}

    def pump(addr: IPAddress) -> None:
        engine, sock = engines[addr]
        now = time.monotonic()
        for d in engine.datagrams_to_send(now):
            with contextlib.suppress(OSError):  # a retransmission will try again
                sock.sendto(d.data, (str(d.dst), d.dst_port or PORT))
        entry = engine.table.lookup(target)
        if addr not in done and entry is not None and entry.state is HidState.ESTABLISHED:
            done[addr] = now - start

    for addr in engines:
        pump(addr)
    deadline = start + float(30)
    while len(done) < len(engines) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.05):
            addr = key.data
            engine, sock = engines[addr]
            while True:
                try:
                    data, (src, sport, *_) = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                engine.receive_datagram(data, ip_address(src), addr, time.monotonic(), sport)
            pump(addr)
        now = time.monotonic()
        for addr, (engine, _) in engines.items():
            timer = engine.get_timer()
            if timer is not None and timer <= now:
                engine.handle_timer(now)
                pump(addr)
    times = sorted(done.values())
    print(json.dumps({"hosts": len(engines), "completed": len(times),
                      "seconds": times[-1] if times else None}))  # fmt: skip


if __name__ == "__main__":
    main()
