"""The IHMP wire format (``ihmp/wire.py``) against its spec, ``docs/ihmp-wire.md``.

* every ``ihmp-vector`` block of the spec, byte for byte;
* round trips of random valid messages of every type;
* fuzzing: random and mutated bytes are refused with WireError and nothing else;
* signatures: tampering, wrong keys, unsigned messages;
* the encoder refusing messages that break the format's rules;
* the rendezvous vectors fitting together (a REGISTER and its ACK, a RELAY and the
  RELAYED it becomes, around a signed address event).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ihmp.addr import IPAddress
from ihmp.flows import FlowSpec, NatMapping
from ihmp.wire import (
    DEFAULT_PORT,
    HEADER_LEN,
    MAX_ADDRESSES,
    MAX_PAYLOAD,
    RELAYABLE,
    SIGNATURE_LEN,
    VERSION,
    Flags,
    Message,
    MessageType,
    WireError,
    decode,
    encode,
    public_key_bytes,
    unsigned,
    verify,
)

T = MessageType

DOC = Path(__file__).resolve().parent.parent / "docs" / "ihmp-wire.md"
# The spec's vector key: the Ed25519 private key whose seed is bytes 0x00..0x1f.
VECTOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
VECTOR_PUB = public_key_bytes(VECTOR_KEY)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
OTHER_PUB = public_key_bytes(OTHER_KEY)

REASONS = {"truncated", "version", "type", "flags", "length", "field", "address"}


# == the spec's test vectors ==========================================================


def _load_vectors() -> list[dict[str, Any]]:
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"^```ihmp-vector\n(.*?)^```", text, flags=re.S | re.M)
    return [json.loads(block) for block in blocks]


VECTORS = _load_vectors()
VALID = [v for v in VECTORS if "error" not in v]
INVALID = [v for v in VECTORS if "error" in v]

_MESSAGE_KEYS = {
    "more_flows",
    "type",
    "seq",
    "host_id",
    "counter",
    "flags",
    "advertised",
    "new_addr",
    "old_addrs",
    "src_addr",
    "observed_addr",
    "public_key",
    "nat_mapping",
    "flow",
    "nonce",
    "cookie",
    "target",
    "origin",
    "payload",
    "signature",
}
# The address events a RELAY may carry (section 11), written out independently.
RELAYABLE_TYPES = frozenset(
    {
        T.ADDR_UP,
        T.ADDR_UP_UNREACHABLE,
        T.ADDR_DOWN,
        T.ADDR_DOWN_UNREACHABLE,
        T.HANDOFF,
        T.HANDOFF_UNREACHABLE,
    }
)
RENDEZVOUS_TYPES = frozenset({T.REGISTER, T.RELAY, T.RELAYED})


def _addr(value: str | None) -> IPAddress | None:
    return None if value is None else ip_address(value)


def _addrs(values: list[str]) -> tuple[IPAddress, ...]:
    return tuple(ip_address(v) for v in values)


def _hex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def _flow(spec: dict[str, Any]) -> FlowSpec:
    return FlowSpec(
        proto=spec["proto"],
        local=ip_address(spec["local"]),
        lport=spec["lport"],
        remote=ip_address(spec["remote"]),
        rport=spec["rport"],
    )


def message_from_json(obj: dict[str, Any]) -> Message:
    """The Message a vector's ``message`` object describes."""
    unknown = set(obj) - _MESSAGE_KEYS
    assert not unknown, f"unknown message keys {unknown}"
    flags = Flags.NONE
    for name in obj.get("flags", []):
        assert name != "SIG", "SIG follows from the signature, it is not listed"
        flags |= Flags[name]
    nat = obj.get("nat_mapping")
    mapping = None
    if nat is not None:
        mapping = NatMapping(
            proto=nat["proto"],
            internal=ip_address(nat["internal"]),
            internal_port=nat["internal_port"],
            external=ip_address(nat["external"]),
            external_port=nat["external_port"],
        )
    spec = obj.get("flow")
    flow = None if spec is None else _flow(spec)
    origin = None
    if obj.get("origin") is not None:
        assert set(obj["origin"]) == {"addr", "port"}, obj["origin"]
        origin = (ip_address(obj["origin"]["addr"]), obj["origin"]["port"])
    host_id = _addr(obj["host_id"])
    assert host_id is not None
    return Message(
        type=MessageType[obj["type"]],
        seq=obj["seq"],
        host_id=host_id,
        counter=obj.get("counter", 0),
        flags=flags,
        advertised=_addrs(obj.get("advertised", [])),
        new_addr=_addr(obj.get("new_addr")),
        old_addrs=_addrs(obj.get("old_addrs", [])),
        src_addr=_addr(obj.get("src_addr")),
        observed_addr=_addr(obj.get("observed_addr")),
        public_key=_hex(obj.get("public_key")),
        nat_mapping=mapping,
        flow=flow,
        more_flows=tuple(_flow(f) for f in obj.get("more_flows", [])),
        nonce=_hex(obj.get("nonce")),
        cookie=_hex(obj.get("cookie")),
        target=_hex(obj.get("target")),
        origin=origin,
        payload=_hex(obj.get("payload")),
        signature=_hex(obj.get("signature")),
    )


def test_vectors_are_well_formed() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "vector names must be unique"
    for v in VALID:
        assert set(v) == {"name", "message", "signed", "hex"}, v["name"]
        assert isinstance(v["signed"], bool)
        assert (v["message"]["signature"] is not None) == v["signed"], v["name"]
        if MessageType[v["message"]["type"]] in RENDEZVOUS_TYPES:
            # Vectors newer than every field list them all.
            assert set(v["message"]) == _MESSAGE_KEYS, v["name"]
    for v in INVALID:
        assert set(v) == {"name", "hex", "error"}, v["name"]
        assert v["error"] in REASONS, v["name"]


_HEADING = re.compile(
    r"^\*\*(?P<name>[\w-]+)\*\*(?: \((?P<type>\w+), (?P<size>\d+) bytes\))?\.(?P<text>.*?)\n\n"
    r"```ihmp-vector\n(?P<block>.*?)^```",
    flags=re.S | re.M,
)


def test_every_vector_has_its_heading() -> None:
    """Each vector follows a line naming it: a valid one with its type and size, an
    invalid one with the refusal it gets, word for word (so a vector whose bytes come
    to mean something else, as a type or tag number is assigned, is caught)."""
    headed = {}
    for m in _HEADING.finditer(DOC.read_text(encoding="utf-8")):
        vector = json.loads(m["block"])
        assert vector["name"] == m["name"]
        headed[m["name"]] = m
    assert set(headed) == {v["name"] for v in VECTORS}
    for v in VALID:
        m = headed[v["name"]]
        assert m["type"] == v["message"]["type"], v["name"]
        assert int(m["size"]) == len(bytes.fromhex(v["hex"])), v["name"]
    for v in INVALID:
        m = headed[v["name"]]
        assert m["type"] is None, v["name"]
        with pytest.raises(WireError) as info:
            decode(bytes.fromhex(v["hex"]))
        assert m["text"].rstrip().endswith(f"(`{info.value}`)"), v["name"]


def test_every_message_type_has_a_vector() -> None:
    covered = {MessageType[v["message"]["type"]] for v in VALID}
    assert covered == set(MessageType)
    assert any(v["signed"] for v in VALID)
    assert any(not v["signed"] for v in VALID)


def test_enough_invalid_vectors_with_distinct_reasons() -> None:
    assert len(INVALID) >= 4
    assert {v["error"] for v in INVALID} == REASONS


def test_required_vectors_are_present() -> None:
    """The vectors the spec promises: they must not silently disappear."""
    msgs = {v["name"]: (message_from_json(v["message"]), v["signed"]) for v in VALID}

    def has(pred: Any) -> bool:
        return any(pred(m, signed) for m, signed in msgs.values())

    assert has(
        lambda m, s: (
            m.type is T.HELLO
            and s
            and m.public_key == VECTOR_PUB
            and {a.version for a in m.advertised} == {4, 6}
        )
    )
    assert has(
        lambda m, s: (
            m.type is T.ACK
            and not s
            and m.flags == Flags.ND | Flags.NF
            and m.observed_addr is not None
        )
    )
    assert has(lambda m, s: m.type is T.HANDOFF and m.flags & Flags.OU and len(m.old_addrs) == 2)
    assert has(lambda m, s: m.type is T.NAT_ENTRY and m.nat_mapping is not None)
    assert has(lambda m, s: m.type is T.FLOW_BIND and s and m.flow is not None)
    assert has(
        lambda m, s: (
            m.type is T.REGISTER
            and s
            and m.public_key == VECTOR_PUB
            and m.src_addr == m.host_id
            and {a.version for a in m.advertised} == {4, 6}
        )
    )
    assert has(
        lambda m, s: (
            m.type is T.ACK
            and not s
            and m.flags == Flags.ND
            and m.nonce is not None
            and m.observed_addr is not None
        )
    )
    assert has(lambda m, s: m.type is T.RELAY and not s and m.target is not None)
    assert has(lambda m, s: m.type is T.RELAYED and not s and m.origin is not None)
    assert has(
        lambda m, s: m.type is T.RELAYED and m.origin is not None and m.origin[0].version == 6
    )
    # The refusals the rendezvous tags bring.
    refused = {v["name"]: v["error"] for v in INVALID}
    assert refused.get("origin-port-0") == "field"
    assert refused.get("payload-empty") == "field"
    assert refused.get("target-31-bytes") == "field"
    assert refused.get("relay-without-target") == "field"


def _valid_bytes(mtype: MessageType) -> list[tuple[Message, bytes]]:
    return [
        (message_from_json(v["message"]), bytes.fromhex(v["hex"]))
        for v in VALID
        if v["message"]["type"] == mtype.name
    ]


def test_the_relayable_types_are_the_address_events() -> None:
    assert RELAYABLE == RELAYABLE_TYPES


def test_register_vectors_and_their_ack() -> None:
    """Each REGISTER vector is answered by an ACK vector as section 11.1 says: its
    sequence number and nonce echoed, OBSERVED_ADDR, ND exactly if that is not the
    REGISTER's SRC_ADDR, unsigned, and smaller than the REGISTER."""
    registers = _valid_bytes(T.REGISTER)
    assert registers
    for reg, reg_bytes in registers:
        assert reg.signature is not None and verify(reg, VECTOR_PUB)
        assert reg.public_key == VECTOR_PUB and reg.src_addr == reg.host_id
        acks = [
            (ack, data)
            for ack, data in _valid_bytes(T.ACK)
            if ack.seq == reg.seq and ack.nonce == reg.nonce
        ]
        assert acks, "a REGISTER vector without its ACK"
        for ack, data in acks:
            assert ack.signature is None
            assert ack.observed_addr is not None
            assert bool(ack.flags & Flags.ND) == (ack.observed_addr != reg.src_addr)
            assert ack.public_key is None and not ack.advertised
            assert len(data) < len(reg_bytes)


def test_relay_vectors_carry_signed_address_events() -> None:
    """A RELAY's (and a RELAYED's) PAYLOAD is the bytes of a signed vector of a
    relayable type; a RELAY's is signed by its PUBLIC_KEY; each RELAY has a RELAYED
    vector forwarding it: same PAYLOAD, ORIGIN its Host ID, smaller."""
    signed = {bytes.fromhex(v["hex"]) for v in VALID if v["signed"]}
    relays, relayeds = _valid_bytes(T.RELAY), _valid_bytes(T.RELAYED)
    assert relays and relayeds
    for msg, _ in relays + relayeds:
        assert msg.seq == 0 and msg.signature is None
        assert msg.payload in signed
        inner = decode(msg.payload)
        assert inner.type in RELAYABLE_TYPES
        assert verify(inner, VECTOR_PUB)
    for relay, relay_bytes in relays:
        assert relay.public_key == VECTOR_PUB
        assert relay.target == OTHER_PUB
        forwarded = [(m, d) for m, d in relayeds if m.payload == relay.payload]
        assert forwarded, "a RELAY vector without its RELAYED"
        for relayed, relayed_bytes in forwarded:
            assert relayed.origin is not None and relayed.origin[0] == relay.host_id
            assert len(relayed_bytes) < len(relay_bytes)


def test_spec_states_the_constants() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert str(DEFAULT_PORT) in text
    assert f"{MAX_PAYLOAD} bytes (`MAX_PAYLOAD`)" in text
    assert VECTOR_PUB.hex() in text
    assert HEADER_LEN == 16
    assert VERSION == 1


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_valid_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    msg = message_from_json(vector["message"])
    key = VECTOR_KEY if vector["signed"] else None
    # Encoding the message (without its signature) gives the vector, byte for byte.
    assert encode(unsigned(msg), key) == data
    # So does re-encoding it with the signature it carries.
    assert encode(msg) == data
    # Decoding gives the message back, signature included.
    decoded = decode(data)
    assert decoded == msg
    assert decoded.signature == msg.signature
    if vector["signed"]:
        assert data[2] & Flags.SIG
        assert decoded.signature == data[-SIGNATURE_LEN:]
        assert verify(decoded, VECTOR_PUB)
        assert not verify(decoded, OTHER_PUB)
    else:
        assert not data[2] & Flags.SIG
        assert decoded.signature is None
        assert not verify(decoded, VECTOR_PUB)
    _check_header(data, decoded)


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector(vector: dict[str, Any]) -> None:
    with pytest.raises(WireError) as info:
        decode(bytes.fromhex(vector["hex"]))
    assert info.value.reason == vector["error"]


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_vector_prefixes_are_truncated_and_extensions_too_long(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    for end in range(len(data)):
        with pytest.raises(WireError) as info:
            decode(data[:end])
        assert info.value.reason == "truncated"
    with pytest.raises(WireError) as info:
        decode(data + b"\x00")
    assert info.value.reason == "length"


def _check_header(data: bytes, msg: Message) -> None:
    """The 16-byte header as the spec lays it out."""
    version, mtype, flags, reserved, seq, body_len, counter = struct.unpack_from(
        "!BBBBHHQ", data, 0
    )
    signed = msg.signature is not None
    assert version == VERSION
    assert mtype == msg.type
    assert flags == int(msg.flags) | (Flags.SIG if signed else 0)
    assert reserved == 0
    assert seq == msg.seq
    assert counter == msg.counter
    assert len(data) == HEADER_LEN + body_len + (SIGNATURE_LEN if signed else 0)
    family = data[HEADER_LEN]
    assert family == msg.host_id.version
    host_end = HEADER_LEN + 1 + len(msg.host_id.packed)
    assert data[HEADER_LEN + 1 : host_end] == msg.host_id.packed


# == strategies =======================================================================

ipv4 = st.integers(0, 2**32 - 1).map(IPv4Address)
ipv6 = st.integers(0, 2**128 - 1).map(IPv6Address)
addresses: st.SearchStrategy[IPAddress] = st.one_of(ipv4, ipv6)


def address_lists(exclude: IPAddress | None = None) -> st.SearchStrategy[tuple[IPAddress, ...]]:
    elems = addresses if exclude is None else addresses.filter(lambda a: a != exclude)
    return st.lists(elems, min_size=1, max_size=MAX_ADDRESSES, unique=True).map(tuple)


ports = st.integers(0, 0xFFFF)
nat_mappings = st.builds(
    NatMapping,
    proto=st.sampled_from([6, 17]) | st.integers(0, 0xFF),
    internal=addresses,
    internal_port=ports,
    external=addresses,
    external_port=ports,
)
flows = st.builds(
    FlowSpec,
    proto=st.sampled_from([6, 17]) | st.integers(0, 0xFF),
    local=addresses,
    lport=ports,
    remote=addresses,
    rport=ports,
)


def _relayable_messages() -> st.SearchStrategy[bytes]:
    """A signed address event, as a RELAY carries it."""
    kinds = sorted(RELAYABLE_TYPES)
    return (
        st.sampled_from(kinds).flatmap(lambda k: messages(k)).map(lambda m: encode(m, VECTOR_KEY))
    )


# A PAYLOAD is opaque to the wire format: mostly any bytes (short, or at the limit),
# sometimes what it really carries, a signed address event.
payloads: st.SearchStrategy[bytes] = st.deferred(
    lambda: st.one_of(
        st.binary(min_size=1, max_size=48),
        st.binary(min_size=MAX_PAYLOAD - 2, max_size=MAX_PAYLOAD),
        _relayable_messages(),
    )
)

# The spec's table (section 3), written out independently of ihmp/wire.py:
# required fields, optional fields, and the flags allowed besides NS (and SIG).
SPEC: dict[MessageType, tuple[frozenset[str], frozenset[str], Flags]] = {
    T.HELLO: (
        frozenset({"advertised", "src_addr"}),
        frozenset({"public_key", "cookie"}),
        Flags.NF,
    ),
    T.ACK: (
        frozenset(),
        frozenset({"advertised", "src_addr", "observed_addr", "public_key", "nonce", "cookie"}),
        Flags.ND | Flags.NF,
    ),
    T.PATH_PROBE: (frozenset({"src_addr", "nonce"}), frozenset(), Flags.NONE),
    T.ADDR_UP: (frozenset({"new_addr"}), frozenset(), Flags.NONE),
    T.ADDR_UP_UNREACHABLE: (frozenset({"new_addr"}), frozenset(), Flags.NONE),
    T.ADDR_DOWN: (frozenset({"old_addrs"}), frozenset(), Flags.NONE),
    T.ADDR_DOWN_UNREACHABLE: (frozenset({"old_addrs"}), frozenset(), Flags.NONE),
    T.HANDOFF: (frozenset({"new_addr", "old_addrs"}), frozenset(), Flags.OU),
    T.HANDOFF_UNREACHABLE: (frozenset({"new_addr", "old_addrs"}), frozenset(), Flags.OU),
    T.NAT_ENTRY: (frozenset({"nat_mapping"}), frozenset({"public_key"}), Flags.NONE),
    T.FLOW_BIND: (frozenset({"flow"}), frozenset(), Flags.NONE),
    T.FLOW_MOVE: (frozenset({"new_addr", "flow"}), frozenset(), Flags.NONE),
    T.REGISTER: (
        frozenset({"advertised", "src_addr", "public_key", "nonce"}),
        frozenset(),
        Flags.NONE,
    ),
    T.RELAY: (frozenset({"public_key", "target", "payload"}), frozenset(), Flags.NONE),
    T.RELAYED: (frozenset({"origin", "payload"}), frozenset(), Flags.NONE),
}
ALL_FIELDS = (
    "advertised",
    "new_addr",
    "old_addrs",
    "src_addr",
    "observed_addr",
    "public_key",
    "nat_mapping",
    "flow",
    "nonce",
    "cookie",
    "target",
    "origin",
    "payload",
)


def _field_strategy(name: str, values: dict[str, Any]) -> st.SearchStrategy[Any]:
    if name in ("advertised",):
        return address_lists()
    if name == "old_addrs":
        return address_lists(exclude=values.get("new_addr"))
    if name == "public_key":
        return st.binary(min_size=32, max_size=32)
    if name == "nat_mapping":
        return nat_mappings
    if name == "flow":
        return flows
    if name in ("nonce", "cookie"):
        return st.binary(min_size=8, max_size=8)
    if name == "target":
        return st.binary(min_size=32, max_size=32)
    if name == "origin":
        return st.tuples(addresses, st.integers(1, 0xFFFF))
    if name == "payload":
        return payloads
    return addresses


@st.composite
def messages(draw: st.DrawFn, mtype: MessageType | None = None) -> Message:
    """A valid unsigned message of ``mtype`` (or of any type)."""
    if mtype is None:
        mtype = draw(st.sampled_from(list(MessageType)))
    required, optional, type_flags = SPEC[mtype]
    values: dict[str, Any] = {}
    for name in ALL_FIELDS:  # new_addr before old_addrs: old_addrs must avoid it
        if name in required or (name in optional and draw(st.booleans())):
            values[name] = draw(_field_strategy(name, values))
    allowed = [f for f in (Flags.NS, Flags.ND, Flags.NF, Flags.OU) if f & (Flags.NS | type_flags)]
    flags = Flags.NONE
    for f in draw(st.lists(st.sampled_from(allowed), unique=True)):
        flags |= f
    return Message(
        type=mtype,
        seq=draw(st.integers(0, 0xFFFF)),
        host_id=draw(addresses),
        counter=draw(st.integers(0, 2**64 - 1)),
        flags=flags,
        **values,
    )


@st.composite
def encodings(draw: st.DrawFn) -> bytes:
    """The bytes of a valid message, signed or not."""
    msg = draw(messages())
    return encode(msg, VECTOR_KEY if draw(st.booleans()) else None)


def _decode_or_refuse(data: bytes) -> Message | None:
    """Decode ``data``; a refusal must be a WireError with a known reason."""
    try:
        msg = decode(data)
    except WireError as exc:
        assert exc.reason in REASONS, exc
        return None
    # Accepted bytes are canonical: re-encoding gives them back.
    assert encode(msg) == data
    return msg


# == round trips ======================================================================


@pytest.mark.parametrize("mtype", list(MessageType), ids=[t.name for t in MessageType])
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(mtype: MessageType, data: st.DataObject) -> None:
    msg = data.draw(messages(mtype))
    signed = data.draw(st.booleans(), label="signed")
    wire = encode(msg, VECTOR_KEY if signed else None)
    decoded = decode(wire)
    if signed:
        assert decoded.signature == wire[-SIGNATURE_LEN:]
        assert decoded == replace(msg, signature=decoded.signature)
        assert verify(decoded, VECTOR_PUB)
    else:
        assert decoded == msg
    assert encode(decoded) == wire
    _check_header(wire, decoded)


@settings(deadline=None, max_examples=200)
@given(msg=messages())
def test_encode_ignores_a_sig_flag_given_by_the_caller(msg: Message) -> None:
    """SIG is set exactly when a signature is appended."""
    assert encode(replace(msg, flags=msg.flags | Flags.SIG)) == encode(msg)


# == fuzzing ==========================================================================


@st.composite
def header_shaped(draw: st.DrawFn) -> bytes:
    """Random bytes behind a plausible header, to get past the first checks."""
    host_id = draw(st.sampled_from([b"", b"\x04\xc0\x00\x02\x01", b"\x06" + bytes(16)]))
    body = host_id + draw(st.binary(max_size=120))
    flags = draw(st.sampled_from([0, 0, 0, 0x01, 0x02, 0x04, 0x08, 0x80]) | st.integers(0, 0xFF))
    sig = SIGNATURE_LEN if flags & Flags.SIG else 0
    body_len = draw(st.sampled_from([len(body), len(body), len(body) - sig]) | st.integers())
    header = struct.pack(
        "!BBBBHHQ",
        draw(st.sampled_from([VERSION] * 8 + [0, 2])),
        draw(st.integers(1, len(MessageType)) | st.integers(0, 0xFF)),
        flags,
        draw(st.sampled_from([0] * 8 + [1])),
        draw(st.integers(0, 0xFFFF)),
        body_len & 0xFFFF,
        draw(st.integers(0, 2**64 - 1)),
    )
    return header + body


@settings(max_examples=3_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300) | header_shaped())
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_or_refuse(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid encoding with a few bytes flipped, inserted, deleted, or cut off."""
    data = bytearray(draw(encodings()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 0xFF))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x20, 0x80, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=20))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 20))]
        elif op == "truncate":
            del data[pos:]
    if len(data) >= HEADER_LEN and draw(st.booleans()):
        # Keep the announced body length consistent, to reach the field decoders.
        sig = SIGNATURE_LEN if data[2] & Flags.SIG else 0
        struct.pack_into("!H", data, 6, max(len(data) - HEADER_LEN - sig, 0) & 0xFFFF)
    return bytes(data)


@settings(max_examples=1_500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated())
def test_fuzz_mutated_encodings(data: bytes) -> None:
    _decode_or_refuse(data)


# == signatures =======================================================================


def _signed_vector() -> bytes:
    vector = next(v for v in VALID if v["signed"] and v["message"]["type"] == "HELLO")
    return bytes.fromhex(vector["hex"])


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_tampering_with_any_byte_breaks_the_signature(mask: int) -> None:
    data = _signed_vector()
    assert verify(decode(data), VECTOR_PUB)
    for pos in range(len(data)):
        tampered = bytearray(data)
        tampered[pos] ^= mask
        msg = _decode_or_refuse(bytes(tampered))
        if msg is not None and (pos, tampered[pos] ^ data[pos]) != (2, Flags.NS):
            assert not verify(msg, VECTOR_PUB), f"byte {pos} ^ {mask:#x} still verifies"


def test_ns_is_the_one_bit_a_nat_may_set_on_a_signed_message() -> None:
    data = bytearray(_signed_vector())
    data[2] |= Flags.NS  # an IHMP-aware NAT forwarded it
    msg = decode(bytes(data))
    assert msg.flags & Flags.NS and verify(msg, VECTOR_PUB)
    assert encode(msg) == bytes(data)


@settings(deadline=None, max_examples=300)
@given(data=st.data())
def test_tampering_with_random_signed_messages(data: st.DataObject) -> None:
    wire = bytearray(encode(data.draw(messages()), VECTOR_KEY))
    pos = data.draw(st.integers(0, len(wire) - 1), label="pos")
    mask = data.draw(st.integers(1, 0xFF), label="mask")
    wire[pos] ^= mask
    msg = _decode_or_refuse(bytes(wire))
    if msg is not None and (pos, mask) != (2, Flags.NS):  # NS is not signed
        assert not verify(msg, VECTOR_PUB)


@settings(deadline=None, max_examples=100)
@given(msg=messages())
def test_verify_needs_the_right_key(msg: Message) -> None:
    signed = decode(encode(msg, VECTOR_KEY))
    assert verify(signed, VECTOR_PUB)
    assert not verify(signed, OTHER_PUB)
    assert not verify(signed, VECTOR_PUB[:31])  # not a key at all: False, no exception
    # The signature is over the bytes before it, not just the body.
    assert not verify(replace(signed, counter=(signed.counter + 1) % 2**64), VECTOR_PUB)
    assert not verify(replace(signed, seq=(signed.seq + 1) % 2**16), VECTOR_PUB)


@settings(deadline=None, max_examples=100)
@given(msg=messages())
def test_unsigned_messages_do_not_verify(msg: Message) -> None:
    assert not verify(decode(encode(msg)), VECTOR_PUB)
    assert not verify(unsigned(decode(encode(msg, VECTOR_KEY))), VECTOR_PUB)


def test_signature_does_not_transplant() -> None:
    data = _signed_vector()
    msg = decode(data)
    other = decode(encode(replace(unsigned(msg), counter=msg.counter + 1), VECTOR_KEY))
    assert verify(other, VECTOR_PUB)
    assert not verify(replace(other, signature=msg.signature), VECTOR_PUB)


def test_signature_covers_the_sig_flag() -> None:
    """Signing the same bytes without SIG set gives a signature that does not verify."""
    msg = unsigned(decode(_signed_vector()))
    bare = encode(msg)
    forged = replace(msg, signature=VECTOR_KEY.sign(bare))
    assert not verify(forged, VECTOR_PUB)
    assert verify(
        replace(msg, signature=VECTOR_KEY.sign(encode(forged)[:-SIGNATURE_LEN])), VECTOR_PUB
    )


# == the encoder refuses invalid messages =============================================

A = ip_address("192.0.2.1")
B = ip_address("2001:db8::2")
N8 = bytes(range(8))
C = ip_address("10.0.0.3")
GOOD_NAT = NatMapping(17, ip_address("192.168.1.2"), 5000, A, 40000)
# A signed address event, as a RELAY carries it.
EVENT = encode(Message(T.HANDOFF, 1, A, new_addr=B, old_addrs=(C,)), VECTOR_KEY)


def _register(**changes: Any) -> Message:
    good = Message(T.REGISTER, 1, A, advertised=(A, B), src_addr=A, public_key=VECTOR_PUB, nonce=N8)
    return replace(good, **changes)


def _relay(**changes: Any) -> Message:
    good = Message(T.RELAY, 0, A, public_key=VECTOR_PUB, target=OTHER_PUB, payload=EVENT)
    return replace(good, **changes)


def _relayed(**changes: Any) -> Message:
    return replace(Message(T.RELAYED, 0, B, origin=(A, 4731), payload=EVENT), **changes)


ENCODE_REFUSALS: list[tuple[str, Message, str]] = [
    ("hello-without-src-addr", Message(T.HELLO, 1, A, advertised=(A,)), "field"),
    ("hello-with-empty-advertised", Message(T.HELLO, 1, A, src_addr=A), "field"),
    ("path-probe-without-src-addr", Message(T.PATH_PROBE, 1, A, nonce=N8), "field"),
    ("path-probe-without-nonce", Message(T.PATH_PROBE, 1, A, src_addr=A), "field"),
    ("short-nonce", Message(T.PATH_PROBE, 1, A, src_addr=A, nonce=bytes(7)), "field"),
    ("long-cookie", Message(T.ACK, 1, A, cookie=bytes(9)), "field"),
    ("cookie-on-a-probe", Message(T.PATH_PROBE, 1, A, src_addr=A, nonce=N8, cookie=N8), "field"),
    ("addr-up-without-new-addr", Message(T.ADDR_UP, 1, A), "field"),
    ("addr-down-with-empty-old-addrs", Message(T.ADDR_DOWN, 1, A), "field"),
    ("handoff-without-old-addrs", Message(T.HANDOFF, 1, A, new_addr=B), "field"),
    ("nat-entry-without-mapping", Message(T.NAT_ENTRY, 1, A), "field"),
    (
        "path-probe-with-public-key",
        Message(T.PATH_PROBE, 1, A, src_addr=A, nonce=N8, public_key=bytes(32)),
        "field",
    ),
    ("addr-up-with-advertised", Message(T.ADDR_UP, 1, A, new_addr=B, advertised=(C,)), "field"),
    ("ack-with-new-addr", Message(T.ACK, 1, A, new_addr=B), "field"),
    ("addr-up-with-ou", Message(T.ADDR_UP, 1, A, flags=Flags.OU, new_addr=B), "flags"),
    ("hello-with-nd", Message(T.HELLO, 1, A, flags=Flags.ND, advertised=(A,), src_addr=A), "flags"),
    ("ack-with-ou", Message(T.ACK, 1, A, flags=Flags.OU), "flags"),
    (
        "path-probe-with-nf",
        Message(T.PATH_PROBE, 1, A, flags=Flags.NF, src_addr=A, nonce=N8),
        "flags",
    ),
    ("unassigned-flag-bit", Message(T.ACK, 1, A, flags=Flags(0x10)), "flags"),
    ("seq-negative", Message(T.ACK, -1, A), "field"),
    ("seq-too-large", Message(T.ACK, 0x10000, A), "field"),
    ("counter-negative", Message(T.ACK, 1, A, counter=-1), "field"),
    ("counter-too-large", Message(T.ACK, 1, A, counter=2**64), "field"),
    (
        "new-addr-in-old-addrs",
        Message(T.HANDOFF, 1, A, new_addr=B, old_addrs=(C, B)),
        "field",
    ),
    (
        "new-addr-in-old-addrs-unreachable",
        Message(T.HANDOFF_UNREACHABLE, 1, A, new_addr=C, old_addrs=(C,)),
        "field",
    ),
    ("duplicate-advertised", Message(T.HELLO, 1, A, advertised=(A, B, A), src_addr=A), "field"),
    (
        "too-many-old-addrs",
        Message(
            T.ADDR_DOWN,
            1,
            A,
            old_addrs=tuple(IPv4Address(0x0A000000 + i) for i in range(MAX_ADDRESSES + 1)),
        ),
        "field",
    ),
    (
        "public-key-31-bytes",
        Message(T.HELLO, 1, A, advertised=(A,), src_addr=A, public_key=bytes(31)),
        "field",
    ),
    ("signature-63-bytes", Message(T.ACK, 1, A, signature=bytes(63)), "field"),
    (
        "nat-port-out-of-range",
        Message(T.NAT_ENTRY, 1, A, nat_mapping=replace(GOOD_NAT, external_port=0x10000)),
        "field",
    ),
    (
        "nat-proto-out-of-range",
        Message(T.NAT_ENTRY, 1, A, nat_mapping=replace(GOOD_NAT, proto=256)),
        "field",
    ),
    ("unknown-type", Message(16, 1, A), "type"),  # type: ignore[arg-type]
    ("scoped-host-id", Message(T.ACK, 1, IPv6Address("fe80::1%eth0")), "address"),
    (
        "scoped-addresses-differing-only-in-scope",
        Message(
            T.ADDR_DOWN,
            1,
            A,
            old_addrs=(IPv6Address("fe80::1%1"), IPv6Address("fe80::1%2")),
        ),
        "address",
    ),
    # The rendezvous messages (section 11).
    ("register-without-nonce", _register(nonce=None), "field"),
    ("register-without-public-key", _register(public_key=None), "field"),
    ("register-without-src-addr", _register(src_addr=None), "field"),
    ("register-with-empty-advertised", _register(advertised=()), "field"),
    ("register-with-cookie", _register(cookie=N8), "field"),
    ("register-with-nd", _register(flags=Flags.ND), "flags"),
    ("relay-without-target", _relay(target=None), "field"),
    ("relay-without-public-key", _relay(public_key=None), "field"),
    ("relay-without-payload", _relay(payload=None), "field"),
    ("relay-with-origin", _relay(origin=(A, 4731)), "field"),
    ("relay-with-ou", _relay(flags=Flags.OU), "flags"),
    ("relayed-without-origin", _relayed(origin=None), "field"),
    ("relayed-without-payload", _relayed(payload=None), "field"),
    ("relayed-with-target", _relayed(target=OTHER_PUB), "field"),
    ("relayed-with-public-key", _relayed(public_key=VECTOR_PUB), "field"),
    (
        "target-on-hello",
        Message(T.HELLO, 1, A, advertised=(A,), src_addr=A, target=OTHER_PUB),
        "field",
    ),
    ("origin-on-ack", Message(T.ACK, 1, A, origin=(A, 4731)), "field"),
    ("payload-on-addr-up", Message(T.ADDR_UP, 1, A, new_addr=B, payload=b"x"), "field"),
    ("payload-empty", _relay(payload=b""), "field"),
    ("payload-too-long", _relay(payload=bytes(MAX_PAYLOAD + 1)), "field"),
    ("payload-empty-relayed", _relayed(payload=b""), "field"),
    ("payload-too-long-relayed", _relayed(payload=bytes(MAX_PAYLOAD + 1)), "field"),
    ("origin-port-0", _relayed(origin=(A, 0)), "field"),
    ("origin-port-negative", _relayed(origin=(A, -1)), "field"),
    ("origin-port-too-large", _relayed(origin=(B, 0x10000)), "field"),
    ("origin-scoped-address", _relayed(origin=(IPv6Address("fe80::1%eth0"), 4731)), "address"),
    ("target-31-bytes", _relay(target=OTHER_PUB[:31]), "field"),
    ("target-33-bytes", _relay(target=OTHER_PUB + b"\x00"), "field"),
    ("target-empty", _relay(target=b""), "field"),
]


@pytest.mark.parametrize(
    ("msg", "reason"),
    [(m, r) for _, m, r in ENCODE_REFUSALS],
    ids=[name for name, _, _ in ENCODE_REFUSALS],
)
def test_encode_refuses(msg: Message, reason: str) -> None:
    # Signing with a key replaces any signature on the message: no key for that case.
    keys = (None,) if msg.signature is not None else (None, VECTOR_KEY)
    for key in keys:
        with pytest.raises(WireError) as info:
            encode(msg, key)
        assert info.value.reason == reason


def test_encode_accepts_the_limits() -> None:
    """The edges of each range are valid, and round-trip."""
    most = tuple(IPv6Address(i) for i in range(MAX_ADDRESSES))
    for msg in (
        Message(T.ACK, 0, A, counter=0),
        Message(T.ACK, 0xFFFF, A, counter=2**64 - 1),
        Message(T.ADDR_DOWN, 1, A, old_addrs=most),
        Message(T.HELLO, 1, B, advertised=most, src_addr=B, public_key=VECTOR_PUB),
        Message(
            T.NAT_ENTRY,
            1,
            A,
            nat_mapping=NatMapping(0xFF, B, 0xFFFF, A, 0),
        ),
        _register(advertised=most),
        _relay(payload=b"\x00"),
        _relay(payload=bytes(MAX_PAYLOAD), host_id=B),
        _relayed(origin=(A, 1), payload=b"\xff"),
        _relayed(origin=(B, 0xFFFF), payload=bytes(range(256)) * 4),
    ):
        assert decode(encode(msg)) == msg
        signed = decode(encode(msg, VECTOR_KEY))
        assert unsigned(signed) == msg and verify(signed, VECTOR_PUB)


def _with_payload_length(length: int) -> bytes:
    """An unsigned RELAYED whose PAYLOAD (its last field) is ``length`` bytes, built by
    editing the encoding of one at the limit: the encoder would refuse to make it."""
    data = bytearray(encode(_relayed(payload=bytes(MAX_PAYLOAD))))
    field_at = len(data) - MAX_PAYLOAD - 3
    assert data[field_at] == 13  # tag PAYLOAD
    del data[field_at + 3 :]
    data += bytes(length)
    struct.pack_into("!H", data, field_at + 1, length)
    struct.pack_into("!H", data, 6, len(data) - HEADER_LEN)
    return bytes(data)


@pytest.mark.parametrize("length", [0, MAX_PAYLOAD + 1, 0xFFFF - 64])
def test_decode_refuses_a_payload_out_of_range(length: int) -> None:
    assert decode(_with_payload_length(MAX_PAYLOAD)).payload == bytes(MAX_PAYLOAD)
    assert decode(_with_payload_length(1)).payload == b"\x00"
    with pytest.raises(WireError) as info:
        decode(_with_payload_length(length))
    assert info.value.reason == "field"


def test_payload_is_opaque_to_the_decoder() -> None:
    """A PAYLOAD is checked for its length only: what it holds is for its receiver."""
    for payload in (b"\x00", b"not an IHMP message", EVENT[:-1], EVENT + b"\x00"):
        msg = _relay(payload=payload)
        assert decode(encode(msg)) == msg


def test_more_flows_holds_at_most_fifteen_flows_both_ways() -> None:
    flow = FlowSpec(6, ip_address("198.51.100.20"), 40000, ip_address("192.0.2.1"), 22)
    more = tuple(FlowSpec(6, flow.local, 40001 + i, flow.remote, 22) for i in range(16))
    msg = Message(
        MessageType.FLOW_MOVE,
        1,
        flow.local,
        new_addr=ip_address("203.0.113.20"),
        flow=flow,
        more_flows=more[:15],
    )
    assert decode(encode(msg)).more_flows == more[:15]
    with pytest.raises(WireError, match="at most 15"):
        encode(replace(msg, more_flows=more))
    # Sixteen written by hand (one more FLOW value in the field) are refused.
    data = bytearray(encode(msg))
    extra = encode(replace(msg, flow=more[15], more_flows=()))
    value = extra[_field_at(extra, 10) + 3 :][:15]  # the 16th flow: an IPv4 FLOW value
    at = _field_at(bytes(data), 14)
    length = int.from_bytes(data[at + 1 : at + 3], "big")
    data[at + 1 : at + 3] = (length + len(value)).to_bytes(2, "big")
    data[at + 3 + length : at + 3 + length] = value
    data[6:8] = (int.from_bytes(data[6:8], "big") + len(value)).to_bytes(2, "big")
    with pytest.raises(WireError, match="more than 15 flows"):
        decode(bytes(data))


def _field_at(data: bytes, tag: int) -> int:
    """Offset of body field ``tag`` in an unsigned message (walked, not searched)."""
    pos = 16 + (5 if data[16] == 4 else 17)  # header, Host ID
    while data[pos] != tag:
        pos += 3 + int.from_bytes(data[pos + 1 : pos + 3], "big")
    return pos
