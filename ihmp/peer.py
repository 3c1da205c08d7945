"""What the engine keeps per peer beyond the HID table, and how it is saved.

:class:`Peer` is the protocol state of one remote host (sequence numbers, what we
told it, what we withdrew, messages awaiting their ACK); :class:`Pending` is one of
those messages. Both belong to :class:`ihmp.engine.IhmpEngine`; they live here so
that the engine module holds the protocol logic and this one its bookkeeping,
including what survives a restart (:meth:`Peer.to_json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from ihmp.addr import IPAddress, addr_key
from ihmp.flows import NatMapping
from ihmp.wire import Message


@dataclass
class Pending:
    """A message of ours waiting for its ACK."""

    hid: int
    msg: Message  # the counter is filled in at each transmission
    src: IPAddress
    dst: IPAddress
    dst_port: int | None
    max_attempts: int | None  # None: retransmit until give_up_at
    give_up_at: float | None  # None: until max_attempts
    fallback: bool  # on failure, send the _UNREACHABLE form over an existing path
    first_sent: float
    deadline: float  # of the next retransmission
    rto: float
    attempts: int = 1
    local_failures: int = 0  # sends the host itself could not make (no route yet)
    prefer: bool = False  # a path challenge: make its address the locator once answered
    # A path challenge: the peer's messages (seq -> message, source, our address, port)
    # whose ACK waits for the answer, since that ACK says we now send there.
    deferred: dict[int, tuple[Message, IPAddress, IPAddress, int | None]] = field(
        default_factory=dict
    )
    cookie_tries: int = 0  # a HELLO: cookies it was sent again with
    # A probe of a path (a potentially reachable one, or a challenge): if it goes
    # unanswered, that is evidence the path does not work.
    probe: bool = False

    def exhausted(self, now: float) -> bool:
        """Whether the retransmission due now should not happen: give up instead."""
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return True
        return self.give_up_at is not None and now >= self.give_up_at


@dataclass
class Peer:
    """Per-HID protocol state that the HID table does not hold."""

    seq: int  # next sequence number to send
    addr_seq: dict[IPAddress, int] = field(default_factory=dict)  # newest seq per address
    pending: dict[int, Pending] = field(default_factory=dict)
    announced: set[IPAddress] = field(default_factory=set)  # our addresses it heard of
    withdrawn: dict[IPAddress, bool] = field(default_factory=dict)  # lost -> was reachable
    legacy_until: float | None = None
    answered: bool = False  # the peer sent us anything we accepted, ever
    acked_us: bool = False  # the peer acknowledged a message of ours: it has our key
    cancelled_hellos: set[int] = field(default_factory=set)  # lost a HELLO tie-break
    nat_supported: bool = False
    nat_entries: list[NatMapping] = field(default_factory=list)
    last_used: float = 0.0  # a message taken in from it, or a flow to it: eviction order
    # Known only from a flow it started (its first packet's source may be spoofed):
    # not verified until a HELLO exchange, and not said HELLO to.
    unproven: bool = False
    # The peer's IHMP port at each of its addresses, where it is not the default:
    # a NAT's public side (the NAT chose the port).
    ports: dict[IPAddress, int] = field(default_factory=dict)
    # How the peer sees us, if through a NAT: the address its ACK observed.
    observed: IPAddress | None = None
    # Our addresses the peer saw through a NAT: flows bound to them are named by the
    # NAT's address there.
    natted_locals: set[IPAddress] = field(default_factory=set)
    # (our address, its address) pairs whose probes went unanswered -> until when
    # that evidence holds: it makes a potentially reachable path known unreachable
    # (not saved: a restarted daemon probes again).
    dead: dict[tuple[IPAddress, IPAddress], float] = field(default_factory=dict)

    def to_json(self, now: float) -> dict[str, Any]:
        """What a successor needs to go on with this peer (messages in flight are
        not kept: a restart re-synchronises with a HELLO)."""
        return {
            "seq": self.seq,
            "addr_seq": {str(a): n for a, n in self.addr_seq.items()},
            "announced": [str(a) for a in sorted(self.announced, key=addr_key)],
            "withdrawn": {str(a): r for a, r in self.withdrawn.items()},
            "legacy_for": max(self.legacy_until - now, 0.0) if self.legacy_until else None,
            "answered": self.answered,
            "acked_us": self.acked_us,
            "nat_supported": self.nat_supported,
            "unproven": self.unproven,
            "ports": {str(a): p for a, p in self.ports.items()},
            "observed": str(self.observed) if self.observed is not None else None,
            "natted_locals": [str(a) for a in sorted(self.natted_locals, key=addr_key)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], now: float, seq_skip: int) -> Peer:
        """A peer as :meth:`to_json` saved it. Its sequence numbers go on ``seq_skip``
        further than saved: messages sent after the save must not be taken for
        newer than ours by the peer."""
        legacy_for = data.get("legacy_for")
        return cls(
            seq=(int(data["seq"]) + seq_skip) & 0xFFFF,
            addr_seq={ip_address(a): int(n) for a, n in data.get("addr_seq", {}).items()},
            announced={ip_address(a) for a in data.get("announced", [])},
            withdrawn={ip_address(a): bool(r) for a, r in data.get("withdrawn", {}).items()},
            legacy_until=now + float(legacy_for) if legacy_for is not None else None,
            answered=bool(data.get("answered")),
            acked_us=bool(data.get("acked_us")),
            nat_supported=bool(data.get("nat_supported")),
            last_used=now,
            unproven=bool(data.get("unproven")),
            ports={ip_address(a): int(p) for a, p in data.get("ports", {}).items()},
            observed=ip_address(data["observed"]) if data.get("observed") else None,
            natted_locals={ip_address(a) for a in data.get("natted_locals", [])},
        )
