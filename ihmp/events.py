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
from ihmp.flows import FlowSpec, NatMapping
from ihmp.hosts import HostChanged
from ihmp.wire import MessageType

__all__ = [
    "AddressVerified",
    "DropReason",
    "Event",
    "ExchangeCompleted",
    "ExchangeFailed",
    "FlowsNeedBinding",
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
    BAD_NONCE = "bad_nonce"  # the ACK of a path challenge does not echo its nonce
    UNVERIFIED_SOURCE = "unverified_source"  # a knock from no verified address of its host
    UNVERIFIED_ADDRESS = "unverified_address"  # a FLOW_MOVE to no verified address of its host


class DropReason(enum.Enum):
    """Why a datagram was not taken in, or an answer not sent, without an event: what
    a flood brings is counted (``dime status``), not logged one by one."""

    RATE_LIMITED = "rate_limited"  # over its rate, from a source no peer was verified at
    COOKIE_RATE = "cookie_rate"  # a HELLO that would need a cookie, over the cookie rate
    BAD_COOKIE = "bad_cookie"  # a HELLO whose cookie is not ours, or too old (a new one goes)
    STRAY_COOKIE = "stray_cookie"  # a cookie for no HELLO of ours
    PEER_CAP = "peer_cap"  # a new peer, with the table full of peers in use
    HALF_OPEN_CAP = "half_open_cap"  # a new HELLO, with too many unanswered ones in use
    CHALLENGE_CAP = "challenge_cap"  # an address to validate, with too many in flight
    TOO_LARGE = "too_large"  # an answer to an unverified source larger than its request
    KNOCK_RATE = "knock_rate"  # a knock over the rate of knocks from its address
    RELAY_RATE = "relay_rate"  # a datagram over the rate taken from a rendezvous point


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
    """A message of ours was acknowledged (``rtt``: since its first transmission;
    ``attempts``: how many times it was sent)."""

    hid: int
    type: MessageType
    seq: int
    rtt: float
    attempts: int = 1


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


@dataclass(frozen=True)
class FlowsNeedBinding:
    """This host now reaches ``hid`` from ``local`` through a NAT (its ACK said
    so): each flow to it must send a knock (a FLOW_BIND inside the flow's own
    packets, :meth:`ihmp.engine.IhmpEngine.flow_binding`), so that the peer learns
    the port the NAT gave the flow."""

    hid: int
    local: IPAddress
    #: Only the UDP flows: the NAT keepalive (their mappings time out in seconds to
    #: minutes, TCP's in days; a knock on a bound flow is taken out by the peer).
    udp_only: bool = False
    #: Only the flows bound to these local identifiers (None: all): after a move to
    #: an address without a NAT, the flows started behind one, which the peer knows
    #: by the NAT's address and moves only on their knock.
    identifiers: frozenset[IPAddress] | None = None


@dataclass(frozen=True)
class FlowMoveReceived:
    """The peer ``hid`` asks that its ``flow`` (as the peer's socket sees it) be sent to
    its verified address ``addr`` (FLOW_MOVE). Its ACK goes once this event is handled:
    the data plane must send there before the datagrams that follow are sent."""

    hid: int
    flow: FlowSpec
    addr: IPAddress


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
    | FlowsNeedBinding
    | FlowMoveReceived
)
