"""The dime daemon: StackTrans and IHMP joined in one asyncio loop.

One process, one loop, serving the NFQUEUE sockets (through StackTrans), the IHMP
UDP sockets, the netlink address monitor, the control socket and the engine's
timers. Wiring:

* a first packet to an unknown address creates a HID -> the engine says HELLO;
* the engine changes the HID table -> StackTrans rewrites every flow of that host
  at once (it subscribes to the table);
* the engine drops a HID whose last path is gone -> StackTrans fails its flows
  (TCP reset / ICMP error, and SOCK_DESTROY for idle sockets);
* netlink address events -> the engine (ADDR_UP/DOWN, HANDOFF) and StackTrans
  (local identifiers to keep as ghosts).

Everything it installs is recorded in the run directory, so ``dime down`` can
clean up after a ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from dime import control, keystore
from dime.config import Config, run_dir, state_dir
from dime.hid_table import HidTable, TableChange
from dime.transport import IhmpTransport
from ihmp import events as ev
from ihmp.engine import IhmpEngine
from ihmp.keys import LocalKeys, TrustStore
from stacktrans.kernel_flows import alive_flows, existing_flows
from stacktrans.monitor import AddressMonitor, IPInterface
from stacktrans.nft import Nft, NftError
from stacktrans.rto_revert import prompt
from stacktrans.service import (
    DataplaneConfig,
    DataplaneMode,
    Residue,
    StackTransService,
    check_privileges,
    cleanup,
)
from stacktrans.socket_table import endpoint

IPAddress = IPv4Address | IPv6Address
log = logging.getLogger("dime")
RESIDUE = "residue.json"


def notify_systemd(state: str) -> None:
    """sd_notify(3): one datagram to $NOTIFY_SOCKET (Type=notify units)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
            sock.send(state.encode())
        except OSError as exc:
            log.warning("systemd notification failed: %s", exc)


def save_residue(residue: Residue) -> None:
    directory = run_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (RESIDUE + ".tmp")
    tmp.write_text(json.dumps(residue.to_json()))
    tmp.replace(directory / RESIDUE)


def load_residue() -> Residue | None:
    path = run_dir() / RESIDUE
    try:
        return Residue.from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


async def clean_residue() -> bool:
    """Remove what a dead daemon of this namespace left behind. Returns whether any."""
    residue = load_residue()
    if residue is None:
        return False
    try:
        nft: Nft | None = Nft()
    except NftError:
        nft = None
    await cleanup(residue, nft)
    (run_dir() / RESIDUE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir().rmdir()
    return True


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.table = HidTable()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: IhmpEngine | None = None
        self.service: StackTransService | None = None
        self.transport: IhmpTransport | None = None
        self.monitor: AddressMonitor | None = None
        self._stop = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.started_at = time.time()
        self.table.subscribe(self._log_change)

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or ``dime down``; always leave the kernel clean."""
        self.loop = asyncio.get_running_loop()
        check_privileges()  # before touching the state dir, the lock or the kernel
        ctl = control.bind()  # the per-namespace lock: refuses a second daemon
        try:
            if await clean_residue():
                log.info("removed what an earlier dime left behind here")
            await self._start(ctl)
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self._stop.set)
            notify_systemd("READY=1")
            log.info("dime up: IHMP port %d, dataplane %s", self.config.port, self._mode())
            await self._stop.wait()
            notify_systemd("STOPPING=1")
        finally:
            await self._shutdown()
            ctl.close()

    async def _start(self, ctl: socket.socket) -> None:
        cfg = self.config
        local_keys, trust = self._keyring(announce=True)
        engine_cfg = cfg.ihmp
        engine_cfg.strict = cfg.strict
        self.monitor = AddressMonitor(
            self._on_added,
            self._on_removed,
            self._on_handoff,
            handoff_window=cfg.handoff_window,
            ignore=self._is_ghost,
            # A removal while another address of the family is up ends a soft
            # handoff: act on it now, not a window later.
            soft_immediate=True,
        )
        addresses = await self.monitor.current()
        self.engine = IhmpEngine(
            self.table,
            counter_start=time.time_ns() // 1000,
            rng=random.SystemRandom(),
            config=engine_cfg,
            local_keys=local_keys,
            trust=trust,
            local_addresses=addresses,
        )
        self.service = StackTransService(
            self.table,
            DataplaneConfig(
                mode=DataplaneMode(cfg.dataplane),
                queue_out=cfg.queue_out,
                queue_in=cfg.queue_in,
                ihmp_port=cfg.port,
                sweep_interval=cfg.sweep_interval,
                adopt=cfg.adopt_existing,
            ),
            clock=self._now,
            on_new_hid=self._on_new_hid,
            on_residue=save_residue,
            existing_flows=existing_flows,
            alive_flows=alive_flows,
            prompt_retransmit=prompt,
        )
        # The port first: if it is taken, nothing has been installed yet.
        self.transport = IhmpTransport(cfg.port, self._on_datagram)
        assert self.loop is not None
        self.transport.open(self.loop)
        await self.service.start({i.ip for i in addresses})
        self._tasks.append(asyncio.create_task(self.monitor.run(known=addresses)))
        self._tasks.append(asyncio.create_task(self._serve_control(ctl)))
        self._pump()

    def _keyring(self, announce: bool = False) -> tuple[LocalKeys, TrustStore]:
        """Keys from the host key, the config file and the CLI's bindings."""
        cfg = self.config
        sdir = state_dir(cfg)
        host_key, created = keystore.load_or_create_host_key(sdir)
        if announce:
            if created:
                log.info("generated host key %s", sdir / keystore.HOST_KEY)
            log.info("host key %s", keystore.public_hex(host_key))
        bindings = keystore.Bindings.load(sdir)
        local = [(b.file, b.addr) for b in cfg.local_key]
        local += [(Path(b["file"]), b["addr"]) for b in bindings.local_keys]
        trusted = [(b.key, b.addr) for b in cfg.trust]
        try:
            trusted += [(bytes.fromhex(b["key"]), b["addr"]) for b in bindings.trust]
        except (KeyError, TypeError, ValueError) as exc:
            raise keystore.KeyFileError(f"{sdir / keystore.BINDINGS}: bad trust entry") from exc
        return keystore.build_keyring(host_key, local, trusted)

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()
        if self.service is not None:
            await self.service.stop()
        (run_dir() / RESIDUE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            run_dir().rmdir()
        log.info("dime down: rules, maps and ghost addresses removed")

    def stop(self) -> None:
        self._stop.set()

    def _now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    def _mode(self) -> str:
        return self.service.mode.value if self.service is not None else "-"

    # -- inputs -> engine -------------------------------------------------------------

    def _on_datagram(self, data: bytes, src: IPAddress, port: int, dst: IPAddress) -> None:
        assert self.engine is not None
        try:
            self.engine.receive_datagram(data, src, dst, self._now(), src_port=port)
        except Exception:
            # The engine refuses bad input with events; anything else is our bug,
            # and a packet must never take the daemon down.
            log.exception("IHMP datagram from %s crashed the engine; dropped", src)
        self._pump()

    def _on_new_hid(self, hid: int, local: IPAddress) -> None:
        assert self.engine is not None
        self.engine.start_hello(hid, self._now(), local)
        # Called from inside the packet path: send once the verdict is given.
        assert self.loop is not None
        self.loop.call_soon(self._pump)

    def _on_added(self, iface: IPInterface) -> None:
        log.info("address up: %s", iface)
        assert self.engine is not None and self.service is not None
        self.service.local_added(iface.ip)
        self.engine.address_added(iface, self._now())
        self._pump()

    def _on_removed(self, iface: IPInterface) -> None:
        log.info("address down: %s", iface)
        assert self.engine is not None and self.service is not None
        self.service.local_removed(iface.ip)
        self.engine.address_removed(iface, self._now())
        self._pump()

    def _on_handoff(self, old: IPInterface, new: IPInterface) -> None:
        log.info("handoff: %s -> %s", old, new)
        assert self.engine is not None and self.service is not None
        self.service.local_removed(old.ip)
        self.service.local_added(new.ip)
        self.engine.handoff(old, new, self._now())
        self._pump()

    def _is_ghost(self, addr: IPAddress) -> bool:
        return self.service is not None and self.service.is_ghost(addr)

    def _on_timer(self) -> None:
        self._timer = None
        assert self.engine is not None
        self.engine.handle_timer(self._now())
        self._pump()

    # -- engine -> outputs ------------------------------------------------------------

    def _pump(self) -> None:
        """Send what the engine queued, log its events, re-arm its timer."""
        engine = self.engine
        if engine is None or self.transport is None:
            return
        now = self._now()
        for dgram in engine.datagrams_to_send(now):
            if not self.transport.send(dgram.data, dgram.src, dgram.dst, dgram.dst_port):
                engine.send_failed(dgram.src, dgram.dst, now)
        while (event := engine.next_event()) is not None:
            self._log_event(event)
        deadline = engine.get_timer()
        if self._timer is not None and (deadline is None or self._timer.when() != deadline):
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None:
            assert self.loop is not None
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _log_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.MessageRejected):
            log.warning(
                "IHMP from %s rejected (%s): %s", event.src, event.reason.value, event.detail
            )
        elif isinstance(event, ev.MessageApplied):
            log.info(
                "IHMP %s #%d from HID %d applied%s",
                event.type.name,
                event.seq,
                event.hid,
                " (stale)" if event.stale else "",
            )
        elif isinstance(event, ev.ExchangeCompleted):
            log.info(
                "IHMP %s #%d to HID %d acknowledged in %.1f ms",
                event.type.name,
                event.seq,
                event.hid,
                event.rtt * 1000,
            )
        elif isinstance(event, ev.ExchangeFailed):
            log.info("IHMP %s #%d to HID %d unanswered", event.type.name, event.seq, event.hid)
        elif isinstance(event, ev.PeerLost):
            log.warning("HID %d lost its last path: its flows are failed", event.hid)
        else:
            log.info("IHMP %s", event)

    def _log_change(self, change: TableChange) -> None:
        after = change.after
        if after is None:
            log.info("HID %d removed (%s)", change.hid, change.reason)
            return
        log.info(
            "HID %d %s: active [%s] unreachable [%s] local [%s] %s (%s)",
            change.hid,
            change.kind.value,
            " ".join(map(str, after.active)),
            " ".join(map(str, sorted(after.unreachable, key=str))),
            " ".join(map(str, after.local)),
            after.state.value,
            change.reason,
        )

    # -- control ----------------------------------------------------------------------

    async def _serve_control(self, ctl: socket.socket) -> None:
        server = await control.serve(ctl, self._control)
        async with server:
            await server.serve_forever()

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "status":
            return self.status()
        if cmd == "reload-keys":
            try:
                keys, trust = self._keyring()
            except (keystore.KeyFileError, ValueError) as exc:
                return {"error": str(exc)}
            assert self.engine is not None
            self.engine.local_keys, self.engine.trust = keys, trust
            log.info("key bindings reloaded")
            return {"ok": True}
        if cmd == "down":
            assert self.loop is not None
            self.loop.call_soon(self._stop.set)
            return {"ok": True, "pid": os.getpid()}
        return {"error": f"unknown command {cmd!r}"}

    def status(self) -> dict[str, Any]:
        engine, service = self.engine, self.service
        hids = [
            {
                "hid": e.hid,
                "active": [str(a) for a in e.active],
                "unreachable": sorted(str(a) for a in e.unreachable),
                "local": [str(a) for a in e.local],
                "key": e.key.hex() if e.key else None,
                "state": e.state.value,
            }
            for e in self.table
        ]
        sockets = []
        translated = 0
        if service is not None and service.translator is not None:
            for s in service.translator.sockets:
                sockets.append(
                    {
                        "proto": "tcp" if s.key.proto == 6 else "udp",
                        "local": endpoint(s.key.local, s.key.lport),
                        "remote": endpoint(s.key.remote, s.key.rport),
                        "hid": s.hid,
                    }
                )
            translated = service.path.translated if service.path is not None else 0
        counters: dict[str, Any] = {
            "messages_sent": 0,
            "messages_received": 0,
            "messages_rejected": {},
        }
        if engine is not None:
            c = engine.counters
            counters = {
                "messages_sent": c.messages_sent,
                "messages_received": c.messages_received,
                "messages_rejected": dict(c.messages_rejected),
                "retransmissions": c.retransmissions,
            }
        counters["packets_translated_in_user_space"] = translated
        if service is not None:
            counters["packets_queued"] = sum(q.packets for q in service.queues)
            counters["tcp_flows_prompted"] = sum(service.prompts.values())
        return {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 1),
            "dataplane": self._mode(),
            "port": self.config.port,
            "local_addresses": [str(a) for a in (engine.local_addresses if engine else [])],
            "ghosts": sorted(str(a) for a in (service.continuity.ghosts if service else [])),
            "hids": hids,
            "sockets": sockets,
            "counters": counters,
        }
