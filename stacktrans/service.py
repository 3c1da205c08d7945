"""StackTrans as a running service: the asyncio adapter around the Dataplane.

What :class:`~stacktrans.dataplane.Dataplane` is to StackTrans' decisions, this is
to its I/O, as aioquic's ``asyncio/protocol.py`` is to ``QuicConnection``: it installs
the kernel rules and maps, serves the NFQUEUEs, feeds the Dataplane (IHMP's host
changes, this host's addresses, queued packets, the liveness sweep) and carries out
the :class:`~stacktrans.dataplane.Effects` it returns: ghost addresses and routes,
prompts of stalled TCP flows, sockets of lost hosts. The daemon runs one next to the
IHMP engine and imports nothing of StackTrans but this module; the StackTrans tests
run one driven by a test double of IHMP. Everything it puts into the kernel it
records first (:mod:`stacktrans.residue`), so that a later run can remove it after
a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ihmp.addr import IPAddress
from ihmp.flows import MAX_FLOWS_PER_MOVE, FlowSpec
from ihmp.hosts import ChangeKind, HostChanged, HostSnapshot
from stacktrans import nflog, residue
from stacktrans.carry import Carrier
from stacktrans.dataplane import Dataplane, HidFor
from stacktrans.flow_death import Death, DeathWatch, Fate, Suspects, check_flows
from stacktrans.ghosts import Ghosts
from stacktrans.kernel_flows import alive_flows, existing_flows
from stacktrans.knock import Knocker, build
from stacktrans.link_routes import (
    LinkRoutes,
    LocalAddress,
    LocalLink,
    Selector,
    is_routing_change,
    preferred_sources,
)
from stacktrans.link_routes import clear_leftovers as clear_routes
from stacktrans.nflog import FlowNotices, NflogError
from stacktrans.nfqueue import Handler, PacketQueue, QueueError
from stacktrans.nft import IN_KERNEL_PREFIX, Nft, NftError, NftTable, QueueSpec
from stacktrans.policy import Policy, parse_address
from stacktrans.queue_rules import XtQueueRules, nft_queue_supported
from stacktrans.residue import Record, Residue
from stacktrans.rto_revert import FlowSeq, Remedy, prompt
from stacktrans.socket_table import TCP, UDP, FlowKey, SocketEntry, endpoint
from stacktrans.userspace import OnKnock, UserspacePath

__all__ = [
    "TCP",
    "UDP",
    "DataplaneConfig",
    "DataplaneMode",
    "FlowKey",
    "KernelFlows",
    "LocalLink",
    "Residue",
    "StackTrans",
    "StartError",
    "check_privileges",
    "clean_leftovers",
    "endpoint",
    "is_routing_change",
    "previous_run",
]

log = logging.getLogger("dime.stacktrans")


class DataplaneMode(enum.Enum):
    AUTO = "auto"
    NFT = "nft"  # the kernel learns flows and rewrites them (nft maps); notices via NFLOG
    NFQUEUE = "nfqueue"  # every packet through user space


class StartError(RuntimeError):
    """A start-up precondition failed; the message says what and how to fix it."""


@dataclass
class DataplaneConfig:
    mode: DataplaneMode = DataplaneMode.AUTO
    queue_out: int = 4731
    queue_in: int = 4732
    ihmp_port: int = 4731
    log_group: int = 4731  # nft mode: the NFLOG group of flow notices
    # ... and of the notices of flows the kernel holds, which it may batch
    held_log_group: int = 4732
    sweep_interval: float = 2.0  # the full sweep's period where the kernel announces no deaths
    safety_sweep: float = 600.0  # ... and where it does (in case an event was missed)
    udp_idle: float = 120.0  # nfqueue mode: a UDP flow silent this long has ended
    adopt: bool = True
    #: Flows without a policy rule follow the kernel's preferred source towards
    #: their peer (a new default route takes them along, make-before-break).
    follow_routes: bool = True


@dataclass
class KernelFlows:
    """How the service asks the kernel about its sockets: blocking calls, run in a
    thread. None turns that part off (tests that do not want it)."""

    #: Flows that exist at start-up, to adopt (sock_diag).
    existing: Callable[[], list[FlowKey]] | None = existing_flows
    #: Which flows still have sockets (argument: also ask conntrack), for the sweep.
    alive: Callable[[bool], Container[FlowKey]] | None = alive_flows
    #: Make stalled TCP flows send now; returns how many got each remedy.
    prompt: Callable[[list[FlowSeq]], Counter[Remedy]] | None = prompt
    #: What became of flows the kernel said ended (exact lookups); None: no
    #: destroy events, the periodic sweep alone finds ended flows.
    check: Callable[[list[FlowKey]], dict[FlowKey, Fate]] | None = check_flows
    #: The source the kernel's routing picks towards each peer locator.
    preferred: Callable[[list[IPAddress]], dict[IPAddress, IPAddress]] | None = preferred_sources


#: A sweep lists every socket (and, in nft mode, conntrack entry): at 10k-100k flows
#: that takes seconds of CPU. Waiting SWEEP_DUTY times as long as the last one took
#: keeps it to 1/SWEEP_DUTY of a core; below ~1k flows the interval rules.
SWEEP_DUTY = 20


def sweep_delay(interval: float, last_sweep: float) -> float:
    """Seconds until the next sweep: ``interval``, or longer after a costly sweep."""
    return max(interval, SWEEP_DUTY * last_sweep)


#: Destroy events come in bursts (a server closing many sockets): suspects are looked
#: up together, this long after the first.
DEATH_BATCH_S = 0.05


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise StartError(
            "dime needs root (CAP_NET_ADMIN) to install packet rules: run it with sudo"
        )


def resolve_mode(
    mode: DataplaneMode, nft: Nft, log_group: int, held_log_group: int | None = None
) -> DataplaneMode:
    """AUTO -> NFT when the kernel can rewrite with nft maps and tell us of new flows
    through NFLOG (both groups), else NFQUEUE. NFT where it cannot: StartError,
    saying why."""
    if mode is DataplaneMode.NFQUEUE:
        return mode
    missing = _nft_mode_missing(nft, log_group, held_log_group)
    if missing is None:
        return DataplaneMode.NFT
    if mode is DataplaneMode.NFT:
        raise StartError(f"dataplane nft is not possible here: {missing}")
    log.info("dataplane nfqueue: %s", missing)
    return DataplaneMode.NFQUEUE


def _nft_mode_missing(nft: Nft, log_group: int, held_log_group: int | None = None) -> str | None:
    """Why the nft data plane cannot run here, or None."""
    probe = (
        "add table inet dime_probe\n"
        "add map inet dime_probe m { type ipv4_addr : ipv4_addr; }\n"
        "add chain inet dime_probe c { type route hook output priority -140; }\n"
        "add rule inet dime_probe c ip daddr set ip daddr map @m\n"
        f"add rule inet dime_probe c ct state new log group {log_group}\n"
        "delete table inet dime_probe\n"
    )
    try:
        nft.run(probe)
    except NftError as exc:
        return f"the kernel lacks nft map rewriting, conntrack or log ({exc})"
    missing = nflog.available(log_group)
    if missing is None and held_log_group is not None:
        missing = nflog.available(held_log_group, nflog.HELD_BATCH)
    return missing


class StackTrans:
    def __init__(
        self,
        config: DataplaneConfig,
        *,
        clock: Callable[[], float],
        hid_for: HidFor,
        residue_dir: Path | None = None,
        kernel_flows: KernelFlows | None = None,
    ) -> None:
        """``hid_for``: IHMP's answer to "which host does this new flow go to"
        (:meth:`ihmp.engine.IhmpEngine.flow_started`). ``residue_dir``: where the
        record of what is installed lives (None: nowhere; tests)."""
        self.config = config
        self.clock = clock
        self.residue = Residue()
        self.record = Record(residue_dir)
        self.kernel_flows = kernel_flows or KernelFlows()
        self.mode = config.mode
        self.nft: Nft | None = None
        self.kernel: NftTable | None = None
        self.rules: XtQueueRules | None = None
        self.dataplane: Dataplane | None = None
        self.path: UserspacePath | None = None
        self.ghosts = Ghosts(on_record=self._record)
        self.queues: list[PacketQueue] = []
        self.notices: FlowNotices | None = None  # each at once
        self.held_notices: FlowNotices | None = None  # of flows the kernel holds: batched
        self._adopt_task: asyncio.Task[None] | None = None
        self.prompts: Counter[Remedy] = Counter()  # what rto_revert did (status counters)
        self._hid_for = hid_for
        #: Called with each knock that comes in (set by the daemon before start).
        self.on_knock: OnKnock | None = None
        #: ``on_move(hid, flows, via)``: ask the peer to send ``flows`` (as our sockets
        #: see them; at most MAX_FLOWS_PER_MOVE) to our ``via`` (one IHMP FLOW_MOVE); True if
        #: asked. The answer comes back, per flow, as :meth:`move_done` or
        #: :meth:`move_failed`. Set by the daemon.
        self.on_move: Callable[[int, list[FlowSpec], IPAddress], bool] | None = None
        #: Routing by source address and policy selectors: only once a policy or a
        #: move asks for it (without, routing is the host's own, as it always was).
        self.links: LinkRoutes | None = None
        self._local_links: dict[IPAddress, LocalLink] = {}
        self.knocker = Knocker()
        self._tasks: list[asyncio.Task[None]] = []
        self._stalled_hids: set[int] = set()
        self._lost_hids: set[int] = set()  # of those, hosts whose old locator is gone
        self._prompt_task: asyncio.Task[None] | None = None
        self._reconcile_pending = False
        self._reconcile_task: asyncio.Task[None] | None = None
        self.deaths: DeathWatch | None = None
        self.suspects = Suspects()
        self._suspected = asyncio.Event()
        self._sweep_now = asyncio.Event()
        self._sweeps_owed = 0  # full sweeps due now (two: a flow goes on its 2nd miss)
        self._owed_since = 0.0  # ... counted from sweeps that start after this
        self._port_deaths: list[Death] = []  # deaths that named a port, not a flow
        self.ended_by_events = 0
        self.full_sweeps = 0
        self.ended_after_sweeps = 0  # ends found of flows a full sweep had missed

    # -- lifecycle --------------------------------------------------------------------

    async def start(
        self,
        local_addresses: set[IPAddress],
        *,
        hosts: Iterable[HostSnapshot] = (),
        previous: Residue | None = None,
    ) -> None:
        """Install everything; on any failure, remove what was installed and raise.

        ``hosts``: what IHMP already knows (a restored engine's table), so flows
        adopted now are translated at once. ``previous``: the record of a run that
        did not stop cleanly here: its kernel state is taken over, not torn down
        (its nft tables are replaced in one batch that already holds this run's
        elements, its ghosts are kept while needed, identical queue rules stay).
        """
        check_privileges()
        try:
            await self._start(local_addresses, hosts, previous)
        except BaseException:
            await self.stop()
            raise

    async def _start(
        self,
        local_addresses: set[IPAddress],
        hosts: Iterable[HostSnapshot],
        previous: Residue | None,
    ) -> None:
        try:
            self.nft = Nft()
        except NftError as exc:
            raise StartError(str(exc)) from exc
        self.mode = resolve_mode(
            self.config.mode, self.nft, self.config.log_group, self.config.held_log_group
        )
        fast = self.mode is DataplaneMode.NFT
        queue = None
        if nft_queue_supported(self.nft):
            # The kernel has the nft queue statement: everything in our own table.
            queue = QueueSpec(
                self.config.queue_out, self.config.queue_in, self.config.ihmp_port, not fast
            )
        loop = asyncio.get_running_loop()
        # New flows' elements are batched for up to 5 ms (one libnftables call for a
        # burst of new flows); a flow that needs rewriting at once flushes at once.
        # Until install() the kernel maps only collect what the Dataplane decides.
        self.kernel = NftTable(
            self.nft,
            fast_path=fast,
            queue=queue,
            ihmp_port=self.config.ihmp_port,
            log_group=self.config.log_group if fast else None,
            held_log_group=self.config.held_log_group if fast else None,
            defer=lambda fn: loop.call_later(0.005, fn),
        )
        self.dataplane = Dataplane(self.kernel, self._hid_for)
        self.dataplane.set_local_addresses(local_addresses)
        for host in hosts:
            self.dataplane.host_changed(HostChanged(ChangeKind.CREATED, host.hid, None, host))
        if previous is not None and previous.link_routes:
            # Its routing by source is redone, if this run's policy wants it.
            await asyncio.to_thread(clear_routes)
        if previous is not None:
            log.info("taking over what an earlier dime left here")
            # Its ghosts are ours now: removed only once no flow needs them.
            self.ghosts = Ghosts.from_state(previous.ghosts, on_record=self._record)
        self.path = UserspacePath(self.dataplane, self.clock, self.on_knock, Carrier())
        # The queues listen before the snapshot of existing flows is taken, so that
        # a flow that starts meanwhile is seen one way or the other.
        for num, handler in (
            (self.config.queue_out, self.path.outbound),
            (self.config.queue_in, self.path.inbound),
        ):
            pq = PacketQueue(num, self._following_up(handler))
            try:
                pq.start(loop)
            except QueueError as exc:
                raise StartError(str(exc)) from exc
            self.queues.append(pq)
        if fast:
            observe = self.path.observe

            def notice(data: bytes, outbound: bool, prefix: str) -> None:
                observe(data, outbound, prefix == IN_KERNEL_PREFIX)
                if self.dataplane is not None and self.dataplane.has_effects:
                    self._follow_up()  # (a new flow the policy wants elsewhere)

            # The notices of flows the kernel holds need no prompt reaction: the
            # kernel sends them in batches (a notice at most 10 ms late); the others
            # (a new host to greet, a flow to add) come one by one, at once.
            self.notices = FlowNotices(self.config.log_group, notice, self._notices_lost)
            self.held_notices = FlowNotices(
                self.config.held_log_group, notice, self._notices_lost, nflog.HELD_BATCH
            )
            try:
                self.notices.start(loop)
                self.held_notices.start(loop)
            except NflogError as exc:
                raise StartError(str(exc)) from exc
        # Before adoption: a flow adopted now must not end unheard.
        self._watch_deaths(loop)
        existing = self.kernel_flows.existing
        if self.config.adopt and existing is not None:
            flows = await asyncio.to_thread(existing)
            n = self.dataplane.adopt(flows, self.clock())
            log.info("adopted %d existing flows", n)
        if previous is not None and previous.bindings:
            bound = self.dataplane.restore_bindings(previous.bindings)
            log.info("%d flows of peers behind NATs keep their ports there", bound)
        self.residue.nft_table = True
        self._record()  # before the kernel changes: a crash half-way is cleaned up
        try:
            self.kernel.install()
        except NftError as exc:
            raise StartError(f"cannot install the nft table inet dime: {exc}") from exc
        if queue is None:
            self._install_xt_rules(fast, previous.xt_rules if previous else None)
        elif previous is not None and previous.xt_rules is not None:
            await residue.remove(Residue(xt_rules=previous.xt_rules), self.nft)
        log.info("queue rules: %s", "nft queue" if queue else "iptables NFQUEUE target")
        if self.kernel_flows.alive is not None:
            self._tasks.append(asyncio.create_task(self._sweeper()))
        if self.deaths is not None:
            self._tasks.append(asyncio.create_task(self._death_checker()))
            if self.mode is DataplaneMode.NFQUEUE and self.kernel_flows.alive is not None:
                self._tasks.append(asyncio.create_task(self._idle_expirer()))
        self._follow_up()
        log.info("StackTrans up: dataplane %s", self.mode.value)

    def _install_xt_rules(self, fast: bool, previous: dict[str, Any] | None) -> None:
        """The iptables queue rules; a predecessor's identical ones are kept as they
        are (no moment without them), different ones replaced."""
        assert self.nft is not None
        self.rules = XtQueueRules(
            self.config.queue_out,
            self.config.queue_in,
            self.config.ihmp_port,
            every_packet=not fast,
        )
        if previous is not None:
            created = list(previous.get("created_tables", []))
            self.rules.created_tables = created
            if previous == self._rules_json():
                self.residue.xt_rules = previous
                self._record()
                return
            XtQueueRules(0, 0, 0, every_packet=False, created_tables=created).remove(self.nft)
        # Recorded before installing: a crash half-way must still be cleaned up.
        self.residue.xt_rules = self._rules_json()
        self._record()
        try:
            self.rules.install(self.nft)
        except RuntimeError as exc:
            raise StartError(str(exc)) from exc
        self.residue.xt_rules = self._rules_json()
        self._record()

    async def stop(self, *, keep: bool = False) -> None:
        """Remove everything this run installed. Safe to call more than once.

        ``keep``: stop serving but leave the kernel as it is, and the record of it
        (with the control plane's state), for a successor to take over: the kernel
        goes on translating the flows it knows meanwhile."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for queue in self.queues:
            queue.stop()
        self.queues.clear()
        for notices in (self.notices, self.held_notices):
            if notices is not None:
                notices.stop()
        if self.deaths is not None:
            self.deaths.stop()
        self.knocker.close()
        if self.path is not None and self.path.carrier is not None:
            self.path.carrier.close()
        if self.kernel is not None:
            self.kernel.flush()  # the table goes next: nothing may be left queued
        for pending in (self._reconcile_task, self._prompt_task, self._adopt_task):
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        if keep:
            self._record()
            return
        if self.links is not None:
            await asyncio.to_thread(self.links.close)
            self.residue.link_routes = False
        await residue.remove(self.residue, self.nft, self.ghosts)
        self._record()
        self.record.discard()

    def _rules_json(self) -> dict[str, Any]:
        assert self.rules is not None
        return {
            "created_tables": list(self.rules.created_tables),
            "queues": [self.config.queue_out, self.config.queue_in],
            "port": self.config.ihmp_port,
            "every_packet": self.rules.every_packet,
        }

    def _record(self) -> None:
        self.residue.ghosts = self.ghosts.state()
        if self.dataplane is not None:
            self.residue.bindings = self.dataplane.bindings()
            self.dataplane.bindings_changed = False
        self.record.save(self.residue)

    def save_control(self, state: dict[str, Any]) -> None:
        """Keep the control plane's state (IHMP's :meth:`~ihmp.engine.IhmpEngine.save`)
        in the record, so a successor after a crash can resume it."""
        self.residue.control = state
        self._record()

    # -- inputs -----------------------------------------------------------------------

    def host_changed(self, change: HostChanged) -> None:
        """IHMP changed a host (:class:`~ihmp.hosts.HostChanged`): the one way a peer's
        move reaches StackTrans. The Dataplane applies it to the kernel maps at once
        (:meth:`~stacktrans.dataplane.Dataplane.host_changed`); what follows (ghosts,
        routes, prompts, failed sockets) is scheduled here."""
        if self.dataplane is not None:
            self.dataplane.host_changed(change)
            self._follow_up()

    def local_added(self, addr: IPAddress) -> None:
        if self.dataplane is not None:
            self.dataplane.local_added(addr)
            self.routes_changed()

    def local_removed(self, addr: IPAddress) -> None:
        if self.dataplane is not None:
            self.dataplane.local_removed(addr)
            self.routes_changed()

    def set_local_addresses(self, addrs: set[IPAddress]) -> None:
        if self.dataplane is not None:
            self.dataplane.set_local_addresses(addrs)
            self.routes_changed()

    def routes_changed(self) -> None:
        """The main routing table or this host's addresses changed: flows without a
        policy rule follow the kernel's preferred source towards their peer (config
        ``follow_routes``), and the per-address tables copy main's routes again.
        Only peers of an IP version this host has more than one address of are
        looked up (elsewhere there is no choice)."""
        dp = self.dataplane
        if dp is None:
            return
        find = self.kernel_flows.preferred
        versions = [a.version for a in dp.local_addresses]
        choice = {v for v in versions if versions.count(v) > 1}
        preferred: dict[IPAddress, IPAddress] = {}
        if self.config.follow_routes and find is not None and choice:
            # (Walks every flow: only on a host that has a choice.)
            peers = sorted((r for r in dp.remote_locators() if r.version in choice), key=str)
            try:
                preferred = find(peers) if peers else {}
            except OSError as exc:  # the last answer stands
                log.warning("routes: %s", exc)
                preferred = dp.preferred
        dp.set_preferred(preferred)
        self._update_links()
        self._follow_up()

    def knock(
        self,
        hid: int,
        local: IPAddress,
        payload_for: Callable[[FlowSpec], bytes | None],
        protos: Container[int] = (TCP, UDP),
        identifiers: Container[IPAddress] | None = None,
    ) -> int:
        """Send each flow of ``hid`` a knock from our address ``local`` (we now reach
        the host through a NAT there); ``payload_for(flow)`` is its FLOW_BIND.
        Returns how many went."""
        if self.dataplane is None:
            return 0
        sent = 0
        for entry, dst, dport in self.dataplane.knock_targets(hid):
            k = entry.key
            if k.proto not in protos or dst.version != local.version:
                continue
            if identifiers is not None and k.local not in identifiers:
                continue
            payload = payload_for(FlowSpec(k.proto, k.local, k.lport, k.remote, k.rport))
            if payload is None:
                continue
            seq = (entry.isn + 1) & 0xFFFFFFFF if entry.isn is not None else 0
            ack = (entry.peer_isn + 1) & 0xFFFFFFFF if entry.peer_isn is not None else 0
            packet = build(k.proto, local, k.lport, dst, dport, payload, seq=seq, ack=ack)
            sent += self.knocker.send(packet, dst)
        log.debug("HID %d: reached through a NAT from %s; %d knocks sent", hid, local, sent)
        return sent

    def bind(self, hid: int, flow: FlowSpec, at: IPAddress, port: int) -> bool:
        """A verified knock: ``flow`` of ``hid`` is at ``at``:``port`` now."""
        if self.dataplane is None or self.dataplane.bind(hid, flow, at, port) is None:
            return False
        self._follow_up()
        return True

    def bind_port(self, hid: int, proto: int, peer_port: int, at: IPAddress, port: int) -> int:
        """A verified NAT_ENTRY: ``hid``'s flows from ``peer_port`` are at ``at``:``port``."""
        if self.dataplane is None:
            return 0
        bound = self.dataplane.bind_port(hid, proto, peer_port, at, port)
        self._follow_up()
        return bound

    # -- per-flow locators ------------------------------------------------------------

    def set_policy(self, policy: Policy) -> None:
        """The locator policy: for the flows there are (moves), and for new ones
        (routing rules that give a new socket the address the policy wants)."""
        if self.dataplane is None:
            return
        if policy.rules:
            self._route_by_source()
        self.dataplane.set_policy(policy)
        self._update_links()
        self._follow_up()

    def set_links(self, links: dict[IPAddress, LocalLink]) -> None:
        """Each local address's link (name, index, prefix), as the monitor sees them."""
        self._local_links = dict(links)
        if self.dataplane is not None:
            self.dataplane.set_interfaces({a: link.name for a, link in links.items()})
            self._update_links()
            self._follow_up()

    def request_move(self, key: FlowKey, via: IPAddress) -> str | None:
        """``dime move``: see :meth:`Dataplane.request_move`."""
        if self.dataplane is None:
            return "StackTrans is not running"
        error = self.dataplane.request_move(key, via)
        if error is None:
            self._route_by_source()
        self._follow_up()
        return error

    def _route_by_source(self) -> None:
        """From now on, packets from each local address leave by its own link."""
        if self.links is None:
            self.links = LinkRoutes()
            self.residue.link_routes = True
            self._record()
            self._update_links()

    def _update_links(self) -> None:
        if self.links is None or self.dataplane is None:
            return
        addrs = [
            LocalAddress(a, link.prefixlen, link.index)
            for a, link in self._local_links.items()
            if a in self.dataplane.local_addresses
        ]
        try:
            self.links.update(addrs)
            self.links.set_selectors(self._selectors())
        except OSError as exc:
            log.warning("routing by source: %s", exc)

    def _selectors(self) -> list[Selector]:
        """The policy's rules as routing selectors: each rule's addresses in order."""
        assert self.dataplane is not None
        out = []
        for rule in self.dataplane.policy.rules:
            via: list[IPAddress] = []
            for name in rule.via + rule.backup:
                addr = parse_address(name)
                on = (
                    [addr]
                    if addr is not None
                    else [a for a, link in self._local_links.items() if link.name == name]
                )
                via += [a for a in on if a in self._local_links and a not in via]
            out.append(
                Selector(rule.proto, rule.remote, rule.remote_port, rule.local_port, tuple(via))
            )
        return out

    def is_at(self, key: FlowKey, via: IPAddress) -> bool:
        return self.dataplane is not None and self.dataplane.is_at(key, via)

    def move_done(self, flow: FlowSpec, via: IPAddress) -> None:
        if self.dataplane is not None:
            self.dataplane.move_done(_key(flow), via)
            self._follow_up()

    def move_failed(self, flow: FlowSpec) -> None:
        if self.dataplane is not None:
            self.dataplane.move_failed(_key(flow))

    def pin(self, hid: int, flow: FlowSpec, at: IPAddress) -> bool:
        """The peer's FLOW_MOVE: its ``flow`` (as its socket sees it) goes to ``at``."""
        if self.dataplane is None or self.dataplane.pin(hid, flow, at) is None:
            return False
        self._follow_up()
        return True

    def _ask_moves(self, moves: dict[FlowKey, IPAddress]) -> None:
        """Ask the peers: one request per host and address for up to
        :data:`MAX_FLOWS_PER_MOVE` flows (one FLOW_MOVE exchange each)."""
        assert self.dataplane is not None
        if self.on_move is None:
            return
        batches: dict[tuple[int, IPAddress], list[FlowKey]] = {}
        for key, via in moves.items():
            entry = self.dataplane.sockets.get(key)
            if entry is not None:
                batches.setdefault((entry.hid, via), []).append(key)
        for (hid, via), keys in batches.items():
            for i in range(0, len(keys), MAX_FLOWS_PER_MOVE):
                batch = keys[i : i + MAX_FLOWS_PER_MOVE]
                if self.on_move(hid, [_spec(k) for k in batch], via):
                    for key in batch:
                        self.dataplane.move_started(key, via)
                else:
                    log.info(
                        "%d flows of HID %d: the peer cannot be asked to send to %s",
                        len(batch),
                        hid,
                        via,
                    )

    def flush(self) -> None:
        """Put every rewrite decided so far into the kernel now (one batch)."""
        if self.kernel is not None:
            self.kernel.flush()

    def _following_up(self, handler: Handler) -> Handler:
        """``handler`` (a queued packet's translation), then whatever it decided."""

        def handle(data: bytes) -> bytes | None:
            out = handler(data)
            if self.dataplane is not None and self.dataplane.has_effects:
                self._follow_up()
            return out

        return handle

    # -- queries ----------------------------------------------------------------------

    def flows(self) -> list[dict[str, Any]]:
        """The socket table, as ``dime status`` shows it."""
        if self.dataplane is None:
            return []
        return [
            {
                "proto": "tcp" if e.key.proto == TCP else "udp",
                "local": endpoint(e.key.local, e.key.lport),
                "remote": endpoint(e.key.remote, e.key.rport),
                "hid": e.hid,
                "via": str(self.dataplane.via_of(e)),
                "to": str(self.dataplane.remote_of(e)),
                "rule": e.rule,
                # Carried across IP versions (via and to are of the other version).
                "across": self.dataplane.cross_of(e) is not None,
            }
            for e in self.dataplane.sockets
        ]

    def policy_json(self) -> list[dict[str, Any]]:
        """The locator policy's rules, as the config file writes them."""
        return [r.to_json() for r in self.dataplane.policy.rules] if self.dataplane else []

    def flow_keys(self) -> list[FlowKey]:
        return [e.key for e in self.dataplane.sockets] if self.dataplane is not None else []

    def carries_flows(self, hid: int) -> bool:
        """Whether host ``hid`` has flows in the socket table (IHMP never evicts it)."""
        return self.dataplane is not None and self.dataplane.sockets.has_flows(hid)

    def _carrier_counters(self) -> dict[str, int]:
        carrier = self.path.carrier if self.path else None
        return {
            "path_mtu_prompts": carrier.mtu_prompts if carrier else 0,
            "path_mtu_errors_heard": carrier.mtu_heard_count if carrier else 0,
            "icmp_errors_carried": carrier.errors_passed if carrier else 0,
            "packets_carried_lost": carrier.failed if carrier else 0,
            # How carried packets went in: whole through a packet socket (the kernel
            # cuts and sums them), or through a raw socket (cut and summed by us).
            "packets_carried_whole": carrier.whole if carrier else 0,
            "packets_carried_raw": carrier.sent - carrier.whole if carrier else 0,
        }

    def counters(self) -> dict[str, int]:
        return {
            "packets_translated_in_user_space": self.path.translated if self.path else 0,
            "packets_queued": sum(q.packets for q in self.queues),
            "tcp_flows_prompted": sum(self.prompts.values()),
            "tcp_retransmits_prompted": self.prompts[Remedy.RETRANSMIT],
            "tcp_acks_prompted": self.prompts[Remedy.REACK],
            "packets_carried_across": self.path.carried if self.path else 0,
            "packets_not_carried": self.path.not_carried if self.path else 0,
            **self._carrier_counters(),
            "knocks_sent": self.knocker.sent,
            "knocks_received": self.path.knocks if self.path else 0,
            "flows_seen_before_knocks": self.dataplane.aliases_dropped if self.dataplane else 0,
            **self._notice_counters(),
            "flow_deaths_heard": self.deaths.events if self.deaths else 0,
            "flow_deaths_lost": self.deaths.lost if self.deaths else 0,
            "flow_deaths_malformed": self.deaths.malformed if self.deaths else 0,
            "flows_ended_by_events": self.ended_by_events,
            "flows_ended_after_sweeps": self.ended_after_sweeps,
            "full_sweeps": self.full_sweeps,
            "flows_learned_by_kernel": self.dataplane.learned_by_kernel if self.dataplane else 0,
            "flows_moved_to_route": self.dataplane.route_moves if self.dataplane else 0,
        }

    def _notice_counters(self) -> dict[str, int]:
        """Flow notices (nft mode): received and lost in all, and of them those of
        flows the kernel held (batched), with the reads that brought these."""
        groups = [n for n in (self.notices, self.held_notices) if n is not None]
        held = self.held_notices
        return {
            "flow_notices": sum(n.received for n in groups),
            "flow_notices_lost": sum(n.overflows for n in groups),
            "flow_notices_batched": held.received if held else 0,
            "flow_notices_batched_lost": held.overflows if held else 0,
            "flow_notice_batches": held.reads if held else 0,
        }

    def _notices_lost(self) -> None:
        """The kernel dropped flow notices (we fell behind): the flows it learned
        meanwhile are translated all the same, but missing from the socket table
        (no sweep, no prompts) and a new host may not have been greeted. Take them
        from the kernel's sockets, as at start-up; one pass at a time."""
        log.warning("flow notices were lost (the daemon fell behind): adopting from sockets")
        if self._adopt_task is None or self._adopt_task.done():
            self._adopt_task = asyncio.get_running_loop().create_task(self._adopt())

    async def _adopt(self) -> None:
        existing = self.kernel_flows.existing
        if existing is None or self.dataplane is None:
            return
        try:
            flows = await asyncio.to_thread(existing)
        except Exception:
            log.exception("listing sockets failed")
            return
        if self.dataplane is not None:
            log.info("adopted %d flows", self.dataplane.adopt(flows, self.clock()))
            self._follow_up()

    # -- effects ----------------------------------------------------------------------

    def _follow_up(self) -> None:
        """Carry out what the Dataplane decided: asynchronously, never in its way."""
        assert self.dataplane is not None
        if self.dataplane.bindings_changed:
            self._record()  # a successor must know each flow's NAT port
        effects = self.dataplane.take_effects()
        if effects.reconcile:
            self.schedule_reconcile()
        if effects.moved:
            self._prompt_soon(effects.moved, effects.lost)
        if effects.moves:
            self._ask_moves(effects.moves)
        tcp = [e for e in effects.failed if e.key.proto == TCP]
        if tcp:
            # The nft reject path answers the next packet; destroying the TCP sockets
            # now means even an idle application learns it at once.
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(asyncio.get_running_loop().create_task(destroy_sockets(tcp)))

    def schedule_reconcile(self) -> None:
        """Coalesce ghost/route reconciliation into one task at a time."""
        if self._reconcile_pending:
            return
        self._reconcile_pending = True
        self._reconcile_task = asyncio.get_running_loop().create_task(self._reconcile())

    async def settle(self) -> None:
        """Wait until pending ghost/route changes are in the kernel."""
        while self._reconcile_task is not None and not self._reconcile_task.done():
            await asyncio.gather(self._reconcile_task, return_exceptions=True)

    async def _reconcile(self) -> None:
        await asyncio.sleep(0)
        self._reconcile_pending = False
        if self.dataplane is None:
            return
        want = self.dataplane.ghosts_needed()
        kernel = self.kernel if self.kernel is not None and self.kernel.installed else None
        if kernel is not None:
            # The ARP rules know a ghost before it is on lo: no packet from it may
            # make the kernel name it in an ARP request (nft.GHOST_ARP).
            senders = await self.ghosts.link_senders(want | self.ghosts.addresses)
            kernel.set_ghosts(want | self.ghosts.addresses, dict(senders))
        await self.ghosts.reconcile(want, self.dataplane.translated_remotes())
        if kernel is not None:
            kernel.set_ghosts(self.ghosts.addresses, dict(senders))

    def prompt_stalled(self, hid: int) -> None:
        """Make the TCP flows of ``hid`` whose timers backed off send now (those that
        did not, nothing)."""
        self._prompt_soon({hid}, set())

    def _prompt_soon(self, hids: set[int], lost: set[int]) -> None:
        if self.kernel_flows.prompt is None:
            return
        self._stalled_hids |= hids
        self._lost_hids |= lost
        if self._prompt_task is None or self._prompt_task.done():
            self._prompt_task = asyncio.get_running_loop().create_task(self._prompt_stalled())

    async def _prompt_stalled(self) -> None:
        """TCP flows of hosts whose path changed send now, not when their (backed-off)
        timer says; where the peer's old locator is gone, they retransmit what was in
        flight and acknowledge again (:mod:`stacktrans.rto_revert`)."""
        prompt_flows = self.kernel_flows.prompt
        assert prompt_flows is not None
        await asyncio.sleep(0)  # the rest of this burst of table changes first
        while self._stalled_hids and self.dataplane is not None:
            hids, self._stalled_hids = self._stalled_hids, set()
            lost, self._lost_hids = self._lost_hids, set()
            if self.kernel is not None:
                self.kernel.flush()  # the new locators must be in the kernel first
            flows = [
                FlowSeq(e.key, e.isn, e.peer_isn, peer_lost=hid in lost)
                for hid in hids
                for e in self.dataplane.sockets.flows_of(hid)
                # A flow with a locator of its own at either end (a move, the
                # policy, the route) did not change path with its host: not prompted.
                if e.key.proto == TCP and e.isn is not None and e.pinned is None and e.via is None
            ]
            # ... and the ghosts on lo: a prompt is addressed to the flow's local
            # identifier, which must be local again, or it would leave the host.
            # (Where every identifier is still a local address, as on the side that
            # did not move, waiting for the reconciliation would only delay it.)
            if any(f.key.local not in self.dataplane.local_addresses for f in flows):
                await self.settle()
            log.debug("path changed for HIDs %s: %d TCP flows with a known ISN", hids, len(flows))
            if not flows:
                continue
            try:
                done = await asyncio.to_thread(prompt_flows, flows)
            except Exception:
                log.exception("prompting TCP flows failed")
                continue
            self.prompts.update(done)
            if done:
                log.info("%d stalled TCP flows prompted to send", sum(done.values()))

    # -- flows ------------------------------------------------------------------------

    async def _sweeper(self) -> None:
        """The full liveness sweep: every socket (and conntrack entry) listed. Where
        the kernel announces flow deaths it is a rare safety net (and runs twice at
        once when events were lost); elsewhere the only way flows end."""
        alive_flows = self.kernel_flows.alive
        assert alive_flows is not None
        delay = self._sweep_period()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), delay)
            self._sweep_now.clear()
            taken_at = self.clock()
            started = time.monotonic()
            try:
                # conntrack only where it times UDP flows out: in nfqueue mode the
                # daemon does (and listing 100k conntrack entries costs seconds).
                alive = await asyncio.to_thread(alive_flows, self.mode is DataplaneMode.NFT)
            except Exception:
                log.exception("listing live flows failed")
                continue
            finally:
                self.full_sweeps += 1
                cost = time.monotonic() - started
                if self._sweeps_owed > 0 and taken_at >= self._owed_since:
                    self._sweeps_owed -= 1
                    period = self.config.sweep_interval if self._sweeps_owed else None
                else:
                    period = None
                delay = sweep_delay(period or self._sweep_period(), cost)
            self._swept(alive, taken_at)

    def _swept(self, alive: Container[FlowKey], taken_at: float) -> None:
        """Apply a full sweep's snapshot (begun at ``taken_at``) to the table.

        Flows it lacked for the first time become suspects, looked up one by one
        soon (a cost per flow), where deaths are announced: the next full sweep,
        whose second miss would drop them, is minutes away there, and a flow whose
        destroy event was lost would stay in the table and the kernel's sets until
        then."""
        if self.dataplane is None:
            return
        # In nfqueue mode every packet refreshes last_seen: idle UDP times out.
        idle = self.config.udp_idle if self.mode is DataplaneMode.NFQUEUE else None
        gone = self.dataplane.sweep(alive, self.clock(), idle, taken_at)
        if gone:
            why = getattr(alive, "why_missing", lambda key: "gone")
            shown = ", ".join(f"{e.key} ({why(e.key)})" for e in gone[:4])
            more = f" and {len(gone) - 4} more" if len(gone) > 4 else ""
            log.info("%d flows ended: %s%s", len(gone), shown, more)
        if self.deaths is not None and (missing := self.dataplane.missing_once):
            self.suspects.add(missing, self.clock())
            self._suspected.set()
        self._follow_up()

    def _sweep_period(self) -> float:
        """``safety_sweep`` where every death is announced, else ``sweep_interval``."""
        if self._deaths_complete():
            return max(self.config.safety_sweep, self.config.sweep_interval)
        return self.config.sweep_interval

    def _deaths_complete(self) -> bool:
        """Whether the kernel announces every end the sweep would find: sockets, and
        in nft mode the conntrack entries that time UDP flows out."""
        if self.deaths is None:
            return False
        return self.mode is not DataplaneMode.NFT or self.deaths.conntrack_events

    def _watch_deaths(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.kernel_flows.check is None:
            return
        deaths = DeathWatch(
            self._death_heard, self._deaths_lost, conntrack=self.mode is DataplaneMode.NFT
        )
        try:
            deaths.start(loop)
        except OSError as exc:
            log.info("no sock_diag destroy events (%s): sweeping every %g s", exc,
                     self.config.sweep_interval)  # fmt: skip
            return
        self.deaths = deaths

    def _death_heard(self, death: Death) -> None:
        """A socket or conntrack entry ended: the flows it may have carried become
        suspects, looked up soon (:meth:`_death_checker`)."""
        if self.dataplane is None:
            return
        if death.connected:
            keys = [death.key()]
            if death.conntrack:  # the tuple as the packet went: either end may be ours
                keys.append(FlowKey(UDP, death.remote, death.rport, death.local, death.lport))
            # Whether it is a flow of ours is asked when the batch is taken: the notice
            # of a short flow's first packet may come after its socket's end.
            self.suspects.add(keys, self.clock(), conntrack=death.conntrack)
            self._suspected.set()
        elif death.proto == UDP or not death.remote.is_unspecified:
            # An unconnected UDP socket served every flow on its port (its address or
            # the wildcard); a reset TCP socket has lost its remote port. Which flows
            # those were takes a walk of the table: one per batch (_death_checker).
            self._port_deaths.append(death)
            self._suspected.set()
        # else a TCP listener: its connections have sockets of their own

    def _port_suspects(self) -> None:
        """The flows of the deaths that named no flow, made suspects (one table walk)."""
        deaths, self._port_deaths = self._port_deaths, []
        if not deaths or self.dataplane is None:
            return
        keys = [
            k
            for k in self.dataplane.flows_on({(d.proto, d.lport) for d in deaths})
            if any(_on(d, k) for d in deaths)
        ]
        self.suspects.add(keys, self.clock())

    def _deaths_lost(self) -> None:
        """The kernel dropped destroy events: the flows they named are found by two
        full sweeps (a flow goes on its second miss), starting now."""
        log.warning("flow destroy events were lost (the daemon fell behind): sweeping")
        self._owe_sweeps()

    def _owe_sweeps(self) -> None:
        """Two full sweeps from now: only sweeps that start after this count (one
        running now may have listed the kernel's flows before the loss)."""
        self._sweeps_owed = 2
        self._owed_since = self.clock()
        self._sweep_now.set()

    async def _death_checker(self) -> None:
        check = self.kernel_flows.check
        assert check is not None
        while True:
            due = self.suspects.next_due()
            wait = None if due is None else max(0.0, due - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._suspected.wait(), wait)
            self._suspected.clear()
            await asyncio.sleep(DEATH_BATCH_S)
            try:
                await self._check_suspects(check)
            except Exception:  # the sweeps stand in for the events until the next
                log.exception("checking ended flows failed: sweeping")
                self._owe_sweeps()

    async def _check_suspects(self, check: Callable[[list[FlowKey]], Any]) -> None:
        """Look up the suspects that are due; drop the flows that ended."""
        self._port_suspects()
        taken = self.suspects.take(self.clock())
        if self.dataplane is not None:
            taken = {k: ct for k, ct in taken.items() if self.dataplane.tracks(k)}
        if not taken:
            return
        taken_at = self.clock()
        fates = await asyncio.to_thread(check, list(taken))
        ended = self.suspects.settle(taken, fates, self.clock())
        if self.dataplane is not None and ended:
            self._flows_ended(ended, taken_at)

    def _flows_ended(self, ended: dict[FlowKey, float | None], taken_at: float) -> None:
        """Drop the flows lookups found ended; counted as the events' ends, or as a
        sweep's where a full sweep had missed them (:meth:`_swept`)."""
        assert self.dataplane is not None
        # A flow conntrack forgot and the kernel learned again since (a notice:
        # last_seen) is alive: its new entry reports no "new" packet twice.
        keys = [
            k
            for k, ct_at in ended.items()
            if ct_at is None or (e := self.dataplane.sockets.get(k)) is None or e.last_seen <= ct_at
        ]
        missed = {k for k in keys if k in self.dataplane.missing_once}  # before they go
        gone = self.dataplane.flows_ended(keys, taken_at)
        after_sweep = sum(e.key in missed for e in gone)
        self.ended_after_sweeps += after_sweep
        self.ended_by_events += len(gone) - after_sweep
        if gone:
            shown = ", ".join(str(e.key) for e in gone[:4])
            more = f" and {len(gone) - 4} more" if len(gone) > 4 else ""
            log.info("%d flows ended (destroy events): %s%s", len(gone), shown, more)
        self._follow_up()

    async def _idle_expirer(self) -> None:
        """nfqueue mode with destroy events: UDP flows idle past ``udp_idle`` end
        without waiting for the rare full sweep (a walk of the table, no listing)."""
        while True:
            await asyncio.sleep(self.config.udp_idle / 4)
            if self.dataplane is not None and self.dataplane.expire_idle(
                self.clock(), self.config.udp_idle
            ):
                self._follow_up()


def _spec(key: FlowKey) -> FlowSpec:
    return FlowSpec(key.proto, key.local, key.lport, key.remote, key.rport)


def _key(flow: FlowSpec) -> FlowKey:
    """The flow as our socket sees it, from IHMP's name for it (ours, not the peer's)."""
    return FlowKey(flow.proto, flow.local, flow.lport, flow.remote, flow.rport)


def _on(death: Death, key: FlowKey) -> bool:
    """Whether ``death`` (a socket that named no flow) may have carried ``key``."""
    if (key.proto, key.lport) != (death.proto, death.lport):
        return False
    if not death.local.is_unspecified and key.local != death.local:
        return False
    return death.remote.is_unspecified or key.remote == death.remote


def previous_run(directory: Path) -> Residue | None:
    """The record a run that did not stop cleanly left in ``directory``, if any."""
    return Record(directory).load()


async def clean_leftovers(directory: Path) -> bool:
    """Remove what a dead run recorded in ``directory`` left in the kernel (``dime
    down`` with no daemon, or a start after a crash). Returns whether there was any."""
    return await residue.clean_leftovers(Record(directory))


async def destroy_sockets(flows: list[SocketEntry]) -> None:
    """Close TCP sockets with sock_diag's SOCK_DESTROY (``ss -K``), one call per 50."""
    for i in range(0, len(flows), 50):
        terms = [
            f"( src {_ss_addr(e.key.local)} and sport = :{e.key.lport} "
            f"and dst {_ss_addr(e.key.remote)} and dport = :{e.key.rport} )"
            for e in flows[i : i + 50]
        ]
        proc = await asyncio.create_subprocess_exec(
            "ss",
            "-K",
            "-t",
            " or ".join(terms),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await proc.wait()


def _ss_addr(addr: IPAddress) -> str:
    return f"[{addr}]" if addr.version == 6 else str(addr)
