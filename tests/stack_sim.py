"""DIME hosts with both halves, IHMP and StackTrans, over the in-memory network.

The tier between the engine simulation (tests/ihmp_sim.py) and real network
namespaces. A :class:`StackHost` is a real :class:`~ihmp.engine.IhmpEngine`, a real
:class:`~stacktrans.dataplane.Dataplane` over a :class:`~tests.stack_kernel.FakeKernel`,
a real :class:`~stacktrans.userspace.UserspacePath` and a real
:class:`~dime.monitor.HandoffDetector`, wired as ``dime/daemon.py`` wires them:

* the engine's events go, in order, to ``Dataplane.host_changed`` (HostChanged), then
  the kernel maps are flushed, and only then are the engine's datagrams sent (the
  daemon's ``_pump``; :class:`~tests.ihmp_sim.Net` drains a host's events before it
  takes its datagrams);
* the Dataplane's ``hid_for`` is ``IhmpEngine.flow_started``;
* link changes go through the detector (``handoff_window``, ghosts ignored, soft
  removals at once), whose events go to the Dataplane (``local_added``/
  ``local_removed``) and then the engine (``address_added``/``address_removed``/
  ``handoff``), then the pump: ``Daemon._on_added/_on_removed/_on_handoff``;
* the Dataplane's effects are carried out as ``StackTrans._follow_up`` does: ghosts
  and identifier routes become what the Dataplane asks for (:attr:`StackHost.ghosts`,
  :attr:`StackHost.routes`), failed TCP sockets are destroyed.

A :class:`Node` alone is a host without DIME (its kernel leaves packets alone, and
IHMP datagrams to it are lost: it answers nothing).

Packets (:meth:`StackNet.transmit`) go as the kernel sends them, in either data-plane
mode: ``nft`` (conntrack-new packets and SYN-ACKs through the user-space path, then
the ``out``/``in`` chains with the maps) or ``nfqueue`` (every packet through the
user-space path, as bytes). The network delivers a packet when the sender has its
source address, the destination is a current address of some node and the sites/NAT
model of :class:`~tests.ihmp_sim.Net` lets it through; the receiver delivers it locally
when its destination is one of its addresses or ghosts, to the socket of its flow (a
listening socket accepts a SYN or a UDP datagram); anything else is a stray, what TCP
answers with a reset. Every transmission is recorded as a :class:`Trace`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from ipaddress import ip_interface

from dime.monitor import Added, AddressEvent, HandoffDetector, Removed
from ihmp.addr import IPAddress, IPInterface
from ihmp.engine import EngineConfig
from ihmp.hosts import HostChanged
from ihmp.keys import TrustStore
from stacktrans.dataplane import Dataplane, Effects
from stacktrans.socket_table import TCP, UDP, FlowKey
from stacktrans.userspace import UserspacePath
from tests.ihmp_sim import Host, Net
from tests.stack_kernel import (
    ACK,
    PSH,
    SYN,
    FakeKernel,
    Learned,
    Maps,
    Pkt,
    decode,
    encode,
    flow_tuple,
    in_chain,
    out_chain,
)

MODES = ["nft", "nfqueue"]


@dataclass
class Socket:
    """An application's socket: the flow as it sees it, and what it received."""

    key: FlowKey
    received: list[bytes] = field(default_factory=list)
    aborted: bool = False  # destroyed by dime (ss -K): the application got an error


class Node:
    """A host of the packet network. On its own it runs no DIME."""

    def __init__(self, name: str, addrs: list[str]) -> None:
        self.name = name
        self.links: dict[IPAddress, IPInterface] = {}
        for a in addrs:
            iface = ip_interface(a)
            self.links[iface.ip] = iface
        self.sockets: dict[FlowKey, Socket] = {}
        self.listening: set[tuple[int, int]] = set()  # (protocol, port), any address

    def __repr__(self) -> str:
        return self.name

    def current_addresses(self) -> list[IPAddress]:
        return list(self.links)

    def is_local(self, addr: IPAddress) -> bool:
        """Whether a packet to ``addr`` is delivered here."""
        return addr in self.links

    def can_send_from(self, src: IPAddress) -> bool:
        """Whether a packet with source ``src`` leaves: from an address of a link, or
        from another local address (a ghost on lo) when a link of its family gives
        it a route, as Linux does (no source check on output)."""
        if src in self.links:
            return True
        return self.is_local(src) and any(a.version == src.version for a in self.links)

    def _held(self, key: FlowKey) -> bool:
        """Chain ``synack_*``: whether the kernel's flow set holds ``key``."""
        return flow_tuple(key) in self.kernel.maps.flows

    def egress(self, pkt: Pkt) -> Pkt | None:
        """What the kernel makes of a packet a socket sends; None: rejected."""
        return pkt

    def ingress(self, pkt: Pkt) -> Pkt:
        """What the kernel makes of a packet that arrives, before local delivery."""
        return pkt

    def after_packet(self) -> None:
        """The loop's turn after a packet's verdict."""

    def link_up(self, iface: IPInterface, now: float) -> None:
        self.links[iface.ip] = iface

    def link_down(self, addr: IPAddress, now: float) -> None:
        del self.links[addr]

    def receive(self, pkt: Pkt) -> Socket | None:
        """The socket ``pkt`` reaches (a listener accepts a new flow), or None."""
        key = pkt.received_by()
        sock = self.sockets.get(key)
        opens = pkt.proto == UDP or pkt.flags & (SYN | ACK) == SYN
        if sock is None and opens and (pkt.proto, pkt.dport) in self.listening:
            sock = self.sockets[key] = Socket(key)
        if sock is None or sock.aborted:
            return None
        sock.received.append(pkt.payload)
        return sock


class StackHost(Host, Node):
    """A DIME host: IHMP, StackTrans and the address monitor, as the daemon runs them.

    ``running`` False: dime is not up yet (packets pass untouched, conntrack still
    tracks them, address changes reach nobody); :meth:`StackNet.up` starts it and
    adopts the existing flows.
    """

    def __init__(
        self,
        name: str,
        addrs: list[str],
        *,
        seed: int,
        mode: str = "nft",
        config: EngineConfig | None = None,
        trust: TrustStore | None = None,
        handoff_window: float = 1.0,
        running: bool = True,
    ) -> None:
        Host.__init__(self, name, addrs, seed=seed, config=config, trust=trust)
        Node.__init__(self, name, addrs)
        assert mode in MODES, mode
        self.mode = mode
        self.running = running
        self.clock: Callable[[], float] = lambda: 0.0
        self.flush_net: Callable[[], None] = lambda: None
        self.kernel = FakeKernel(fast_path=mode == "nft")
        self.dataplane = Dataplane(self.kernel, self.engine.flow_started)
        self.dataplane.set_local_addresses(self.links)
        self.path = UserspacePath(self.dataplane, lambda: self.clock())
        self.conntrack: set[FlowKey] = set()  # as the sockets see them (identifiers)
        self.queued = 0  # packets through the user-space path
        self.sync_queued = 0  # nft mode: first packets the learn chains queued
        self.ghosts: set[IPAddress] = set()
        self.routes: dict[IPAddress, IPAddress] = {}  # identifier -> locator
        self.effects: list[tuple[float, Effects]] = []
        self.address_events: list[AddressEvent] = []  # what the monitor reported
        self.detector = HandoffDetector(handoff_window, self.links.values(), soft_immediate=True)
        self.drain_events()

    # -- the daemon's pump and StackTrans' follow-up -----------------------------------

    def drain_events(self) -> None:
        """Events to the Dataplane in order, then the kernel flush (``Daemon._pump``)."""
        while (e := self.engine.next_event()) is not None:
            self.events.append(e)
            if isinstance(e, HostChanged):
                self.dataplane.host_changed(e)
        self.kernel.flush()
        self._follow_up()

    def _follow_up(self) -> None:
        effects = self.dataplane.take_effects()
        if not effects:
            return
        self.effects.append((self.clock(), effects))
        if effects.reconcile:
            self.ghosts = self.dataplane.ghosts_needed()
            self.routes = self.dataplane.translated_remotes()
        for entry in effects.failed:
            sock = self.sockets.get(entry.key)
            if entry.key.proto == TCP and sock is not None:
                sock.aborted = True

    def moved(self) -> list[tuple[float, set[int]]]:
        """When the Dataplane reported hosts as moved, and which."""
        return [(t, e.moved) for t, e in self.effects if e.moved]

    def failed(self) -> list[tuple[float, list[FlowKey]]]:
        return [(t, [s.key for s in e.failed]) for t, e in self.effects if e.failed]

    def is_ghost(self, addr: IPAddress) -> bool:
        return addr in self.ghosts

    # -- addresses: links -> monitor -> StackTrans and the engine ----------------------

    def current_addresses(self) -> list[IPAddress]:
        return list(self.links)

    def is_local(self, addr: IPAddress) -> bool:
        return addr in self.links or addr in self.ghosts

    def link_up(self, iface: IPInterface, now: float) -> None:
        self.links[iface.ip] = iface
        if self.running:
            self.detector.added(iface, now)
            self._poll(now)

    def link_down(self, addr: IPAddress, now: float) -> None:
        iface = self.links.pop(addr)
        if self.running:
            self.detector.removed(iface, now)
            self._poll(now)

    def _poll(self, now: float) -> None:
        for event in self.detector.poll(now):
            self._address_event(event, now)

    def _address_event(self, event: AddressEvent, now: float) -> None:
        """``Daemon._on_added``, ``_on_removed``, ``_on_handoff``."""
        self.address_events.append(event)
        if isinstance(event, Added):
            self.dataplane.local_added(event.iface.ip)
            self._follow_up()
            self.engine.address_added(event.iface, now)
        elif isinstance(event, Removed):
            self.dataplane.local_removed(event.iface.ip)
            self._follow_up()
            self.engine.address_removed(event.iface, now)
        else:
            self.dataplane.local_removed(event.old.ip)
            self._follow_up()
            self.dataplane.local_added(event.new.ip)
            self._follow_up()
            self.engine.handoff(event.old, event.new, now)
        self.flush_net()

    def next_timer(self) -> float | None:
        timers = [t for t in (self.engine.get_timer(), self.detector.deadline()) if t is not None]
        return min(timers, default=None)

    def handle_timer(self, now: float) -> None:
        timer = self.engine.get_timer()
        if timer is not None and timer <= now:
            self.engine.handle_timer(now)
        deadline = self.detector.deadline()
        if deadline is not None and deadline <= now:
            self._poll(now)

    # -- packets -----------------------------------------------------------------------

    def _track(self, key: FlowKey) -> bool:
        """Conntrack (priority -200, both hooks): whether ``key`` starts a connection."""
        new = key not in self.conntrack
        self.conntrack.add(key)
        return new

    def _queued(self, handler: Callable[[bytes], bytes | None], pkt: Pkt) -> Pkt:
        """Through an NFQUEUE to the user-space path and back."""
        self.queued += 1
        out = handler(encode(pkt))
        return pkt if out is None else decode(out)

    def _first(self, pkt: Pkt, key: FlowKey, outbound: bool) -> Pkt:
        """nft mode, a packet conntrack saw first (-200): the learn chains (-160), then
        the queue rules (-150) if they marked it. A notice (NFLOG) reaches the
        daemon here at once; the real one comes a moment later, which only delays
        a HELLO."""
        learned = self.kernel.learn(key)
        if learned is Learned.SYNC:
            self.sync_queued += 1
            return self._queued(self.path.outbound if outbound else self.path.inbound, pkt)
        plain_syn = pkt.proto == TCP and pkt.flags & (SYN | ACK) == SYN
        if learned is not Learned.KNOWN and not plain_syn:  # (its SYN-ACK tells)
            self.path.observe(encode(pkt), outbound, learned is Learned.LEARNED)
        return pkt

    def _held(self, key: FlowKey) -> bool:
        """Chain ``synack_*``: whether the kernel's flow set holds ``key``."""
        return flow_tuple(key) in self.kernel.maps.flows

    def egress(self, pkt: Pkt) -> Pkt | None:
        new = self._track(pkt.sent_by())
        if not self.running:
            return pkt
        if self.mode == "nfqueue":
            pkt = self._queued(self.path.outbound, pkt)  # mangle OUTPUT, -150
        elif new:
            pkt = self._first(pkt, pkt.sent_by(), outbound=True)
        elif pkt.syn_ack:  # logged (learn_out), saying whether the kernel holds it
            self.path.observe(encode(pkt), True, self._held(pkt.sent_by()))
        return out_chain(self.kernel.maps, pkt)  # chain out, -140

    def ingress(self, pkt: Pkt) -> Pkt:
        if not self.running:
            self._track(pkt.received_by())
            return pkt
        if self.mode == "nfqueue":
            pkt = self._queued(self.path.inbound, pkt)  # raw PREROUTING, -300
            self._track(pkt.received_by())
            return pkt
        pkt = in_chain(self.kernel.maps, pkt)  # chain in, -300
        if self._track(pkt.received_by()):
            pkt = self._first(pkt, pkt.received_by(), outbound=False)
        elif pkt.syn_ack:  # logged (learn_in)
            self.path.observe(encode(pkt), False, self._held(pkt.received_by()))
        return pkt

    def after_packet(self) -> None:
        # The packet path's follow-up, and the pump that _hid_for schedules; the
        # datagrams it queued (a HELLO) go at the network's next flush.
        self.drain_events()

    def sweep(self) -> None:
        """The liveness sweep, twice: flows whose socket is gone end (a flow goes
        when two sweeps in a row miss it)."""
        alive = {k for k, s in self.sockets.items() if not s.aborted}
        for _ in range(2):
            self.dataplane.sweep(alive, self.clock())
        self.drain_events()


@dataclass
class Trace:
    """One packet: as sent, on the wire, as received, and what became of it."""

    at: float
    sender: Node
    sent: Pkt
    wire: Pkt | None = None
    receiver: Node | None = None
    received: Pkt | None = None
    socket: FlowKey | None = None
    #: delivered, stray (no socket: a reset), rejected (dead flow), no-source (the
    #: sender lacks the source address), lost (nobody reachable has the
    #: destination), not-local (the receiver does not have the destination)
    outcome: str = ""

    def __str__(self) -> str:
        return (
            f"t={self.at} {self.sender}: {self.sent} | wire {self.wire} | "
            f"{self.receiver}: {self.received} -> {self.outcome} {self.socket}"
        )


@dataclass
class Flow:
    """A flow opened by ``client``; ``key`` is its socket (identifiers)."""

    client: Node
    server: Node
    key: FlowKey

    @property
    def server_key(self) -> FlowKey:
        k = self.key
        return FlowKey(k.proto, k.remote, k.rport, k.local, k.lport)

    def packet(
        self,
        from_client: bool,
        payload: bytes,
        flags: int = PSH | ACK,
        seq: int = 0,
        ack: int = 0,
    ) -> Pkt:
        k = self.key if from_client else self.server_key
        tcp = k.proto == TCP
        return Pkt(k.proto, k.local, k.lport, k.remote, k.rport,
                   flags if tcp else 0, seq, payload, ack if tcp else 0)  # fmt: skip


@dataclass
class StackNet(Net):
    """The in-memory network, carrying packets among :class:`Node` s as well."""

    nodes: list[Node] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)

    def stack_host(self, name: str, addrs: list[str], *, seed: int, **kw: object) -> StackHost:
        host = StackHost(name, addrs, seed=seed, **kw)  # type: ignore[arg-type]
        host.clock = lambda: self.now
        host.flush_net = self.flush
        self.add(host)
        self.nodes.append(host)
        return host

    def legacy_host(self, name: str, addrs: list[str]) -> Node:
        node = Node(name, addrs)
        self.nodes.append(node)
        return node

    def up(self, *hosts: StackHost) -> None:
        """``dime up`` on ``hosts``: StackTrans adopts the flows their sockets have."""
        for host in hosts:
            host.running = True
        for host in hosts:
            host.dataplane.adopt(list(host.sockets), self.now)
            host.drain_events()
        self.flush()

    # -- links ---------------------------------------------------------------------------

    def detach(self, node: Node, addr: str) -> None:
        """``node`` loses the address and its link."""
        node.link_down(ip_interface(addr).ip, self.now)
        self.flush()

    def attach(self, node: Node, addr: str) -> None:
        """``node`` gets a link with this address (``a.b.c.d/len``)."""
        node.link_up(ip_interface(addr), self.now)
        self.flush()

    # -- packets -------------------------------------------------------------------------

    def node_at(self, addr: IPAddress) -> Node | None:
        return next((n for n in self.nodes if addr in n.links), None)

    def transmit(self, sender: Node, pkt: Pkt) -> Trace:
        trace = Trace(self.now, sender, pkt)
        self.traces.append(trace)
        touched = [sender]
        wire = trace.wire = sender.egress(pkt)
        if wire is None:
            trace.outcome = "rejected"
        elif not sender.can_send_from(wire.src):
            trace.outcome = "no-source"
        else:
            ok, seen = self.reaches(wire.src, wire.dst)
            target = self.node_at(wire.dst) if ok else None
            if target is None:
                trace.outcome = "lost"
            else:
                touched.append(target)
                trace.receiver = target
                got = trace.received = target.ingress(replace(wire, src=seen))
                sock = target.receive(got) if target.is_local(got.dst) else None
                trace.socket = sock.key if sock is not None else None
                trace.outcome = (
                    "not-local" if not target.is_local(got.dst)
                    else "delivered" if sock is not None
                    else "stray"
                )  # fmt: skip
        for node in touched:
            node.after_packet()
        return trace

    def send(self, flow: Flow, *, from_client: bool = True, payload: bytes = b"data") -> Trace:
        """One packet of ``flow`` from one end's socket."""
        sender = flow.client if from_client else flow.server
        return self.transmit(sender, flow.packet(from_client, payload))

    def close(self, flow: Flow) -> None:
        """Both ends close their sockets, and StackTrans' sweep sees them gone."""
        del flow.client.sockets[flow.key]
        del flow.server.sockets[flow.server_key]
        for node in (flow.client, flow.server):
            if isinstance(node, StackHost):
                node.sweep()

    def connect(
        self,
        client: Node,
        server: Node,
        proto: int,
        local: IPAddress,
        lport: int,
        remote: IPAddress,
        rport: int,
    ) -> Flow:
        """``client`` opens a flow to ``server`` (which listens on ``rport``):
        a TCP handshake, or a UDP request and its reply."""
        server.listening.add((proto, rport))
        flow = Flow(client, server, FlowKey(proto, local, lport, remote, rport))
        client.sockets[flow.key] = Socket(flow.key)
        if proto == TCP:
            handshake = [
                (True, SYN, 1000, 0), (False, SYN | ACK, 5000, 1001), (True, ACK, 1001, 5001)
            ]  # fmt: skip
        else:
            handshake = [(True, 0, 0, 0), (False, 0, 0, 0)]
        for from_client, flags, seq, ack in handshake:
            packet = flow.packet(from_client, b"", flags, seq, ack)
            trace = self.transmit(client if from_client else server, packet)
            self.assert_delivered(trace, flow, from_client, b"")
        return flow

    def assert_delivered(self, trace: Trace, flow: Flow, from_client: bool, payload: bytes) -> None:
        """The packet reached the other end's socket of ``flow``, with its identifiers."""
        receiver, key = (flow.server, flow.server_key) if from_client else (flow.client, flow.key)
        assert trace.outcome == "delivered", trace
        assert trace.receiver is receiver and trace.socket == key, trace
        assert trace.received is not None and trace.received.received_by() == key, trace
        assert receiver.sockets[key].received[-1] == payload, trace

    def exchange(self, flow: Flow, tag: str = "") -> None:
        """A packet each way, each delivered to the flow's socket at the other end."""
        for from_client in (True, False):
            payload = f"{tag} {'request' if from_client else 'reply'} t={self.now}".encode()
            trace = self.send(flow, from_client=from_client, payload=payload)
            self.assert_delivered(trace, flow, from_client, payload)

    def assert_clean(self, *flows: Flow) -> None:
        """Nothing reached a wrong or missing socket: no strays, and every node has
        exactly the sockets of ``flows``."""
        assert [t for t in self.traces if t.outcome in ("stray", "not-local")] == []
        for node in self.nodes:
            want = {f.key for f in flows if f.client is node}
            want |= {f.server_key for f in flows if f.server is node}
            assert set(node.sockets) == want, (node, set(node.sockets), want)


# -- expectations ----------------------------------------------------------------------


def maps_of(
    hid: int,
    flows: Iterable[FlowKey],
    *,
    locators: Iterable[IPAddress],
    rloc: dict[IPAddress, IPAddress] | None = None,
    lloc: dict[tuple[IPAddress, IPAddress], IPAddress] | None = None,
) -> Maps:
    """The maps of a host whose flows all go to one peer, HID ``hid``."""
    flows = list(flows)
    return Maps(
        flows={flow_tuple(k) for k in flows},
        rloc=rloc or {},
        lloc=lloc or {},
        hid=dict.fromkeys(locators, hid),
        rid={(hid, k.proto, k.rport, k.lport): k.remote for k in flows},
        lid={(hid, k.proto, k.rport, k.lport): k.local for k in flows},
    )


def assert_maps(host: StackHost, want: Maps) -> None:
    """The kernel holds ``want`` (in nfqueue mode: its dead set; the Dataplane's
    decisions, which the user-space path applies, are ``want`` all the same)."""
    assert host.kernel.nft_view == want, (host, host.kernel.nft_view, want)
    assert host.kernel.maps == (want if host.mode == "nft" else want.only_dead())
    assert host.kernel.refused == []
