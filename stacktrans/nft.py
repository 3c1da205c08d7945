"""Our own nftables table: the kernel fast path and the reject path.

Everything lives in one table, ``inet dime``; nothing else in the ruleset is read or
written. Programming goes through libnftables in-process (the ``nftables`` Python
binding), one atomic batch per change.

Hooks and priorities, chosen so that conntrack sees identifiers both ways:

* ``out``: output hook, type ``route``, priority -140. After conntrack (-200), so
  conntrack records the socket's identifiers; after iptables' mangle (-150), where
  the first packet of a flow was queued to the daemon, so a flow's map elements
  exist before its first packet gets here. Type ``route`` makes the kernel route
  the packet again after the destination changed.
* ``in``: prerouting hook, priority -300 (raw). Before conntrack and before the
  routing decision, so conntrack matches the restored identifiers with the
  existing connection and the packet is delivered to the identifier (possibly a
  ghost address on ``lo``).

Outbound rewrites are keyed by identifier ((local id, remote id) for the source,
remote id for the destination) and gated by a per-flow set, so a handoff updates a
handful of elements per host, never one per flow. Inbound, the source locator
gives the HID (in the packet mark, used as a scratch register only on packets whose
mark is 0, and cleared again), and (HID, protocol, ports) gives the flow's
identifiers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ihmp.addr import IPAddress
from ihmp.flows import KNOCK_MAGIC
from stacktrans import heap
from stacktrans.socket_table import TCP, FlowKey, SocketEntry
from stacktrans.translation import HidTranslation

log = logging.getLogger("dime.nft")

TABLE = "dime"
FAMILIES = ("inet", "arp")  # our tables: table inet dime, table arp dime
OUT_PRIORITY = -140
XFAM_PRIORITY = -155
IN_PRIORITY = -300
#: The mark of an inbound knock: no translation here, and the queue rules send it to
#: the daemon whatever conntrack thinks of it (a knock on a port the flow already has
#: would otherwise reach the application).
KNOCK_MARK = 0xD1E5
#: The mark of a new flow's first packet that the kernel cannot learn by itself (a
#: host whose flows need a decision of the daemon): the queue rules send it to the
#: daemon, and our chains clear the mark again after the queue's hook.
SYNC_MARK = 0xD1E6
#: The mark of a packet of a flow carried across IP versions (``xout``/``xin``): the
#: queue rules send it to the daemon, which translates it (:mod:`stacktrans.family`).
XFAM_MARK = 0xD1E7
#: The mark of the packets the daemon injects (raw sockets): nothing of ours queues,
#: learns or translates them again.
INJECT_MARK = 0xD1E8
#: Elements the per-flow sets and maps hold at most: the kernel adds to them from
#: the packet path, and such a set needs a size (its default is 65,535).
FLOWS_MAX = 1 << 21
#: Bytes of each logged packet sent to the daemon: IPv6 and TCP headers, options
#: included up to the sequence number's needs.
NOTICE_SNAPLEN = 80
#: The log prefix of a notice whose flow the kernel holds already (learned, or the
#: daemon's): the daemon need not add its elements again. Such notices go to their
#: own NFLOG group, which the kernel may batch (:data:`stacktrans.nflog.HELD_BATCH`).
IN_KERNEL_PREFIX = "k"


# A batch this long (bytes of commands) leaves libnftables' parse of it in freed C
# heap (see stacktrans.heap); smaller ones are not worth a trim.
TRIM_AFTER = 64 * 1024


class NftError(RuntimeError):
    """libnftables refused a command; the message is nft's own."""


class Nft:
    """A libnftables context. ``run`` applies one batch atomically."""

    def __init__(self) -> None:
        try:
            import nftables  # the libnftables binding (pip-nftables)
        except ImportError as exc:  # pragma: no cover - install problem
            raise NftError(
                "the nftables Python binding is missing: pip install pip-nftables"
            ) from exc
        try:
            self._nft = nftables.Nftables()
        except OSError as exc:
            raise NftError("libnftables is missing: apt-get install libnftables1") from exc
        self._nft.set_handle_output(False)

    def run(self, commands: str) -> str:
        rc, out, err = self._nft.cmd(commands)
        if len(commands) >= TRIM_AFTER:
            heap.trim_heap()
        if rc != 0:
            raise NftError(err.strip() or f"nft failed ({rc})")
        return str(out)

    def json(self, command: str) -> dict[str, Any]:
        self._nft.set_json_output(True)
        try:
            out = self.run(command)
        finally:
            self._nft.set_json_output(False)
        return dict(json.loads(out)) if out.strip() else {}

    def table_exists(self, family: str, name: str) -> bool:
        tables = self.json("list tables").get("nftables", [])
        return any(
            t.get("table", {}).get("family") == family and t["table"].get("name") == name
            for t in tables
        )


def _fam(addr: IPAddress) -> str:
    return "4" if addr.version == 4 else "6"


def _proto(proto: int) -> str:
    return "tcp" if proto == TCP else "udp"


@dataclass(frozen=True)
class QueueSpec:
    """Native nft queue rules, for kernels with ``CONFIG_NFT_QUEUE``.

    The same selection as :mod:`stacktrans.queue_rules` (which uses iptables where
    the statement is missing), in our own table.
    """

    out_queue: int
    in_queue: int
    ihmp_port: int
    every_packet: bool


ICMP4_ERRORS = "destination-unreachable, source-quench, time-exceeded, parameter-problem"
ICMP6_ERRORS = "destination-unreachable, packet-too-big, time-exceeded, parameter-problem"


def _skip(dev: str, ihmp_port: int) -> list[str]:
    """What is never queued nor learned: loopback, IHMP, multicast and broadcast."""
    return [
        f'    {dev} "lo" return',
        f"    meta mark {INJECT_MARK:#x} return",
        f"    udp sport {ihmp_port} return",
        f"    udp dport {ihmp_port} return",
        "    ip daddr { 224.0.0.0/4, 255.255.255.255 } return",
        "    ip6 daddr ff00::/8 return",
    ]


def _queue_chains(q: QueueSpec) -> list[str]:
    def skip(dev: str) -> list[str]:
        return _skip(dev, q.ihmp_port)

    def to(num: int) -> str:
        return f"queue num {num} bypass"

    icmp = [
        f"    icmp type {{ {ICMP4_ERRORS} }} {to(q.out_queue)}",
        f"    icmpv6 type {{ {ICMP6_ERRORS} }} {to(q.out_queue)}",
    ]
    # First packets: those the learn chains marked for the daemon, and those that
    # came with a mark of their own (the learn chains need the mark to be 0).
    new = "" if q.every_packet else " ct state new meta mark != 0"
    lines = [
        "  chain q_out {",
        "    type filter hook output priority -150; policy accept;",
        *skip("oifname"),
        f"    meta mark {XFAM_MARK:#x} {to(q.out_queue)}",
        f"    meta l4proto {{ tcp, udp }}{new} {to(q.out_queue)}",
        *icmp,
        "  }",
        "  chain q_in {",
        "    type filter hook prerouting priority -300; policy accept;",
        *skip("iifname"),
        *(line.replace(to(q.out_queue), to(q.in_queue)) for line in icmp),
    ]
    if q.every_packet:
        lines += [f"    meta l4proto {{ tcp, udp }} {to(q.in_queue)}", "  }"]
    else:
        lines += [
            "  }",
            "  chain q_new {",
            "    type filter hook prerouting priority -150; policy accept;",
            *skip("iifname"),
            f"    meta mark {KNOCK_MARK:#x} {to(q.in_queue)}",
            f"    meta mark {XFAM_MARK:#x} {to(q.in_queue)}",
            f"    meta l4proto {{ tcp, udp }}{new} {to(q.in_queue)}",
            "  }",
        ]
    return lines


def _learn_chains(ihmp_port: int, group: int, held_group: int) -> list[str]:
    """New flows learned in the packet path, never waiting for the daemon.

    After conntrack (-200) and before the queue rules (-150), a first packet
    (``ct state new``, mark 0) of a flow the kernel does not know yet is

    * **learned here** when its (local, remote) pair is in ``learn``, which maps it
      to its HID (:attr:`~stacktrans.translation.HidTranslation.learnable`: what the
      daemon would decide is known): the flow goes into ``flows``, and its inbound
      restoration into ``rid``/``lid``; the out chain (-140) rewrites it from this
      very packet. The daemon hears of it from a copy (NFLOG ``group``) for its
      socket table;
    * **queued** (:data:`SYNC_MARK`, which the queue rules match) when its remote is
      a known host's other address (``hid``) or its inbound key is another flow's:
      the daemon decides before the packet goes on, as it always did;
    * **passed and logged** when its remote is unknown: nothing is translated for a
      host IHMP does not know yet; the daemon learns the flow from the copy (and
      says HELLO) before any move can concern it.

    The copy of a TCP connection is its SYN-ACK, logged both ways: it names the flow
    and carries both sequence numbers (its own and, acknowledged, the SYN's), which
    the daemon needs to prompt stalled flows (:mod:`stacktrans.rto_revert`). A SYN
    is not logged: one notice per connection at each end, not two. A packet that
    already carries a mark is left to the queue rules. Outbound, the out chain
    clears :data:`SYNC_MARK`; inbound, ``unmark`` does, after the queue rules' hook.

    A copy whose flow the kernel holds (in ``flows``: learned, or added by the
    daemon) says so (prefix :data:`IN_KERNEL_PREFIX`): the daemon then does not add
    its elements again through libnftables, which would cost it more than the rest
    of the notice. Nothing waits for such a copy (the kernel translates the flow
    already): it goes to NFLOG ``held_group``, whose notices the daemon lets the
    kernel batch; every other copy goes to ``group``, each at once.
    """
    log = f"log group {group} snaplen {NOTICE_SNAPLEN}"
    held = f'log group {held_group} snaplen {NOTICE_SNAPLEN} prefix "{IN_KERNEL_PREFIX}"'
    # A first packet's copy, unless it is a SYN (its SYN-ACK tells).
    notice = f"tcp flags & (syn | ack) != syn {log}"
    lines: list[str] = []
    for way, hook, dev in (("out", "output", "oifname"), ("in", "prerouting", "iifname")):
        lines += [
            f"  chain learn_{way} {{",
            f"    type filter hook {hook} priority -160; policy accept;",
            # Most packets are neither a flow's first nor a SYN-ACK: out at once,
            # before the skip rules (this chain sees every packet).
            "    ct state != new meta l4proto != tcp return",
            "    ct state != new tcp flags & (syn | ack) != syn | ack return",
            *_skip(dev, ihmp_port),
            f"    tcp flags & (syn | ack) == syn | ack jump synack_{way}",
            *(
                f"    meta mark 0 meta l4proto {{ tcp, udp }} ct state new "
                f"meta nfproto {proto} jump new_{way}{f}"
                for f, proto in (("4", "ipv4"), ("6", "ipv6"))
            ),
            "  }",
        ]
        synack = [f"  chain synack_{way} {{"]
        for f, ip in (("4", "ip"), ("6", "ip6")):
            # The flow as its socket sees it: (local, remote) both ways.
            local, remote = ("saddr", "daddr") if way == "out" else ("daddr", "saddr")
            lport, rport = ("sport", "dport") if way == "out" else ("dport", "sport")
            flow = f"meta l4proto . {ip} {local} . th {lport} . {ip} {remote} . th {rport}"
            pair = f"{ip} {local} . {ip} {remote}"
            other, inward = ("6" if f == "4" else "4"), int(way == "in")
            inbound = f"meta mark . meta l4proto . th {rport} . th {lport}"
            synack.append(f"    {flow} @flows{f} {held} return")
            lines += [
                f"  chain new_{way}{f} {{",
                f"    {flow} @flows{f} return",
                # Maps are looked up for their data even where only a hit matters
                # (Linux 6.1 refuses a map looked up as a set): a miss ends the rule.
                f"    meta mark set {pair} map @learn{f} goto learn_{way}{f}",
                f"    meta mark set {ip} {remote} map @hid{f} meta mark set {SYNC_MARK:#x} return",
                f"    meta l4proto udp {log}",
                f"    {notice}",
                "  }",
                f"  chain learn_{way}{f} {{",
                f"    {inbound} @taken{f} meta mark set {SYNC_MARK:#x} return",
                # A flow of the host's in the other IP version, carried across before
                # we knew (the peer decided first): the daemon's (stacktrans.carry).
                *([f"    {inbound} @taken{other} meta mark set {SYNC_MARK:#x} return"] * inward),
                f"    add @flows{f} {{ {flow} }} "
                f"add @rid{f} {{ {inbound} : {ip} {remote} }} "
                f"add @lid{f} {{ {inbound} : {ip} {local} }} "
                f"add @taken{f} {{ {inbound} }} meta mark set 0",
                # The mark still names the HID only if a set was full: then the
                # daemon decides (and says so in its log).
                f"    meta mark != 0 meta mark set {SYNC_MARK:#x} return",
                f"    meta l4proto udp {held}",
                f"    tcp flags & (syn | ack) != syn {held}",
                "  }",
            ]
        lines += [*synack, f"    {log}", "  }"]
    lines += [
        "  chain unmark {",
        "    type filter hook prerouting priority -149; policy accept;",
        f"    meta mark {SYNC_MARK:#x} meta mark set 0",
        "  }",
    ]
    return lines


def _untracked_ihmp(port: int) -> list[str]:
    """IHMP to and from this host bypasses conntrack. A flood of spoofed sources
    would otherwise leave an entry per source (our rules make conntrack run here):
    the host's conntrack table filled for everyone, and every sweep of it longer.
    IHMP needs none: its peers' datagrams are expected unasked (so a stateful
    firewall must accept the port anyway). Only packets *to* this host: forwarded
    IHMP (a router running dime) keeps its NAT."""
    return [
        "  chain ihmp_in {",
        "    type filter hook prerouting priority raw; policy accept;",
        f"    udp dport {port} fib daddr type local notrack",
        "  }",
        "  chain ihmp_out {",
        "    type filter hook output priority raw; policy accept;",
        f"    udp sport {port} notrack",
        # What the daemon carried across IP versions to the peer: no connection of
        # ours (the peer's answers, in that version, must come to the daemon as new
        # packets, which the learn chains send it, never to a stack that would reset
        # them). What it delivers to us keeps conntrack's view of the flow itself.
        f"    meta mark {INJECT_MARK:#x} fib daddr type != local notrack",
        "  }",
    ]


def ruleset(
    *,
    fast_path: bool,
    queue: QueueSpec | None = None,
    ihmp_port: int | None = None,
    log_group: int | None = None,
    held_log_group: int | None = None,
) -> str:
    """The text of our table. Without the fast path only the reject path is there;
    with ``queue``, the queue rules too (else iptables carries them); with
    ``ihmp_port``, IHMP bypasses conntrack; with the fast path, ``ihmp_port`` and
    ``log_group``, the kernel learns new flows itself and tells the daemon through
    NFLOG group ``log_group``, and of the flows it holds already through
    ``held_log_group`` (default: ``log_group``) (:func:`_learn_chains`)."""
    lines = [f"table inet {TABLE} {{"]
    dyn = f"flags dynamic; size {FLOWS_MAX};"
    for f, t in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
        flow = f"inet_proto . {t} . inet_service . {t} . inet_service"
        inbound = "mark . inet_proto . inet_service . inet_service"
        lines += [
            f"  set dead{f} {{ type {flow}; }}",
            f"  set flows{f} {{ type {flow}; {dyn} }}",
            f"  map rloc{f} {{ type {t} : {t}; }}",
            f"  map lloc{f} {{ type {t} . {t} : {t}; }}",
            f"  map hid{f} {{ type {t} : mark; }}",
            f"  map learn{f} {{ type {t} . {t} : mark; }}",
            f"  map rid{f} {{ type {inbound} : {t}; {dyn} }}",
            f"  map lid{f} {{ type {inbound} : {t}; {dyn} }}",
            # The keys of rid and lid, for the learn chains to look up: Linux 6.1
            # refuses a map looked up as a set.
            f"  set taken{f} {{ type {inbound}; {dyn} }}",
            # Flows of a host behind a NAT, which gave each flow a port of its own.
            # (``inbound``: the key of rid/lid.)
            f"  map wdst{f} {{ type {flow} : {t}; }}",
            f"  map wport{f} {{ type {flow} : inet_service; }}",
            f"  map rport{f} {{ type {inbound} : inet_service; }}",
            # A flow's own local locator (a locator policy, `dime move`), keyed by the
            # flow as the packet is when it is looked up (after a NAT's rewrite).
            f"  map wsrc{f} {{ type {flow} : {t}; }}",
            # Flows carried across IP versions: outbound by their identifiers' pair,
            # inbound by their key on the wire (in the locators' version).
            f"  set xout{f} {{ type {t} . {t}; }}",
            f"  set xin{f} {{ type {inbound}; }}",
        ]
    out = [f"    type route hook output priority {OUT_PRIORITY}; policy accept;"]
    # Before the queue rules (-150): a flow carried across IP versions goes to the daemon.
    xfam = [f"    type filter hook output priority {XFAM_PRIORITY}; policy accept;"]
    inn = [f"    type filter hook prerouting priority {IN_PRIORITY}; policy accept;"]
    if fast_path:
        # A knock (UDP, or TCP without options, as dime builds them) is marked for the
        # daemon and not translated (the jumps below want mark 0).
        inn += [
            f"    meta l4proto udp @th,64,64 0x{KNOCK_MAGIC.hex()} meta mark set {KNOCK_MARK:#x}",
            f"    meta l4proto tcp @th,160,64 0x{KNOCK_MAGIC.hex()} meta mark set {KNOCK_MARK:#x}",
        ]
    for f, ip in (("4", "ip"), ("6", "ip6")):
        key = f"meta l4proto . {ip} saddr . th sport . {ip} daddr . th dport"
        # Flows of a host that is gone: the application gets an error now, not a hang.
        out += [
            f"    meta l4proto tcp {key} @dead{f} reject with tcp reset",
            f"    meta l4proto udp {key} @dead{f} reject",
        ]
        if fast_path:
            out.append(f"    meta l4proto {{ tcp, udp }} {key} @flows{f} jump out{f}")
            xfam.append(
                f"    meta mark 0 {ip} saddr . {ip} daddr @xout{f} meta mark set {XFAM_MARK:#x}"
            )
            inn.append(
                f"    meta mark 0 meta l4proto {{ tcp, udp }} "
                f"meta mark set {ip} saddr map @hid{f} jump in{f}"
            )
    if fast_path:
        out.insert(1, f"    meta mark {SYNC_MARK:#x} meta mark set 0")  # (after the hook line)
    lines += ["  chain out {", *out, "  }", "  chain in {", *inn, "  }"]
    if fast_path:
        lines += ["  chain xfam_out {", *xfam, "  }"]
    if fast_path:
        for f, ip in (("4", "ip"), ("6", "ip6")):
            fkey = "meta mark . meta l4proto . th sport . th dport"
            key = f"meta l4proto . {ip} saddr . th sport . {ip} daddr . th dport"
            # A rewrite through a map applies only where the map has the key: a miss
            # ends the rule, before its verdict too. (Linux 6.1 refuses a map looked
            # up as a set: no ``@map`` conditions, and none are needed.)
            lines += [
                f"  chain out{f} {{",
                f"    {ip} daddr set {key} map @wdst{f} goto nat{f}",
                f"    {ip} saddr set {key} map @wsrc{f} goto via{f}",
                f"    {ip} saddr set {ip} saddr . {ip} daddr map @lloc{f}",
                f"    {ip} daddr set {ip} daddr map @rloc{f}",
                "  }",
                # A flow with a local locator of its own: from there (the type route
                # chain routes it again: by source, stacktrans.link_routes).
                f"  chain via{f} {{",
                f"    {ip} daddr set {ip} daddr map @rloc{f}",
                "  }",
                # Behind a NAT: to the NAT's address (out rewrote it), at the port it
                # gave the flow; from our locator, if we moved too (lloc holds the pair
                # of our identifier and the NAT's address for such flows).
                f"  chain nat{f} {{",
                f"    meta l4proto tcp tcp dport set {key} map @wport{f}",
                f"    meta l4proto udp udp dport set {key} map @wport{f}",
                f"    {ip} saddr set {key} map @wsrc{f} return",
                f"    {ip} saddr set {ip} saddr . {ip} daddr map @lloc{f}",
                "  }",
                # (The in chain set the mark to the HID.)
                f"  chain in{f} {{",
                f"    {fkey} @xin{f} meta mark set {XFAM_MARK:#x} return",
                f"    {ip} saddr set {fkey} map @rid{f}",
                f"    {ip} daddr set {fkey} map @lid{f}",
                f"    meta l4proto tcp tcp sport set {fkey} map @rport{f}",
                f"    meta l4proto udp udp sport set {fkey} map @rport{f}",
                "    meta mark set 0",
                "  }",
            ]
    if fast_path and ihmp_port is not None and log_group is not None:
        held = log_group if held_log_group is None else held_log_group
        lines += _learn_chains(ihmp_port, log_group, held)
    if queue is not None:
        lines += _queue_chains(queue)
    if ihmp_port is not None:
        lines += _untracked_ihmp(ihmp_port)
    lines.append("}")
    return "\n".join(lines) + "\n" + GHOST_ARP


#: A ghost (an address this host left, kept on ``lo`` for its flows) must not be
#: claimed on any link: a host that is given the address next would find us
#: answering for it. Linux answers ARP for any local address on any link
#: (``arp_ignore`` 0), and names the source of the packet that needs the neighbour
#: as the sender of its request (``arp_announce`` 0): a ghost, for a packet of a flow
#: not rewritten yet. These rules stop both, for ghosts only: requests for a ghost
#: are not answered, and a request naming one names an address of its link instead
#: (``sender``). Dropping such requests instead would stall the link's neighbour
#: resolution (the kernel asks again for the newest queued packet, which may again
#: come from the ghost), IHMP included. (IPv6 neighbour discovery answers only for
#: addresses of the receiving link: a ghost on ``lo`` is never claimed there.)
GHOST_ARP = f"""table arp {TABLE} {{
  set ghosts {{ type ipv4_addr; }}
  map sender {{ type iface_index : ipv4_addr; }}
  chain in {{
    type filter hook input priority 0; policy accept;
    arp operation request arp daddr ip @ghosts drop
  }}
  chain out {{
    type filter hook output priority 0; policy accept;
    arp saddr ip @ghosts arp saddr ip set meta oif map @sender
  }}
}}
"""


def _flow_element(e: SocketEntry) -> tuple[str, str]:
    k = e.key
    return _fam(k.local), f"{_proto(k.proto)} . {k.local} . {k.lport} . {k.remote} . {k.rport}"


class NftTable:
    """Our table, and the elements it holds, mirrored so updates can be diffs."""

    def __init__(
        self,
        nft: Nft,
        *,
        fast_path: bool,
        queue: QueueSpec | None = None,
        ihmp_port: int | None = None,
        log_group: int | None = None,
        held_log_group: int | None = None,
        defer: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        """``defer(fn)``: run ``fn`` a little later (an event-loop timer). With it,
        changes made while handling a burst of packets go to the kernel as one batch;
        without it, each change is applied at once. :meth:`flush` forces a batch."""
        self.nft = nft
        self.fast_path = fast_path
        self.queue = queue
        self.ihmp_port = ihmp_port
        self.log_group = log_group
        self.held_log_group = held_log_group
        self._hids: dict[int, HidTranslation] = {}
        self._ghosts: set[IPAddress] = set()
        self._senders: dict[int, IPAddress] = {}
        self._defer = defer
        self._pending: list[str] = []
        self.installed = False

    def install(self) -> None:
        """(Re)create our tables, with every element already asked for, in one
        atomic batch: a stale copy (a predecessor that crashed) is replaced without
        a moment in which its flows go untranslated."""
        replace = "".join(f"add table {f} {TABLE}\ndelete table {f} {TABLE}\n" for f in FAMILIES)
        tables = replace + ruleset(
            fast_path=self.fast_path,
            queue=self.queue,
            ihmp_port=self.ihmp_port,
            log_group=self.log_group,
            held_log_group=self.held_log_group,
        )
        try:
            self.nft.run(tables + "\n".join(self._pending))
            self._pending.clear()
        except NftError as exc:
            if not self._pending:
                raise
            # Some element was refused: the tables alone, then the elements one by one
            # (flush), so that one bad element costs nothing else.
            log.warning("nft refused the elements with the tables (%s); adding them apart", exc)
            self.nft.run(tables)
        self.installed = True
        self.flush()

    def uninstall(self) -> None:
        for family in FAMILIES:
            if self.nft.table_exists(family, TABLE):
                self.nft.run(f"delete table {family} {TABLE}")
        self._hids.clear()
        self._ghosts.clear()
        self.installed = False

    # -- ghosts -----------------------------------------------------------------------

    def set_ghosts(self, ghosts: set[IPAddress], senders: dict[int, IPAddress]) -> None:
        """The ghost addresses no link may see us claim (IPv4: ARP), and for each
        link (ifindex) the address its ARP names instead."""
        v4: set[IPAddress] = {a for a in ghosts if a.version == 4}
        cmds = [f"delete element arp {TABLE} ghosts {{ {a} }}" for a in self._ghosts - v4]
        cmds += [f"add element arp {TABLE} ghosts {{ {a} }}" for a in v4 - self._ghosts]
        self._ghosts = v4
        cmds += _map_diff(lambda k: f"arp {TABLE} sender", self._senders, senders)
        self._senders = dict(senders)
        self._apply(cmds)
        self.flush()

    # -- flows ------------------------------------------------------------------------

    def add_flows(self, entries: Iterable[SocketEntry]) -> None:
        if self.fast_path:
            self._apply(self._flow_cmds("add", entries))

    def remove_flows(self, entries: Iterable[SocketEntry]) -> None:
        if self.fast_path:
            self._apply(self._flow_cmds("delete", entries))

    def _flow_cmds(self, verb: str, entries: Iterable[SocketEntry]) -> list[str]:
        cmds = []
        for e in entries:
            f, elem = _flow_element(e)
            cmds.append(f"{verb} element inet {TABLE} flows{f} {{ {elem} }}")
            cmds += _elements(verb, f, _wire_elements(e, e.wire))
        return cmds

    def set_wire(self, entry: SocketEntry, old: tuple[IPAddress, int] | None) -> None:
        """``entry``'s wire (:attr:`SocketEntry.wire`) was ``old``, and is now its own."""
        if self.fast_path:
            f = _fam(entry.key.local)
            self._apply(
                _elements("delete", f, _wire_elements(entry, old))
                + _elements("add", f, _wire_elements(entry, entry.wire))
            )

    def set_via(self, entry: SocketEntry, old: IPAddress | None) -> None:
        """``entry``'s own local locator (:attr:`SocketEntry.via`) was ``old``."""
        if self.fast_path:
            f = _fam(entry.key.local)
            self._apply(
                _elements("delete", f, _via_elements(entry, entry.wire, old))
                + _elements("add", f, _via_elements(entry, entry.wire, entry.via))
            )

    def set_cross(
        self,
        pairs: Iterable[tuple[IPAddress, IPAddress]],
        inbound: Iterable[tuple[int, FlowKey, IPAddress]],
        old_pairs: Iterable[tuple[IPAddress, IPAddress]],
        old_inbound: Iterable[tuple[int, FlowKey, IPAddress]],
    ) -> None:
        """The flows carried across IP versions changed: ``pairs`` are (local id,
        remote id) whose packets go to the daemon; ``inbound``, (HID, flow, remote
        locator) whose packets from that locator do. ``old_*``: what was there."""
        if not self.fast_path:
            return

        def pair(p: tuple[IPAddress, IPAddress]) -> tuple[str, str]:
            return f"xout{_fam(p[0])}", f"{p[0]} . {p[1]}"

        def inb(item: tuple[int, FlowKey, IPAddress]) -> tuple[str, str]:
            hid, k, loc = item
            return f"xin{_fam(loc)}", f"{hid} . {_proto(k.proto)} . {k.rport} . {k.lport}"

        new = {pair(p) for p in pairs} | {inb(i) for i in inbound}
        old = {pair(p) for p in old_pairs} | {inb(i) for i in old_inbound}
        cmds = [f"delete element inet {TABLE} {m} {{ {k} }}" for m, k in sorted(old - new)]
        cmds += [f"add element inet {TABLE} {m} {{ {k} }}" for m, k in sorted(new - old)]
        self._apply(cmds)

    def kill_flows(self, entries: Iterable[SocketEntry]) -> None:
        """Make the flows' next outbound packet fail: a TCP reset or ICMP error."""
        self._apply(self._dead_cmds("add", entries))

    def forget_dead(self, entries: Iterable[SocketEntry]) -> None:
        self._apply(self._dead_cmds("delete", entries))

    @staticmethod
    def _dead_cmds(verb: str, entries: Iterable[SocketEntry]) -> list[str]:
        cmds = []
        for e in entries:
            f, elem = _flow_element(e)
            cmds.append(f"{verb} element inet {TABLE} dead{f} {{ {elem} }}")
        return cmds

    # -- hosts ------------------------------------------------------------------------

    def update_hid(self, new: HidTranslation | None, hid: int) -> None:
        """Make the kernel's maps for ``hid`` match ``new`` (None: the host is gone).

        One atomic batch, however many flows the host has.
        """
        if not self.fast_path:
            return
        old = self._hids.get(hid)
        cmds: list[str] = []
        old_remote = old.remote if old else {}
        old_local = old.local if old else {}
        old_locs = old.locators if old else frozenset()
        new_remote = new.remote if new else {}
        new_local = new.local if new else {}
        new_locs = new.locators if new else frozenset()
        cmds += _map_diff(_per_family("rloc"), old_remote, new_remote)
        cmds += _map_diff(_per_family("lloc"), old_local, new_local, lambda k: f"{k[0]} . {k[1]}")
        hid_old = {a: hid for a in old_locs}
        hid_new = {a: hid for a in new_locs}
        cmds += _map_diff(_per_family("hid"), hid_old, hid_new)
        learn_old = {pair: hid for pair in (old.learnable if old else ())}
        learn_new = {pair: hid for pair in (new.learnable if new else ())}
        cmds += _map_diff(_per_family("learn"), learn_old, learn_new, lambda k: f"{k[0]} . {k[1]}")
        self._apply(cmds)
        if new is None:
            self._hids.pop(hid, None)
        else:
            self._hids[hid] = new

    def _apply(self, cmds: list[str]) -> None:
        """Queue ``cmds`` (in order) for the next batch, or apply them now. Before
        :meth:`install` they wait for it."""
        if not cmds:
            return
        if not self.installed:
            self._pending += cmds
            return
        if self._defer is None:
            self.nft.run("\n".join(cmds))
            return
        if not self._pending:
            self._defer(self.flush)
        self._pending += cmds

    def flush(self) -> None:
        """Apply the queued commands as one atomic batch.

        Safe to defer: a new flow's elements only matter once a rewrite is due for
        it, and the Dataplane flushes at once when it is. If the batch is refused, the
        commands are retried one by one so that one bad element loses nothing else.
        """
        if not self.installed:
            return  # install() takes them
        cmds, self._pending = self._pending, []
        if not cmds:
            return
        try:
            self.nft.run("\n".join(merge_elements(cmds)))
        except NftError as exc:
            log.warning("nft batch of %d refused (%s); applying one by one", len(cmds), exc)
            for cmd in cmds:
                try:
                    self.nft.run(cmd)
                except NftError as one:
                    log.warning("nft refused %r: %s", cmd, one)


_ELEMENT_VERBS = ("add element ", "delete element ")


def merge_elements(cmds: list[str]) -> list[str]:
    """``cmds`` with the element commands of one verb and one set merged into one
    command (``delete element inet dime flows4 { a, b }``), where that changes
    nothing: within a run of commands of the same verb, the elements of each set in
    their order. libnftables then handles one command per set and verb instead of
    one per element, most of its cost (a flow has four or more elements)."""
    out: list[str] = []
    run: dict[str, list[str]] = {}  # target ("add element inet dime flows4") -> keys
    verb = ""
    for cmd in cmds:
        this = next((v for v in _ELEMENT_VERBS if cmd.startswith(v)), "")
        target, brace, rest = cmd.partition(" { ")
        if not this or not brace or not rest.endswith(" }") or "\n" in cmd:
            out += _merged(run)
            run, verb = {}, ""
            out.append(cmd)
            continue
        if this != verb:
            out += _merged(run)
            run, verb = {}, this
        run.setdefault(target, []).append(rest[:-2])
    return out + _merged(run)


def _merged(run: dict[str, list[str]]) -> list[str]:
    return [f"{target} {{ {', '.join(keys)} }}" for target, keys in run.items()]


def _wire_elements(
    e: SocketEntry, wire: tuple[IPAddress, int] | None
) -> list[tuple[str, str, object]]:
    """(map, key, value) of a flow's per-flow elements when carried at ``wire``: the
    inbound restoration (keyed by the port on the wire), and behind a NAT the
    outbound destination and port and the inbound port."""
    k = e.key
    proto = _proto(k.proto)
    inbound = f"{e.hid} . {proto} . {wire[1] if wire else k.rport} . {k.lport}"
    out: list[tuple[str, str, object]] = [
        ("rid", inbound, k.remote),
        ("lid", inbound, k.local),
        ("taken", inbound, None),  # (a set: rid's and lid's keys)
    ]
    if wire is not None:
        _, flow = _flow_element(e)
        out += [
            ("rport", inbound, k.rport),
            ("wdst", flow, wire[0]),
            ("wport", f"{proto} . {k.local} . {k.lport} . {wire[0]} . {k.rport}", wire[1]),
        ]
    return out + _via_elements(e, wire, e.via)


def _via_elements(
    e: SocketEntry, wire: tuple[IPAddress, int] | None, via: IPAddress | None
) -> list[tuple[str, str, object]]:
    """The ``wsrc`` element of a flow with its own local locator ``via``, keyed as
    the packet is when the out chains look it up: after a NAT's rewrite, if any."""
    if via is None:
        return []
    k = e.key
    remote, rport = wire if wire is not None else (k.remote, k.rport)
    return [("wsrc", f"{_proto(k.proto)} . {k.local} . {k.lport} . {remote} . {rport}", via)]


def _elements(verb: str, f: str, elements: list[tuple[str, str, object]]) -> list[str]:
    """``verb`` (add, delete) the (map, key, value) ``elements``; value None: a set's."""
    if verb == "add":
        return [
            f"add element inet {TABLE} {m}{f} {{ {key}{'' if v is None else f' : {v}'} }}"
            for m, key, v in elements
        ]
    return [f"delete element inet {TABLE} {m}{f} {{ {key} }}" for m, key, _ in elements]


def _map_diff(
    target: Callable[[Any], str],
    old: dict[Any, Any],
    new: dict[Any, Any],
    key_text: Callable[[Any], str] = str,
) -> list[str]:
    """Commands turning a map from ``old`` into ``new``; ``target(key)`` names the map
    a key lives in (e.g. ``inet dime rloc4``).

    An existing key can't be re-added with another value, so changes are a delete
    and an add in the same batch; deletes of keys we never added would abort it.
    """
    cmds = [
        f"delete element {target(k)} {{ {key_text(k)} }}" for k, v in old.items() if new.get(k) != v
    ]
    cmds += [
        f"add element {target(k)} {{ {key_text(k)} : {v} }}"
        for k, v in new.items()
        if old.get(k) != v
    ]
    return cmds


def _per_family(name: str) -> Callable[[Any], str]:
    """The map of our inet table for a key's IP version: ``name4`` or ``name6``."""
    return lambda key: f"inet {TABLE} {name}{_fam(_first(key))}"


def _first(key: Any) -> IPAddress:
    return key[0] if isinstance(key, tuple) else key  # type: ignore[no-any-return]
