"""Events the IHMP engine reports to its user (the daemon, and through it StackTrans).

The engine's one way out for what it decided, besides datagrams: every change of
the HID table (:class:`~ihmp.hosts.HostChanged`, which StackTrans applies to the data
plane) and what a table cannot say (outcomes, rejections, NAT facts), in the order
they happened. :data:`Event` is the union of them all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ihmp.addr import IPAddress
from ihmp.hosts import HostChanged
from ihmp.wire import MessageType, NatMapping

__all__ = [
    "AddressVerified",
    "Event",
    "ExchangeCompleted",
    "ExchangeFailed",
    "HostChanged",
    "MessageApplied",
    "MessageRejected",
    "NatDetected",
    "NatEntryReceived",
    "PeerEstablished",
    "PeerLegacy",
    "PeerLost",
    "RejectReason",
]


class RejectReason(enum.Enum):
    MALFORMED = "malformed"  # not a valid IHMP message
    UNKNOWN_HOST_ID = "unknown_host_id"  # Host ID maps to no HID (and not a HELLO)
    UNSIGNED = "unsigned"  # unsigned, but a key is bound or required
    BAD_SIGNATURE = "bad_signature"  # signature does not verify with the bound key
    KEY_MISMATCH = "key_mismatch"  # carries a public key other than the bound one
    UNTRUSTED = "untrusted"  # strict mode and no key configured for the sender
    REPLAY = "replay"  # counter already seen or too old
    UNEXPECTED_ACK = "unexpected_ack"  # ACK that matches nothing outstanding
    NOT_A_LOCATOR = "not_a_locator"  # sent to an address that is no locator of ours


@dataclass(frozen=True)
class PeerEstablished:
    hid: int
    key_pinned: bool


@dataclass(frozen=True)
class PeerLegacy:
    """The peer never answered HELLO: it runs no DIME. Nothing is sent to it for a while."""

    hid: int


@dataclass(frozen=True)
class PeerLost:
    """The HID was removed: no path is left. Its flows should fail fast."""

    hid: int
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class AddressVerified:
    """A probe (PATH_PROBE, or ADDR_UP/HANDOFF used as one) proved a path works."""

    hid: int
    local: IPAddress
    remote: IPAddress


@dataclass(frozen=True)
class ExchangeCompleted:
    """A message of ours was acknowledged."""

    hid: int
    type: MessageType
    seq: int
    rtt: float


@dataclass(frozen=True)
class ExchangeFailed:
    """A message of ours was never acknowledged; the engine gave up or fell back."""

    hid: int
    type: MessageType
    seq: int


@dataclass(frozen=True)
class MessageApplied:
    """A peer's message was accepted (applied, or recognised as stale) and ACKed."""

    hid: int
    type: MessageType
    seq: int
    stale: bool


@dataclass(frozen=True)
class MessageRejected:
    """A datagram was refused; it changed nothing."""

    src: IPAddress
    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class NatDetected:
    """A message's source address differs from the one it encoded."""

    hid: int
    encoded: IPAddress
    observed: IPAddress


@dataclass(frozen=True)
class NatEntryReceived:
    hid: int
    mapping: NatMapping


Event = (
    HostChanged
    | PeerEstablished
    | PeerLegacy
    | PeerLost
    | AddressVerified
    | ExchangeCompleted
    | ExchangeFailed
    | MessageApplied
    | MessageRejected
    | NatDetected
    | NatEntryReceived
)
