"""The control plane of an IHMP-aware NAT (the paper's III-D), sans I/O.

A NAT router that runs ``dime nat`` tells the non-NATed end of each flow of a dime
host behind it which port the flow got: a NAT_ENTRY, sent from the NAT's public
address as soon as conntrack reports the new mapping, so the peer never has to
learn it from the flow (no knock). Like :class:`ihmp.engine.IhmpEngine`, the agent
takes events, datagrams and time, and hands back datagrams and a timer:

* :meth:`NatAgent.ihmp_crossed`: a forwarded IHMP datagram between a host behind us
  and a peer (so that pair runs dime, and each later mapping between them matters);
* :meth:`NatAgent.mapping_created`: conntrack made a mapping (NEW event);
* :meth:`NatAgent.receive_datagram`: an ACK of a NAT_ENTRY, or a peer's challenge
  to our address (a PATH_PROBE: the peer checks that the key signing the entries
  belongs to whoever receives at the NAT's address), answered with its nonce.

Each NAT_ENTRY is signed with the NAT's key (carried in it), and is sent again
until acknowledged (``initial_rto`` doubling, ``max_attempts`` tries).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ihmp.addr import IPAddress
from ihmp.engine import Datagram
from ihmp.flows import NatMapping
from ihmp.timers import Timers
from ihmp.wire import (
    Flags,
    Message,
    MessageType,
    WireError,
    decode,
    encode,
    public_key_bytes,
)

T = MessageType
#: How many (host behind us, peer) pairs are remembered as running dime.
MAX_PAIRS = 4096
#: Mappings of pairs not known (yet) to run dime, kept this long and this many: a
#: flow's first packet (its mapping) comes before the HELLO it prompts.
RECENT_FOR = 30.0
MAX_RECENT = 4096


@dataclass
class AgentCounters:
    entries_sent: int = 0  # NAT_ENTRY messages, first transmissions
    entries_acked: int = 0
    entries_given_up: int = 0
    retransmissions: int = 0
    challenges_answered: int = 0
    mappings_ignored: int = 0  # not between dime hosts, or IHMP's own
    datagrams_refused: int = 0  # malformed, or matching nothing of ours


@dataclass
class _Entry:
    msg: Message
    src: IPAddress
    dst: IPAddress
    port: int
    attempts: int = 1
    rto: float = 0.5


@dataclass
class NatAgent:
    """One IHMP-aware NAT. ``ihmp_port``: where peers listen for IHMP."""

    key: Ed25519PrivateKey
    counter_start: int
    rng: random.Random
    ihmp_port: int = 4731
    initial_rto: float = 0.5
    max_attempts: int = 5
    counters: AgentCounters = field(default_factory=AgentCounters)

    def __post_init__(self) -> None:
        self._counter = self.counter_start
        self._seq = self.rng.getrandbits(16)
        self._pairs: OrderedDict[tuple[IPAddress, IPAddress], None] = OrderedDict()
        # (time, mapping, remote, remote port) of pairs not known to run dime yet.
        self._recent: OrderedDict[int, tuple[float, NatMapping, IPAddress, int]] = OrderedDict()
        self._recent_id = 0
        self._pending: dict[int, _Entry] = {}
        self._timers: Timers[int] = Timers()
        self._out: list[Datagram] = []

    # -- outputs ------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return self._timers.next()

    # -- inputs ---------------------------------------------------------------------------

    def ihmp_crossed(self, a: IPAddress, b: IPAddress, now: float) -> None:
        """IHMP went between ``a`` and ``b`` through us: both run dime. Mappings
        between them made shortly before (the flow that prompted their HELLO) are
        announced now."""
        new = (a, b) not in self._pairs
        for pair in ((a, b), (b, a)):
            self._pairs[pair] = None
            self._pairs.move_to_end(pair)
        while len(self._pairs) > MAX_PAIRS:
            self._pairs.popitem(last=False)
        if not new:
            return
        for key, (at, mapping, remote, port) in list(self._recent.items()):
            if now - at > RECENT_FOR:
                del self._recent[key]
            elif {mapping.internal, remote} == {a, b}:
                del self._recent[key]
                self.mapping_created(mapping, remote, port, now)

    def mapping_created(
        self, mapping: NatMapping, remote: IPAddress, remote_port: int, now: float
    ) -> None:
        """Conntrack mapped ``mapping.internal``:port to ``mapping.external``:port for a
        flow to ``remote``:``remote_port``: tell ``remote``, if both run dime."""
        inside = (mapping.internal, mapping.internal_port)
        if self.ihmp_port in (remote_port, mapping.internal_port) or inside == (
            mapping.external,
            mapping.external_port,
        ):
            self.counters.mappings_ignored += 1  # IHMP's own, or not translated
            return
        if (mapping.internal, remote) not in self._pairs:
            self.counters.mappings_ignored += 1
            self._recent_id += 1
            self._recent[self._recent_id] = (now, mapping, remote, remote_port)
            while len(self._recent) > MAX_RECENT:
                self._recent.popitem(last=False)
            return
        seq, self._seq = self._seq, (self._seq + 1) & 0xFFFF
        msg = Message(
            type=T.NAT_ENTRY,
            seq=seq,
            host_id=mapping.external,
            flags=Flags.NS,
            nat_mapping=mapping,
            public_key=public_key_bytes(self.key),
        )
        entry = _Entry(msg, mapping.external, remote, self.ihmp_port, rto=self.initial_rto)
        self._pending[seq] = entry
        self._transmit(entry)
        self._timers.set(seq, now + entry.rto)
        self.counters.entries_sent += 1

    def receive_datagram(
        self, data: bytes, src: IPAddress, dst: IPAddress, src_port: int, now: float
    ) -> None:
        """An ACK of one of our entries, or a challenge to us; anything else is
        counted and dropped."""
        try:
            msg = decode(data)
        except WireError:
            self.counters.datagrams_refused += 1
            return
        if msg.type is T.PATH_PROBE and msg.nonce is not None:
            # The peer checks that our key receives at this address: echo its nonce.
            # No larger than the probe (no amplification), and no state kept.
            ack = Message(type=T.ACK, seq=msg.seq, host_id=dst, nonce=msg.nonce)
            self._out.append(Datagram(self._stamp(ack), dst, src, src_port))
            self.counters.challenges_answered += 1
            return
        entry = self._pending.get(msg.seq) if msg.type is T.ACK else None
        if entry is None or src != entry.dst:
            self.counters.datagrams_refused += 1
            return
        del self._pending[msg.seq]
        self._timers.cancel(msg.seq)
        self.counters.entries_acked += 1

    def handle_timer(self, now: float) -> None:
        for seq in self._timers.expired(now):
            entry = self._pending.get(seq)
            if entry is None:
                continue
            if entry.attempts >= self.max_attempts:
                del self._pending[seq]
                self.counters.entries_given_up += 1
                continue
            entry.attempts += 1
            entry.rto *= 2
            self.counters.retransmissions += 1
            self._transmit(entry)
            self._timers.set(seq, now + entry.rto)

    # -- sending --------------------------------------------------------------------------

    def _transmit(self, entry: _Entry) -> None:
        self._out.append(Datagram(self._stamp(entry.msg), entry.src, entry.dst, entry.port))

    def _stamp(self, msg: Message) -> bytes:
        self._counter += 1
        return encode(replace(msg, counter=self._counter, signature=None), self.key)
