"""IHMP wire format: encode, decode, sign and verify messages.

The byte layout is specified in ``docs/ihmp-wire.md``; this module is its reference
implementation. Decoding is strict and canonical: any input that ``encode`` would not
have produced byte for byte is refused with :class:`WireError`, and nothing else is
ever raised. Hence ``encode(decode(b)) == b`` for every accepted ``b``, and a
signature can be checked by re-encoding the decoded message.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ihmp.addr import IPAddress
from ihmp.flows import MAX_FLOWS_PER_MOVE, FlowSpec, NatMapping

VERSION = 1
DEFAULT_PORT = 4731
HEADER = struct.Struct("!BBBBHHQ")  # version, type, flags, reserved, seq, body length, counter
HEADER_LEN = HEADER.size  # 16
SIGNATURE_LEN = 64
PUBLIC_KEY_LEN = 32
MAX_ADDRESSES = 32  # per address list; keeps a message well under 1280 bytes
MAX_PAYLOAD = 1024  # a relayed message: larger ones are never sent
FIELD_HEAD = struct.Struct("!BH")  # tag, length
NONCE_LEN = 8  # a path challenge's nonce: unpredictable, echoed by the answer
MAX_MORE_FLOWS = MAX_FLOWS_PER_MOVE - 1  # FLOW_MOVE: one flow in FLOW, these in MORE_FLOWS
COOKIE_LEN = 8  # a HELLO cookie: proves the HELLO's sender receives at its source


class MessageType(enum.IntEnum):
    HELLO = 1
    ACK = 2
    PATH_PROBE = 3
    ADDR_UP = 4
    ADDR_UP_UNREACHABLE = 5
    ADDR_DOWN = 6
    ADDR_DOWN_UNREACHABLE = 7
    HANDOFF = 8
    HANDOFF_UNREACHABLE = 9
    NAT_ENTRY = 10
    FLOW_BIND = 11  # carried inside a flow's own packets (a knock), never on the IHMP port
    # The rendezvous protocol (docs/ihmp-wire.md): a host and its rendezvous points.
    REGISTER = 12  # host -> rendezvous point: "I am at the source of this", signed
    RELAY = 13  # host -> rendezvous point: "forward PAYLOAD to the host of key TARGET"
    RELAYED = 14  # rendezvous point -> host: PAYLOAD, as ORIGIN sent it
    FLOW_MOVE = 15  # "send this flow of ours to NEW_ADDR (an address of ours you verified)"


#: What a RELAY may carry: a host's address events. Challenges and their answers
#: must go directly (they prove an address), and a HELLO introduces a key, which a
#: relayed message must never do.
RELAYABLE = frozenset(
    {
        MessageType.ADDR_UP,
        MessageType.ADDR_UP_UNREACHABLE,
        MessageType.ADDR_DOWN,
        MessageType.ADDR_DOWN_UNREACHABLE,
        MessageType.HANDOFF,
        MessageType.HANDOFF_UNREACHABLE,
    }
)


class Flags(enum.IntFlag):
    NONE = 0
    NS = 0x01  # NAT supported: set by an IHMP-aware NAT the message crossed
    ND = 0x02  # NAT detected: the ACKed message's source differed from its encoded one
    NF = 0x04  # NAT forced: one-to-one HID, no further signaling
    OU = 0x08  # old address unreachable (HANDOFF*): the peer could not reach the old one
    SIG = 0x80  # an Ed25519 signature follows the body


class Tag(enum.IntEnum):
    """Body field tags; fields appear at most once, in increasing tag order."""

    ADVERTISED = 1  # list of addresses
    NEW_ADDR = 2  # one address
    OLD_ADDRS = 3  # list of addresses (at least one)
    SRC_ADDR = 4  # one address: the source the sender encoded (NAT detection)
    OBSERVED_ADDR = 5  # one address: the source the ACK's sender saw
    PUBLIC_KEY = 6  # 32 bytes, raw Ed25519
    NAT_MAPPING = 7  # see NatMapping
    NONCE = 8  # NONCE_LEN bytes: PATH_PROBE's challenge, echoed in its ACK
    COOKIE = 9  # COOKIE_LEN bytes: in an ACK, "say HELLO again with this"; in a HELLO, that
    FLOW = 10  # see FlowSpec: one flow, as its sender's socket sees it
    TARGET = 11  # 32 bytes: the raw Ed25519 key of the host a RELAY is for
    ORIGIN = 12  # port (2 bytes) and address: where a RELAY came from, as seen
    PAYLOAD = 13  # a whole IHMP message, carried end to end (RELAY, RELAYED)
    MORE_FLOWS = 14  # FLOW values back to back: FLOW_MOVE's further flows (at most 15)


class WireError(ValueError):
    """Bytes that are not a valid IHMP message. ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Message:
    """One IHMP message. ``counter`` is the sender's replay counter."""

    type: MessageType
    seq: int
    host_id: IPAddress
    counter: int = 0
    flags: Flags = Flags.NONE
    advertised: tuple[IPAddress, ...] = ()
    new_addr: IPAddress | None = None
    old_addrs: tuple[IPAddress, ...] = ()
    src_addr: IPAddress | None = None
    observed_addr: IPAddress | None = None
    public_key: bytes | None = None
    nat_mapping: NatMapping | None = None
    flow: FlowSpec | None = None
    more_flows: tuple[FlowSpec, ...] = ()
    nonce: bytes | None = None
    cookie: bytes | None = None
    target: bytes | None = None
    origin: tuple[IPAddress, int] | None = None
    payload: bytes | None = None
    signature: bytes | None = field(default=None, repr=False)


# Which fields each type must carry, and which it may carry.
_REQUIRED: dict[MessageType, frozenset[Tag]] = {
    MessageType.HELLO: frozenset({Tag.ADVERTISED, Tag.SRC_ADDR}),
    MessageType.ACK: frozenset(),
    MessageType.PATH_PROBE: frozenset({Tag.SRC_ADDR, Tag.NONCE}),
    MessageType.ADDR_UP: frozenset({Tag.NEW_ADDR}),
    MessageType.ADDR_UP_UNREACHABLE: frozenset({Tag.NEW_ADDR}),
    MessageType.ADDR_DOWN: frozenset({Tag.OLD_ADDRS}),
    MessageType.ADDR_DOWN_UNREACHABLE: frozenset({Tag.OLD_ADDRS}),
    MessageType.HANDOFF: frozenset({Tag.NEW_ADDR, Tag.OLD_ADDRS}),
    MessageType.HANDOFF_UNREACHABLE: frozenset({Tag.NEW_ADDR, Tag.OLD_ADDRS}),
    MessageType.NAT_ENTRY: frozenset({Tag.NAT_MAPPING}),
    MessageType.FLOW_BIND: frozenset({Tag.FLOW}),
    MessageType.FLOW_MOVE: frozenset({Tag.NEW_ADDR, Tag.FLOW}),
    MessageType.REGISTER: frozenset({Tag.ADVERTISED, Tag.SRC_ADDR, Tag.PUBLIC_KEY, Tag.NONCE}),
    MessageType.RELAY: frozenset({Tag.PUBLIC_KEY, Tag.TARGET, Tag.PAYLOAD}),
    MessageType.RELAYED: frozenset({Tag.ORIGIN, Tag.PAYLOAD}),
}
_OPTIONAL: dict[MessageType, frozenset[Tag]] = {
    MessageType.HELLO: frozenset({Tag.PUBLIC_KEY, Tag.COOKIE}),
    MessageType.ACK: frozenset(
        {Tag.ADVERTISED, Tag.SRC_ADDR, Tag.OBSERVED_ADDR, Tag.PUBLIC_KEY, Tag.NONCE, Tag.COOKIE}
    ),
    MessageType.NAT_ENTRY: frozenset({Tag.PUBLIC_KEY}),  # the NAT's own key
    MessageType.FLOW_MOVE: frozenset({Tag.MORE_FLOWS}),  # one exchange moves up to 16
}
# Flags other than NS and SIG are only meaningful on some types.
_TYPE_FLAGS: dict[Flags, frozenset[MessageType]] = {
    Flags.ND: frozenset({MessageType.ACK}),
    Flags.NF: frozenset({MessageType.HELLO, MessageType.ACK}),
    Flags.OU: frozenset({MessageType.HANDOFF, MessageType.HANDOFF_UNREACHABLE}),
}


# -- addresses -------------------------------------------------------------------------


def encode_address(addr: IPAddress) -> bytes:
    """Family byte (4 or 6) followed by the 4 or 16 address bytes."""
    if getattr(addr, "scope_id", None) is not None:
        # The wire has no room for a scope: it would be lost, and two addresses
        # differing only in scope would encode as a duplicate that decode refuses.
        raise WireError("address", f"scoped address {addr} cannot be encoded")
    return bytes([addr.version]) + addr.packed


def _decode_address(data: bytes, pos: int, end: int) -> tuple[IPAddress, int]:
    if pos >= end:
        raise WireError("truncated", "address family missing")
    family = data[pos]
    size = {4: 4, 6: 16}.get(family)
    if size is None:
        raise WireError("address", f"unknown address family {family}")
    if pos + 1 + size > end:
        raise WireError("truncated", "address bytes missing")
    raw = data[pos + 1 : pos + 1 + size]
    addr: IPAddress = IPv4Address(raw) if family == 4 else IPv6Address(raw)
    return addr, pos + 1 + size


def _decode_single_address(value: bytes, tag: Tag) -> IPAddress:
    addr, pos = _decode_address(value, 0, len(value))
    if pos != len(value):
        raise WireError("field", f"{tag.name} holds trailing bytes")
    return addr


def _decode_address_list(value: bytes, tag: Tag) -> tuple[IPAddress, ...]:
    addrs: list[IPAddress] = []
    pos = 0
    while pos < len(value):
        addr, pos = _decode_address(value, pos, len(value))
        addrs.append(addr)
    _check_address_list(addrs, tag)
    return tuple(addrs)


def _check_address_list(addrs: tuple[IPAddress, ...] | list[IPAddress], tag: Tag) -> None:
    # Lists are never empty: an empty list would have no canonical encoding.
    if not addrs:
        raise WireError("field", f"{tag.name} is empty")
    if len(addrs) > MAX_ADDRESSES:
        raise WireError("field", f"{tag.name} lists more than {MAX_ADDRESSES} addresses")
    if len(set(addrs)) != len(addrs):
        raise WireError("field", f"{tag.name} lists an address twice")


# -- NAT mapping -----------------------------------------------------------------------

_NAT_HEAD = struct.Struct("!BHH")  # proto, internal port, external port


def _encode_two_ends(
    what: str, proto: int, ports: tuple[int, int], addrs: tuple[IPAddress, IPAddress]
) -> bytes:
    """NAT_MAPPING and FLOW share a layout: protocol, two ports, two addresses."""
    for port in ports:
        if not 0 <= port <= 0xFFFF:
            raise WireError("field", f"{what} port {port} out of range")
    if not 0 <= proto <= 0xFF:
        raise WireError("field", f"{what} protocol {proto} out of range")
    return _NAT_HEAD.pack(proto, *ports) + encode_address(addrs[0]) + encode_address(addrs[1])


def _encode_nat(m: NatMapping) -> bytes:
    ports, addrs = (m.internal_port, m.external_port), (m.internal, m.external)
    return _encode_two_ends("NAT_MAPPING", m.proto, ports, addrs)


def _encode_flow(f: FlowSpec) -> bytes:
    return _encode_two_ends("FLOW", f.proto, (f.lport, f.rport), (f.local, f.remote))


def _decode_flow(value: bytes) -> FlowSpec:
    m = _decode_nat(value)  # the same layout: proto, two ports, two addresses
    return FlowSpec(m.proto, m.internal, m.internal_port, m.external, m.external_port)


def _decode_nat(value: bytes) -> NatMapping:
    mapping, pos = _decode_nat_at(value, 0)
    if pos != len(value):
        raise WireError("field", "NAT_MAPPING holds trailing bytes")
    return mapping


def _decode_nat_at(value: bytes, pos: int) -> tuple[NatMapping, int]:
    """The two-ends layout at ``pos``; and where it ends."""
    if len(value) - pos < _NAT_HEAD.size:
        raise WireError("truncated", "NAT_MAPPING too short")
    proto, iport, eport = _NAT_HEAD.unpack_from(value, pos)
    internal, pos = _decode_address(value, pos + _NAT_HEAD.size, len(value))
    external, pos = _decode_address(value, pos, len(value))
    return NatMapping(proto, internal, iport, external, eport), pos


def _encode_more_flows(flows: tuple[FlowSpec, ...]) -> bytes:
    if len(flows) > MAX_MORE_FLOWS:
        raise WireError("field", f"MORE_FLOWS holds {len(flows)} flows (at most {MAX_MORE_FLOWS})")
    return b"".join(_encode_flow(f) for f in flows)


def _decode_more_flows(value: bytes) -> tuple[FlowSpec, ...]:
    flows: list[FlowSpec] = []
    pos = 0
    while pos < len(value):
        if len(flows) == MAX_MORE_FLOWS:
            raise WireError("field", f"MORE_FLOWS holds more than {MAX_MORE_FLOWS} flows")
        m, pos = _decode_nat_at(value, pos)
        flows.append(FlowSpec(m.proto, m.internal, m.internal_port, m.external, m.external_port))
    if not flows:
        raise WireError("field", "MORE_FLOWS is empty")
    return tuple(flows)


# -- fields ----------------------------------------------------------------------------


def _fields_of(msg: Message) -> dict[Tag, bytes]:
    """The body fields ``msg`` carries, as encoded values."""
    fields: dict[Tag, bytes] = {}
    if msg.advertised or Tag.ADVERTISED in _REQUIRED[msg.type]:
        _check_address_list(msg.advertised, Tag.ADVERTISED)
        fields[Tag.ADVERTISED] = b"".join(encode_address(a) for a in msg.advertised)
    if msg.new_addr is not None:
        fields[Tag.NEW_ADDR] = encode_address(msg.new_addr)
    if msg.old_addrs:
        _check_address_list(msg.old_addrs, Tag.OLD_ADDRS)
        fields[Tag.OLD_ADDRS] = b"".join(encode_address(a) for a in msg.old_addrs)
    if msg.src_addr is not None:
        fields[Tag.SRC_ADDR] = encode_address(msg.src_addr)
    if msg.observed_addr is not None:
        fields[Tag.OBSERVED_ADDR] = encode_address(msg.observed_addr)
    if msg.public_key is not None:
        fields[Tag.PUBLIC_KEY] = _check_opaque(Tag.PUBLIC_KEY, msg.public_key)
    if msg.nat_mapping is not None:
        fields[Tag.NAT_MAPPING] = _encode_nat(msg.nat_mapping)
    if msg.flow is not None:
        fields[Tag.FLOW] = _encode_flow(msg.flow)
    if msg.more_flows:
        fields[Tag.MORE_FLOWS] = _encode_more_flows(msg.more_flows)
    for tag, value in ((Tag.NONCE, msg.nonce), (Tag.COOKIE, msg.cookie), (Tag.TARGET, msg.target)):
        if value is not None:
            fields[tag] = _check_opaque(tag, value)
    if msg.origin is not None:
        fields[Tag.ORIGIN] = _encode_origin(msg.origin)
    if msg.payload is not None:
        fields[Tag.PAYLOAD] = _check_payload(msg.payload)
    return fields


_OPAQUE_LEN = {
    Tag.PUBLIC_KEY: PUBLIC_KEY_LEN,
    Tag.NONCE: NONCE_LEN,
    Tag.COOKIE: COOKIE_LEN,
    Tag.TARGET: PUBLIC_KEY_LEN,
}
_PORT = struct.Struct("!H")


def _encode_origin(origin: tuple[IPAddress, int]) -> bytes:
    addr, port = origin
    if not 0 < port <= 0xFFFF:
        raise WireError("field", f"ORIGIN port {port} out of range")
    return _PORT.pack(port) + encode_address(addr)


def _decode_origin(value: bytes) -> tuple[IPAddress, int]:
    if len(value) < _PORT.size:
        raise WireError("truncated", "ORIGIN too short")
    (port,) = _PORT.unpack_from(value, 0)
    if port == 0:
        raise WireError("field", "ORIGIN port 0")
    return _decode_single_address(value[_PORT.size :], Tag.ORIGIN), port


def _check_payload(value: bytes) -> bytes:
    # Opaque here: the receiver decodes (and verifies) the message it carries.
    if not 0 < len(value) <= MAX_PAYLOAD:
        raise WireError("field", f"PAYLOAD must be 1 to {MAX_PAYLOAD} bytes")
    return bytes(value)


def _check_opaque(tag: Tag, value: bytes) -> bytes:
    """A fixed-size byte string field, checked for its size."""
    if len(value) != _OPAQUE_LEN[tag]:
        raise WireError("field", f"{tag.name} must be {_OPAQUE_LEN[tag]} bytes")
    return bytes(value)


def _check_fields(mtype: MessageType, tags: set[Tag]) -> None:
    missing = _REQUIRED[mtype] - tags
    if missing:
        names = ", ".join(sorted(t.name for t in missing))
        raise WireError("field", f"{mtype.name} lacks {names}")
    extra = tags - _REQUIRED[mtype] - _OPTIONAL.get(mtype, frozenset())
    if extra:
        names = ", ".join(sorted(t.name for t in extra))
        raise WireError("field", f"{mtype.name} may not carry {names}")


def _check_flags(mtype: MessageType, flags: int) -> None:
    known = Flags.NS | Flags.ND | Flags.NF | Flags.OU | Flags.SIG
    if flags & ~known:
        raise WireError("flags", f"unknown flag bits 0x{flags & ~known:02x}")
    for flag, types in _TYPE_FLAGS.items():
        if flags & flag and mtype not in types:
            raise WireError("flags", f"flag {flag.name} is not allowed on {mtype.name}")


def _apply_field(values: dict[str, object], tag: Tag, value: bytes) -> None:
    if tag is Tag.ADVERTISED:
        values["advertised"] = _decode_address_list(value, tag)
    elif tag is Tag.NEW_ADDR:
        values["new_addr"] = _decode_single_address(value, tag)
    elif tag is Tag.OLD_ADDRS:
        values["old_addrs"] = _decode_address_list(value, tag)
    elif tag is Tag.SRC_ADDR:
        values["src_addr"] = _decode_single_address(value, tag)
    elif tag is Tag.OBSERVED_ADDR:
        values["observed_addr"] = _decode_single_address(value, tag)
    elif tag is Tag.NAT_MAPPING:
        values["nat_mapping"] = _decode_nat(value)
    elif tag is Tag.FLOW:
        values["flow"] = _decode_flow(value)
    elif tag is Tag.MORE_FLOWS:
        values["more_flows"] = _decode_more_flows(value)
    elif tag is Tag.ORIGIN:
        values["origin"] = _decode_origin(value)
    elif tag is Tag.PAYLOAD:
        values["payload"] = _check_payload(value)
    else:
        values[_NAME_OF[tag]] = _check_opaque(tag, value)


# -- encode / decode -------------------------------------------------------------------


def _encode_unsigned(msg: Message, flags: int) -> bytes:
    """Header and body, with ``flags`` as given: the bytes a signature covers."""
    try:
        mtype = MessageType(msg.type)
    except ValueError:
        raise WireError("type", f"unknown message type {msg.type}") from None
    fields = _fields_of(msg)
    _check_fields(mtype, set(fields))
    _check_flags(mtype, flags)
    if msg.old_addrs and msg.new_addr in msg.old_addrs:
        raise WireError("field", "NEW_ADDR is also in OLD_ADDRS")
    body = bytearray(encode_address(msg.host_id))
    for tag in sorted(fields):
        value = fields[tag]
        body += FIELD_HEAD.pack(tag, len(value)) + value
    if not 0 <= msg.seq <= 0xFFFF:
        raise WireError("field", f"sequence number {msg.seq} out of range")
    if not 0 <= msg.counter < 1 << 64:
        raise WireError("field", f"counter {msg.counter} out of range")
    header = HEADER.pack(VERSION, mtype, flags, 0, msg.seq, len(body), msg.counter)
    return header + bytes(body)


def encode(msg: Message, key: Ed25519PrivateKey | None = None) -> bytes:
    """Serialize ``msg``.

    With ``key`` the message is signed afresh. Without it, a signature already on
    ``msg`` (as left by :func:`decode`) is kept, else the message goes unsigned.
    Raises WireError if ``msg`` breaks a rule of the format.
    """
    flags = int(msg.flags) & ~Flags.SIG
    if key is not None:
        unsigned = _encode_unsigned(msg, flags | Flags.SIG)
        return unsigned + key.sign(_signed_bytes(unsigned))
    if msg.signature is not None:
        if len(msg.signature) != SIGNATURE_LEN:
            raise WireError("field", "signature must be 64 bytes")
        return _encode_unsigned(msg, flags | Flags.SIG) + msg.signature
    return _encode_unsigned(msg, flags)


def decode(data: bytes) -> Message:
    """Parse one datagram. Raises WireError, and only WireError, on any defect."""
    if len(data) < HEADER_LEN:
        raise WireError("truncated", f"{len(data)} bytes is shorter than the header")
    version, type_, flags, reserved, seq, body_len, counter = HEADER.unpack_from(data, 0)
    if version != VERSION:
        raise WireError("version", f"unsupported version {version}")
    try:
        mtype = MessageType(type_)
    except ValueError:
        raise WireError("type", f"unknown message type {type_}") from None
    if reserved != 0:
        raise WireError("flags", "reserved byte is not zero")
    _check_flags(mtype, flags)
    sig_len = SIGNATURE_LEN if flags & Flags.SIG else 0
    expected = HEADER_LEN + body_len + sig_len
    if len(data) < expected:
        raise WireError("truncated", f"{len(data)} bytes, header announces {expected}")
    if len(data) > expected:
        raise WireError("length", f"{len(data) - expected} bytes past the end of the message")
    end = HEADER_LEN + body_len
    host_id, pos = _decode_address(data, HEADER_LEN, end)
    values: dict[str, object] = {}
    last_tag = 0
    while pos < end:
        if pos + FIELD_HEAD.size > end:
            raise WireError("truncated", "field header cut short")
        tag_num, length = FIELD_HEAD.unpack_from(data, pos)
        pos += FIELD_HEAD.size
        try:
            tag = Tag(tag_num)
        except ValueError:
            raise WireError("field", f"unknown field tag {tag_num}") from None
        if tag_num <= last_tag:
            raise WireError("field", f"field {tag.name} out of order or repeated")
        last_tag = tag_num
        if pos + length > end:
            raise WireError("truncated", f"field {tag.name} cut short")
        _apply_field(values, tag, data[pos : pos + length])
        pos += length
    _check_fields(mtype, {_TAG_OF[name] for name in values})
    msg = Message(
        type=mtype,
        seq=seq,
        host_id=host_id,
        counter=counter,
        flags=Flags(flags & ~Flags.SIG),
        signature=bytes(data[end:]) if sig_len else None,
        **values,  # type: ignore[arg-type]
    )
    if msg.new_addr is not None and msg.new_addr in msg.old_addrs:
        raise WireError("field", "NEW_ADDR is also in OLD_ADDRS")
    return msg


_TAG_OF = {
    "advertised": Tag.ADVERTISED,
    "new_addr": Tag.NEW_ADDR,
    "old_addrs": Tag.OLD_ADDRS,
    "src_addr": Tag.SRC_ADDR,
    "observed_addr": Tag.OBSERVED_ADDR,
    "public_key": Tag.PUBLIC_KEY,
    "nat_mapping": Tag.NAT_MAPPING,
    "flow": Tag.FLOW,
    "nonce": Tag.NONCE,
    "cookie": Tag.COOKIE,
    "target": Tag.TARGET,
    "origin": Tag.ORIGIN,
    "payload": Tag.PAYLOAD,
    "more_flows": Tag.MORE_FLOWS,
}
_NAME_OF = {tag: name for name, tag in _TAG_OF.items()}


# -- signatures ------------------------------------------------------------------------


def _signed_bytes(unsigned: bytes) -> bytes:
    """What a signature covers: every byte before it, with NS clear. NS is the one
    bit a middlebox writes (an IHMP-aware NAT on the messages it forwards), so it
    cannot be covered; it is a hint and nothing more (section 4)."""
    return unsigned[:2] + bytes([unsigned[2] & ~Flags.NS & 0xFF]) + unsigned[3:]


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes_raw()


def verify(msg: Message, public_key: bytes) -> bool:
    """Whether ``msg`` carries a valid signature by ``public_key`` (raw 32 bytes)."""
    if msg.signature is None:
        return False
    try:
        pub = Ed25519PublicKey.from_public_bytes(public_key)
        signed = _encode_unsigned(msg, (int(msg.flags) & ~Flags.SIG) | Flags.SIG)
        pub.verify(msg.signature, _signed_bytes(signed))
    except (InvalidSignature, ValueError):
        return False
    return True


def unsigned(msg: Message) -> Message:
    """``msg`` without its signature."""
    return replace(msg, signature=None)
