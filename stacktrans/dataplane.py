"""StackTrans' state: the socket table, each host's translation, and the kernel maps.

The :class:`Dataplane` is StackTrans' core, in the same sans-I/O spirit as the IHMP
engine: no event loop, no clock, no sockets. Its inputs are

* :meth:`Dataplane.host_changed`: a change of IHMP's HID table (an
  :class:`~ihmp.hosts.HostChanged` event). **This is where "a peer moved" reaches the
  kernel**: the host's new :class:`~stacktrans.translation.HidTranslation` is
  computed and applied to the kernel maps in one update, whatever the number of
  flows;
* :meth:`flow_seen` (the first packet of a flow, or adoption at start-up), which asks
  IHMP for the flow's HID through the injected ``hid_for``;
* :meth:`set_local_addresses`, :meth:`sweep` (flows that ended);

and its outputs are the calls it makes on :class:`KernelMaps` (nft maps: a
synchronous library call, injected so tests can record it) and the
:class:`Effects` that something asynchronous must follow up on (ghost addresses and
routes, stalled TCP flows to prompt, sockets to fail), drained with
:meth:`take_effects`. Its view of the remote hosts is built only from the
HostChanged events it is given: it never reads IHMP's table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any, Protocol

from ihmp.addr import IPAddress, usable
from ihmp.flows import FlowSpec
from ihmp.hosts import ChangeKind, FlowOrigin, HostChanged, HostSnapshot
from stacktrans.policy import Policy, Rule, rank
from stacktrans.socket_table import TCP, UDP, FlowKey, SocketEntry, SocketTable
from stacktrans.translation import HidTranslation, compute

log = logging.getLogger("dime.stacktrans")

#: ``hid_for(remote, local, now, origin)``: the HID of the host a new flow local ->
#: remote goes to (IHMP creates it, and says HELLO if it is new and the flow ours),
#: or None to leave the flow alone. ``origin``: whose first packet it was, or
#: adopted (the flow existed before this run, a restart: an address its host
#: withdrew still names that host). :meth:`ihmp.engine.IhmpEngine.flow_started` is
#: the real one.
HidFor = Callable[[IPAddress, IPAddress, float, FlowOrigin], "int | None"]


class KernelMaps(Protocol):
    """What the Dataplane needs from the kernel: :class:`~stacktrans.nft.NftTable`.

    A protocol so tests can record the calls, and mypy checks the recorder.
    """

    def add_flows(self, entries: Iterable[SocketEntry]) -> None: ...
    def remove_flows(self, entries: Iterable[SocketEntry]) -> None: ...
    def kill_flows(self, entries: Iterable[SocketEntry]) -> None: ...
    def forget_dead(self, entries: Iterable[SocketEntry]) -> None: ...
    def update_hid(self, new: HidTranslation | None, hid: int) -> None: ...
    def set_wire(self, entry: SocketEntry, old: tuple[IPAddress, int] | None) -> None:
        """``entry.wire`` changed from ``old`` (its per-flow NAT elements)."""

    def set_via(self, entry: SocketEntry, old: IPAddress | None) -> None:
        """``entry.via`` changed from ``old`` (its per-flow source locator)."""

    def set_cross(
        self,
        pairs: Iterable[tuple[IPAddress, IPAddress]],
        inbound: Iterable[tuple[int, FlowKey, IPAddress]],
        old_pairs: Iterable[tuple[IPAddress, IPAddress]],
        old_inbound: Iterable[tuple[int, FlowKey, IPAddress]],
    ) -> None:
        """The flows carried across IP versions (see :class:`~stacktrans.nft.NftTable`)."""

    def flush(self) -> None:
        """Apply deferred element updates now."""


@dataclass
class Effects:
    """What the Dataplane decided that must happen outside it, asynchronously."""

    #: Ghost addresses or identifier routes may have to change (:mod:`stacktrans.ghosts`).
    reconcile: bool = False
    #: Hosts whose locators changed: their stalled TCP flows may send now
    #: (:mod:`stacktrans.rto_revert`).
    moved: set[int] = field(default_factory=set)
    #: Of those, hosts whose old locator is gone: what we sent there was lost, so
    #: their flows retransmit and acknowledge again at once.
    lost: set[int] = field(default_factory=set)
    #: Flows of hosts that are gone: their sockets must fail now.
    failed: list[SocketEntry] = field(default_factory=list)
    #: Flows to move to another local locator of ours: the peer must be asked
    #: (FLOW_MOVE, :meth:`Dataplane.move_started` then :meth:`Dataplane.move_done`).
    moves: dict[FlowKey, IPAddress] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.reconcile or bool(self.moved) or bool(self.failed) or bool(self.moves)


class Dataplane:
    def __init__(self, kernel: KernelMaps, hid_for: HidFor) -> None:
        self.kernel = kernel
        self.sockets = SocketTable()
        self.local_addresses: set[IPAddress] = set()
        self._hid_for = hid_for
        self._hosts: dict[int, HostSnapshot] = {}
        self._by_locator: dict[IPAddress, int] = {}
        self._translations: dict[int, HidTranslation] = {}
        self._dead: dict[FlowKey, SocketEntry] = {}
        self._missing: set[FlowKey] = set()  # flows the last sweep's snapshot lacked
        #: HIDs that may have flows bound to a NAT's port (entry.wire): only theirs are
        #: walked by _refresh, which runs for every new flow (a walk of 100k flows
        #: each made learning 100k flows quadratic: minutes).
        self._maybe_wired: set[int] = set()
        #: A flow's NAT port changed since the service last recorded them (bindings()).
        self.bindings_changed = False
        #: Flows whose elements the kernel learned itself (none added by us).
        self.learned_by_kernel = 0
        #: Flows a NAT's port named before their knock came, dropped for the knocking
        #: flow (:meth:`_drop_alias`).
        self.aliases_dropped = 0
        self._effects = Effects()
        #: The locator policy (:mod:`stacktrans.policy`), and each local address's
        #: interface name, which its rules name.
        self.policy = Policy()
        self.interfaces: dict[IPAddress, str] = {}
        self._manual: dict[FlowKey, IPAddress] = {}  # `dime move`: the user's choice
        self._moving: dict[FlowKey, IPAddress] = {}  # asked of the peer, not yet ACKed
        self._ever_steered = False  # some flow had a locator of its own
        #: The kernel's preferred source towards each peer locator that has a choice
        #: (config ``follow_routes``; :meth:`set_preferred`): flows without a rule
        #: follow it, make-before-break.
        self.preferred: dict[IPAddress, IPAddress] = {}
        #: Moves asked because the route changed (not a rule, not the user), and the
        #: flows whose wanted move (if asked) is one.
        self.route_moves = 0
        self._routed_moves: set[FlowKey] = set()
        #: Per HID carrying flows across IP versions: what the kernel was told
        #: (:meth:`KernelMaps.set_cross`): the pairs, and (HID, flow, locator) inbound.
        self._cross: dict[int, tuple[set[tuple[IPAddress, IPAddress]], set[Any]]] = {}

    # -- outputs ----------------------------------------------------------------------

    def take_effects(self) -> Effects:
        """What must be followed up since the last call; the record is emptied."""
        effects, self._effects = self._effects, Effects()
        return effects

    @property
    def has_effects(self) -> bool:
        return bool(self._effects)

    # -- queries ----------------------------------------------------------------------

    def translation(self, hid: int) -> HidTranslation | None:
        return self._translations.get(hid)

    def host_of(self, locator: IPAddress) -> int | None:
        """The HID whose host's packets may come from ``locator``, if any."""
        return self._by_locator.get(locator)

    def ghosts_needed(self) -> set[IPAddress]:
        """Local identifiers in use that this host no longer has: keep them on ``lo``."""
        return {a for a in self.sockets.local_identifiers() if a not in self.local_addresses}

    def translated_remotes(self) -> dict[IPAddress, IPAddress]:
        """Remote identifier -> locator, for every identifier rewritten now."""
        out: dict[IPAddress, IPAddress] = {}
        for tr in self._translations.values():
            out.update(tr.remote)
            # A flow carried across IP versions needs a route of its own version to
            # reach the hook that queues it: the locator's link will do.
            out.update({rid: rloc for (_, rid), (_, rloc) in tr.cross.items()})
        return out

    # -- inputs: IHMP -------------------------------------------------------------------

    def host_changed(self, change: HostChanged) -> None:
        """IHMP changed a host: bring its translation, in the kernel too, up to date."""
        if change.kind is ChangeKind.REMOVED:
            self._host_gone(change.hid)
            return
        assert change.after is not None
        self._learn(change.after)
        self._unbind_stale(change.hid)
        self._refresh(change.hid)
        if self._steering:
            self._steer(self.sockets.flows_of(change.hid))

    def _learn(self, host: HostSnapshot) -> None:
        self._forget(host.hid)
        self._hosts[host.hid] = host
        for addr in host.sources():
            self._by_locator[addr] = host.hid

    def _forget(self, hid: int) -> None:
        host = self._hosts.pop(hid, None)
        for addr in host.sources() if host else ():
            if self._by_locator.get(addr) == hid:
                del self._by_locator[addr]

    # -- inputs: flows ----------------------------------------------------------------

    def flow_seen(
        self,
        key: FlowKey,
        now: float,
        origin: FlowOrigin = FlowOrigin.OUTBOUND,
        in_kernel: bool = False,
    ) -> SocketEntry | None:
        """The first packet of ``key`` (``origin``: its direction, or adopted: the
        flow existed before this run, see ``HidFor``): record it, and its HID.

        ``in_kernel``: the kernel says it holds the flow's elements already (it
        learned the flow, :mod:`stacktrans.nft`). They are not added again when the
        kernel learned them for the same HID: a host known before, for which the
        pair is learnable (what we put in the kernel's ``learn`` map); else they
        are, as for any flow.

        Returns the flow's entry, or None for traffic dime leaves alone. Never
        waits for IHMP: a new host only *prompts* a HELLO.
        """
        entry = self.sockets.get(key)
        if entry is not None:
            entry.last_seen = now
            return entry
        if key in self._dead:
            return None  # its host is gone: the kernel rejects it, nothing brings it back
        if not (usable(key.remote) and usable(key.local)) or key.remote == key.local:
            return None
        if key.remote in self.local_addresses or self.sockets.is_local_identifier(key.remote):
            return None  # to this host itself (our own prompts, say): nothing to translate
        # Whom the kernel could have learned it for: a host known before this flow
        # (IHMP may create one now, and tell us at once).
        known = self._by_locator.get(key.remote) if in_kernel else None
        hid = self._hid_for(key.remote, key.local, now, origin)
        if hid is None:
            return None
        # A flow between addresses another flow of the host already uses changes
        # nothing of its translation (a new flow has no NAT port yet): no refresh,
        # which walks the host's flows (a server's thousands, at each new one).
        new_pair = not self.sockets.has_pair(hid, key.local, key.remote)
        entry = self.sockets.add(key, hid, now)
        if entry is None:
            log.warning("flow %s collides with another flow of HID %d; not translated", key, hid)
            return None
        log.debug("flow %s -> HID %d", key, hid)
        if known == hid and self._learnable(hid, key):
            self.learned_by_kernel += 1
        else:
            self.kernel.add_flows([entry])
        # A host IHMP created just now is not known here until its HostChanged event
        # comes: until then its flows are identities, nothing to rewrite.
        if new_pair:
            self._refresh(hid)
        tr, host = self._translations.get(hid), self._hosts.get(hid)
        if tr is not None and (key.local, key.remote) in tr.cross:
            self._sync_cross(hid, tr)  # (its pair was carried across already)
        if tr is not None and host is not None:
            rewritten = tr.outbound(key.local, key.remote) != (None, None)
            if rewritten or key.remote not in host.active:
                self.kernel.flush()  # its packets need rewriting from the start
        if self.policy.rules:
            self._steer([entry])
        return entry

    def _learnable(self, hid: int, key: FlowKey) -> bool:
        tr = self._translations.get(hid)
        return tr is not None and (key.local, key.remote) in tr.learnable

    def adopt(self, keys: Iterable[FlowKey], now: float) -> int:
        """Take over flows that existed before we started. Returns how many."""
        adopted = FlowOrigin.ADOPTED
        return sum(1 for key in keys if self.flow_seen(key, now, adopted) is not None)

    def sweep(
        self,
        alive: Container[FlowKey],
        now: float,
        udp_idle: float | None = None,
        taken_at: float | None = None,
    ) -> list[SocketEntry]:
        """Drop flows whose socket is gone (``alive`` holds those that still exist),
        and UDP flows idle for more than ``udp_idle`` seconds (when the caller sees
        every packet, so that ``last_seen`` means something).

        A flow goes only when two sweeps in a row found it missing: one snapshot
        once lacked a busy UDP flow (under a parallel test suite; the kernel walks
        tables shared by every namespace, resuming at a position, and can skip a
        live entry while others churn). Two misses a sweep interval apart are a
        flow that really ended.

        ``taken_at`` is when the snapshot ``alive`` began. Flows first seen since
        then are kept whatever it says: a snapshot of 100k sockets takes seconds,
        and a flow born meanwhile may be missing from it. Dropping such a flow
        would be for good in ``nft`` mode, whose packets are no longer "new".
        """
        missing = {
            e.key
            for e in self.sockets
            if (taken_at is None or e.created < taken_at) and e.key not in alive
        }
        gone = [
            e
            for e in self.sockets
            if (e.key in missing and e.key in self._missing)
            or (
                udp_idle is not None
                and e.key.proto == UDP
                and (taken_at is None or e.created < taken_at)
                and now - e.last_seen > udp_idle
            )
        ]
        self._missing = missing - {e.key for e in gone}
        self._remove_flows(gone)
        dead_gone = [e for k, e in self._dead.items() if k not in alive]
        if dead_gone:
            self.kernel.forget_dead(dead_gone)
            for e in dead_gone:
                del self._dead[e.key]
        return gone

    @property
    def missing_once(self) -> AbstractSet[FlowKey]:
        """Flows the last sweep's snapshot lacked for the first time: the next sweep
        drops those it lacks too. The table's own set, not a copy: read it at once."""
        return self._missing

    def tracks(self, key: FlowKey) -> bool:
        """Whether ``key`` is a flow of the socket table, or of a host that is gone
        (rejected by the kernel until its socket ends)."""
        return key in self._dead or self.sockets.get(key) is not None

    def flows_on(self, ports: Container[tuple[int, int]]) -> list[FlowKey]:
        """Flows tracked whose (protocol, local port) is in ``ports``. Walks the whole
        table: for the rarer ends that do not name a flow (an unconnected UDP
        socket, a TCP socket reset), gathered into one walk."""
        return [
            k
            for k in [e.key for e in self.sockets] + list(self._dead)
            if (k.proto, k.lport) in ports
        ]

    def flows_ended(self, keys: Iterable[FlowKey], taken_at: float) -> list[SocketEntry]:
        """The kernel said these flows ended (an event, then a lookup begun at
        ``taken_at``): drop them now, but not a flow first seen since ``taken_at``
        (a new socket of the same key, see :meth:`sweep`). Returns the dropped."""
        keys = set(keys)
        gone = [e for k in keys if (e := self.sockets.get(k)) is not None and e.created < taken_at]
        self._missing -= {e.key for e in gone}
        self._remove_flows(gone)
        dead_gone = [self._dead.pop(k) for k in keys if k in self._dead]
        if dead_gone:
            self.kernel.forget_dead(dead_gone)
        return gone

    def expire_idle(self, now: float, udp_idle: float) -> list[SocketEntry]:
        """Drop UDP flows silent for more than ``udp_idle`` seconds (when the caller
        sees every packet, so that ``last_seen`` means something)."""
        gone = [e for e in self.sockets if e.key.proto == UDP and now - e.last_seen > udp_idle]
        self._remove_flows(gone)
        return gone

    def _remove_flows(self, entries: list[SocketEntry]) -> None:
        if not entries:
            return
        for e in entries:
            self.sockets.remove(e.key)
            self._manual.pop(e.key, None)
            self._moving.pop(e.key, None)
            self._routed_moves.discard(e.key)
        self.kernel.remove_flows(entries)
        for hid in {e.hid for e in entries}:
            self._refresh(hid)
        self._effects.reconcile = True

    # -- inputs: this host's addresses ----------------------------------------------------

    def set_local_addresses(self, addrs: Iterable[IPAddress]) -> None:
        self.local_addresses = set(addrs)
        for hid in list(self._translations):
            self._refresh(hid)
        self._effects.reconcile = True
        if self._steering:
            self._steer(self.sockets)

    def local_added(self, addr: IPAddress) -> None:
        self.set_local_addresses(self.local_addresses | {addr})

    def local_removed(self, addr: IPAddress) -> None:
        self.set_local_addresses(self.local_addresses - {addr})

    # -- translations --------------------------------------------------------------------

    def _refresh(self, hid: int) -> None:
        """Recompute ``hid``'s translation; apply a change to the kernel in one batch."""
        host = self._hosts.get(hid)
        if host is None:
            return
        # A flow bound to a NAT's port is sent there: our locator for it is looked up
        # by the address it goes to (the kernel rewrites the destination first).
        wired: set[tuple[IPAddress, IPAddress]] = set()
        if hid in self._maybe_wired:
            wired = {(e.key.local, e.wire[0]) for e in self.sockets.flows_of(hid) if e.wire}
            if not wired:
                self._maybe_wired.discard(hid)
        new = compute(host, self.sockets.pairs_of(hid) | wired, self.local_addresses)
        old = self._translations.get(hid)
        self._sync_cross(hid, new)
        if new == old:
            return
        self._translations[hid] = new
        self.kernel.update_hid(new, hid)
        if old is None or (old.remote, old.local, old.cross) != (new.remote, new.local, new.cross):
            log.info(
                "HID %d: rewrite remote %s local %s",
                hid,
                {str(k): str(v) for k, v in new.remote.items()},
                {f"{k[0]}>{k[1]}": str(v) for k, v in new.local.items()},
            )
            self._effects.reconcile = True
            if old is not None:
                self._effects.moved.add(hid)
                if _locator_lost(old, new, host):
                    self._effects.lost.add(hid)

    # -- per-flow locators: the policy, `dime move`, the peer's FLOW_MOVE ---------------

    def set_policy(self, policy: Policy) -> None:
        """A new locator policy: every flow goes where it says (moves asked of peers)."""
        self.policy = policy
        self._steer(self.sockets)

    def set_preferred(self, preferred: dict[IPAddress, IPAddress]) -> None:
        """Peer locator -> the local address the kernel's routing now prefers towards
        it (only where this host has more than one address of its version). A flow
        without a policy rule or a user's move goes there once the peer has verified
        it: a new default route takes the flows along while the old link still works.
        Empty: flows stay on their address until it goes (a handoff moves them)."""
        if preferred != self.preferred:
            self.preferred = dict(preferred)
            if self._steering:
                self._steer(self.sockets)

    def remote_locators(self) -> set[IPAddress]:
        """The peer locators the flows go to now (what :meth:`set_preferred` keys)."""
        return {self.remote_of(e) for e in self.sockets}

    def set_interfaces(self, names: dict[IPAddress, str]) -> None:
        """Each local address's interface name (what policy rules and moves name)."""
        if names != self.interfaces:
            self.interfaces = dict(names)
            if self._steering:
                self._steer(self.sockets)

    def request_move(self, key: FlowKey, via: IPAddress) -> str | None:
        """``dime move``: the user wants ``key`` on our address ``via`` (until that
        address stops working; then its policy rule, if any, decides again). Returns
        why it cannot be, or None (then :attr:`Effects.moves` may hold the move)."""
        entry = self.sockets.get(key)
        if entry is None:
            return f"no flow {key}"
        host = self._hosts.get(entry.hid)
        if host is None or via not in host.local or via not in self.local_addresses:
            return f"the peer of {key} does not reach us at {via} (not verified)"
        if via.version != key.local.version:
            return f"{via} is not of the flow's IP version"
        self._manual[key] = via
        self._steer([entry])
        return None

    def is_at(self, key: FlowKey, via: IPAddress) -> bool:
        """Whether ``key`` uses our ``via`` now, both ways, with no move in flight."""
        entry = self.sockets.get(key)
        return entry is not None and key not in self._moving and self.via_of(entry) == via

    def via_of(self, entry: SocketEntry) -> IPAddress:
        """The local locator ``entry`` uses now: its own, or its host's for its
        identifier, or its identifier itself."""
        if entry.via is not None:
            return entry.via
        cross = self.cross_of(entry)
        if cross is not None:
            return cross[0]
        tr = self._translations.get(entry.hid)
        remote = entry.wire[0] if entry.wire is not None else entry.key.remote
        lloc = tr.local.get((entry.key.local, remote)) if tr is not None else None
        return lloc or entry.key.local

    def remote_of(self, entry: SocketEntry) -> IPAddress:
        """The peer's locator ``entry``'s packets go to now."""
        if entry.wire is not None:
            return entry.wire[0]
        cross = self.cross_of(entry)
        if cross is not None:
            return cross[1]
        tr = self._translations.get(entry.hid)
        return tr.remote.get(entry.key.remote, entry.key.remote) if tr else entry.key.remote

    def move_started(self, key: FlowKey, via: IPAddress) -> None:
        """The peer was asked to send ``key`` to our ``via`` (counted once asked: a
        move that cannot be asked, e.g. from behind a NAT, is wanted again later)."""
        self._moving[key] = via
        if key in self._routed_moves:
            self._routed_moves.discard(key)
            self.route_moves += 1

    def move_done(self, key: FlowKey, via: IPAddress) -> None:
        """The peer acknowledged that it sends ``key`` to our ``via``: so do we now."""
        if self._moving.get(key) == via:
            del self._moving[key]
        entry = self.sockets.get(key)
        if entry is None or via not in self.local_addresses:
            return
        self._set_via(entry, None if via == key.local else via)
        log.info("flow %s: now from %s", key, via)
        self._steer([entry])  # the policy may have changed meanwhile

    def move_failed(self, key: FlowKey) -> None:
        self._moving.pop(key, None)

    def pin(self, hid: int, flow: FlowSpec, at: IPAddress) -> SocketEntry | None:
        """The peer's FLOW_MOVE (verified by IHMP: ``at`` is an active address of
        ``hid``): send ``flow`` (as the peer's socket sees it) to ``at``; its own
        address (its identifier) is host-wide again. Returns the flow, or None if we
        have no such flow, or it is bound to a NAT's port (moved by knocks only)."""
        key = FlowKey(flow.proto, flow.remote, flow.rport, flow.local, flow.lport)
        entry = self.sockets.get(key)
        host = self._hosts.get(hid)
        if entry is None or entry.hid != hid or host is None or at not in host.active:
            return None
        if entry.bound_to is not None:
            return None
        entry.pinned = None if at == key.remote else at
        wire = (at, key.rport) if entry.pinned is not None else None
        if not self._rewire(entry, wire, None):
            return None
        self._refresh(hid)
        log.info("flow %s of HID %d: now to %s", key, hid, at)
        self.kernel.flush()
        return entry

    @property
    def _steering(self) -> bool:
        """Whether any flow may need steering (else no flow is walked for it)."""
        return bool(
            self.policy.rules
            or self._manual
            or self._moving
            or self._ever_steered
            or self.preferred
        )

    def _steer(self, entries: Iterable[SocketEntry]) -> None:
        """Put each flow where the user or the policy wants it. A flow whose own
        locator left this host falls back to its host's at once; a flow wanted
        elsewhere is a move to ask of the peer (:attr:`Effects.moves`)."""
        for e in entries:
            if e.via is not None and e.via not in self.local_addresses:
                self._set_via(e, None)
            self._routed_moves.discard(e.key)  # _target says again whose wish it is
            target = self._target(e)
            if target is None or self._moving.get(e.key) == target:
                continue
            if target == e.key.local and e.via is None:
                continue  # where it is
            if target == e.via:
                continue
            if e.via is None and target == self.via_of(e):
                continue  # its host's locator is that already (a handoff put it there)
            self._effects.moves[e.key] = target

    def _target(self, e: SocketEntry) -> IPAddress | None:
        """The local locator ``e`` should use, or None: no opinion (its host's)."""
        rule = self.policy.rule_for(e.key)
        placed = rule is not None and e.rule == rule.index
        # (A flow to a host without dime is placed by routing alone, at its start.)
        e.rule = rule.index if rule is not None else None
        host = self._hosts.get(e.hid)
        if host is None or not host.local:
            return None
        working = {a: self.interfaces.get(a, "") for a in host.local if a in self.local_addresses}
        manual = self._manual.get(e.key)
        if manual is not None:
            if manual in working:
                e.rule = None  # the user's choice, not a rule's
                return manual
            del self._manual[e.key]
        if rule is None:
            routed = self._routed(e, working)
            if routed is not None:
                return routed
            # No rule (any more): back to the host's locator, if the peer reaches
            # us at the flow's own address (else it stays: no way to say so).
            return e.key.local if e.via is not None and e.key.local in working else None
        return _placed(rule, working, e, self.via_of(e) if placed else None)

    def _routed(self, e: SocketEntry, working: dict[IPAddress, str]) -> IPAddress | None:
        """The kernel's preferred source towards ``e``'s peer locator, if the peer
        reaches us there and it is of the flow's IP version (a flow carried across
        versions is left to its host's translation); else None."""
        want = self.preferred.get(self.remote_of(e))
        if want is None or want not in working or want.version != e.key.local.version:
            return None
        if want != self.via_of(e):
            self._routed_moves.add(e.key)
        return want

    def _set_via(self, entry: SocketEntry, via: IPAddress | None) -> None:
        old, entry.via = entry.via, via
        if via is not None:
            self._ever_steered = True
        if old != via:
            self.kernel.set_via(entry, old)
            self.kernel.flush()

    # -- flows carried across IP versions ---------------------------------------------

    def _sync_cross(self, hid: int, tr: HidTranslation) -> None:
        """The kernel sends the packets of ``hid``'s flows that ``tr`` carries across IP
        versions to the daemon: outbound by their identifiers, inbound by their key on
        the wire (from the remote locator, in its version)."""
        old = self._cross.get(hid, (set(), set()))
        if not tr.cross and not old[0]:
            return
        pairs = set(tr.cross)
        inbound = {
            (hid, e.key, tr.cross[(e.key.local, e.key.remote)][1])
            for e in self.sockets.flows_of(hid)
            if (e.key.local, e.key.remote) in tr.cross
        }
        if (pairs, inbound) == old:
            return
        if pairs and not old[0]:
            log.info("HID %d: flows carried across IP versions: %s", hid, _pairs(tr.cross))
        self.kernel.set_cross(pairs, inbound, *old)
        self.kernel.flush()
        if pairs:
            self._cross[hid] = (pairs, inbound)
        else:
            self._cross.pop(hid, None)

    def cross_of(self, entry: SocketEntry) -> tuple[IPAddress, IPAddress] | None:
        """(local locator, remote locator) of the other IP version, if ``entry`` is
        carried across."""
        if entry.hid not in self._cross:  # (nearly every packet: one lookup)
            return None
        tr = self._translations.get(entry.hid)
        return tr.cross.get((entry.key.local, entry.key.remote)) if tr is not None else None

    def crossing(self, hid: int) -> bool:
        """Whether some flow of ``hid`` is carried across IP versions."""
        return hid in self._cross

    # -- hosts behind a NAT ----------------------------------------------------------

    def bind(self, hid: int, flow: FlowSpec, at: IPAddress, port: int) -> SocketEntry | None:
        """A knock (verified by IHMP) says: ``flow`` (as host ``hid``'s socket sees it)
        now comes from ``at``:``port``, a NAT in front of the host. Its packets go
        there from now on, and that port is mapped back to the flow's own. Returns
        the flow, or None if we have no such flow (or the port is another's)."""
        # Usually we know the flow by the peer's own identifier and port: one lookup
        # (a move knocks every flow). Else it started behind a NAT: by its port there.
        key = FlowKey(flow.proto, flow.remote, flow.rport, flow.local, flow.lport)
        entry = self.sockets.get(key)
        if entry is None or entry.hid != hid:
            entry = next(
                (
                    e
                    for e in self.sockets.flows_of(hid)
                    if e.key.proto == flow.proto
                    and e.key.lport == flow.rport
                    and (e.peer_port or e.key.rport) == flow.lport
                    and e.key.local == flow.remote
                ),
                None,
            )
        if entry is None:
            entry = self._started_behind(hid, flow)
        if entry is None:
            log.info("knock for %s of HID %d: no such flow", flow, hid)
            return None
        return entry if self._bind(entry, at, port) else None

    def _started_behind(self, hid: int, flow: FlowSpec) -> SocketEntry | None:
        """The flow a knock names, if it started behind a NAT that chose its port
        (we know it by the NAT's port, the knock by the host's own): the one flow of
        the host to that port of ours whose own port we have not learned. Two or
        more such flows cannot be told apart: none is bound."""
        host = self._hosts.get(hid)
        if host is None:
            return None
        found = [
            e
            for e in self.sockets.flows_of(hid)
            if e.key.proto == flow.proto
            and e.key.lport == flow.rport
            and e.key.local == flow.remote
            and e.peer_port is None
            and host.behind(e.key.remote) is not None  # named by a NAT's address
        ]
        if len(found) != 1:
            if found:
                log.info("knock for %s of HID %d: %d flows it may be", flow, hid, len(found))
            return None
        found[0].peer_port = flow.lport  # its own port behind the NAT, known now
        self.bindings_changed = True
        return found[0]

    def bind_port(self, hid: int, proto: int, peer_port: int, at: IPAddress, port: int) -> int:
        """An IHMP-aware NAT at ``at`` (verified by IHMP) says: host ``hid``'s flows
        from its port ``peer_port`` leave it from ``port``. Returns how many flows."""
        bound = 0
        for e in self.sockets.flows_of(hid):
            if e.key.proto != proto:
                continue
            if (e.key.remote, e.key.rport) == (at, port):
                e.peer_port = peer_port  # started behind this NAT: now we know its port
                self.bindings_changed = True
            elif (e.peer_port or e.key.rport) == peer_port:
                bound += self._bind(e, at, port)
        return bound

    def _bind(self, entry: SocketEntry, at: IPAddress, port: int) -> bool:
        host = self._hosts.get(entry.hid)
        if host is None:
            return False
        behind = host.behind(at)
        wire = (at, port) if (at, port) != (entry.key.remote, entry.key.rport) else None
        bound_to = (at, behind) if behind is not None else None
        if (entry.wire, entry.bound_to) == (wire, bound_to):
            return True  # said again
        self._drop_alias(entry, at, port)
        if not self._rewire(entry, wire, bound_to):
            return False
        self._refresh(entry.hid)
        log.info("flow %s of HID %d: now at %s:%d", entry.key, entry.hid, at, port)
        self._effects.moved.add(entry.hid)
        self.kernel.flush()
        return True

    def _drop_alias(self, entry: SocketEntry, at: IPAddress, port: int) -> None:
        """Forget the flow that ``entry``'s packets made before its knock came: one
        of the same host, named by the NAT's very address and port (a NAT gives
        that port, towards us, to one socket behind it: the knocking flow's)."""
        k = entry.key
        holder = self.sockets.inbound(entry.hid, k.remote.version, k.proto, port, k.lport)
        if (
            holder is None
            or holder is entry
            or (holder.key.remote, holder.key.rport, holder.key.local) != (at, port, k.local)
            or holder.wire is not None
        ):
            return
        log.info("flow %s: the same as %s, seen before its knock", holder.key, k)
        self.aliases_dropped += 1
        self._remove_flows([holder])

    def knock_targets(self, hid: int) -> list[tuple[SocketEntry, IPAddress, int]]:
        """Each flow of ``hid`` with where its packets go now (address, port): where
        its knock goes."""
        tr = self._translations.get(hid)
        out = []
        for e in self.sockets.flows_of(hid):
            if e.wire is not None:
                out.append((e, *e.wire))
            else:
                dst = tr.remote.get(e.key.remote, e.key.remote) if tr else e.key.remote
                out.append((e, dst, e.key.rport))
        return out

    def awaits_knock(self, hid: int, at: IPAddress, proto: int, lport: int) -> bool:
        """Whether a packet from ``at`` (a NAT in front of ``hid``) to our ``lport`` on a
        port we do not know may be a flow of ``hid`` whose knock has not come yet:
        then it must not reach our stack (which would answer with a reset).

        So too a packet (TCP: no SYN) from an address the host claims that we have
        not proven (our challenge is out) to a port of its flows of that protocol:
        the peer moves its flows when our challenge reaches it
        (``IhmpEngine._on_path_probe``), a round trip before we take the address;
        behind a NAT that chose new ports, nothing names the flow yet. (Taken as a
        new flow, it would hold the very port its knock then names.)"""
        host = self._hosts.get(hid)
        if host is not None and at in host.unreachable and at not in host.active:
            return any(
                e.key.proto == proto and e.key.lport == lport for e in self.sockets.flows_of(hid)
            )
        behind = host.behind(at) if host is not None and at == host.locator else None
        if behind is None:
            return False  # (a NAT it left may have other hosts behind it: their flows)
        # A flow named by this NAT's address (it started behind it) has a port there
        # we know; after our own move the NAT gives it another, towards our new
        # address. A TCP segment that is no SYN may be such a flow's (our stack would
        # reset it, as no connection of ours has that port); UDP from an unknown port
        # may as well be a new flow of another host behind the NAT, and goes on.
        return any(
            e.key.proto == proto
            and e.key.lport == lport
            and (e.key.remote != at or proto == TCP)
            and e.bound_to != (at, behind)
            for e in self.sockets.flows_of(hid)
        )

    def bindings(self) -> list[dict[str, Any]]:
        """Each flow's NAT facts (its port there, its peer's own port), as JSON-able
        data: what a successor needs to go on (:meth:`restore_bindings`)."""
        out = []
        for e in self.sockets:
            if e.wire is None and e.peer_port is None:
                continue
            k = e.key
            out.append(
                {
                    "flow": [k.proto, str(k.local), k.lport, str(k.remote), k.rport],
                    "wire": [str(e.wire[0]), e.wire[1]] if e.wire else None,
                    "bound_to": [str(a) for a in e.bound_to] if e.bound_to else None,
                    "peer_port": e.peer_port,
                }
            )
        return out

    def restore_bindings(self, saved: Iterable[dict[str, Any]]) -> int:
        """A predecessor's :meth:`bindings`, for the flows adopted since. Returns how
        many were taken; anything unusable is skipped."""
        taken = 0
        for item in saved:
            try:
                proto, local, lport, remote, rport = item["flow"]
                key = FlowKey(
                    int(proto), ip_address(local), int(lport), ip_address(remote), int(rport)
                )
                wire = item.get("wire")
                bound = item.get("bound_to")
                entry = self.sockets.get(key)
                if entry is None:
                    continue
                entry.peer_port = item.get("peer_port")
                new_wire = (ip_address(wire[0]), int(wire[1])) if wire else None
                bound_to = (ip_address(bound[0]), ip_address(bound[1])) if bound else None
            except (KeyError, TypeError, ValueError):
                continue
            taken += self._rewire(entry, new_wire, bound_to)
        return taken

    def _unbind_stale(self, hid: int) -> None:
        """A host whose locator is its own address again: its flows go by the host's
        translation, their NAT ports are forgotten. (Behind a NAT, a flow keeps its
        last binding until its knock comes: its packets go where they went.) A flow
        it started behind a NAT whose port there was not its own (``peer_port``, an
        IHMP-aware NAT said so) goes to that port of its own, at the new locator."""
        host = self._hosts.get(hid)
        if host is None or host.behind(host.locator) is not None:
            return
        loc = host.locator
        for e in self.sockets.flows_of(hid):
            if e.pinned is not None and e.pinned not in host.active:
                e.pinned = None  # the address it was sent to left the host: host-wide
            if e.pinned is not None:
                want: tuple[IPAddress, int] | None = (e.pinned, e.key.rport)
                if e.wire != want:
                    self._rewire(e, want, None)
                continue
            want = None
            moved = loc is not None and loc != e.key.remote and loc.version == e.key.remote.version
            if e.wire is not None and e.wire[0] == loc and e.bound_to is None:
                want = e.wire  # its knock came from here
            elif moved and e.peer_port is not None and e.peer_port != e.key.rport:
                assert loc is not None
                want = (loc, e.peer_port)
            if e.wire != want:
                self._rewire(e, want, None)
                self._effects.moved.add(hid)

    def _rewire(
        self,
        entry: SocketEntry,
        wire: tuple[IPAddress, int] | None,
        bound_to: tuple[IPAddress, IPAddress] | None,
    ) -> bool:
        old = entry.wire
        if old == wire:
            entry.bound_to = bound_to
            return True
        if not self.sockets.rebind(entry, wire, bound_to):
            log.warning("flow %s: port %s is another flow's", entry.key, wire)
            return False
        if wire is not None:
            self._maybe_wired.add(entry.hid)
        self.kernel.set_wire(entry, old)
        self.bindings_changed = True
        return True

    def _host_gone(self, hid: int) -> None:
        old = self._cross.pop(hid, None)
        if old is not None:
            self.kernel.set_cross((), (), *old)
        self._forget(hid)
        flows = self.sockets.remove_hid(hid)
        self._translations.pop(hid, None)
        self.kernel.update_hid(None, hid)
        if flows:
            self.kernel.remove_flows(flows)
            self.kernel.kill_flows(flows)
            for e in flows:
                self._dead[e.key] = e
            log.info("HID %d removed: failing %d flows", hid, len(flows))
            self._effects.failed += flows
        self._effects.reconcile = True


def _pairs(cross: dict[tuple[IPAddress, IPAddress], tuple[IPAddress, IPAddress]]) -> str:
    return ", ".join(f"{lid}>{rid} over {a}>{b}" for (lid, rid), (a, b) in cross.items())


def _placed(
    rule: Rule, working: dict[IPAddress, str], e: SocketEntry, current: IPAddress | None
) -> IPAddress | None:
    """Where ``rule`` puts ``e``: the first working address it ranks; once it has
    placed the flow (``current``), with ``return = false``, wherever the flow is as
    long as the rule allows that and it works (it does not go back). None: nothing
    it names works (the flow keeps any working address: its host's)."""
    ranked = rank(rule, working, e.key.local)
    if not rule.return_ and current is not None and current in ranked:
        return current
    if ranked:
        return ranked[0]
    return e.key.local if e.via is not None and e.key.local in working else None


def _locator_lost(old: HidTranslation, new: HidTranslation, host: HostSnapshot) -> bool:
    """Whether a remote identifier's locator changed away from one the host no longer
    has active (went down, or it handed off): packets in flight to it are lost."""
    for rid in old.remote.keys() | new.remote.keys():
        before = old.remote.get(rid, rid)
        if before != new.remote.get(rid, rid) and before not in host.active:
            return True
    return False
