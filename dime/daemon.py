"""The dime daemon: StackTrans and IHMP joined in one asyncio loop.

One process, one loop, serving the NFQUEUE sockets (through StackTrans), the IHMP
UDP sockets, the netlink address monitor, the control socket and the engine's
timer. Everything the engine decides leaves it one way, and :meth:`Daemon._pump`
hands it on:

* events -> :meth:`Daemon._on_event`: a change of a host (a peer moved, was
  created, lost its last path, ...) goes to StackTrans, which brings the kernel's
  rewrites for all of that host's flows up to date at once; the rest is logged;
* datagrams -> the IHMP transport, after the kernel has the rewrites the events
  asked for (so an ACK never promises a rewrite that is not in place yet).

Inputs: IHMP datagrams and timers -> the engine; netlink address events -> the
engine (ADDR_UP/DOWN, HANDOFF) and StackTrans (which local identifiers need a
ghost); a new flow's first packet -> StackTrans, which asks the engine for the
flow's host (:meth:`Daemon._hid_for`).

Everything StackTrans installs is recorded in the run directory first, with the
engine's state after every change of the HID table, so that a daemon that dies any
way but a clean stop (``kill -9``, a crash, ``dime down --keep``) leaves what its
successor needs to resume: the next ``dime up`` takes over the kernel state and the
peers, and catches up with what changed meanwhile. ``dime down`` with no daemon
removes it all instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any

from dime import control, keystore, moves, status, systemd
from dime.config import Config, ConfigError, interface_names, load, run_dir
from dime.monitor import AddressMonitor
from dime.transport import IhmpTransport
from ihmp import events as ev
from ihmp.addr import IPAddress, IPInterface
from ihmp.engine import IhmpEngine
from ihmp.flows import FlowSpec
from ihmp.hosts import FlowOrigin
from ihmp.wire import MessageType
from stacktrans.heap import trim_heap
from stacktrans.service import (
    DataplaneConfig,
    DataplaneMode,
    FlowKey,
    Residue,
    StackTrans,
    check_privileges,
    previous_run,
)

#: After the first knocks, when the flows knock again (seconds).
KNOCK_ROUNDS = (0.3, 1.0)
#: Our own address events (a HANDOFF or ADDR_UP is acknowledged once the peer has
#: proven the new address).
ADDRESS_NEWS = frozenset(
    {
        MessageType.ADDR_UP,
        MessageType.ADDR_UP_UNREACHABLE,
        MessageType.HANDOFF,
        MessageType.HANDOFF_UNREACHABLE,
    }
)

log = logging.getLogger("dime")


#: How long `dime move` waits for the peer's ACK (its FLOW_MOVE is sent again
#: meanwhile, every initial_rto doubling up to max_rto).
MOVE_TIMEOUT = 10.0


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        """``config_path``: the file ``config`` came from (`dime reload` reads it again)."""
        self.config = config
        self.config_path = config_path
        #: Our FLOW_MOVEs in flight: (HID, sequence number) -> (the flow, our address).
        self._moves: dict[tuple[int, int], tuple[list[FlowSpec], IPAddress]] = {}
        #: `dime move` requests waiting, per flow: set when its move ends either way.
        self._move_waiters: dict[FlowKey, list[asyncio.Event]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: IhmpEngine | None = None
        self.service: StackTrans | None = None
        self.transport: IhmpTransport | None = None
        self.monitor: AddressMonitor | None = None
        self._routes_pending = False
        self._stop = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._pump_scheduled = False
        self._drops_logged: tuple[dict[str, int], float] = ({}, 0.0)
        self._keep = False  # stop without removing anything: a successor takes over
        self._tasks: list[asyncio.Task[Any]] = []
        self.started_at = time.time()

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT or ``dime down``; always leave the kernel clean."""
        self.loop = asyncio.get_running_loop()
        check_privileges()  # before touching the state dir, the lock or the kernel
        ctl = control.bind()  # the per-namespace lock: refuses a second daemon
        try:
            await self._start(ctl)
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self._stop.set)
            self.loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            # What start-up freed (the ruleset's parse, key and config loading,
            # netlink dumps) goes back to the kernel: 1 MiB and more of idle RSS.
            trim_heap(collect=True)
            systemd.notify("READY=1")
            log.info("dime up: IHMP port %d, dataplane %s", self.config.port, self._mode())
            await self._stop.wait()
            systemd.notify("STOPPING=1")
        finally:
            await self._shutdown()
            ctl.close()

    async def _start(self, ctl: socket.socket) -> None:
        cfg = self.config
        keyring = keystore.load_keyring(cfg)
        if keyring.host_key_created:
            log.info("generated host key %s", keyring.host_key_path)
        log.info("host key %s", keystore.public_hex(keyring.host_key))
        engine_cfg = cfg.ihmp
        engine_cfg.strict = cfg.strict
        self.monitor = AddressMonitor(
            self._on_added,
            self._on_removed,
            self._on_handoff,
            handoff_window=cfg.handoff_window,
            # A removal while another address of the family is up ends a soft
            # handoff: act on it now, not a window later.
            soft_immediate=True,
            on_routes=self._on_routes,
        )
        addresses = await self.monitor.current()
        self.engine = IhmpEngine(
            counter_start=time.time_ns() // 1000,
            rng=random.SystemRandom(),
            config=engine_cfg,
            local_keys=keyring.local,
            trust=keyring.trust,
            local_addresses=addresses,
            in_use=self._carries_flows,
            rendezvous=cfg.rendezvous,
        )
        previous = previous_run(run_dir())
        resumed = previous is not None and self._resume_engine(previous)
        # The hosts the engine knows (restored ones) go to StackTrans with its start.
        hosts = [e.after for e in self._drain_events() if isinstance(e, ev.HostChanged) and e.after]
        self.service = StackTrans(
            DataplaneConfig(
                mode=DataplaneMode(cfg.dataplane),
                queue_out=cfg.queue_out,
                queue_in=cfg.queue_in,
                log_group=cfg.log_group,
                held_log_group=cfg.held_log_group,
                ihmp_port=cfg.port,
                sweep_interval=cfg.sweep_interval,
                safety_sweep=cfg.safety_sweep,
                adopt=cfg.adopt_existing,
                follow_routes=cfg.follow_routes,
            ),
            clock=self._now,
            hid_for=self._hid_for,
            residue_dir=run_dir(),
        )
        self.service.on_knock = self._on_knock
        self.service.on_move = self._ask_move
        # The port first: if it is taken, nothing has been installed yet.
        self.transport = IhmpTransport(cfg.port, self._on_datagram)
        assert self.loop is not None
        self.transport.open(self.loop)
        await self.service.start({i.ip for i in addresses}, hosts=hosts, previous=previous)
        self.service.set_links(self.monitor.table.links())
        self.service.set_policy(cfg.policy)
        # A resumed engine believes in the addresses it saved: the monitor reports
        # what changed since as ordinary events, then the peers are re-synchronised.
        known = self.engine.local_interfaces if resumed else addresses
        on_synced = self._resync if resumed else (lambda: None)
        self._tasks.append(asyncio.create_task(self.monitor.run(known, on_synced)))
        self._tasks.append(asyncio.create_task(control.serve_forever(ctl, self._control)))
        self._save()
        self._pump()

    def _resume_engine(self, previous: Residue) -> bool:
        """Restore what the previous daemon's engine saved; False if there is nothing
        usable (it then starts afresh, and only the kernel state is taken over)."""
        assert self.engine is not None
        if previous.control is None:
            return False
        try:
            self.engine.restore(previous.control, self._now())
        except ValueError as exc:
            log.warning("cannot resume the previous daemon's peers: %s", exc)
            return False
        log.info("resuming %d peers of the previous daemon", len(self.engine.table))
        return True

    def _resync(self) -> None:
        assert self.engine is not None
        self.engine.resume(self._now())
        self._pump()

    def _drain_events(self) -> list[ev.Event]:
        assert self.engine is not None
        events = []
        while (event := self.engine.next_event()) is not None:
            events.append(event)
        return events

    def _save(self) -> None:
        """The engine's state into the record, for a successor after a crash."""
        if self.engine is not None and self.service is not None:
            self.service.save_control(self.engine.save(self._now()))

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()
        if self.service is not None:
            if self._keep:
                self._save()
            await self.service.stop(keep=self._keep)
        if self._keep:
            log.info("dime down: the kernel state stays for the next dime up to take over")
        else:
            log.info("dime down: rules, maps and ghost addresses removed")

    def stop(self) -> None:
        self._stop.set()

    def _now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    def _carries_flows(self, hid: int) -> bool:
        return self.service is not None and self.service.carries_flows(hid)

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
        # One pump for the whole burst the transport reads at once (up to 64): the
        # engine's state is saved once for all of them, before any answer leaves.
        # The save is as big as the HID table: per datagram, a server greeted by a
        # thousand new peers spent nearly all its time saving (about 50 HELLOs/s).
        self._pump_soon()

    def _hid_for(
        self, remote: IPAddress, local: IPAddress, now: float, origin: FlowOrigin
    ) -> int | None:
        """StackTrans saw a new flow local -> remote: the engine names its host."""
        assert self.engine is not None
        hid = self.engine.flow_started(remote, local, now, origin)
        # Called from inside the packet path: the HELLO and the host's creation go
        # out once this packet has its verdict.
        self._pump_soon()
        return hid

    def _on_added(self, iface: IPInterface) -> None:
        log.info("address up: %s", iface)
        assert self.engine is not None and self.service is not None
        self.service.local_added(iface.ip)
        self.engine.address_added(iface, self._now())
        self._links_changed()

    def _on_removed(self, iface: IPInterface) -> None:
        log.info("address down: %s", iface)
        assert self.engine is not None and self.service is not None
        self.service.local_removed(iface.ip)
        self.engine.address_removed(iface, self._now())
        self._links_changed()

    def _on_handoff(self, old: IPInterface, new: IPInterface) -> None:
        log.info("handoff: %s -> %s", old, new)
        assert self.engine is not None and self.service is not None
        self.service.local_removed(old.ip)
        self.service.local_added(new.ip)
        self.engine.handoff(old, new, self._now())
        self._links_changed()

    def _on_routes(self) -> None:
        """The main routing table changed: once per burst of route messages (an
        address brings several), after what is queued is read."""
        if self._routes_pending or self.loop is None:
            return
        self._routes_pending = True
        self.loop.call_soon(self._routes_now)

    def _routes_now(self) -> None:
        self._routes_pending = False
        if self.service is not None:
            self.service.routes_changed()
            self._pump()

    def _links_changed(self) -> None:
        assert self.service is not None and self.monitor is not None
        self.service.set_links(self.monitor.table.links())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        assert self.engine is not None
        self.engine.handle_timer(self._now())
        self._pump()

    # -- engine -> outputs ------------------------------------------------------------

    def _pump_soon(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            assert self.loop is not None
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Send what the engine queued, act on its events, re-arm its timer."""
        self._pump_scheduled = False
        engine = self.engine
        if engine is None or self.transport is None:
            return
        changed = False
        while (event := engine.next_event()) is not None:
            changed |= isinstance(event, ev.HostChanged)
            self._on_event(event)
        if changed:
            self._save()  # before anything that acts on it leaves this host
        self._log_drops()
        if self.service is not None:
            # The kernel rewrites what the engine just decided before any datagram
            # (an ACK of a HANDOFF, say) tells the peer it may use it.
            self.service.flush()
        now = self._now()
        for dgram in engine.datagrams_to_send(now):
            if not self.transport.send(dgram.data, dgram.src, dgram.dst, dgram.dst_port):
                engine.send_failed(dgram.src, dgram.dst, now)
        deadline = engine.get_timer()
        if self._timer is not None and (deadline is None or self._timer.when() != deadline):
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None:
            assert self.loop is not None
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _log_drops(self) -> None:
        """What the engine refused without an event (a flood's worth), summed up in
        one line at most every 10 s: logging each would be the flood's own."""
        assert self.engine is not None
        dropped = self.engine.counters.dropped
        last, at = self._drops_logged
        now = self._now()
        if dropped != last and now - at >= 10.0:
            news = {k: n - last.get(k, 0) for k, n in dropped.items() if n != last.get(k, 0)}
            log.warning("IHMP datagrams refused since the last report: %s", news)
            self._drops_logged = (dict(dropped), now)

    def _on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.HostChanged):
            log_change(event)
            assert self.service is not None
            self.service.host_changed(event)  # the peer's new locators reach the kernel
        elif isinstance(event, ev.NatEntryReceived):
            log_event(event)
            assert self.service is not None
            m = event.mapping
            self.service.bind_port(event.hid, m.proto, m.internal_port, m.external, m.external_port)
        elif isinstance(event, ev.FlowMoveReceived):
            assert self.service is not None
            if not self.service.pin(event.hid, event.flow, event.addr):
                log.info("FLOW_MOVE of HID %d: no flow %s here", event.hid, event.flow)
        elif isinstance(event, ev.ExchangeCompleted | ev.ExchangeFailed) and (
            event.type is MessageType.FLOW_MOVE
        ):
            self._move_ended(event)
        elif (
            isinstance(event, ev.ExchangeCompleted)
            and event.type in ADDRESS_NEWS
            and event.attempts > 1
        ):
            log_event(event)
            # Our news had to be sent again: the peer's proof of our new address came
            # late, and meanwhile our flows got nothing back from it (it answered to
            # our old address, or held their packets from a NAT's new ports), so
            # their timers backed off again after the prompt its challenge gave them.
            assert self.service is not None
            self.service.prompt_stalled(event.hid)
        elif isinstance(event, ev.FlowsNeedBinding) and event.udp_only:
            self._knock(event.hid, event.local, udp_only=True)  # the NAT keepalive
        elif isinstance(event, ev.FlowsNeedBinding):
            # Knocks are not acknowledged: two more rounds cover one lost.
            assert self.loop is not None
            only = event.identifiers
            for delay in KNOCK_ROUNDS:
                self.loop.call_later(delay, self._knock, event.hid, event.local, False, only)
            self._knock(event.hid, event.local, identifiers=only)
        else:
            log_event(event)

    def _knock(
        self,
        hid: int,
        local: IPAddress,
        udp_only: bool = False,
        identifiers: frozenset[IPAddress] | None = None,
    ) -> None:
        """Each flow to ``hid`` (``udp_only``: each UDP flow; ``identifiers``: bound to
        one of those) knocks from our ``local`` (if both are still there)."""
        engine, service = self.engine, self.service
        if engine is None or service is None or local not in engine.local_addresses:
            return
        if hid in engine.table and local in engine.table.get(hid).local:
            udp, tcp = socket.IPPROTO_UDP, socket.IPPROTO_TCP
            protos = (udp,) if udp_only else (tcp, udp)
            payload = lambda f: engine.flow_binding(hid, f, local)  # noqa: E731
            service.knock(hid, local, payload, protos, identifiers)

    # -- per-flow moves ---------------------------------------------------------------

    def _ask_move(self, hid: int, flows: list[FlowSpec], via: IPAddress) -> bool:
        """StackTrans wants ``flows`` (of one host, up to MAX_FLOWS_PER_MOVE) on our
        ``via``: ask the peer (one FLOW_MOVE)."""
        assert self.engine is not None
        seq = self.engine.move_flows(hid, flows, via, self._now())
        if seq is None:
            return False
        self._moves[(hid, seq)] = (flows, via)
        self._pump_soon()
        return True

    def _move_ended(self, event: ev.ExchangeCompleted | ev.ExchangeFailed) -> None:
        asked = self._moves.pop((event.hid, event.seq), None)
        if asked is None or self.service is None:
            return
        flows, via = asked
        keys = [FlowKey(f.proto, f.local, f.lport, f.remote, f.rport) for f in flows]
        what = str(keys[0]) if len(keys) == 1 else f"{len(keys)} flows"
        done = isinstance(event, ev.ExchangeCompleted)
        if done:
            log.info("IHMP FLOW_MOVE #%d (%s via %s) acknowledged", event.seq, what, via)
        else:
            log.warning("IHMP FLOW_MOVE #%d (%s via %s): no answer", event.seq, what, via)
        for flow, key in zip(flows, keys, strict=True):
            if done:
                self.service.move_done(flow, via)
            else:
                self.service.move_failed(flow)
            for waiter in self._move_waiters.pop(key, []):
                waiter.set()

    async def _move(self, request: dict[str, Any]) -> dict[str, Any]:
        """`dime move`: the flows it names to the address it names, once acknowledged."""
        assert self.service is not None
        links = self.monitor.table.links() if self.monitor is not None else {}
        try:
            keys = moves.select(request, self.service.flow_keys())
            targets = moves.resolve(str(request.get("via", "")), links, keys)
        except ValueError as exc:
            return {"error": str(exc)}
        waits = []
        for key, via in targets.items():
            error = self.service.request_move(key, via)
            if error is not None:
                return {"error": error}
            if not self.service.is_at(key, via):
                waiter = asyncio.Event()
                self._move_waiters.setdefault(key, []).append(waiter)
                waits.append(waiter.wait())
        self._pump()
        try:
            async with asyncio.timeout(MOVE_TIMEOUT):
                await asyncio.gather(*waits)
        except TimeoutError:
            pass
        late = [f"{k}" for k, via in targets.items() if not self.service.is_at(k, via)]
        if late:
            return {"error": f"the peer did not acknowledge the move of {late[0]}"}
        return {"ok": True, "moved": [[moves.describe(k), str(v)] for k, v in targets.items()]}

    # -- reload -----------------------------------------------------------------------

    def _on_sighup(self) -> None:
        reply = self._reload()
        if "error" in reply:
            log.error("reload refused, the old policy stays: %s", reply["error"])

    def _reload(self) -> dict[str, Any]:
        """Read the config file again; its policy and ``follow_routes`` apply to new
        and existing flows. A bad file changes nothing. (Other keys take effect at
        the next start.)"""
        try:
            cfg = load(self.config_path)
            cfg.policy.check_interfaces(interface_names())
        except (ConfigError, ValueError) as exc:
            return {"error": f"config: {exc}"}
        assert self.service is not None
        self.config.policy = cfg.policy
        self.config.follow_routes = self.service.config.follow_routes = cfg.follow_routes
        self.service.set_policy(cfg.policy)
        self.service.routes_changed()
        self._pump()
        log.info("config reloaded: %d policy rules", len(cfg.policy.rules))
        return {"ok": True, "rules": len(cfg.policy.rules)}

    def _on_knock(self, src: IPAddress, port: int, data: bytes) -> None:
        """A knock came in: if IHMP verifies it, its flow is at ``src``:``port`` now."""
        assert self.engine is not None and self.service is not None
        bound = self.engine.receive_binding(data, src, port, self._now())
        if bound is not None:
            self.service.bind(bound[0], bound[1], src, port)
        self._pump_soon()

    # -- control ----------------------------------------------------------------------

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "status":
            return self.status()
        if cmd == "reload-keys":
            try:
                keyring = keystore.load_keyring(self.config)
            except (keystore.KeyFileError, ValueError) as exc:
                return {"error": str(exc)}
            assert self.engine is not None
            self.engine.local_keys, self.engine.trust = keyring.local, keyring.trust
            log.info("key bindings reloaded")
            return {"ok": True}
        if cmd == "move":
            return await self._move(request)
        if cmd == "reload":
            return self._reload()
        if cmd == "down":
            assert self.loop is not None
            self._keep = bool(request.get("keep"))
            self.loop.call_soon(self._stop.set)
            return {"ok": True, "pid": os.getpid()}
        return {"error": f"unknown command {cmd!r}"}

    def status(self) -> dict[str, Any]:
        return status.build(
            port=self.config.port,
            started_at=self.started_at,
            engine=self.engine,
            service=self.service,
            now=self._now(),
        )


def log_event(event: ev.Event) -> None:
    """One log line per engine event (the demo and the testbed read some of them)."""
    if isinstance(event, ev.MessageRejected):
        log.warning("IHMP from %s rejected (%s): %s", event.src, event.reason.value, event.detail)
    elif isinstance(event, ev.MessageApplied):
        stale = " (stale)" if event.stale else ""
        log.info("IHMP %s #%d from HID %d applied%s", event.type.name, event.seq, event.hid, stale)
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


def log_change(change: ev.HostChanged) -> None:
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
