"""Events the IHMP engine reports to its user (the daemon, and through it StackTrans).

Table changes are not events: they reach StackTrans through the HID table's
subscribers. Events are what a table cannot say: outcomes, rejections, NAT facts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ihmp.wire import MessageType, NatMapping

IPAddress = IPv4Address | IPv6Address


class RejectReason(enum.Enum):
    MALFORMED = "malformed"  # not a valid IHMP message
    UNKNOWN_HOST_ID = "unknown_host_id"  # Host ID maps to no HID (and not a HELLO)
    UNSIGNED = "unsigned"  # unsigned, but a key is bound or required
    BAD_SIGNATURE = "bad_signature"  # signature does not verify with the bound key
    KEY_MISMATCH = "key_mismatch"  # carries a public key other than the bound one
    UNTRUSTED = "untrusted"  # strict mode and no key configured for the sender
    REPLAY = "replay"  # counter already seen or too old
    UNEXPECTED_ACK = "unexpected_ack"  # ACK that matches nothing outstanding


@dataclass(frozen=True)
class Event:
    """Base class of engine events."""


@dataclass(frozen=True)
class PeerEstablished(Event):
    hid: int
    key_pinned: bool


@dataclass(frozen=True)
class PeerLegacy(Event):
    """The peer never answered HELLO: it runs no DIME. Nothing is sent to it for a while."""

    hid: int


@dataclass(frozen=True)
class PeerLost(Event):
    """The HID was removed: no path is left. Its flows should fail fast."""

    hid: int
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class AddressVerified(Event):
    """A probe (PATH_PROBE, or ADDR_UP/HANDOFF used as one) proved a path works."""

    hid: int
    local: IPAddress
    remote: IPAddress


@dataclass(frozen=True)
class ExchangeCompleted(Event):
    """A message of ours was acknowledged."""

    hid: int
    type: MessageType
    seq: int
    rtt: float


@dataclass(frozen=True)
class ExchangeFailed(Event):
    """A message of ours was never acknowledged; the engine gave up or fell back."""

    hid: int
    type: MessageType
    seq: int


@dataclass(frozen=True)
class MessageApplied(Event):
    """A peer's message was accepted (applied, or recognised as stale) and ACKed."""

    hid: int
    type: MessageType
    seq: int
    stale: bool


@dataclass(frozen=True)
class MessageRejected(Event):
    """A datagram was refused; it changed nothing."""

    src: IPAddress
    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class NatDetected(Event):
    """A message's source address differs from the one it encoded."""

    hid: int
    encoded: IPAddress
    observed: IPAddress


@dataclass(frozen=True)
class NatEntryReceived(Event):
    hid: int
    mapping: NatMapping
