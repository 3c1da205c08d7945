"""``dime rendezvous``: a rendezvous point, on any host with a stable address.

One asyncio loop, as ``dime up``'s daemon: the UDP socket (the IHMP port by default)
feeds :class:`ihmp.rendezvous.RendezvousServer` (sans I/O), whose answers and
forwarded messages go back out of it; the control socket serves ``dime status``
(the registered hosts) and ``dime down``. It installs nothing in the kernel, keeps
nothing on disk, and needs no privilege beyond its port. SIGTERM or SIGINT stop it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from dime import control
from dime.config import Config
from dime.transport import IhmpTransport
from ihmp.addr import IPAddress
from ihmp.rendezvous import RendezvousServer
from ihmp.wire import MessageType

log = logging.getLogger("dime.rendezvous")


class RendezvousDaemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.server = RendezvousServer(config.rendezvous_server)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport: IhmpTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self.started_at = time.time()

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        ctl = control.bind()  # one dime per namespace: `dime status` finds this one
        try:
            self.transport = IhmpTransport(self.config.port, self._on_datagram)
            self.transport.open(self.loop)
            serving = asyncio.create_task(control.serve_forever(ctl, self._control))
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self._stop.set)
            accept = self.config.rendezvous_server.accept
            log.info(
                "dime rendezvous: serving on UDP port %d (%s)",
                self.config.port,
                f"{len(accept)} accepted keys" if accept else "any host key",
            )
            await self._stop.wait()
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if self.transport is not None:
                self.transport.close()
            ctl.close()
            log.info("dime rendezvous: stopped; %s", self.server.counters)

    def _now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    def _on_datagram(self, data: bytes, src: IPAddress, port: int, dst: IPAddress) -> None:
        refused = self.server.receive_datagram(data, src, port, dst, self._now())
        if refused is not None:
            log.debug("from %s:%d refused: %s", src, port, refused.value)
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self.server.handle_timer(self._now())
        self._pump()

    def _pump(self) -> None:
        assert self.transport is not None and self.loop is not None
        for d in self.server.datagrams_to_send(self._now()):
            if d.data[1] == MessageType.RELAYED:  # rare, and worth a line each
                log.info("forwarding a message to %s:%s", d.dst, d.dst_port)
            self.transport.send(d.data, d.src, d.dst, d.dst_port)
        deadline = self.server.get_timer()
        if self._timer is not None and (deadline is None or self._timer.when() != deadline):
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "status":
            return self.status()
        if cmd == "down":
            assert self.loop is not None
            self.loop.call_soon(self._stop.set)
            return {"ok": True, "pid": os.getpid()}
        return {"error": f"{cmd!r}: not served by a rendezvous point"}

    def status(self) -> dict[str, Any]:
        """``dime status`` of a rendezvous point: ``role`` "rendezvous", and the
        ``registered_hosts``."""
        c, cfg = self.server.counters, self.server.config
        return {
            "role": "rendezvous",
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 1),
            "port": self.config.port,
            "registered_hosts": self.server.registered(self._now()),
            "counters": {
                "registrations": c.registrations,
                "relayed": c.relayed,
                "expired": c.expired,
                "refused": dict(c.refused),
            },
            "limits": {
                "max_hosts": cfg.max_hosts,
                "lifetime": cfg.lifetime,
                "rate": cfg.rate,
                "burst": cfg.burst,
                "accepted_keys": len(cfg.accept),
            },
        }
