"""``dime nat``: the IHMP-aware NAT of the paper (III-D), on a Linux NAT router.

One asyncio loop, as ``dime up``'s daemon:

* **conntrack events** (ctnetlink, the NEW group; no polling): each new mapping the
  NAT makes (a source address or port translated) goes to the agent, which sends a
  NAT_ENTRY to the flow's other end if both ends run dime;
* **forwarded IHMP** (an NFQUEUE on mangle FORWARD, UDP ``port`` either way): NS is
  set on each datagram (the one bit a signature does not cover), and the two ends
  are remembered as dime hosts;
* **the agent's UDP socket** (``nat_port``, not the IHMP port, whose public side is
  the hosts' behind the NAT): ACKs of NAT_ENTRY, and challenges from peers checking
  that the agent's key receives at the NAT's address.

The protocol is :class:`ihmp.natagent.NatAgent` (sans I/O). SIGTERM or SIGINT stop it
and remove its rule.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time

from dime import keystore
from dime.config import Config, state_dir
from dime.transport import IhmpTransport
from ihmp.addr import IPAddress
from ihmp.natagent import NatAgent
from stacktrans.nat_router import ConntrackEvents, ForwardedIhmp, mappings
from stacktrans.service import check_privileges

log = logging.getLogger("dime.nat")


class NatDaemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.agent: NatAgent | None = None
        self.transport: IhmpTransport | None = None
        self.events = ConntrackEvents(self._on_events)
        self.forward = ForwardedIhmp(config.nat_port, config.port, self._on_crossed)
        self._timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        check_privileges()
        self.loop = asyncio.get_running_loop()
        key, _ = keystore.load_or_create_host_key(state_dir(self.config))
        self.agent = NatAgent(
            key=key,
            counter_start=int(time.time() * 1e6),
            rng=random.SystemRandom(),
            ihmp_port=self.config.port,
        )
        try:
            self.transport = IhmpTransport(self.config.nat_port, self._on_datagram)
            self.transport.open(self.loop)
            self.events.open(self.loop)
            self.forward.start(self.loop)
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self._stop.set)
            log.info(
                "dime nat: IHMP-aware NAT up (agent port %d, NS on forwarded IHMP port %d, key %s)",
                self.config.nat_port,
                self.config.port,
                keystore.public_hex(key),
            )
            await self._stop.wait()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self.forward.stop()
        self.events.close()
        if self.transport is not None:
            self.transport.close()
        if self.agent is not None:
            log.info("dime nat: stopped; %s", self.agent.counters)

    def _now(self) -> float:
        return time.monotonic()

    # -- inputs -------------------------------------------------------------------------

    def _on_events(self, data: bytes) -> None:
        assert self.agent is not None
        for mapping, remote, remote_port in mappings(data):
            self.agent.mapping_created(mapping, remote, remote_port, self._now())
        self._pump()

    def _on_crossed(self, a: IPAddress, b: IPAddress) -> None:
        assert self.agent is not None
        self.agent.ihmp_crossed(a, b, self._now())

    def _on_datagram(self, data: bytes, src: IPAddress, port: int, dst: IPAddress) -> None:
        assert self.agent is not None
        self.agent.receive_datagram(data, src, dst, port, self._now())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        assert self.agent is not None
        self.agent.handle_timer(self._now())
        self._pump()

    def _pump(self) -> None:
        assert self.agent is not None and self.transport is not None and self.loop is not None
        for d in self.agent.datagrams_to_send(self._now()):
            self.transport.send(d.data, d.src, d.dst, d.dst_port)
        deadline = self.agent.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            delay = max(deadline - self._now(), 0.0)
            self._timer = self.loop.call_later(delay, self._on_timer)
