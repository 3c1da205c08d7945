"""A host's registrations with its rendezvous points (:mod:`ihmp.rendezvous`).

The engine owns one :class:`Registrations`; this module decides *when* each
rendezvous point is told (again) where the host is, and which answer counts; the
engine builds and signs the REGISTER messages. A registration is renewed at once
after every change of the host's addresses, and every ``refresh`` seconds (which also
keeps a NAT's mapping towards the rendezvous point open, so that forwarded messages
get through); unanswered, it is sent again with the usual backoff until
``deadline``, and then at the next refresh.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

from ihmp.addr import IPAddress
from ihmp.wire import DEFAULT_PORT, NONCE_LEN, Message


class RendezvousAddressError(ValueError):
    """A rendezvous point that is not ``ADDR``, ``ADDR:PORT`` or ``[V6ADDR]:PORT``."""


@dataclass(frozen=True)
class RendezvousPoint:
    """A rendezvous point as configured: ``name`` is the text it was given as."""

    name: str
    addr: IPAddress
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> RendezvousPoint:
        """``ADDR``, ``ADDR:PORT`` or ``[V6ADDR]:PORT`` (port default 4731)."""
        host, port = text.strip(), str(DEFAULT_PORT)
        if host.startswith("["):
            inner, sep, rest = host[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise RendezvousAddressError(f"{text!r}: expected [V6ADDR]:PORT")
            host, port = inner, rest[1:] or port
        elif host.count(":") == 1:
            host, port = host.split(":")
        try:
            addr = ip_address(host)
            number = int(port)
        except ValueError:
            raise RendezvousAddressError(
                f"{text!r}: not ADDR, ADDR:PORT or [V6ADDR]:PORT"
            ) from None
        if not 0 < number <= 0xFFFF:
            raise RendezvousAddressError(f"{text!r}: port {number} out of range")
        return cls(text, addr, number)


@dataclass
class Registration:
    """Where we stand with one rendezvous point."""

    point: RendezvousPoint
    seq: int  # of the registration in flight, or the last one answered
    nonce: bytes = b""
    registered: bool = False  # the rendezvous point acknowledged our current addresses
    answered_at: float | None = None
    observed: IPAddress | None = None  # our source as it saw it (a NAT's, maybe)
    due: float | None = 0.0  # when to send (again); None: nothing to send
    rto: float = 0.0
    give_up_at: float = 0.0
    sent_from: IPAddress | None = None
    local_failures: int = 0  # sends of this registration the host itself could not make

    def to_json(self, now: float) -> dict[str, Any]:
        ago = round(now - self.answered_at, 1) if self.answered_at is not None else None
        return {
            "server": self.point.name,
            "registered": self.registered,
            "address": str(self.point.addr),
            "port": self.point.port,
            "observed_as": str(self.observed) if self.observed is not None else None,
            "answered_ago": ago,
        }


class Registrations:
    """The host's registrations with each of ``points``."""

    def __init__(
        self,
        points: list[RendezvousPoint],
        rng: random.Random,
        *,
        refresh: float,
        initial_rto: float,
        max_rto: float,
        deadline: float,
    ) -> None:
        self.points = points
        self._rng = rng
        self.refresh = refresh
        self.initial_rto, self.max_rto, self.deadline = initial_rto, max_rto, deadline
        self._regs = [Registration(p, seq=rng.getrandbits(16)) for p in points]

    def __bool__(self) -> bool:
        return bool(self._regs)

    def point_at(self, addr: IPAddress, port: int | None) -> RendezvousPoint | None:
        """The rendezvous point of ours at ``addr``:``port`` (None: the default port)."""
        for p in self.points:
            if p.addr == addr and p.port == (port or DEFAULT_PORT):
                return p
        return None

    def renew(self, now: float) -> None:
        """Our addresses changed: every rendezvous point must hear of it now."""
        for reg in self._regs:
            reg.registered = False
            reg.due = now
            reg.nonce = b""  # a new registration, not a retransmission

    def due(self, now: float) -> list[Registration]:
        """The registrations to send now; each is then scheduled for when it is due next.
        A new one gets a new sequence number and nonce; a retransmission keeps them."""
        out = []
        for reg in self._regs:
            if reg.due is None or reg.due > now:
                continue
            if not reg.nonce:
                reg.seq = (reg.seq + 1) & 0xFFFF
                reg.nonce = self._rng.getrandbits(8 * NONCE_LEN).to_bytes(NONCE_LEN, "big")
                reg.rto, reg.give_up_at = self.initial_rto, now + self.deadline
                reg.local_failures = 0
            elif now >= reg.give_up_at:
                reg.registered = False  # unanswered: try afresh at the next refresh
                reg.nonce, reg.due = b"", now + self.refresh
                continue
            else:
                reg.rto = min(reg.rto * 2, self.max_rto)
            reg.due = now + reg.rto
            out.append(reg)
        return out

    def answered(self, point: RendezvousPoint, ack: Message, now: float) -> bool:
        """An ACK from ``point``: whether it answers our registration in flight (its
        seq and nonce). Then we are registered until the next refresh."""
        for reg in self._regs:
            if reg.point == point and reg.nonce and ack.seq == reg.seq and ack.nonce == reg.nonce:
                reg.registered, reg.answered_at = True, now
                reg.observed = ack.observed_addr
                reg.nonce, reg.due = b"", now + self.refresh
                return True
        return False

    def send_failed(self, addr: IPAddress, retry_at: float) -> None:
        """A registration to ``addr`` could not even leave this host (no route yet,
        just after a move): due again at ``retry_at``, not after a backoff."""
        for reg in self._regs:
            if reg.point.addr == addr and reg.nonce and reg.local_failures < 10:
                reg.local_failures += 1
                reg.due, reg.rto = retry_at, reg.rto / 2  # due() doubles it again

    def next_timer(self) -> float | None:
        return min((r.due for r in self._regs if r.due is not None), default=None)

    def status(self, now: float) -> list[dict[str, Any]]:
        return [r.to_json(now) for r in self._regs]
