"""The IHMP engine: the control plane of DIME as a sans-I/O state machine.

Like aioquic's ``QuicConnection``, the engine never touches a socket or a clock. Its
user feeds it

* received datagrams: :meth:`IhmpEngine.receive_datagram` ``(data, src, dst, now)``;
* this host's address events: :meth:`address_added`, :meth:`address_removed`,
  :meth:`handoff` (one address lost and another gained);
* a new flow to a remote address (StackTrans asks which host it belongs to):
  :meth:`flow_started`, which creates the host and says HELLO if it is new;
* timer expiry: :meth:`handle_timer` ``(now)``;

and collects

* datagrams to send, each with its source and destination address:
  :meth:`datagrams_to_send`;
* events (:mod:`ihmp.events`), among them every change of its HID table
  (:class:`~ihmp.hosts.HostChanged`), in order: :meth:`next_event`;
* the next timer deadline: :meth:`get_timer`.

The engine owns its :class:`~ihmp.hosts.HidTable` (``engine.table``) and is its only
writer; others read it, or follow it through the HostChanged events.

The protocol is section III-B of the DIME paper, with these additions:

* every message carries a 64-bit per-sender counter, checked against a sliding
  window, so that replays are refused; retransmissions reuse the sequence number
  but get a fresh counter (and signature);
* address events from a peer are applied in sequence-number order: a message older
  than one already applied is acknowledged but not applied ("latest state wins");
* a host's lost addresses are withdrawn until the peer acknowledges it, and every
  later HANDOFF/ADDR_DOWN to that peer carries all of them, superseding the ones in
  flight;
* losing the last path to a peer does not drop it at once: a grace period lets a
  hard handoff (address down, then up) complete. Only then is the HID removed and
  :class:`~ihmp.events.PeerLost` reported.
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import ip_interface
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ihmp import events as ev
from ihmp.addr import IPAddress, IPInterface, addr_key, usable
from ihmp.cookie import CookieJar
from ihmp.events import DropReason, RejectReason
from ihmp.flows import KNOCK_MAGIC, MAX_FLOWS_PER_MOVE, FlowSpec
from ihmp.hosts import FlowOrigin, HidState, HidTable, HidTableError, HostEntry, HostSnapshot
from ihmp.keys import LocalKeys, TrustStore
from ihmp.natproof import NatProofs
from ihmp.peer import Peer, Pending
from ihmp.ratelimit import PerSource, TokenBucket
from ihmp.reachability import Reach, advertisable, best_path, classify
from ihmp.registration import Registration, Registrations, RendezvousPoint
from ihmp.replay import ReplayWindow
from ihmp.states import Trigger
from ihmp.timers import Timers
from ihmp.wire import (
    NONCE_LEN,
    RELAYABLE,
    Flags,
    Message,
    MessageType,
    WireError,
    decode,
    encode,
    public_key_bytes,
    verify,
)

T = MessageType
_EVENT_TYPES = frozenset(
    {
        T.ADDR_UP,
        T.ADDR_UP_UNREACHABLE,
        T.ADDR_DOWN,
        T.ADDR_DOWN_UNREACHABLE,
        T.HANDOFF,
        T.HANDOFF_UNREACHABLE,
    }
)
_WITHDRAWING = frozenset({T.ADDR_DOWN, T.ADDR_DOWN_UNREACHABLE, T.HANDOFF, T.HANDOFF_UNREACHABLE})
_MAX_KEY_WINDOWS = 4096
MAX_LOCAL_RETRIES = 10  # quick retries after a send failed locally (about 100 ms)
MAX_COOKIE_TRIES = 3  # times one HELLO of ours is said again with a fresh cookie


@dataclass
class EngineConfig:
    """Timing and policy. Every field has a default that works."""

    initial_rto: float = 0.5  # first retransmission timeout, seconds
    max_rto: float = 2.0  # backoff cap
    # Transmissions of a HELLO before a peer that never answered counts as legacy
    # (about 17 s): with 30 % of IHMP lost both ways, all ten fail with p = 0.51^10.
    max_attempts: int = 10
    probe_attempts: int = 3  # for probes of potentially reachable paths
    # How long an address event (ADDR_UP/DOWN, HANDOFF, NAT_ENTRY) is retransmitted
    # before giving up: as long as a peer with no path is kept, so that a lossy
    # control path delays a handoff but does not lose it.
    exchange_deadline: float = 30.0
    legacy_hold_down: float = 300.0  # after a HELLO went unanswered
    path_loss_grace: float = 30.0  # how long a peer with no path is kept
    dead_path_hold: float = 300.0  # how long an unanswered probe keeps its path unused
    strict: bool = False  # accept only keys configured a priori
    # Limits against floods; each has a counter in `dime status`.
    max_peers: int = 4096  # HID table entries; the least recently used idle one goes first
    max_half_open: int = 256  # of them, hosts whose first HELLO is still unanswered
    max_challenges: int = 8  # addresses of one peer being validated at once
    unverified_rate: float = 5.0  # datagrams/s taken from a source no peer was verified at
    unverified_burst: float = 20.0
    cookie_rate: float = 500.0  # HELLO cookies sent per second, to all sources together
    # Behind a NAT, a signed probe to each peer with flows this often (seconds; 0:
    # never), so that the NAT keeps our IHMP mapping and the peer can reach us.
    nat_keepalive: float = 25.0
    # Knocks verified per second from one NAT address (each costs a signature check;
    # a move sends three per flow within a second).
    knock_rate: float = 300.0
    knock_burst: float = 3000.0
    # Forwarded messages taken in per second from one rendezvous point (each costs a
    # signature check; anyone can spoof a rendezvous point's address).
    relay_rate: float = 50.0
    relay_burst: float = 200.0


@dataclass(frozen=True)
class Datagram:
    """A datagram to send. ``dst_port`` None means the peer's default IHMP port."""

    data: bytes
    src: IPAddress
    dst: IPAddress
    dst_port: int | None = None


@dataclass
class Counters:
    messages_sent: int = 0
    messages_received: int = 0
    retransmissions: int = 0
    messages_rejected: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # DropReason value -> count
    cookies_sent: int = 0
    challenges_sent: int = 0  # path challenges (PATH_PROBE), retransmissions not counted
    addresses_validated: int = 0  # challenges answered with their nonce
    peers_evicted: int = 0
    keepalives_sent: int = 0
    flows_bound: int = 0  # knocks taken in: a flow's port on a NAT learned
    registrations_sent: int = 0  # REGISTERs to rendezvous points, retransmissions included
    relays_sent: int = 0  # our messages sent through a rendezvous point
    relayed_received: int = 0  # peers' messages a rendezvous point forwarded, taken in
    flow_moves_sent: int = 0  # FLOW_MOVEs of ours (up to 16 flows each), not retransmissions
    flow_moves_received: int = 0  # peers' FLOW_MOVEs applied


SAVE_VERSION = 1
#: How far a restarted engine moves each peer's sequence numbers past the saved
#: ones: far more messages than could have been sent between the last save and a
#: crash, far fewer than the 2^15 that RFC 1982 comparison tolerates.
RESTART_SEQ_SKIP = 1024

#: Timer keys: (kind, hid, seq). RETRANSMIT is per message of ours awaiting its ACK,
#: GRACE per peer that lost its last path (seq 0).
RETRANSMIT, GRACE, KEEPALIVE = "retransmit", "grace", "keepalive"
TimerKey = tuple[str, int, int]


#: A NAT_ENTRY waiting for its NAT's key to be proven: (message, source, our address,
#: source port).
_Waiting = tuple[Message, IPAddress, IPAddress, int | None]


class _Reject(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _window_name(wid: bytes | int) -> str:
    return wid.hex() if isinstance(wid, bytes) else f"hid:{wid}"


def _window_key(name: str) -> bytes | int:
    return int(name[4:]) if name.startswith("hid:") else bytes.fromhex(name)


def seq_newer(a: int, b: int) -> bool:
    """Whether 16-bit sequence number ``a`` comes after ``b`` (RFC 1982 arithmetic)."""
    return 0 < (a - b) & 0xFFFF < 0x8000


class IhmpEngine:
    """IHMP for one host. See the module docstring for the contract."""

    def __init__(
        self,
        *,
        counter_start: int,
        rng: random.Random,
        config: EngineConfig | None = None,
        local_keys: LocalKeys | None = None,
        trust: TrustStore | None = None,
        local_addresses: Iterable[IPInterface] = (),
        in_use: Callable[[int], bool] | None = None,
        rendezvous: Iterable[RendezvousPoint] = (),
    ) -> None:
        """``counter_start`` must grow across restarts: pass the wall clock in µs.
        ``rng`` makes nonces and the cookie secret: unpredictable in a daemon
        (``random.SystemRandom``). ``in_use(hid)``: whether the host carries flows now;
        such a host is never evicted to make room. ``rendezvous``: the rendezvous
        points to register with (at the first :meth:`handle_timer`, and after every
        change of our addresses) and to relay through."""
        self._events: deque[ev.Event] = deque()
        self.table = HidTable(self._events.append)
        self.config = config or EngineConfig()
        self.local_keys = local_keys or LocalKeys()
        self.trust = trust or TrustStore()
        self.counters = Counters()
        self._rng = rng
        self._counter = counter_start
        self._local: dict[IPAddress, IPInterface] = {i.ip: i for i in local_addresses}
        self._peers: dict[int, Peer] = {}
        self._windows: dict[bytes | int, ReplayWindow] = {}
        self._out: list[Datagram] = []
        self._timers: Timers[TimerKey] = Timers()
        self._in_use = in_use or (lambda hid: False)
        self._cookies = CookieJar(rng.getrandbits(256).to_bytes(32, "big"))
        cfg = self.config
        self._unverified = PerSource(cfg.unverified_rate, cfg.unverified_burst)
        self._knocks = PerSource(cfg.knock_rate, cfg.knock_burst)
        self._cookie_budget = TokenBucket(cfg.cookie_rate, cfg.cookie_rate)
        # The source and size of the datagram being handled: answers to it may not
        # be larger while the source is unverified.
        self._request: tuple[IPAddress, int] | None = None
        # A peer's own address behind a NAT -> its HID: it names itself by it.
        self._aliases: dict[IPAddress, int] = {}
        # IHMP-aware NATs: the key proven to receive at each NAT address.
        self._nat_proofs: NatProofs[_Waiting] = NatProofs(rng, NONCE_LEN)
        self._relays = PerSource(cfg.relay_rate, cfg.relay_burst)
        self.registrations = Registrations(
            list(rendezvous),
            rng,
            refresh=cfg.nat_keepalive or 25.0,
            initial_rto=cfg.initial_rto,
            max_rto=cfg.max_rto,
            deadline=cfg.exchange_deadline,
        )

    # == outputs ======================================================================

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        """Everything queued for sending; the queue is emptied."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> ev.Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest time :meth:`handle_timer` must be called, or None."""
        deadlines = [
            t for t in (self._timers.next(), self.registrations.next_timer()) if t is not None
        ]
        return min(deadlines, default=None)

    @property
    def local_addresses(self) -> list[IPAddress]:
        return list(self._local)

    @property
    def local_interfaces(self) -> list[IPInterface]:
        """This host's addresses as the engine knows them, with their prefixes."""
        return list(self._local.values())

    def half_open(self) -> int:
        """Hosts we said HELLO to that have not answered yet."""
        return sum(self._saying_hello(e) for e in self.table)

    def _saying_hello(self, entry: HostEntry) -> bool:
        # Not a host that started a flow to us: we await its HELLO, at no cost.
        peer = self._peers.get(entry.hid)
        return entry.state is HidState.HELLO_PENDING and not (peer and peer.unproven)

    def peer_info(self, hid: int) -> dict[str, object]:
        """Protocol facts about a peer for status output."""
        peer = self._peers.get(hid)
        if peer is None:
            return {}
        challenges = [p.dst for p in peer.pending.values() if p.msg.type is T.PATH_PROBE]
        return {
            "pending": len(peer.pending),
            "validating": sorted({str(a) for a in challenges}),
            "withdrawn": [str(a) for a in peer.withdrawn],
            "nat_supported": peer.nat_supported,
            "nat_entries": len(peer.nat_entries),
            "we_are_observed_as": str(peer.observed) if peer.observed is not None else None,
        }

    # == surviving a restart ==========================================================

    def save(self, now: float) -> dict[str, Any]:
        """Everything a successor needs to resume (:meth:`restore`), as JSON-able data:
        the HID table, each peer's sequence state, what we told it and withdrew, our
        addresses and the replay windows' high-water marks.
        Messages in flight are not kept: :meth:`resume` re-synchronises instead."""
        peers = {str(hid): peer.to_json(now) for hid, peer in self._peers.items()}
        return {
            "version": SAVE_VERSION,
            "local": [str(i) for i in self._local.values()],
            "hosts": [h.to_json() for h in self.table.snapshot()],
            "peers": peers,
            "windows": {_window_name(w): win.highest for w, win in self._windows.items()},
        }

    def restore(self, saved: dict[str, Any], now: float) -> None:
        """Take up where the engine that :meth:`save` d left off. Call once, on a new
        engine, before any other input. Every host comes back as a HostChanged event
        (CREATED); our addresses are the saved ones, so what changed since comes
        in as ordinary address events. Raises ValueError for data it cannot use
        (and then has changed nothing)."""
        try:
            if saved.get("version") != SAVE_VERSION:
                raise ValueError(f"version {saved.get('version')!r}")
            local = [ip_interface(i) for i in saved["local"]]
            hosts = [HostSnapshot.from_json(h) for h in saved["hosts"]]
            peers = {
                int(hid): Peer.from_json(p, now, RESTART_SEQ_SKIP)
                for hid, p in saved["peers"].items()
            }
            windows = {_window_key(w): int(h) for w, h in saved["windows"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"saved IHMP state unusable: {exc!r}") from exc
        self._local = {i.ip: i for i in local}
        for host in hosts:
            self.table.restore(host)
            # A host without its peer state (saved mid-change) still needs one.
            self._peers[host.hid] = peers.get(host.hid) or self._peer(host.hid)
        for wid, highest in windows.items():
            self._windows[wid] = ReplayWindow.restored(highest)

    def resume(self, now: float) -> None:
        """After :meth:`restore` and the address events since: say HELLO again to
        every established peer, from a real address of ours and under a Host ID it
        knows, to re-synchronise (its sequence state, our addresses, its addresses);
        finish the HELLOs a predecessor had begun."""
        for entry in self.table:
            if entry.locator is None:
                continue
            if entry.state is HidState.HELLO_PENDING:
                if not self._peers[entry.hid].unproven:
                    self._start_hello(entry.hid, now)
            elif entry.state is HidState.ESTABLISHED:
                _, src, _ = best_path([entry.locator], list(self._local))
                if src is not None and not self._hello_pending(self._peers[entry.hid]):
                    self._send_hello(entry, src, self._host_id(entry, src), now)

    # == inputs: timers ===============================================================

    def handle_timer(self, now: float) -> None:
        """Retransmit, give up, fall back, and drop peers whose grace ran out."""
        for kind, hid, seq in self._timers.expired(now):
            if kind == GRACE:
                self._drop_peer(hid)
                continue
            if kind == KEEPALIVE:
                self._keepalive(hid, now)
                continue
            peer = self._peers.get(hid)
            pending = peer.pending.get(seq) if peer is not None else None
            if peer is None or pending is None:
                continue  # dropped by an earlier expiry in this same pass
            if pending.exhausted(now):
                self._untrack(peer, seq)
                self._failed(pending, now)
            else:
                self._retransmit(pending, now)
        self._register(now)

    def send_failed(self, src: IPAddress, dst: IPAddress, now: float, retry: float = 0.01) -> None:
        """The host could not even send a datagram src -> dst (no route yet, say).

        A new address usually comes a few milliseconds before its route: rather than
        wait a whole RTO, the engine tries again after ``retry`` seconds, up to
        :data:`MAX_LOCAL_RETRIES` times per message, and such failed sends do not
        count as attempts.
        """
        self.registrations.send_failed(dst, now + retry)
        for peer in self._peers.values():
            for pending in peer.pending.values():
                if (
                    pending.src == src
                    and pending.dst == dst
                    and pending.local_failures < MAX_LOCAL_RETRIES
                ):
                    pending.local_failures += 1
                    pending.attempts -= 1
                    self._arm(pending, min(pending.deadline, now + retry))
                    # _retransmit doubles it again: the failed send must not back off.
                    pending.rto = pending.rto / 2

    # == inputs: StackTrans ===========================================================

    def flow_started(
        self,
        remote: IPAddress,
        local: IPAddress,
        now: float,
        origin: FlowOrigin = FlowOrigin.OUTBOUND,
    ) -> int | None:
        """A new flow ``local`` -> ``remote`` (identifiers): the HID of its host.

        An address no host owns yet makes a new host, and the engine says HELLO to it
        from ``local``; so does a new flow to a legacy host whose hold-down is over.
        A flow the remote started (``INBOUND``) makes the host too, but no HELLO: its
        first packet's source may be spoofed (a SYN flood would turn us into a
        reflector), and a remote that runs DIME says HELLO itself. ``ADOPTED``: the
        flow existed before this daemon (a restart resumed), so an address a host
        withdrew still names it; a really new flow to such an address goes to
        whoever has it now, a new host. Returns None for addresses that are never
        translated (loopback, multicast, unspecified), or when the table is full of
        hosts in use.
        """
        if not (usable(remote) and usable(local)) or remote == local or remote in self._local:
            return None
        entry = self.table.lookup(remote)
        if entry is None and origin is FlowOrigin.ADOPTED:
            entry = self.table.lookup_retired(remote)
        inbound = origin is FlowOrigin.INBOUND
        if entry is None:
            if not self._make_room(now, half_open=not inbound):
                return None
            trigger = Trigger.FLOW_RECEIVED if inbound else Trigger.HELLO_SENT
            entry = self.table.create([remote], trigger)
            self._peer(entry.hid).unproven = inbound
            if not inbound:
                self._start_hello(entry.hid, now, local)
        elif not inbound and (entry.state is HidState.LEGACY or self._peer(entry.hid).unproven):
            # Our own flow to it now: an application chose the address.
            self._peer(entry.hid).unproven = False
            self._start_hello(entry.hid, now, local)
        peer = self._peers.get(entry.hid)
        if peer is not None:
            peer.last_used = now
            if peer.observed is not None and (KEEPALIVE, entry.hid, 0) not in self._timers:
                self._arm_keepalive(entry.hid, now)
        return entry.hid

    def _start_hello(
        self,
        hid: int,
        now: float,
        local: IPAddress | None = None,
        host_id: IPAddress | None = None,
    ) -> bool:
        """Say HELLO to ``hid`` from ``local`` (None: the best address we have), under
        ``host_id`` (None: ``local``).

        Returns False when nothing is sent: the peer is in its legacy hold-down,
        already established, or has no usable path.
        """
        entry = self.table.get(hid)
        peer = self._peer(hid)
        if entry.state is HidState.ESTABLISHED or entry.locator is None:
            return False
        if peer.legacy_until is not None and now < peer.legacy_until:
            return False
        if self._hello_pending(peer):
            return False
        if local not in self._local:
            # Never from a ghost: an identifier this host no longer has (the flow's
            # local address after a move) is no locator.
            _, local, _ = best_path([entry.locator], list(self._local))
        if local is None:
            return False
        self.table.transition(hid, Trigger.HELLO_SENT)
        self._send_hello(entry, local, host_id or local, now)
        return True

    def _send_hello(self, entry: HostEntry, src: IPAddress, host_id: IPAddress, now: float) -> None:
        assert entry.locator is not None
        peer = self._peers[entry.hid]
        advertised = self._advertised(first=src)
        peer.announced |= set(advertised)
        msg = self._message(
            peer,
            T.HELLO,
            host_id=host_id,
            advertised=advertised,
            src_addr=src,
            public_key=self._public_key(src),
        )
        self._send(entry.hid, msg, src, entry.locator, now, track=True)

    # == inputs: local address events =================================================

    def address_added(self, iface: IPInterface, now: float) -> None:
        """This host gained ``iface``: tell every established peer (III-B2)."""
        addr = iface.ip
        if addr in self._local:
            return
        self._local[addr] = iface
        if not advertisable(addr):
            return
        self._reregister(now)
        for entry in self._signaled():
            peer = self._peers[entry.hid]
            peer.withdrawn.pop(addr, None)
            if peer.withdrawn and not entry.local and not self._announcing(peer):
                # Orphaned (a hard handoff): this address may restore the path.
                self._send_handoff(entry, addr, now)
            else:
                self._send_addr_up(entry, addr, now)

    def address_removed(self, iface: IPInterface, now: float) -> None:
        """This host lost ``iface``: tell every established peer (III-B3)."""
        addr = iface.ip
        if self._local.pop(addr, None) is None:
            return
        self._reregister(now)
        self._rehome_hellos(addr, now)
        for entry in self._signaled():
            if not self._lose_local(entry, addr):
                continue
            if entry.local and entry.locator is not None:
                self._send_addr_down(entry, now)
                continue
            others = [a for a in self._local if advertisable(a)]
            reach, local, _ = self._best_path(entry, self._remotes(entry), others, now)
            if local is not None and reach is not Reach.UNREACHABLE:
                self._send_handoff(entry, local, now)
            else:
                self._orphan(entry.hid, now)

    def handoff(self, old: IPInterface, new: IPInterface, now: float) -> None:
        """This host lost ``old`` and gained ``new`` (III-B4)."""
        self._local.pop(old.ip, None)
        self._local[new.ip] = new
        self._reregister(now)
        self._rehome_hellos(old.ip, now)
        for entry in self._signaled():
            self._lose_local(entry, old.ip)
            self._peers[entry.hid].withdrawn.pop(new.ip, None)
            if advertisable(new.ip):
                self._send_handoff(entry, new.ip, now)
            elif entry.local:
                self._send_addr_down(entry, now)
            else:
                self._orphan(entry.hid, now)

    # == NAT traversal: knocks ========================================================

    def flow_binding(self, hid: int, flow: FlowSpec, src: IPAddress) -> bytes | None:
        """The payload of a knock for ``flow`` (as our socket sees it) to ``hid``,
        sent from our address ``src``: :data:`~ihmp.wire.KNOCK_MAGIC` and a signed
        FLOW_BIND with a fresh counter. None if ``hid`` is gone."""
        if hid not in self.table:
            return None
        entry = self.table.get(hid)
        msg = Message(type=T.FLOW_BIND, seq=0, host_id=self._host_id(entry, src), flow=flow)
        stamped: bytes = self._stamp(msg, src)
        return KNOCK_MAGIC + stamped

    def receive_binding(
        self, data: bytes, src: IPAddress, src_port: int, now: float
    ) -> tuple[int, FlowSpec] | None:
        """A knock's payload (what follows :data:`~ihmp.wire.KNOCK_MAGIC`) that came
        from ``src``:``src_port``: the HID and the flow (as the peer's socket sees
        it) whose packets the NAT at ``src`` now carries from that port.

        Only a FLOW_BIND signed by the host ``src`` is a verified address of, and
        never seen before (replay window), binds anything; anything else is counted
        and reported (MessageRejected) and binds nothing."""
        self.counters.messages_received += 1
        try:
            entry = self._verified(src)
            if entry is None:
                raise _Reject(RejectReason.UNVERIFIED_SOURCE, f"knock from {src}:{src_port}")
            if not self._knocks.take(src, now):
                self._drop(DropReason.KNOCK_RATE)  # (anyone can spoof a NAT's address)
                return None
            msg = decode(data)
            if msg.type is not T.FLOW_BIND or msg.flow is None:
                raise _Reject(RejectReason.MALFORMED, f"a knock carries {msg.type.name}")
            if self._resolve(msg.host_id) is not entry:
                raise _Reject(RejectReason.UNKNOWN_HOST_ID, f"knock names {msg.host_id}")
            pin, window = self._admit(msg, entry, src)
        except WireError as exc:
            self._reject(src, RejectReason.MALFORMED, str(exc))
            return None
        except _Reject as rej:
            self._reject(src, rej.reason, rej.detail)
            return None
        self._commit(msg, entry.hid, window, pin, now)
        self.counters.flows_bound += 1
        return entry.hid, msg.flow

    # == per-flow moves (a multihomed host's locator policy) ===========================

    def move_flows(
        self, hid: int, flows: Sequence[FlowSpec], via: IPAddress, now: float
    ) -> int | None:
        """Ask peer ``hid`` to send ``flows`` (1 to :data:`MAX_FLOWS_PER_MOVE`, as our
        sockets see them) to our address ``via``: one FLOW_MOVE from ``via``,
        retransmitted until ACKed. Returns its sequence number (an
        :class:`~ihmp.events.ExchangeCompleted` or :class:`~ihmp.events.ExchangeFailed`
        of that number ends it), or None when the peer cannot be asked: gone, not
        established, nowhere to send to in ``via``'s family, ``via`` is no address of
        ours the peer has verified (it would refuse the move: it never challenges for
        one), or we reach it through a NAT. ValueError for no flow or too many."""
        if not 0 < len(flows) <= MAX_FLOWS_PER_MOVE:
            raise ValueError(f"a FLOW_MOVE moves 1 to {MAX_FLOWS_PER_MOVE} flows, not {len(flows)}")
        if hid not in self.table:
            return None
        entry = self.table.get(hid)
        if entry.state is not HidState.ESTABLISHED or via not in entry.local:
            return None
        remote = next((a for a in entry.active if a.version == via.version), None)
        peer = self._peer(hid)
        if remote is None or via not in self._local or peer.observed is not None:
            # (Behind a NAT the peer knows our flows by the NAT's ports: they move
            # by knocks, after a handoff, not one by one.)
            return None
        msg = self._message(
            peer,
            T.FLOW_MOVE,
            host_id=self._host_id(entry),
            new_addr=via,
            flow=flows[0],
            more_flows=tuple(flows[1:]),
        )
        self._send(hid, msg, via, remote, now, track=True)
        self.counters.flow_moves_sent += 1
        return msg.seq

    def _on_flow_move(
        self, msg: Message, entry: HostEntry, src: IPAddress, dst: IPAddress, port: int | None
    ) -> None:
        """The peer moves some of its flows to another of its addresses. Only to one we
        verified: the signature says the host asks, the challenge that made the
        address active says the host is there. Anything else is refused."""
        assert msg.new_addr is not None and msg.flow is not None
        if msg.new_addr not in entry.active:
            raise _Reject(
                RejectReason.UNVERIFIED_ADDRESS,
                f"FLOW_MOVE to {msg.new_addr}: not a verified address of HID {entry.hid}",
            )
        self.counters.flow_moves_received += 1
        for flow in (msg.flow, *msg.more_flows):
            self._events.append(ev.FlowMoveReceived(entry.hid, flow, msg.new_addr))
        self._ack_applied(entry.hid, msg, src, dst, port, nat=False, applied=True)

    # == IHMP-aware NATs ================================================================

    def _on_nat_entry(
        self, msg: Message, src: IPAddress, dst: IPAddress, port: int | None, now: float
    ) -> None:
        """A NAT's word on a flow of a host behind it (III-D). Taken only from the
        NAT's own address, which must be the verified locator of the host whose
        address behind it the mapping names; signed by the key it carries, under a
        fresh counter; and that key must have answered a challenge to that address
        (once per NAT). Then the host's flows from that port go to the mapping."""
        mapping = msg.nat_mapping
        assert mapping is not None
        entry = self._verified(src)
        if entry is None or mapping.external != src or entry.nat.get(src) != mapping.internal:
            raise _Reject(
                RejectReason.UNVERIFIED_SOURCE, f"NAT_ENTRY from {src}: no NAT of that host"
            )
        key = msg.public_key
        if key is None or not verify(msg, key):
            raise _Reject(RejectReason.BAD_SIGNATURE, "NAT_ENTRY not signed by the key it carries")
        window = self._windows.get(key)
        if window is not None and not window.fresh(msg.counter):
            raise _Reject(RejectReason.REPLAY, f"counter {msg.counter} already seen or too old")
        self._commit_window(key, msg.counter)
        if self._nat_proofs.proven(src, key):
            self._apply_nat_entry(entry.hid, msg, src, dst, port)
            return
        waiting = (msg, src, dst, port)
        challenge = self._nat_proofs.challenge(src, key, waiting, now, self.config.initial_rto)
        if challenge is None:
            return  # the challenge in flight answers for this one too
        nonce, new = challenge
        self.counters.challenges_sent += new
        # No larger than the entry, and no retransmission: the NAT sends its entry again.
        probe = Message(type=T.PATH_PROBE, seq=msg.seq, host_id=dst, src_addr=dst, nonce=nonce)
        self._answer(self._stamp(probe, dst), dst, src, port)

    def _nat_answered(self, ack: Message, src: IPAddress) -> None:
        waited = self._nat_proofs.answered(src, ack.nonce, lambda key: verify(ack, key))
        if waited is None:
            raise _Reject(RejectReason.BAD_NONCE, f"not the answer to our challenge to {src}")
        self.counters.addresses_validated += 1
        for msg, at, dst, port in waited:
            entry = self._verified(at)
            if entry is not None:
                self._apply_nat_entry(entry.hid, msg, at, dst, port)

    def _apply_nat_entry(
        self, hid: int, msg: Message, src: IPAddress, dst: IPAddress, port: int | None
    ) -> None:
        assert msg.nat_mapping is not None
        peer = self._peer(hid)
        peer.nat_supported = True
        peer.nat_entries = [*peer.nat_entries[-63:], msg.nat_mapping]
        self._events.append(ev.NatEntryReceived(hid, msg.nat_mapping))
        ack = Message(type=T.ACK, seq=msg.seq, host_id=dst)
        self._answer(self._stamp(ack, dst), dst, src, port)

    def _behind_nat(
        self, entry: HostEntry, public: IPAddress, private: IPAddress, port: int | None
    ) -> None:
        """The peer's ``private`` address reaches us through a NAT at ``public``:
        answer there at ``port``; ``private`` still names the peer (its Host ID)."""
        peer = self._peers[entry.hid]
        if port is not None:
            peer.ports[public] = port
        self._aliases[private] = entry.hid
        if self.table.lookup(public) is entry:
            self.table.set_nat(entry.hid, public, private, reason="behind a NAT")

    def _own_address(self, entry: HostEntry, addr: IPAddress) -> None:
        """``addr`` reached us untranslated: it is the peer's own, no NAT's."""
        self._peers[entry.hid].ports.pop(addr, None)
        if addr in entry.nat:
            self.table.set_nat(entry.hid, addr, None, reason="no NAT in the way")

    def _observed_through(
        self, peer: Peer, hid: int, local: IPAddress, ack: Message, now: float, *, knock: bool
    ) -> None:
        """The peer's ACK of a message from our ``local`` says whether a NAT was in the
        way. Through one, the peer answers at the NAT's mapping, which must be kept
        alive; and (``knock``: our flows moved to ``local``) each flow's packets now
        get a port of the NAT's choosing, which the peer learns from their knocks."""
        peer.observed = ack.observed_addr if ack.flags & Flags.ND else None
        if peer.observed is None:
            self._timers.cancel((KEEPALIVE, hid, 0))
            started_behind = frozenset(peer.natted_locals - {local})
            if knock and started_behind:
                self._events.append(ev.FlowsNeedBinding(hid, local, identifiers=started_behind))
            return
        peer.natted_locals.add(local)
        self._arm_keepalive(hid, now)
        if knock:
            self._events.append(ev.FlowsNeedBinding(hid, local))

    def _arm_keepalive(self, hid: int, now: float) -> None:
        if self.config.nat_keepalive > 0:
            self._timers.set((KEEPALIVE, hid, 0), now + self.config.nat_keepalive)

    def _keepalive(self, hid: int, now: float) -> None:
        """Keep our NAT's mappings towards ``hid`` alive while flows need them: a
        probe (the peer answers; no state either side) for IHMP's, a knock on each
        UDP flow for theirs. Stops when the host carries no flow; a new flow starts
        it again."""
        peer = self._peers.get(hid)
        if peer is None or peer.observed is None or hid not in self.table:
            return
        entry = self.table.get(hid)
        src = next((a for a in entry.local if a in self._local), None)
        if src is None or entry.locator is None or not self._in_use(hid):
            return
        nonce = self._rng.getrandbits(8 * NONCE_LEN).to_bytes(NONCE_LEN, "big")
        msg = self._message(
            peer, T.PATH_PROBE, host_id=self._host_id(entry, src), src_addr=src, nonce=nonce
        )
        self._send(hid, msg, src, entry.locator, now, track=True, attempts=1)
        self.counters.keepalives_sent += 1
        self._events.append(ev.FlowsNeedBinding(hid, src, udp_only=True))
        self._arm_keepalive(hid, now)

    # == rendezvous points ============================================================

    def _reregister(self, now: float) -> None:
        """Our addresses changed: tell every rendezvous point at once."""
        if self.registrations:
            self.registrations.renew(now)
            self._register(now)

    def _register(self, now: float) -> None:
        for reg in self.registrations.due(now):
            self._send_register(reg)

    def _send_register(self, reg: Registration) -> None:
        """A REGISTER to ``reg``'s rendezvous point, signed by the key of the address
        it goes from: "forward to wherever this comes from"."""
        locals_ = [a for a in self._local if advertisable(a)]
        _, src, _ = best_path([reg.point.addr], locals_)
        key = self.local_keys.key_for(src) if src is not None else None
        if src is None or key is None:
            return  # no path (or no key) yet: it is due again after its backoff
        msg = Message(
            type=T.REGISTER,
            seq=reg.seq,
            host_id=src,
            src_addr=src,
            advertised=self._advertised(first=src),
            public_key=public_key_bytes(key),
            nonce=reg.nonce,
        )
        reg.sent_from = src
        self._out.append(Datagram(self._stamp(msg, src), src, reg.point.addr, reg.point.port))
        self.counters.messages_sent += 1
        self.counters.registrations_sent += 1

    def _relay(self, pending: Pending) -> None:
        """Send ``pending`` (an address event the direct path has not answered) through
        every rendezvous point too, signed as ever: the peer verifies it end to end,
        and answers directly."""
        entry = self.table.get(pending.hid)
        our_key = self._public_key(pending.src)
        if entry.key is None or our_key is None or pending.msg.type not in RELAYABLE:
            return  # the peer could not verify it: a relayed message must be signed
        payload = self._stamp(pending.msg, pending.src)
        locals_ = [a for a in self._local if advertisable(a)]
        for point in self.registrations.points:
            _, src, _ = best_path([point.addr], locals_)
            if src is None:
                continue
            relay = Message(
                type=T.RELAY, seq=0, host_id=src, public_key=our_key, target=entry.key,
                payload=payload,
            )  # fmt: skip
            self._out.append(Datagram(encode(relay), src, point.addr, point.port))
            self.counters.messages_sent += 1
            self.counters.relays_sent += 1

    def _from_rendezvous(
        self, point: RendezvousPoint, data: bytes, src: IPAddress, dst: IPAddress, now: float
    ) -> None:
        """A datagram from one of our rendezvous points: the answer to a REGISTER, or a
        peer's message it forwards. Rate-limited before any signature check: anyone
        can write a rendezvous point's address as a source."""
        if not self._relays.take(src, now):
            self._drop(DropReason.RELAY_RATE)
            return
        with self._refusing(src):
            msg = decode(data)
            if msg.type is T.ACK and self.registrations.answered(point, msg, now):
                return
            if msg.type is not T.RELAYED:
                raise _Reject(RejectReason.UNEXPECTED_ACK, f"{msg.type.name} from {point.name}")
            assert msg.payload is not None and msg.origin is not None  # required fields
            self._on_relayed(decode(msg.payload), msg.origin, dst, now, len(msg.payload))

    def _on_relayed(
        self, msg: Message, origin: tuple[IPAddress, int], dst: IPAddress, now: float, size: int
    ) -> None:
        """A peer's address event, forwarded: taken only from a host whose key we have
        pinned, signed by it, fresh, exactly as if it had come directly from ``origin``
        (where the rendezvous point saw it come from, and where every answer goes)."""
        if msg.type not in RELAYABLE:
            raise _Reject(RejectReason.MALFORMED, f"{msg.type.name} cannot be relayed")
        entry = self._resolve(msg.host_id)
        if entry is None or entry.key is None:
            raise _Reject(
                RejectReason.UNKNOWN_HOST_ID, f"relayed, from no pinned host: {msg.host_id}"
            )
        if msg.signature is None:
            raise _Reject(RejectReason.UNSIGNED, "relayed, and unsigned")
        self.counters.relayed_received += 1
        addr, port = origin
        self._request = (addr, size)  # answers to an unverified origin stay this small
        self._on_message(msg, addr, dst, port, now, relayed=True)

    def rendezvous_status(self, now: float) -> list[dict[str, Any]]:
        """Each configured rendezvous point: ``server`` (as configured), ``registered``
        and more, for ``dime status``."""
        return self.registrations.status(now)

    # == inputs: datagrams ============================================================

    def receive_datagram(
        self,
        data: bytes,
        src: IPAddress,
        dst: IPAddress,
        now: float,
        src_port: int | None = None,
    ) -> None:
        """Handle one datagram that arrived from ``src`` on local address ``dst``.

        Anything wrong with it is counted and reported as MessageRejected, and then
        it has changed nothing.
        """
        self.counters.messages_received += 1
        if dst not in self._local:
            # A ghost (an identifier this host left) or a stray: answering would use
            # it as a locator, and applying would take it as one the peer reaches.
            self._reject(src, RejectReason.NOT_A_LOCATOR, f"{dst} is no address of ours")
            return
        point = self.registrations.point_at(src, src_port) if self.registrations else None
        if point is not None:
            self._from_rendezvous(point, data, src, dst, now)
            return
        if self._verified(src) is None and not self._unverified.take(src, now):
            self._drop(DropReason.RATE_LIMITED)
            return
        self._request = (src, len(data))
        with self._refusing(src):
            msg = decode(data)
            if msg.type is T.HELLO:
                self._on_hello(msg, src, dst, src_port, now)
            elif msg.type is T.ACK and msg.cookie is not None:
                self._on_cookie(msg, src, now)
            else:
                self._on_message(msg, src, dst, src_port, now)

    @contextlib.contextmanager
    def _refusing(self, src: IPAddress) -> Iterator[None]:
        """Around the handling of a datagram from ``src``: what it raises is counted
        and reported as MessageRejected; then the datagram being handled is over."""
        try:
            yield
        except WireError as exc:
            self._reject(src, RejectReason.MALFORMED, str(exc))
        except _Reject as rej:
            self._reject(src, rej.reason, rej.detail)
        finally:
            self._request = None

    # == receiving ====================================================================

    def _on_hello(
        self, msg: Message, src: IPAddress, dst: IPAddress, port: int | None, now: float
    ) -> None:
        entry = self._resolve(msg.host_id) or self.table.lookup(src)
        if (entry is None or self._verified(src) is not entry) and not self._cookie_ok(
            msg, src, dst, port, now
        ):
            return  # answered with a cookie (or not at all), and nothing kept
        pin, window = self._admit(msg, entry, src)
        nat = msg.src_addr != src
        if entry is None and not self._make_room(now, half_open=False):
            return
        # Every check passed: from here on the message is applied. Through a NAT too:
        # the NAT's address (verified by the cookie) is the locator, the host's own
        # address behind it names the host.
        trigger = Trigger.HELLO_RECEIVED
        if entry is None:
            entry = self.table.create([src], trigger)
        else:
            self._claim(entry, src, active=True, prefer=True)
            self.table.transition(entry.hid, trigger)
        hid = entry.hid
        self._commit(msg, hid, window, pin, now)
        peer = self._peer(hid)
        peer.unproven = False  # its source is verified: our answer may go there
        peer.addr_seq.clear()  # a HELLO starts the peer's sequence afresh
        self._note_flags(msg, peer)
        self._hello_collision(peer, msg, src, dst, port)
        self._add_local(hid, dst, reason="HELLO received")
        peer.dead.pop((dst, src), None)  # it came along that path: it works
        if nat:
            assert msg.src_addr is not None
            self._behind_nat(entry, src, msg.src_addr, port)
        else:
            self._own_address(entry, src)
        for addr in msg.advertised:
            if addr != src and addr != msg.src_addr:
                self._claim(entry, addr, active=False)
        flags = Flags.ND if nat else Flags.NONE
        advertised = self._advertised(first=dst)
        peer.announced |= set(advertised)
        self._send_ack(
            hid,
            msg,
            src,
            dst,
            port,
            flags=flags,
            advertised=advertised,
            public_key=self._public_key(dst),
            src_addr=dst,
            observed_addr=src if nat else None,
        )
        self._events.append(ev.MessageApplied(hid, msg.type, msg.seq, stale=False))
        if nat:
            assert msg.src_addr is not None
            self._events.append(ev.NatDetected(hid, msg.src_addr, src))
        self._events.append(ev.PeerEstablished(hid, key_pinned=entry.key is not None))
        if not nat:
            self._probe_unreachable(entry, now)
        self._withdraw_leftovers(entry, now)

    def _cookie_ok(
        self, msg: Message, src: IPAddress, dst: IPAddress, port: int | None, now: float
    ) -> bool:
        """Whether a HELLO from a source no peer was verified at shows, with a cookie,
        that its sender receives there. If not, the sender gets a cookie to say HELLO
        again with (no larger than its HELLO, and within the cookie rate)."""
        if msg.cookie is not None:
            if self._cookies.valid(msg.cookie, src, port, dst, now):
                return True
            self._drop(DropReason.BAD_COOKIE)
        if not self._cookie_budget.take(now):
            self._drop(DropReason.COOKIE_RATE)
            return False
        cookie = self._cookies.make(src, port, dst, now)
        # Unsigned, counter 0: the HELLO's sender cannot check it, and needs not to.
        reply = Message(type=T.ACK, seq=msg.seq, host_id=dst, cookie=cookie)
        if self._answer(encode(reply), dst, src, port):
            self.counters.cookies_sent += 1
        return False

    def _on_cookie(self, msg: Message, src: IPAddress, now: float) -> None:
        """A cookie for a HELLO of ours: say it again, with the cookie, at once."""
        entry = self.table.lookup(src)
        peer = self._peers.get(entry.hid) if entry is not None else None
        pending = peer.pending.get(msg.seq) if peer is not None else None
        if (
            pending is None
            or pending.msg.type is not T.HELLO
            or pending.dst != src
            or pending.cookie_tries >= MAX_COOKIE_TRIES
        ):
            self._drop(DropReason.STRAY_COOKIE)
            return
        pending.cookie_tries += 1
        pending.msg = replace(pending.msg, cookie=msg.cookie)
        self._transmit(pending.msg, pending.src, pending.dst, pending.dst_port)
        self._arm(pending, now + pending.rto)

    def _hello_collision(
        self,
        peer: Peer,
        theirs: Message,
        src: IPAddress,
        dst: IPAddress,
        port: int | None,
    ) -> None:
        """Both ends said HELLO at once (theirs came from ``src`` to our ``dst``):
        exactly one exchange goes on.

        The HELLO whose Host ID is the lower address wins (both ends compare the
        same two messages, so they agree); the loser stops retransmitting its own,
        which the peer's HELLO has made moot. An ACK for it may still come: it is
        absorbed quietly (:attr:`Peer.cancelled_hellos`). The winner's next copies
        go to where the peer's came from.
        """
        for seq, pending in list(peer.pending.items()):
            ours = pending.msg
            if ours.type is not T.HELLO:
                continue
            if addr_key(theirs.host_id) < addr_key(ours.host_id):
                self._untrack(peer, seq)
                peer.cancelled_hellos.add(seq)
            elif pending.src == dst:
                # Ours goes on, and the peer now waits for it: its next copies go
                # where the peer is now (it may have left the address ours went to).
                # Not at once: no answer larger than the request it came with.
                pending.dst, pending.dst_port = src, port

    def _on_message(
        self,
        msg: Message,
        src: IPAddress,
        dst: IPAddress,
        port: int | None,
        now: float,
        relayed: bool = False,
    ) -> None:
        """A message other than a HELLO. ``relayed``: a rendezvous point forwarded it
        (from ``src``): no evidence that the peer reaches us at ``dst``."""
        if msg.type is T.NAT_ENTRY:
            self._on_nat_entry(msg, src, dst, port, now)
            return
        if msg.type is T.ACK and msg.nonce is not None:
            if self._nat_proofs.challenged(src):
                self._nat_answered(msg, src)
                return
            if self._nat_proofs.late_copy(src, msg.nonce):
                return  # another copy of a NAT's answer already taken
        entry = self._resolve(msg.host_id)
        if entry is None:
            raise _Reject(RejectReason.UNKNOWN_HOST_ID, f"no HID for Host ID {msg.host_id}")
        pin, window = self._admit(msg, entry, src)
        pending = None
        peer = self._peer(entry.hid)
        if msg.type is T.ACK:
            pending = peer.pending.get(msg.seq)
            challenge = pending.msg.nonce if pending is not None else None
            if challenge is not None and msg.nonce != challenge:
                raise _Reject(RejectReason.BAD_NONCE, f"ACK {msg.seq} lacks the nonce")
            if pending is None and msg.seq in peer.cancelled_hellos:
                peer.cancelled_hellos.discard(msg.seq)
                self._commit(msg, entry.hid, window, pin, now)
                peer.acked_us = True  # it verified our HELLO: it has our key
                return  # the ACK of a HELLO that lost a tie-break: nothing else
            if pending is None:
                raise _Reject(RejectReason.UNEXPECTED_ACK, f"no message {msg.seq} outstanding")
        self._commit(msg, entry.hid, window, pin, now)
        self._note_flags(msg, peer)
        if not relayed:
            peer.dead.pop((dst, src), None)  # it came along that path: it works after all
        if src in entry.nat and port is not None:
            peer.ports[src] = port  # the NAT gave our peer a new mapping: answer there
        if pending is not None:
            self._untrack(peer, msg.seq)
            self._completed(pending, msg, src, now)
        elif msg.type is T.PATH_PROBE:
            self._on_path_probe(msg, entry, src, dst, port, now)
        elif msg.type is T.FLOW_MOVE:
            self._on_flow_move(msg, entry, src, dst, port)
        else:
            self._on_address_event(msg, entry, src, dst, port, now, relayed)

    def _on_path_probe(
        self,
        msg: Message,
        entry: HostEntry,
        src: IPAddress,
        dst: IPAddress,
        port: int | None,
        now: float,
    ) -> None:
        nat = msg.src_addr != src
        # The probe shows the path src -> dst works (III-B1, step 4), unless a newer
        # message of the peer's withdrew src meanwhile. That the peer is at src, its
        # source says, which anyone can write: we challenge src ourselves.
        peer = self._peer(entry.hid)
        if not nat and self._newest_about(peer, src, msg.seq):
            # Where we announced dst ourselves, the peer challenging it means it has
            # our announcement: it takes our packets from dst. Our flows move now,
            # a round trip before its ACK (which waits for this answer): their first
            # packets draw answers to the address we left, which the peer sends
            # again when it switches to dst (stacktrans.rto_revert, "acknowledge
            # again"), where TCP would have waited a round trip for nothing.
            handoff = self._announcing(peer, dst, T.HANDOFF)
            self._add_local(entry.hid, dst, prefer=handoff, reason="PATH_PROBE received")
            self._validate(entry, src, prefer=False, via=dst, now=now)
        self._ack_applied(entry.hid, msg, src, dst, port, nat=nat, applied=True, nonce=msg.nonce)

    def _on_address_event(
        self,
        msg: Message,
        entry: HostEntry,
        src: IPAddress,
        dst: IPAddress,
        port: int | None,
        now: float,
        relayed: bool = False,
    ) -> None:
        # ADDR_UP and HANDOFF are sent from the new address: a different source
        # means a NAT rewrote it. Then the NAT's address is the one to reach the peer
        # at (and to challenge, at the port the NAT chose), and the peer's own
        # address behind it names the peer (III-D, beyond the paper). Not when a
        # rendezvous point forwarded it: the source it names is its word only, and
        # a challenge there could be answered by relaying it to the peer.
        nat = not relayed and msg.type in (T.ADDR_UP, T.HANDOFF) and msg.new_addr != src
        applied = self._apply_address_event(msg, entry, src, dst, port, nat, now, relayed)
        challenge = self._proving(msg, entry, src if nat else msg.new_addr, dst, now)
        if challenge is None:
            self._ack_applied(entry.hid, msg, src, dst, port, nat=nat, applied=applied)
            return
        # The ACK tells the peer we send to its new address (its TCP retransmits at
        # once on it): not before we do. It goes when the challenge is answered.
        challenge.deferred[msg.seq] = (msg, src, dst, port)
        self._events.append(ev.MessageApplied(entry.hid, msg.type, msg.seq, stale=not applied))

    def _proving(
        self, msg: Message, entry: HostEntry, new: IPAddress | None, dst: IPAddress, now: float
    ) -> Pending | None:
        """The challenge to ``new``, the address ``msg`` announces (or the NAT in front
        of it), if it is not proven yet: the one in flight, or a new one (a
        retransmission after one gave up)."""
        if msg.type not in (T.ADDR_UP, T.HANDOFF) or new is None or new in entry.active:
            return None
        peer = self._peers[entry.hid]
        ongoing = self._challenging(peer, new)
        if ongoing is None and new in entry.unreachable:
            self._validate(entry, new, prefer=msg.type is T.HANDOFF, via=dst, now=now)
            ongoing = self._challenging(peer, new)
        return ongoing

    def _ack_applied(
        self,
        hid: int,
        msg: Message,
        src: IPAddress,
        dst: IPAddress,
        port: int | None,
        *,
        nat: bool,
        applied: bool,
        nonce: bytes | None = None,
    ) -> None:
        """ACK a peer's message (ND and the observed source if a NAT was in the way)."""
        flags = Flags.ND if nat else Flags.NONE
        observed = src if nat else None
        self._send_ack(hid, msg, src, dst, port, flags=flags, observed_addr=observed, nonce=nonce)
        self._events.append(ev.MessageApplied(hid, msg.type, msg.seq, stale=not applied))

    def _apply_address_event(
        self,
        msg: Message,
        entry: HostEntry,
        src: IPAddress,
        dst: IPAddress,
        port: int | None,
        nat: bool,
        now: float,
        relayed: bool = False,
    ) -> bool:
        """Apply the parts of ``msg`` no newer message has overtaken; say if any was."""
        peer = self._peer(entry.hid)
        reason = f"{msg.type.name} received"
        applied = False
        left: list[IPAddress] = []
        for old in msg.old_addrs:
            if self._newest_about(peer, old, msg.seq):
                applied = True
                # A NAT in front of the address it left is left too.
                fronts = [public for public, private in entry.nat.items() if private == old]
                for gone in [old, *fronts]:
                    if gone in fronts and gone == src:
                        continue  # a new address behind the same NAT: it stays
                    left.append(gone)
                    if self.table.lookup(gone) is entry:
                        self.table.remove_address(entry.hid, gone, retire=True, reason=reason)
                    challenge = self._challenging(peer, gone)
                    if challenge is not None:  # nobody to answer it there any more
                        self._untrack(peer, challenge.msg.seq)
        new = msg.new_addr
        if new is not None and self._newest_about(peer, new, msg.seq):
            applied = True
            prefer = msg.type is T.HANDOFF
            if msg.type in (T.ADDR_UP, T.HANDOFF):
                # The peer reached us at dst from its new address: dst works for it
                # (unless a rendezvous point forwarded it there).
                if not relayed:
                    self._add_local(entry.hid, dst, prefer=prefer, reason=reason)
                if nat:
                    self._behind_nat(entry, src, new, port)
                self._validate(entry, src if nat else new, prefer=prefer, via=dst, now=now)
                if nat and self.table.lookup(src) is entry:
                    self.table.set_nat(entry.hid, src, new, reason=reason)
                elif not nat:
                    self._own_address(entry, new)
                self._redirect(peer, left, src if nat else new, now)
            else:
                self._claim(entry, new, active=False)
        return applied

    def _redirect(self, peer: Peer, left: list[IPAddress], to: IPAddress, now: float) -> None:
        """The peer left ``left`` for ``to``: our own address events on their way to
        where it was go to where it is, now. When both ends moved at once, each told
        the other's old address; the first to hear of the other's move (directly or
        through a rendezvous point) answers the other's question with its own."""
        for pending in peer.pending.values():
            if pending.dst in left and pending.msg.type in _EVENT_TYPES:
                pending.dst, pending.dst_port = to, peer.ports.get(to)
                self._transmit(pending.msg, pending.src, pending.dst, pending.dst_port)
                self._arm(pending, now + pending.rto)

    @staticmethod
    def _newest_about(peer: Peer, addr: IPAddress, seq: int) -> bool:
        """Per-address "latest state wins": is ``seq`` the newest word on ``addr``?

        Records ``seq`` if so. Messages about different addresses are independent,
        so an ADDR_UP is not lost behind a later HANDOFF about other addresses.
        """
        last = peer.addr_seq.get(addr)
        if last is not None and not seq_newer(seq, last):
            return False
        peer.addr_seq[addr] = seq
        return True

    # == authentication and replay ====================================================

    def _admit(
        self, msg: Message, entry: HostEntry | None, src: IPAddress
    ) -> tuple[bytes | None, bytes | int | None]:
        """Authenticate ``msg`` and check it is no replay: the key to pin (if any) and
        its replay window. Cheap checks first: a replayed message of a peer whose key
        is bound costs no signature check. Raises _Reject; changes nothing."""
        if entry is not None and entry.key is not None:
            window = self._check_replay(msg, entry, None)
            return self._authenticate(msg, entry, src), window
        pin = self._authenticate(msg, entry, src)
        return pin, self._check_replay(msg, entry, pin)

    def _authenticate(self, msg: Message, entry: HostEntry | None, src: IPAddress) -> bytes | None:
        """Check the signature; return a key to pin, if the message binds a new one.

        Raises _Reject. Changes nothing.
        """
        bound = entry.key if entry is not None else None
        expected = bound
        if expected is None:
            expected = self.trust.key_for(msg.host_id) or self.trust.key_for(src)
        if expected is None and self.config.strict:
            raise _Reject(RejectReason.UNTRUSTED, f"strict mode: no key configured for {src}")
        if expected is not None:
            if msg.signature is None:
                raise _Reject(RejectReason.UNSIGNED, "a key is bound but the message is unsigned")
            if msg.public_key is not None and msg.public_key != expected:
                raise _Reject(RejectReason.KEY_MISMATCH, "carries a key other than the bound one")
            if not verify(msg, expected):
                raise _Reject(RejectReason.BAD_SIGNATURE, "signature does not verify")
            return expected if bound is None else None
        if msg.signature is None:
            return None  # an unsigned peer, and nothing bound yet: allowed (not strict)
        if msg.public_key is None:
            raise _Reject(RejectReason.BAD_SIGNATURE, "signed, but no key is known to verify it")
        if not verify(msg, msg.public_key):
            raise _Reject(RejectReason.BAD_SIGNATURE, "signature does not verify")
        return msg.public_key  # trust on first use

    def _window_id(self, entry: HostEntry | None, key: bytes | None) -> bytes | int | None:
        # Signed peers are tracked by key, so that the window survives the HID.
        if key is not None:
            return key
        return entry.hid if entry is not None else None

    def _check_replay(
        self, msg: Message, entry: HostEntry | None, pin: bytes | None
    ) -> bytes | int | None:
        wid = self._window_id(entry, pin or (entry.key if entry is not None else None))
        window = self._windows.get(wid) if wid is not None else None
        if window is not None and not window.fresh(msg.counter):
            raise _Reject(RejectReason.REPLAY, f"counter {msg.counter} already seen or too old")
        return wid

    def _commit(
        self, msg: Message, hid: int, wid: bytes | int | None, pin: bytes | None, now: float
    ) -> None:
        """Record the accepted message's counter and pin its key."""
        if wid is None:
            wid = hid
        self._commit_window(wid, msg.counter)
        peer = self._peer(hid)
        peer.answered = True
        peer.last_used = now
        if pin is not None:
            self.table.bind_key(hid, pin, reason="key pinned")

    def _commit_window(self, wid: bytes | int, counter: int) -> None:
        window = self._windows.get(wid)
        if window is None:
            if len(self._windows) >= _MAX_KEY_WINDOWS:
                self._windows.pop(next(iter(self._windows)))
            window = self._windows[wid] = ReplayWindow()
        window.accept(counter)

    def _note_flags(self, msg: Message, peer: Peer) -> None:
        if msg.flags & Flags.NS:
            peer.nat_supported = True

    def _reject(self, src: IPAddress, reason: RejectReason, detail: str) -> None:
        rejected = self.counters.messages_rejected
        rejected[reason.value] = rejected.get(reason.value, 0) + 1
        self._events.append(ev.MessageRejected(src, reason, detail))

    # == our exchanges completing or failing ==========================================

    def _completed(self, pending: Pending, ack: Message, src: IPAddress, now: float) -> None:
        """``ack`` (from ``src``) answers ``pending``."""
        hid = pending.hid
        entry = self.table.get(hid)
        peer = self._peers[hid]
        mtype = pending.msg.type
        reason = f"ACK of {mtype.name}"
        peer.acked_us = True  # it verified a message of ours: it knows our key
        if mtype is T.HELLO:
            self._hello_acked(entry, pending, ack, now)
        elif mtype is T.PATH_PROBE:
            self._challenge_answered(entry, pending, reason)
        elif mtype in (T.ADDR_UP, T.HANDOFF) and pending.msg.new_addr in self._local:
            new = pending.msg.new_addr
            assert new is not None
            self._add_local(hid, new, prefer=mtype is T.HANDOFF, reason=reason)
            # Knocks even behind an IHMP-aware NAT (NS): a flow that has nothing to
            # send has no mapping on it until its knock makes one.
            self._observed_through(peer, hid, new, ack, now, knock=mtype is T.HANDOFF)
            locator = entry.locator
            prefer = locator is None or classify(locator, new) is Reach.UNREACHABLE
            # Where the answer came from: where the message went, unless the peer
            # moved meanwhile (and heard of ours through a rendezvous point).
            if self.table.lookup_retired(src) is not entry:
                self._validate(entry, src, prefer=prefer, via=new, now=now)
            self._events.append(ev.AddressVerified(hid, new, src))
        if mtype in _WITHDRAWING:
            for old in pending.msg.old_addrs:
                peer.withdrawn.pop(old, None)
                peer.announced.discard(old)
        if entry.local:
            self._timers.cancel((GRACE, hid, 0))
        if ack.flags & Flags.ND and ack.observed_addr is not None:
            encoded = pending.msg.new_addr or pending.msg.src_addr or pending.src
            self._events.append(ev.NatDetected(hid, encoded, ack.observed_addr))
        self._events.append(
            ev.ExchangeCompleted(
                hid, mtype, pending.msg.seq, now - pending.first_sent, pending.attempts
            )
        )

    def _challenge_answered(self, entry: HostEntry, pending: Pending, reason: str) -> None:
        """The peer echoed the nonce we sent to ``pending.dst``: it receives there.

        Unless it withdrew the address meanwhile, the address is the peer's to use,
        taken from another host if need be (the nonce proves this one has it now)."""
        if self.table.lookup_retired(pending.dst) is entry:
            return
        self._claim(entry, pending.dst, active=True, prefer=pending.prefer)
        self._add_local(entry.hid, pending.src, reason=reason)
        self.counters.addresses_validated += 1
        self._events.append(ev.AddressVerified(entry.hid, pending.src, pending.dst))
        peer = self._peers[entry.hid]
        if pending.prefer and peer.observed is not None and entry.locator == pending.dst:
            # The peer moved, and we are behind a NAT: our flows have no mapping
            # towards its new address until they send there. Their knocks make them.
            self._events.append(ev.FlowsNeedBinding(entry.hid, pending.src))
        for msg, src, dst, port in pending.deferred.values():
            nat = msg.new_addr != src
            self._send_ack(
                entry.hid,
                msg,
                src,
                dst,
                port,
                flags=Flags.ND if nat else Flags.NONE,
                observed_addr=src if nat else None,
            )

    def _hello_acked(self, entry: HostEntry, pending: Pending, ack: Message, now: float) -> None:
        hid = entry.hid
        self._add_local(hid, pending.src, reason="ACK of HELLO")
        self._observed_through(self._peers[hid], hid, pending.src, ack, now, knock=False)
        for addr in ack.advertised:
            if addr not in entry.active:
                self._claim(entry, addr, active=False)
        self.table.transition(hid, Trigger.HELLO_ACKED)  # NF (an old peer's) is ignored
        self._peers[hid].legacy_until = None
        self._peers[hid].unproven = False
        self._events.append(ev.PeerEstablished(hid, key_pinned=entry.key is not None))
        self._withdraw_leftovers(entry, now)

    def _withdraw_leftovers(self, entry: HostEntry, now: float) -> None:
        """Addresses we lost while our HELLO to this peer was still unanswered (it was
        said again from a new address) may be in its table: now that it is
        established, withdraw them, unless a withdrawal is already on its way."""
        peer = self._peers[entry.hid]
        if not peer.withdrawn or entry.locator is None or not entry.local:
            return
        if any(p.msg.type in _WITHDRAWING for p in peer.pending.values()):
            return
        self._send_addr_down(entry, now)

    def _failed(self, pending: Pending, now: float) -> None:
        hid = pending.hid
        msg = pending.msg
        self._events.append(ev.ExchangeFailed(hid, msg.type, msg.seq))
        entry = self.table.get(hid)
        peer = self._peers[hid]
        if pending.probe:
            # Evidence: this path does not work (for a while: networks change).
            peer.dead[(pending.src, pending.dst)] = now + self.config.dead_path_hold
        if msg.type is T.HELLO:
            if peer.answered:
                return  # it answered before (or since): never demoted for one HELLO
            self.table.transition(hid, Trigger.HELLO_UNANSWERED)
            peer.legacy_until = now + self.config.legacy_hold_down
            for seq in list(peer.pending):
                self._untrack(peer, seq)
            self._events.append(ev.PeerLegacy(hid))
            return
        if not pending.fallback:
            return
        # The new address could not reach the peer: tell it over a path that works.
        if entry.local and entry.locator is not None:
            unreachable = T.ADDR_UP_UNREACHABLE if msg.type is T.ADDR_UP else T.HANDOFF_UNREACHABLE
            fallback = self._message(
                peer,
                unreachable,
                host_id=self._host_id(entry),
                new_addr=msg.new_addr,
                old_addrs=msg.old_addrs,
                flags=msg.flags,
            )
            self._send_known(entry, fallback, now)
        elif msg.type is T.HANDOFF:
            self._orphan(hid, now)

    # == sending address events =======================================================

    def _introduce(self, entry: HostEntry, new: IPAddress | None, now: float) -> None:
        """Before an address event: a peer that never acknowledged anything of ours
        may not know our key (our ACK of its HELLO was lost, and our own HELLO gave
        way to its own), and would refuse the event. A HELLO first tells it our key
        and our addresses: from an address it already reaches us at (so that it
        changes nothing else), else from ``new``; under a Host ID it knows."""
        peer = self._peers[entry.hid]
        src = next((a for a in entry.local if a in self._local), new)
        if peer.acked_us or src is None or src not in self._local or entry.locator is None:
            return
        if self.local_keys.key_for(src) is None or self._hello_pending(peer):
            return
        self._send_hello(entry, src, self._host_id(entry, src), now)

    def _rehome_hellos(self, lost: IPAddress, now: float) -> None:
        """HELLOs of ours sent from ``lost`` cannot be answered there (nor go on from
        it: no IHMP from an address we left): say them again from one we have."""
        for hid, peer in list(self._peers.items()):
            stranded = [s for s, p in peer.pending.items() if p.msg.type is T.HELLO
                        and p.src == lost]  # fmt: skip
            if not stranded:
                continue
            host_id = peer.pending[stranded[0]].msg.host_id
            for seq in stranded:
                self._untrack(peer, seq)
            entry = self.table.get(hid)
            peer.withdrawn.setdefault(lost, False)  # the peer may have it (_withdraw_leftovers)
            if entry.state is HidState.HELLO_PENDING:
                # Under the Host ID it had: the peer may know us by it already (from
                # our flow's first packet, or the lost HELLO), and must find one HID.
                self._start_hello(hid, now, host_id=host_id)
            elif entry.locator is not None:
                _, src, _ = best_path([entry.locator], list(self._local))
                if src is not None:
                    self._send_hello(entry, src, self._host_id(entry, src), now)

    def _send_addr_up(self, entry: HostEntry, new: IPAddress, now: float) -> None:
        peer = self._peers[entry.hid]
        self._introduce(entry, new, now)
        reach, _, remote = self._best_path(entry, self._remotes(entry), [new], now)
        peer.announced.add(new)
        if remote is not None and reach is not Reach.UNREACHABLE:
            msg = self._message(peer, T.ADDR_UP, host_id=self._host_id(entry), new_addr=new)
            self._send_probing(entry, msg, new, remote, reach, now)
        elif entry.local and entry.locator is not None:
            msg = self._message(
                peer, T.ADDR_UP_UNREACHABLE, host_id=self._host_id(entry), new_addr=new
            )
            self._send_known(entry, msg, now)

    def _send_known(self, entry: HostEntry, msg: Message, now: float) -> None:
        """Send ``msg`` (tracked) along a path the peer has verified: from the first of
        our addresses it reaches to its locator, or failing that (they are of two IP
        versions: ours of the locator's version are gone) the first such pair of one
        version."""
        pairs = [(entry.local[0], entry.locator)] if entry.locator is not None else []
        pairs += [(lo, re) for lo in entry.local for re in entry.active]
        src, dst = next(((lo, re) for lo, re in pairs if lo.version == re.version), pairs[0])
        self._send(entry.hid, msg, src, dst, now, track=True)

    def _send_addr_down(self, entry: HostEntry, now: float) -> None:
        peer = self._peers[entry.hid]
        assert entry.locator is not None
        self._introduce(entry, entry.local[0], now)
        self._supersede(peer)
        reachable = any(peer.withdrawn.values())
        mtype = T.ADDR_DOWN if reachable else T.ADDR_DOWN_UNREACHABLE
        msg = self._message(
            peer, mtype, host_id=self._host_id(entry), old_addrs=tuple(peer.withdrawn)
        )
        self._send_known(entry, msg, now)

    def _send_handoff(self, entry: HostEntry, new: IPAddress, now: float) -> None:
        peer = self._peers[entry.hid]
        olds = tuple(a for a in peer.withdrawn if a != new)
        if not olds:
            self._send_addr_up(entry, new, now)
            return
        self._supersede(peer)
        self._introduce(entry, new, now)
        peer.announced.add(new)
        # OU: the peer could not reach us at any of the old addresses (III-B4).
        flags = Flags.NONE if any(peer.withdrawn[a] for a in olds) else Flags.OU
        host_id = self._host_id(entry)
        reach, _, remote = self._best_path(entry, self._remotes(entry), [new], now)
        if remote is not None and reach is not Reach.UNREACHABLE:
            msg = self._message(
                peer, T.HANDOFF, host_id=host_id, new_addr=new, old_addrs=olds, flags=flags
            )
            self._send_probing(entry, msg, new, remote, reach, now)
        elif entry.local and entry.locator is not None:
            msg = self._message(
                peer,
                T.HANDOFF_UNREACHABLE,
                host_id=host_id,
                new_addr=new,
                old_addrs=olds,
                flags=flags,
            )
            self._send_known(entry, msg, now)
        else:
            self._orphan(entry.hid, now)

    def _send_probing(
        self,
        entry: HostEntry,
        msg: Message,
        src: IPAddress,
        dst: IPAddress,
        reach: Reach,
        now: float,
    ) -> None:
        """Send from a new address. To a potentially reachable peer it is a probe, with
        fewer tries before falling back to a path that works, if there is one; with
        none, it is said as long as any address event: it may be the only way left."""
        probe = reach is Reach.POTENTIAL and self._has_fallback(entry)
        attempts = self.config.probe_attempts if probe else None
        self._send(entry.hid, msg, src, dst, now, track=True, attempts=attempts, fallback=True)
        self._peers[entry.hid].pending[msg.seq].probe = reach is Reach.POTENTIAL

    @staticmethod
    def _has_fallback(entry: HostEntry) -> bool:
        """Whether the peer has a path to us that works: somewhere to fall back to."""
        return bool(entry.local) and entry.locator is not None

    def _best_path(
        self, entry: HostEntry, remotes: list[IPAddress], locals_: list[IPAddress], now: float
    ) -> tuple[Reach, IPAddress | None, IPAddress | None]:
        """:func:`best_path`, paths with fresh evidence against them left out -- unless
        nothing else is left and there is no fallback: then even those are worth a try."""
        peer = self._peers[entry.hid]
        for pair in [p for p, until in peer.dead.items() if until <= now]:
            del peer.dead[pair]
        found = best_path(remotes, locals_, peer.dead)
        if found[1] is None and peer.dead and not self._has_fallback(entry):
            found = best_path(remotes, locals_)
        return found

    @staticmethod
    def _hello_pending(peer: Peer) -> bool:
        return any(p.msg.type is T.HELLO for p in peer.pending.values())

    @staticmethod
    def _announcing(
        peer: Peer, addr: IPAddress | None = None, mtype: MessageType | None = None
    ) -> bool:
        """Whether a message announcing a new address of ours (``addr``, if given; of
        type ``mtype``, if given) is in flight."""
        return any(
            p.msg.new_addr is not None
            and addr in (None, p.msg.new_addr)
            and mtype in (None, p.msg.type)
            for p in peer.pending.values()
        )

    def _supersede(self, peer: Peer) -> None:
        """Drop our in-flight address events that a new withdrawal makes obsolete.

        The new message carries every withdrawn address, so earlier withdrawals
        need no retransmission; an announcement of an address we no longer have
        must not be retransmitted either.
        """
        for seq, pending in list(peer.pending.items()):
            mtype = pending.msg.type
            gone = pending.msg.new_addr is not None and pending.msg.new_addr not in self._local
            if mtype in _WITHDRAWING or (mtype in _EVENT_TYPES and gone):
                self._untrack(peer, seq)

    def _probe_unreachable(self, entry: HostEntry, now: float) -> None:
        """PATH_PROBE every address of the peer that is not clearly unreachable."""
        peer = self._peers[entry.hid]
        locals_ = [a for a in self._local if advertisable(a)]
        for remote in sorted(entry.unreachable, key=addr_key):
            reach, local, _ = self._best_path(entry, [remote], locals_, now)
            if local is None or reach is Reach.UNREACHABLE:
                continue
            if not self._challenging(peer, remote):
                self._challenge(entry, local, remote, now, attempts=self.config.probe_attempts)

    # == path validation ==============================================================

    def _validate(
        self, entry: HostEntry, addr: IPAddress, *, prefer: bool, via: IPAddress, now: float
    ) -> None:
        """The peer says it is at ``addr`` (a HANDOFF, an ADDR_UP, a probe's source):
        use it for the peer's data, first if ``prefer``, once a challenge sent *to*
        ``addr`` comes back answered with its nonce. An address already verified is
        used at once. Until then it is one the peer's packets may come from, never
        one ours go to: no flow data at all goes to an unverified address.

        The challenge goes from ``via`` (where the claim reached us), and is
        retransmitted as long as an address event would be: a lossy control path
        delays the switch, it must not lose it."""
        if addr in entry.active:
            self._claim(entry, addr, active=True, prefer=prefer)
            return
        self._claim(entry, addr, active=False)
        peer = self._peers[entry.hid]
        ongoing = self._challenging(peer, addr)
        if ongoing is not None:
            ongoing.prefer |= prefer
            return
        if sum(p.msg.type is T.PATH_PROBE for p in peer.pending.values()) >= (
            self.config.max_challenges
        ):
            self._drop(DropReason.CHALLENGE_CAP)
            return
        local: IPAddress | None = via
        if via not in self._local:
            _, local, _ = best_path([addr], [a for a in self._local if advertisable(a)])
        if local is not None:
            self._challenge(entry, local, addr, now, prefer=prefer)

    @staticmethod
    def _challenging(peer: Peer, addr: IPAddress) -> Pending | None:
        """Our challenge to ``addr`` in flight, if any."""
        for pending in peer.pending.values():
            if pending.msg.type is T.PATH_PROBE and pending.dst == addr:
                return pending
        return None

    def _challenge(
        self,
        entry: HostEntry,
        local: IPAddress,
        remote: IPAddress,
        now: float,
        *,
        prefer: bool = False,
        attempts: int | None = None,
    ) -> None:
        """PATH_PROBE ``remote`` from ``local`` with a fresh unpredictable nonce."""
        peer = self._peers[entry.hid]
        nonce = self._rng.getrandbits(8 * NONCE_LEN).to_bytes(NONCE_LEN, "big")
        msg = self._message(
            peer, T.PATH_PROBE, host_id=self._host_id(entry, local), src_addr=local, nonce=nonce
        )
        self._send(entry.hid, msg, local, remote, now, track=True, attempts=attempts)
        peer.pending[msg.seq].prefer = prefer
        peer.pending[msg.seq].probe = classify(remote, local) is Reach.POTENTIAL
        self.counters.challenges_sent += 1

    # == local address bookkeeping ====================================================

    def _lose_local(self, entry: HostEntry, addr: IPAddress) -> bool:
        """Forget ``addr`` as a way to reach us; remember to withdraw it from the peer.

        Returns whether the peer knew of ``addr`` at all.
        """
        peer = self._peers[entry.hid]
        reachable = addr in entry.local
        if reachable:
            self.table.remove_local(entry.hid, addr, reason="local address lost")
        if not reachable and addr not in peer.announced:
            return False
        peer.withdrawn[addr] = reachable or peer.withdrawn.get(addr, False)
        return True

    def _orphan(self, hid: int, now: float) -> None:
        """``hid`` has no path left: drop it when its grace period is over."""
        if (GRACE, hid, 0) not in self._timers:
            self._timers.set((GRACE, hid, 0), now + self.config.path_loss_grace)

    def _make_room(self, now: float, *, half_open: bool) -> bool:
        """Room for one more host (``half_open``: one we say HELLO to first). At a cap,
        the least recently used host that carries no flow goes; False if none may."""
        if (
            half_open
            and self.half_open() >= self.config.max_half_open
            and not self._evict([e for e in self.table if self._saying_hello(e)])
        ):
            self._drop(DropReason.HALF_OPEN_CAP)
            return False
        if len(self.table) >= self.config.max_peers and not self._evict(list(self.table)):
            self._drop(DropReason.PEER_CAP)
            return False
        return True

    def _evict(self, candidates: list[HostEntry]) -> bool:
        idle = [e for e in candidates if not self._in_use(e.hid)]
        if not idle:
            return False
        oldest = min(idle, key=lambda e: self._peer(e.hid).last_used)
        self._drop_peer(oldest.hid, reason="evicted to make room")
        self.counters.peers_evicted += 1
        return True

    def _verified(self, addr: IPAddress) -> HostEntry | None:
        """The host verified at ``addr``, if any: one of its active addresses, unless
        all we know of it is a flow it started (whose source anyone can write)."""
        entry = self.table.lookup(addr)
        if entry is None or addr not in entry.active:
            return None
        peer = self._peers.get(entry.hid)
        return None if peer is not None and peer.unproven else entry

    def _drop(self, reason: DropReason) -> None:
        dropped = self.counters.dropped
        dropped[reason.value] = dropped.get(reason.value, 0) + 1

    def _drop_peer(self, hid: int, reason: str = "no path left") -> None:
        entry = self.table.get(hid)
        addresses = tuple(entry.active) + tuple(sorted(entry.unreachable, key=addr_key))
        peer = self._peers.pop(hid, None)
        for seq in list(peer.pending if peer is not None else ()):
            self._timers.cancel((RETRANSMIT, hid, seq))
        self._timers.cancel((GRACE, hid, 0))
        self._windows.pop(hid, None)
        for alias in [a for a, h in self._aliases.items() if h == hid]:
            del self._aliases[alias]
        self._timers.cancel((KEEPALIVE, hid, 0))
        self.table.remove(hid, reason=reason)
        self._events.append(ev.PeerLost(hid, addresses))

    def _resolve(self, host_id: IPAddress) -> HostEntry | None:
        """The HID a Host ID names: a current address, one its host withdrew, or the
        host's own address behind a NAT."""
        entry = self.table.lookup(host_id) or self.table.lookup_retired(host_id)
        if entry is None and host_id in self._aliases:
            hid = self._aliases[host_id]
            entry = self.table.get(hid) if hid in self.table else None
        return entry

    # == message construction and transmission ========================================

    def _peer(self, hid: int) -> Peer:
        peer = self._peers.get(hid)
        if peer is None:
            # A random initial sequence number per peer, as the paper asks.
            peer = self._peers[hid] = Peer(seq=self._rng.getrandbits(16))
        return peer

    def _signaled(self) -> list[HostEntry]:
        """Peers that get address events: those that completed a HELLO exchange."""
        return [e for e in self.table if e.state is HidState.ESTABLISHED and e.hid in self._peers]

    def _remotes(self, entry: HostEntry) -> list[IPAddress]:
        return list(entry.active) + sorted(entry.unreachable, key=addr_key)

    def _advertised(self, first: IPAddress) -> tuple[IPAddress, ...]:
        others = [a for a in self._local if a != first and advertisable(a)]
        return (first, *others)[:32]

    def _host_id(self, entry: HostEntry, fallback: IPAddress | None = None) -> IPAddress:
        """An address of ours that the peer has in its table (the Host ID field)."""
        if entry.local:
            return entry.local[0]
        peer = self._peers[entry.hid]
        if peer.withdrawn:
            return next(iter(peer.withdrawn))
        if peer.announced:
            return sorted(peer.announced, key=addr_key)[0]
        if fallback is not None:
            return fallback
        return next(iter(self._local))

    def _public_key(self, src: IPAddress) -> bytes | None:
        key = self.local_keys.key_for(src)
        return public_key_bytes(key) if key is not None else None

    def _add_local(
        self, hid: int, addr: IPAddress, *, prefer: bool = False, reason: str = ""
    ) -> None:
        """Record that the peer reaches us at ``addr`` -- if it is a locator of ours.

        An address that left this host (a ghost kept for its flows) never is.
        """
        if addr in self._local:
            self.table.add_local(hid, addr, prefer=prefer, reason=reason)

    def _claim(
        self, entry: HostEntry, addr: IPAddress, *, active: bool, prefer: bool = False
    ) -> None:
        """Add a remote address to ``entry``, taking it from another HID if need be.

        An unverified (unreachable) address is never taken from another host: two
        private networks may well use the same address.
        """
        owner = self.table.lookup(addr)
        if owner is not None and owner is not entry:
            if not active:
                return
            self.table.remove_address(owner.hid, addr, reason=f"address moved to HID {entry.hid}")
        try:
            if active:
                self.table.add_active(entry.hid, addr, prefer=prefer, reason="IHMP")
            elif addr not in entry.active:
                self.table.mark_unreachable(entry.hid, addr, reason="IHMP")
        except HidTableError:  # pragma: no cover - guarded by the lookup above
            return

    def _message(self, peer: Peer, mtype: MessageType, **fields: object) -> Message:
        seq = peer.seq
        peer.seq = (peer.seq + 1) & 0xFFFF
        return Message(type=mtype, seq=seq, **fields)  # type: ignore[arg-type]

    def _send(
        self,
        hid: int,
        msg: Message,
        src: IPAddress,
        dst: IPAddress,
        now: float,
        *,
        track: bool,
        attempts: int | None = None,
        fallback: bool = False,
        dst_port: int | None = None,
        flags: Flags = Flags.NONE,
    ) -> None:
        """Send ``msg``; with ``track``, retransmit it until it is acknowledged, or
        ``attempts`` transmissions, or (address events, with no ``attempts``) until
        the exchange deadline; a HELLO gets ``max_attempts``."""
        if flags:
            msg = replace(msg, flags=msg.flags | flags)
        if dst_port is None:
            dst_port = self._peers[hid].ports.get(dst)
        self._transmit(msg, src, dst, dst_port)
        if track:
            rto = self.config.initial_rto
            if attempts is None and msg.type is T.HELLO:
                attempts = self.config.max_attempts
            give_up_at = None if attempts else now + self.config.exchange_deadline
            pending = Pending(
                hid=hid,
                msg=msg,
                src=src,
                dst=dst,
                dst_port=dst_port,
                max_attempts=attempts,
                give_up_at=give_up_at,
                fallback=fallback,
                first_sent=now,
                deadline=now + rto,
                rto=rto,
            )
            self._peers[hid].pending[msg.seq] = pending
            self._arm(pending, pending.deadline)

    def _arm(self, pending: Pending, deadline: float) -> None:
        """(Re)arm the retransmission timer of ``pending`` for ``deadline``."""
        pending.deadline = deadline
        self._timers.set((RETRANSMIT, pending.hid, pending.msg.seq), deadline)

    def _untrack(self, peer: Peer, seq: int) -> None:
        """Forget message ``seq`` of ours (answered, superseded or given up on)."""
        pending = peer.pending.pop(seq, None)
        if pending is not None:
            self._timers.cancel((RETRANSMIT, pending.hid, seq))

    def _send_ack(
        self,
        hid: int,
        msg: Message,
        src: IPAddress,
        dst: IPAddress,
        port: int | None,
        *,
        flags: Flags = Flags.NONE,
        **fields: object,
    ) -> None:
        """ACK ``msg`` (from ``src`` to our ``dst``) back along the path it came by."""
        ack = Message(type=T.ACK, seq=msg.seq, host_id=dst, flags=flags, **fields)  # type: ignore[arg-type]
        self._answer(self._stamp(ack, dst), dst, src, port)

    def _answer(self, data: bytes, src: IPAddress, dst: IPAddress, port: int | None) -> bool:
        """Queue an answer to the datagram being handled (from ``dst``). To a source no
        peer was verified at, never more bytes than it sent: no amplification."""
        request = self._request
        if (
            request is not None
            and request[0] == dst
            and len(data) > request[1]
            and self._verified(dst) is None
        ):
            self._drop(DropReason.TOO_LARGE)
            return False
        self._out.append(Datagram(data, src, dst, port))
        self.counters.messages_sent += 1
        return True

    def _retransmit(self, pending: Pending, now: float) -> None:
        """Say ``pending`` again; an address event also through every rendezvous
        point, since the direct path did not answer it."""
        pending.attempts += 1
        pending.rto = min(pending.rto * 2, self.config.max_rto)
        self._arm(pending, now + pending.rto)
        self.counters.retransmissions += 1
        self._transmit(pending.msg, pending.src, pending.dst, pending.dst_port)
        if self.registrations and pending.msg.type in RELAYABLE:
            self._relay(pending)

    def _transmit(self, msg: Message, src: IPAddress, dst: IPAddress, dst_port: int | None) -> None:
        self._out.append(Datagram(self._stamp(msg, src), src, dst, dst_port))
        self.counters.messages_sent += 1

    def _stamp(self, msg: Message, src: IPAddress) -> bytes:
        """``msg`` encoded with a fresh counter, signed with the key of ``src``.

        A fresh counter (and signature) every time, retransmissions included: the
        receiver's replay window must see each copy as new."""
        self._counter += 1
        key: Ed25519PrivateKey | None = self.local_keys.key_for(src)
        return encode(replace(msg, counter=self._counter, signature=None), key)
