"""The kernel's part of the StackTrans simulation (tests/stack_sim.py): packets, the
nft maps and the chains that use them, with no kernel.

* :class:`Pkt`: one TCP or UDP packet, and its bytes (:func:`encode`, :func:`decode`;
  ``struct`` and RFC 1071 checksums, which :func:`decode` verifies, so a rewrite
  that breaks a checksum is caught);
* :class:`Maps`: what our nft table ``inet dime`` holds, keyed as its maps are keyed
  (one family: IPv4 and IPv6 share each map here);
* :func:`out_chain` and :func:`in_chain`: what the ``out`` and ``in`` chains of
  :func:`stacktrans.nft.ruleset` do to a packet with those maps; :func:`learn_chain`
  what the learn chains do with a new flow's first packet;
* :class:`FakeKernel`: :class:`stacktrans.dataplane.KernelMaps` over a :class:`Maps`,
  with the kernel's element semantics (re-adding a key with another value and
  deleting a missing key are refused, and recorded in ``refused``) and NftTable's
  batching (changes wait for :meth:`FakeKernel.flush`). It also hands every call to
  a real :class:`~stacktrans.nft.NftTable` whose commands :class:`NftText` applies
  to maps of its own, and checks at each flush that both hold the same: the
  commands NftTable writes are checked in every scenario.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from typing import Any

from ihmp.addr import IPAddress
from stacktrans.nft import Nft, NftError, NftTable
from stacktrans.socket_table import TCP, UDP, FlowKey, SocketEntry
from stacktrans.translation import HidTranslation

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

#: ``meta l4proto . saddr . th sport . daddr . th dport`` (the flows and dead sets).
FlowTuple = tuple[int, IPAddress, int, IPAddress, int]
#: ``meta mark . meta l4proto . th sport . th dport`` of an inbound packet (rid, lid):
#: (HID, protocol, remote port, local port).
InKey = tuple[int, int, int, int]


# -- packets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pkt:
    proto: int
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    flags: int = 0  # TCP flags
    seq: int = 0
    payload: bytes = b""
    ack: int = 0

    @property
    def tuple(self) -> FlowTuple:
        return (self.proto, self.src, self.sport, self.dst, self.dport)

    def sent_by(self) -> FlowKey:
        """The flow as the sending socket sees it."""
        return FlowKey(self.proto, self.src, self.sport, self.dst, self.dport)

    def received_by(self) -> FlowKey:
        """The flow as the receiving socket sees it."""
        return FlowKey(self.proto, self.dst, self.dport, self.src, self.sport)

    @property
    def syn_ack(self) -> bool:
        return self.proto == TCP and self.flags & (SYN | ACK) == SYN | ACK

    def __str__(self) -> str:
        name = "tcp" if self.proto == TCP else "udp"
        return f"{name} {self.src}:{self.sport} > {self.dst}:{self.dport} {self.payload!r}"


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _csum(data: bytes) -> int:
    return ~_sum16(data) & 0xFFFF


def _pseudo(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!xBH", proto, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, proto)


_CSUM_AT = {TCP: 16, UDP: 6}


def encode(p: Pkt) -> bytes:
    """The packet's bytes: IPv4 (no options) or IPv6 (no extension headers)."""
    if p.proto == TCP:
        l4 = struct.pack("!HHIIBBHHH", p.sport, p.dport, p.seq, p.ack, 5 << 4, p.flags, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", p.sport, p.dport, 8 + len(p.payload), 0)
    l4 += p.payload
    csum = _csum(_pseudo(p.src, p.dst, p.proto, len(l4)) + l4) or 0xFFFF
    at = _CSUM_AT[p.proto]
    l4 = l4[:at] + struct.pack("!H", csum) + l4[at + 2 :]
    if p.src.version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 7, 0x4000, 64, p.proto, 0,
            p.src.packed, p.dst.packed,
        )  # fmt: skip
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), p.proto, 64, p.src.packed, p.dst.packed)
    return ip + l4


def decode(data: bytes) -> Pkt:
    """Parse what :func:`encode` builds; every checksum must be right."""
    if data[0] >> 4 == 4:
        assert data[0] == 0x45, "IPv4 options"
        assert _sum16(data[:20]) == 0xFFFF, "bad IPv4 header checksum"
        proto, src, dst, l4 = data[9], ip_address(data[12:16]), ip_address(data[16:20]), data[20:]
    else:
        proto, src, dst, l4 = data[6], ip_address(data[8:24]), ip_address(data[24:40]), data[40:]
    assert proto in (TCP, UDP), proto
    assert _sum16(_pseudo(src, dst, proto, len(l4)) + l4) == 0xFFFF, "bad L4 checksum"
    sport, dport = struct.unpack("!HH", l4[:4])
    if proto == TCP:
        seq, ack, flags = struct.unpack("!IIxB", l4[4:14])
        return Pkt(proto, src, sport, dst, dport, flags, seq, l4[20:], ack)
    return Pkt(proto, src, sport, dst, dport, payload=l4[8:])


# -- the maps and the chains that use them ----------------------------------------------


@dataclass
class Maps:
    """The elements of our table, as ``stacktrans/nft.py`` declares its maps."""

    flows: set[FlowTuple] = field(default_factory=set)
    rloc: dict[IPAddress, IPAddress] = field(default_factory=dict)
    lloc: dict[tuple[IPAddress, IPAddress], IPAddress] = field(default_factory=dict)
    hid: dict[IPAddress, int] = field(default_factory=dict)
    rid: dict[InKey, IPAddress] = field(default_factory=dict)
    lid: dict[InKey, IPAddress] = field(default_factory=dict)
    dead: set[FlowTuple] = field(default_factory=set)
    #: (local, remote) -> HID: what the kernel learns by itself. Not compared: the
    #: scenarios state flows and rewrites; FakeKernel checks it against NftTable's.
    learn: dict[tuple[IPAddress, IPAddress], int] = field(default_factory=dict, compare=False)
    #: rid's and lid's keys, which the learn chains look up (Linux 6.1 refuses a map
    #: looked up as a set). Not compared: FakeKernel checks that they are rid's keys.
    taken: set[InKey] = field(default_factory=set, compare=False)

    def copy(self) -> Maps:
        return Maps(
            set(self.flows), dict(self.rloc), dict(self.lloc), dict(self.hid),
            dict(self.rid), dict(self.lid), set(self.dead), dict(self.learn), set(self.taken),
        )  # fmt: skip

    def only_dead(self) -> Maps:
        """What the table holds without the fast path (nfqueue mode): the reject path."""
        return Maps(dead=set(self.dead))

    def learn_flow(self, key: FlowKey, hid: int) -> None:
        """What the learn chains add for a flow they learn (dynset ``add``)."""
        inbound = (hid, key.proto, key.rport, key.lport)
        self.flows.add(flow_tuple(key))
        self.rid.setdefault(inbound, key.remote)
        self.lid.setdefault(inbound, key.local)
        self.taken.add(inbound)

    def apply(self, op: Op) -> bool:
        """One element command, as the kernel takes it. Returns False if refused."""
        verb, name, key, value = op
        elements: Any = getattr(self, name)
        if verb == "add":
            if isinstance(elements, set):
                elements.add(key)  # re-adding an element is no error
                return True
            if key in elements and elements[key] != value:
                return False  # the key exists with another value
            elements[key] = value
            return True
        if key not in elements:
            return False  # deleting what is not there aborts the batch
        if isinstance(elements, set):
            elements.remove(key)
        else:
            del elements[key]
        return True


#: (verb, map, key, value): one ``add``/``delete element`` command; value None for sets
#: and deletes.
Op = tuple[str, str, Any, Any]


def flow_tuple(key: FlowKey) -> FlowTuple:
    return (key.proto, key.local, key.lport, key.remote, key.rport)


def in_key(entry: SocketEntry) -> InKey:
    return (entry.hid, entry.key.proto, entry.key.rport, entry.key.lport)


def out_chain(maps: Maps, pkt: Pkt) -> Pkt | None:
    """Chain ``out`` (output, -140): None when the flow is dead (reset / ICMP error)."""
    if pkt.tuple in maps.dead:
        return None
    if pkt.tuple not in maps.flows:
        return pkt
    src = maps.lloc.get((pkt.src, pkt.dst), pkt.src)
    return replace(pkt, src=src, dst=maps.rloc.get(pkt.dst, pkt.dst))


class Learned(enum.Enum):
    """What the learn chains did with a first packet (``ct state new``, mark 0)."""

    KNOWN = "known"  # the flow is in ``flows`` already: nothing
    LEARNED = "learned"  # added by the kernel; a notice goes to the daemon
    SYNC = "sync"  # marked for the queue: the daemon decides before it goes on
    UNKNOWN = "unknown"  # an unknown host: passed, a notice goes to the daemon


def learn_chain(maps: Maps, key: FlowKey, *also: Maps) -> Learned:
    """Chains ``learn_out``/``learn_in`` (-160) for a new flow's first packet, ``key``
    as its socket sees it. A flow learned goes into ``maps`` and each of ``also``
    (the same kernel seen through other eyes)."""
    if flow_tuple(key) in maps.flows:
        return Learned.KNOWN
    hid = maps.learn.get((key.local, key.remote))
    if hid is None:
        return Learned.SYNC if key.remote in maps.hid else Learned.UNKNOWN
    if (hid, key.proto, key.rport, key.lport) in maps.taken:
        return Learned.SYNC  # another flow's inbound key
    for m in (maps, *also):
        m.learn_flow(key, hid)
    return Learned.LEARNED


def in_chain(maps: Maps, pkt: Pkt) -> Pkt:
    """Chain ``in`` (prerouting, -300): the HID from the source, then the flow's ids."""
    mark = maps.hid.get(pkt.src)
    if mark is None:
        return pkt
    key = (mark, pkt.proto, pkt.sport, pkt.dport)
    return replace(pkt, src=maps.rid.get(key, pkt.src), dst=maps.lid.get(key, pkt.dst))


# -- the kernel maps as the Dataplane programs them -------------------------------------


class FakeKernel:
    """:class:`~stacktrans.dataplane.KernelMaps` over :class:`Maps`.

    ``maps`` is what the kernel holds (without the fast path, only the dead set);
    ``nft_view`` what it would hold with the fast path, whatever the mode, so that
    both modes can be held to the same expectations.
    """

    def __init__(self, *, fast_path: bool) -> None:
        self.fast_path = fast_path
        self.nft_view = Maps()
        self.refused: list[Op] = []
        self.flushes = 0
        self._pending: list[Op] = []
        self._hids: dict[int, HidTranslation] = {}
        self.nft_text = NftText()
        self._nft = NftTable(self.nft_text, fast_path=fast_path, defer=lambda fn: None)
        self._nft.installed = True  # its tables exist: only element commands concern us

    @property
    def maps(self) -> Maps:
        return self.nft_view if self.fast_path else self.nft_view.only_dead()

    def add_flows(self, entries: Iterable[SocketEntry]) -> None:
        flows = list(entries)
        for e in flows:
            self._pending += [
                ("add", "flows", flow_tuple(e.key), None),
                ("add", "rid", in_key(e), e.key.remote),
                ("add", "lid", in_key(e), e.key.local),
                ("add", "taken", in_key(e), None),
            ]
        self._nft.add_flows(flows)

    def remove_flows(self, entries: Iterable[SocketEntry]) -> None:
        flows = list(entries)
        for e in flows:
            self._pending += [
                ("delete", "flows", flow_tuple(e.key), None),
                ("delete", "rid", in_key(e), None),
                ("delete", "lid", in_key(e), None),
                ("delete", "taken", in_key(e), None),
            ]
        self._nft.remove_flows(flows)

    def kill_flows(self, entries: Iterable[SocketEntry]) -> None:
        flows = list(entries)
        self._pending += [("add", "dead", flow_tuple(e.key), None) for e in flows]
        self._nft.kill_flows(flows)

    def forget_dead(self, entries: Iterable[SocketEntry]) -> None:
        flows = list(entries)
        self._pending += [("delete", "dead", flow_tuple(e.key), None) for e in flows]
        self._nft.forget_dead(flows)

    def update_hid(self, new: HidTranslation | None, hid: int) -> None:
        old = self._hids.pop(hid, None)
        if new is not None:
            self._hids[hid] = new
        empty = HidTranslation(hid)
        was, now = old or empty, new or empty
        self._pending += _diff("rloc", was.remote, now.remote)
        self._pending += _diff("lloc", was.local, now.local)
        self._pending += _diff(
            "hid", dict.fromkeys(was.locators, hid), dict.fromkeys(now.locators, hid)
        )
        self._pending += _diff(
            "learn", dict.fromkeys(was.learnable, hid), dict.fromkeys(now.learnable, hid)
        )
        self._nft.update_hid(new, hid)

    def learn(self, key: FlowKey) -> Learned:
        """The learn chains, on the kernel's maps (and NftTable's view of them)."""
        return learn_chain(self.nft_view, key, self.nft_text.maps)

    def flush(self) -> None:
        ops, self._pending = self._pending, []
        self.refused += [op for op in ops if not self.nft_view.apply(op)]
        self.flushes += 1
        self._nft.flush()
        mine, theirs = self.nft_text.maps, self.maps
        assert (mine, mine.learn) == (theirs, theirs.learn), (
            f"NftTable's commands left {mine}, the maps are {theirs}"
        )
        for maps in (mine, theirs):
            assert maps.taken == maps.rid.keys() == maps.lid.keys(), f"taken out of step: {maps}"


def _diff(name: str, before: Mapping[Any, Any], after: Mapping[Any, Any]) -> list[Op]:
    """Like NftTable: a changed key is deleted and added again, in the same batch."""
    ops: list[Op] = [("delete", name, k, None) for k, v in before.items() if after.get(k) != v]
    return ops + [("add", name, k, v) for k, v in after.items() if before.get(k) != v]


_ELEMENT = re.compile(r"(add|delete) element inet dime ([a-z]+)[46] \{ (.+) \}")


def _field(text: str) -> Any:
    if text in ("tcp", "udp"):
        return TCP if text == "tcp" else UDP
    return int(text) if text.isdigit() else ip_address(text)


def parse_element(command: str) -> Op:
    """One ``add``/``delete element`` command of NftTable as an :data:`Op`."""
    m = _ELEMENT.fullmatch(command)
    assert m is not None, f"not an element command: {command!r}"
    verb, name, body = m.groups()
    key_text, _, value_text = body.partition(" : ")
    fields = tuple(_field(f) for f in key_text.split(" . "))
    return (
        verb,
        name,
        fields[0] if len(fields) == 1 else fields,
        _field(value_text) if value_text else None,
    )


class NftText(Nft):
    """A stand-in for libnftables that applies NftTable's element commands to
    :class:`Maps`, each batch atomically (one refused command refuses the batch)."""

    def __init__(self) -> None:  # no libnftables
        self.maps = Maps()
        self.batches: list[str] = []

    def run(self, commands: str) -> str:
        self.batches.append(commands)
        maps = self.maps.copy()
        for line in commands.splitlines():
            if not maps.apply(parse_element(line)):
                raise NftError(f"refused: {line}")
        self.maps = maps
        return ""
