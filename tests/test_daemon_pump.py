"""The daemon's pump (dime.daemon): what the engine decides leaves in one order.

A real IHMP engine behind the daemon, a recorder for StackTrans and the transport;
no kernel, no sockets.
"""

from __future__ import annotations

import asyncio
import random
from ipaddress import ip_address, ip_interface
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dime.config import Config
from dime.daemon import Daemon
from ihmp import events as ev
from ihmp.addr import IPAddress
from ihmp.engine import EngineConfig, IhmpEngine
from ihmp.hosts import HidState
from ihmp.keys import LocalKeys
from ihmp.wire import MessageType

SERVER = ip_address("192.0.2.1")
PORT = 4731


def engine(addr: IPAddress, i: int) -> IhmpEngine:
    keys = LocalKeys()
    keys.set_local_key(Ed25519PrivateKey.generate(), "*")
    return IhmpEngine(
        local_keys=keys,
        counter_start=1 + i,
        rng=random.Random(i),
        config=EngineConfig(),
        local_addresses=[ip_interface(f"{addr}/32")],
    )


class Recorder:
    """StackTrans and the IHMP transport, as far as the pump uses them."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.sent: list[tuple[bytes, IPAddress]] = []

    def host_changed(self, change: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def save_control(self, state: dict[str, Any]) -> None:
        self.log.append(("save", len(state["hosts"])))

    def send(self, data: bytes, src: IPAddress, dst: IPAddress, port: int | None) -> bool:
        self.log.append(("send", dst))
        self.sent.append((data, dst))
        return True


def test_a_burst_of_hellos_is_saved_once_before_any_answer_leaves() -> None:
    """Datagrams read in one burst are handed to the engine one by one, then pumped
    once: the HID table is saved once for all the new peers, before their ACKs."""
    loop = asyncio.new_event_loop()
    try:
        daemon = Daemon(Config())
        daemon.loop = loop
        daemon.engine = engine(SERVER, 0)
        rec = Recorder()
        daemon.service = rec  # type: ignore[assignment]
        daemon.transport = rec  # type: ignore[assignment]
        clients = {
            ip_address(f"198.51.100.{i}"): engine(ip_address(f"198.51.100.{i}"), i)
            for i in range(1, 6)
        }

        def burst(now: float) -> list[tuple[bytes, IPAddress]]:
            """Each client's datagrams to the daemon in one read; what it answered."""
            out = [(d.data, addr) for addr, c in clients.items() for d in c.datagrams_to_send(now)]
            rec.log.clear()
            rec.sent.clear()

            def read() -> None:
                for data, src in out:
                    daemon._on_datagram(data, src, PORT, SERVER)

            loop.call_soon(read)
            loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(asyncio.sleep(0))
            return list(rec.sent)

        now = loop.time()
        for addr, c in clients.items():
            c.flow_started(SERVER, addr, now)
        cookies = burst(now)  # each HELLO is answered with a cookie: no host yet
        assert len(cookies) == len(clients) and all(k == "send" for k, _ in rec.log)
        for data, dst in cookies:
            clients[dst].receive_datagram(data, SERVER, dst, loop.time(), PORT)
        acks = burst(loop.time())  # the HELLOs again, with their cookies
        assert len(acks) == len(clients)
        assert rec.log[0] == ("save", len(clients))
        assert [k for k, _ in rec.log[1:]] == ["send"] * len(clients)
        for data, dst in acks:
            clients[dst].receive_datagram(data, SERVER, dst, loop.time(), PORT)
        states = {getattr(c.table.lookup(SERVER), "state", None) for c in clients.values()}
        assert states == {HidState.ESTABLISHED}
    finally:
        if daemon._timer is not None:
            daemon._timer.cancel()
        loop.close()


class Prompts:
    """StackTrans's prompt of a host's stalled TCP flows, recorded."""

    def __init__(self) -> None:
        self.hids: list[int] = []

    def prompt_stalled(self, hid: int) -> None:
        self.hids.append(hid)


def test_address_news_said_again_prompts_the_flows_once_it_is_acknowledged() -> None:
    """A HANDOFF or ADDR_UP acknowledged only after being sent again: the peer held
    our flows' packets from the new address until its late proof, so their timers
    backed off again; the daemon has StackTrans prompt them. Said once, or another
    message (a FLOW_MOVE), nothing."""
    daemon = Daemon(Config())
    rec = Prompts()
    daemon.service = rec  # type: ignore[assignment]
    for mtype, attempts in [
        (MessageType.HANDOFF, 1),
        (MessageType.HANDOFF, 3),
        (MessageType.ADDR_UP_UNREACHABLE, 2),
        (MessageType.HELLO, 2),
        (MessageType.PATH_PROBE, 2),
    ]:
        daemon._on_event(ev.ExchangeCompleted(7, mtype, 1, 1.5, attempts))
    assert rec.hids == [7, 7]
