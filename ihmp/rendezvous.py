"""A rendezvous point (``dime rendezvous``) as a sans-I/O state machine.

For what no direct exchange can solve: both ends of a connection moved at once (each
tells the other's old address), or a host moved while its peer sits behind a NAT
that filters by remote address. Hosts configured with the rendezvous point register
their current address with it (REGISTER, signed with their host key); a host whose
address event gets no answer on the direct path sends it, wrapped in a RELAY, to the
rendezvous point, which forwards it (RELAYED) to the peer's registered address. The
peer verifies the message's own signature end to end and answers directly: the
rendezvous point can drop messages, never forge or alter them, and data never passes
through it. docs/ihmp-wire.md specifies the protocol.

Like the engine, it takes datagrams, addresses and time, and returns datagrams:
:meth:`RendezvousServer.receive_datagram`, :meth:`~RendezvousServer.datagrams_to_send`,
:meth:`~RendezvousServer.get_timer`, :meth:`~RendezvousServer.handle_timer`. It keeps
no state for a source before a valid signed REGISTER, and never answers with more
bytes than it was sent.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ihmp.addr import IPAddress, addr_key
from ihmp.engine import Datagram
from ihmp.ratelimit import PerSource
from ihmp.replay import ReplayWindow
from ihmp.wire import RELAYABLE, Flags, Message, MessageType, WireError, decode, encode, verify

T = MessageType


class Refused(enum.Enum):
    """Why the rendezvous point did not take a datagram in (counted in its status)."""

    MALFORMED = "malformed"  # not an IHMP message, or not one a rendezvous point takes
    BAD_SIGNATURE = "bad_signature"  # a REGISTER (or a RELAY's payload) not signed by its key
    NOT_ACCEPTED = "not_accepted"  # a key the accept list does not hold
    REPLAY = "replay"  # a REGISTER counter already seen or too old
    RATE_LIMITED = "rate_limited"  # over the per-source rate
    FULL = "full"  # a new host, with max_hosts registered
    UNKNOWN_SENDER = "unknown_sender"  # a RELAY from a key that is not registered
    UNKNOWN_TARGET = "unknown_target"  # a RELAY for a key that is not registered
    NOT_RELAYABLE = "not_relayable"  # a RELAY's payload is no address event


@dataclass
class ServerConfig:
    """Policy of a rendezvous point. Every field has a default that works."""

    lifetime: float = 90.0  # s a registration lasts unless renewed (hosts renew every 25 s)
    max_hosts: int = 10_000
    rate: float = 20.0  # datagrams per second taken from one source
    burst: float = 60.0
    accept: frozenset[bytes] = frozenset()  # host keys it serves; empty: any key


@dataclass
class Registered:
    """One registered host: where its REGISTER came from, as the server saw it."""

    key: bytes
    addr: IPAddress
    port: int
    advertised: tuple[IPAddress, ...]
    expires: float
    via: IPAddress  # our address its REGISTER reached: the one to forward to it from
    window: ReplayWindow = field(default_factory=ReplayWindow)

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "key": self.key.hex(),
            "address": str(self.addr),
            "port": self.port,
            "advertised": [str(a) for a in self.advertised],
            "expires_in": round(max(self.expires - now, 0.0), 1),
        }


@dataclass
class ServerCounters:
    registrations: int = 0  # REGISTERs taken in (renewals included)
    relayed: int = 0  # RELAYs forwarded
    expired: int = 0  # registrations that ran out
    refused: dict[str, int] = field(default_factory=dict)  # Refused value -> count


class _Refuse(Exception):
    def __init__(self, reason: Refused) -> None:
        super().__init__(reason.value)
        self.reason = reason


class RendezvousServer:
    """The rendezvous point's protocol. See the module docstring for the contract."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.counters = ServerCounters()
        self._hosts: dict[bytes, Registered] = {}
        self._out: list[Datagram] = []
        self._rate = PerSource(self.config.rate, self.config.burst)

    # == outputs =====================================================================

    def datagrams_to_send(self, now: float) -> list[Datagram]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """When the next registration runs out."""
        return min((h.expires for h in self._hosts.values()), default=None)

    def handle_timer(self, now: float) -> None:
        for key in [k for k, h in self._hosts.items() if h.expires <= now]:
            del self._hosts[key]
            self.counters.expired += 1

    def registered(self, now: float) -> list[dict[str, Any]]:
        """The registered hosts, for ``dime status``."""
        hosts = sorted(self._hosts.values(), key=lambda h: (addr_key(h.addr), h.port))
        return [h.to_json(now) for h in hosts if h.expires > now]

    # == input =======================================================================

    def receive_datagram(
        self, data: bytes, src: IPAddress, src_port: int, dst: IPAddress, now: float
    ) -> Refused | None:
        """Handle one datagram from ``src``:``src_port`` to our ``dst``. Returns why it
        was refused (also counted), or None if it was taken in."""
        try:
            if not self._rate.take(src, now):
                raise _Refuse(Refused.RATE_LIMITED)
            try:
                msg = decode(data)
            except WireError:
                raise _Refuse(Refused.MALFORMED) from None
            if msg.type is T.REGISTER:
                self._on_register(msg, len(data), src, src_port, dst, now)
            elif msg.type is T.RELAY:
                self._on_relay(msg, len(data), src, src_port, dst, now)
            else:
                raise _Refuse(Refused.MALFORMED)
        except _Refuse as refusal:
            refused = self.counters.refused
            refused[refusal.reason.value] = refused.get(refusal.reason.value, 0) + 1
            return refusal.reason
        return None

    def _on_register(
        self, msg: Message, size: int, src: IPAddress, port: int, dst: IPAddress, now: float
    ) -> None:
        key = msg.public_key
        assert key is not None and msg.src_addr is not None  # required fields
        if not verify(msg, key):
            raise _Refuse(Refused.BAD_SIGNATURE)
        if self.config.accept and key not in self.config.accept:
            raise _Refuse(Refused.NOT_ACCEPTED)
        host = self._hosts.get(key)
        if host is not None and host.expires <= now:
            host = None  # ran out: a new registration (the window goes with it)
        if host is not None and not host.window.fresh(msg.counter):
            raise _Refuse(Refused.REPLAY)
        if host is None:
            self.handle_timer(now)
            if len(self._hosts) >= self.config.max_hosts:
                raise _Refuse(Refused.FULL)
            host = self._hosts[key] = Registered(key, src, port, msg.advertised, 0.0, dst)
        host.window.accept(msg.counter)
        host.addr, host.port, host.advertised, host.via = src, port, msg.advertised, dst
        host.expires = now + self.config.lifetime
        self.counters.registrations += 1
        nat = msg.src_addr != src
        ack = Message(
            type=T.ACK,
            seq=msg.seq,
            host_id=dst,
            flags=Flags.ND if nat else Flags.NONE,
            nonce=msg.nonce,
            observed_addr=src,
        )
        data = encode(ack)
        assert len(data) < size  # no signature, no key: always smaller than the REGISTER
        self._out.append(Datagram(data, dst, src, port))

    def _on_relay(
        self, msg: Message, size: int, src: IPAddress, port: int, dst: IPAddress, now: float
    ) -> None:
        sender, target = msg.public_key, msg.target
        assert sender is not None and target is not None and msg.payload is not None
        if not self._live(sender, now):
            raise _Refuse(Refused.UNKNOWN_SENDER)
        try:
            inner = decode(msg.payload)
        except WireError:
            raise _Refuse(Refused.MALFORMED) from None
        if inner.type not in RELAYABLE:
            raise _Refuse(Refused.NOT_RELAYABLE)
        if not verify(inner, sender):
            raise _Refuse(Refused.BAD_SIGNATURE)
        peer = self._live(target, now)
        if peer is None:
            raise _Refuse(Refused.UNKNOWN_TARGET)
        relayed = Message(
            type=T.RELAYED, seq=0, host_id=peer.via, origin=(src, port), payload=msg.payload
        )
        data = encode(relayed)
        assert len(data) < size  # ORIGIN is smaller than PUBLIC_KEY and TARGET together
        self._out.append(Datagram(data, peer.via, peer.addr, peer.port))
        self.counters.relayed += 1

    def _live(self, key: bytes, now: float) -> Registered | None:
        host = self._hosts.get(key)
        return host if host is not None and host.expires > now else None
