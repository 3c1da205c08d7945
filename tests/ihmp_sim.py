"""An in-memory network with a fake clock for driving IHMP engines back to back.

Reachability model: public addresses (see ihmp.reachability) reach each other;
a private address reaches another private address only within the same *site*;
a private address reaches a public one only through a NAT given in ``nat``.

A host's ``current_addresses``, ``next_timer``, ``handle_timer`` and ``drain_events``
are what the network asks of it; tests/stack_sim.py's hosts add their data plane
and address monitor there.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ihmp import events as ev
from ihmp.addr import IPAddress
from ihmp.engine import Datagram, EngineConfig, IhmpEngine
from ihmp.hosts import HostEntry, HostSnapshot
from ihmp.keys import LocalKeys, TrustStore
from ihmp.reachability import best_path, block_of
from ihmp.registration import RendezvousPoint
from ihmp.wire import MessageType, decode


def A(s: str) -> IPAddress:
    return ip_address(s)


class Host:
    def __init__(
        self,
        name: str,
        addrs: list[str],
        *,
        seed: int,
        signed: bool = True,
        config: EngineConfig | None = None,
        trust: TrustStore | None = None,
        key: Ed25519PrivateKey | None = None,
        rendezvous: list[RendezvousPoint] | None = None,
    ) -> None:
        self.name = name
        self.seed = seed
        self.rendezvous = rendezvous
        self.config = config
        self.trust = trust
        self.key = key or (Ed25519PrivateKey.generate() if signed else None)
        keys = LocalKeys()
        if self.key is not None:
            keys.set_local_key(self.key, "*")
        self.engine = IhmpEngine(
            counter_start=1_000_000 * seed,
            rng=random.Random(seed),
            config=config or EngineConfig(),
            local_keys=keys,
            trust=trust,
            local_addresses=[ip_interface(a) for a in addrs],
            rendezvous=rendezvous or (),
        )
        self.table = self.engine.table
        self.events: list[ev.Event] = []

    def restarted(self, net: Net) -> Host:
        """This host's daemon killed and started again: a new engine (a later replay
        counter, as the wall clock gives), the same key, resuming from what the old
        one saved. It replaces this host in ``net``."""
        saved = self.engine.save(net.now)
        new = Host(
            self.name,
            [],
            seed=self.seed + 1000,
            config=self.config,
            trust=self.trust,
            key=self.key,
            signed=self.key is not None,
            rendezvous=self.rendezvous,
        )
        new.engine.restore(saved, net.now)
        net.hosts[net.hosts.index(self)] = new
        return new

    def drain_events(self) -> None:
        """Collect the engine's events. The network calls it before it takes a host's
        datagrams, as the daemon's pump handles events before sending."""
        while (e := self.engine.next_event()) is not None:
            self.events.append(e)

    def current_addresses(self) -> list[IPAddress]:
        """The addresses the host has now: those it can send from and be reached at."""
        return self.engine.local_addresses

    def next_timer(self) -> float | None:
        return self.engine.get_timer()

    def handle_timer(self, now: float) -> None:
        self.engine.handle_timer(now)

    def events_of(self, kind: type) -> list[ev.Event]:
        self.drain_events()
        return [e for e in self.events if isinstance(e, kind)]

    def entry_for(self, addr: str) -> HostEntry:
        entry = self.table.lookup(A(addr))
        assert entry is not None, f"{self.name} has no HID for {addr}"
        return entry

    def connect(self, remote: str, now: float, local: str | None = None) -> int:
        """What StackTrans does on a first packet to an unknown address."""
        if local is None:
            _, src, _ = best_path([A(remote)], self.engine.local_addresses)
            assert src is not None, f"{self.name} has no address to reach {remote}"
        else:
            src = A(local)
        hid = self.engine.flow_started(A(remote), src, now)
        assert hid is not None
        return hid


@dataclass
class Sent:
    at: float
    datagram: Datagram
    delivered: bool
    src_seen: IPAddress


@dataclass
class Net:
    loss: float = 0.0
    seed: int = 0
    duplicate: bool = False
    shuffle: bool = False
    sites: dict[IPAddress, str] = field(default_factory=dict)
    nat: dict[IPAddress, IPAddress] = field(default_factory=dict)  # private -> public
    hosts: list[Host] = field(default_factory=list)
    now: float = 0.0
    log: list[Sent] = field(default_factory=list)
    hold: bool = False  # queue instead of delivering (tests reorder by hand)
    held: list[tuple[Host, Datagram]] = field(default_factory=list)
    drop: Callable[[Datagram], bool] | None = None  # datagrams it picks are lost

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def add(self, host: Host, sites: dict[str, str] | None = None) -> Host:
        self.hosts.append(host)
        for addr, site in (sites or {}).items():
            self.sites[A(addr)] = site
        return host

    def owner(self, addr: IPAddress) -> tuple[Host, IPAddress] | None:
        for host in self.hosts:
            if addr in host.current_addresses():
                return host, addr
        for private, public in self.nat.items():
            if public == addr:
                found = self.owner(private)
                if found is not None:
                    return found
        return None

    def reaches(self, src: IPAddress, dst: IPAddress) -> tuple[bool, IPAddress]:
        """Whether src can reach dst, and the source address dst will see."""
        if src.version != dst.version:
            return False, src
        sblock, dblock = block_of(src), block_of(dst)
        if sblock is None and dblock is None:
            return True, src
        if sblock is not None and dblock is not None:
            same = self.sites.get(src, "?s") == self.sites.get(dst, "?d")
            return same, src
        if sblock is not None and dblock is None and src in self.nat:
            return True, self.nat[src]
        return False, src

    def deliver(self, sender: Host, dgram: Datagram) -> None:
        ok, seen = self.reaches(dgram.src, dgram.dst)
        if dgram.src not in sender.current_addresses():
            ok = False  # an address the host no longer has cannot send
        target = self.owner(dgram.dst) if ok else None
        lost = self.loss > 0 and self.rng.random() < self.loss
        lost = lost or (self.drop is not None and self.drop(dgram))
        self.log.append(Sent(self.now, dgram, target is not None and not lost, seen))
        if target is None or lost:
            return
        host, local = target
        host.engine.receive_datagram(dgram.data, seen, local, self.now)

    def flush(self) -> None:
        for _ in range(1000):
            batch: list[tuple[Host, Datagram]] = []
            for h in self.hosts:
                h.drain_events()  # events first, then datagrams: the daemon's pump order
                batch += [(h, d) for d in h.engine.datagrams_to_send(self.now)]
            if not batch:
                return
            if self.hold:
                self.held.extend(batch)
                continue
            if self.duplicate:
                batch = batch + batch
            if self.shuffle:
                self.rng.shuffle(batch)
            for host, dgram in batch:
                self.deliver(host, dgram)
        raise AssertionError("datagram storm: the engines never went quiet")

    def run(self, duration: float) -> None:
        """Deliver everything and fire timers until ``duration`` from now has passed."""
        end = self.now + duration
        self.flush()
        while True:
            timers = [t for h in self.hosts if (t := h.next_timer()) is not None]
            if not timers or min(timers) > end:
                break
            self.now = max(self.now, min(timers))
            for host in self.hosts:
                timer = host.next_timer()
                if timer is not None and timer <= self.now:
                    host.handle_timer(self.now)
            self.flush()
        self.now = end
        for host in self.hosts:
            host.drain_events()

    def types_sent(self, since: float = -1.0) -> list[MessageType]:
        return [decode(s.datagram.data).type for s in self.log if s.at >= since]

    def sent_to(self, addr: str) -> list[Sent]:
        return [s for s in self.log if s.datagram.dst == A(addr)]


def assert_events_mirror_table(host: Host) -> None:
    """The HostChanged events are the table: replayed in order, they rebuild it.

    That is what StackTrans relies on: it never reads the table, it follows it.
    """
    host.drain_events()
    replayed: dict[int, HostSnapshot] = {}
    for event in host.events:
        if isinstance(event, ev.HostChanged):
            assert replayed.get(event.hid) == event.before, event
            if event.after is None:
                del replayed[event.hid]
            else:
                replayed[event.hid] = event.after
    assert sorted(replayed.values(), key=lambda h: h.hid) == host.table.snapshot()


def assert_symmetric(a: Host, a_addr: str, b: Host, b_addr: str) -> None:
    """A's view of B mirrors B's view of A (the paper's symmetric HID tables)."""
    ea = a.entry_for(b_addr)
    eb = b.entry_for(a_addr)
    assert set(ea.local) == set(eb.active), (a.name, ea, b.name, eb)
    assert set(ea.active) == set(eb.local), (a.name, ea, b.name, eb)
