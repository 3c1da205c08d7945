"""A NAT testbed in network namespaces: a mobile host that moves between a public
subnet and two private subnets behind two kinds of NAT, and a correspondent host on
the public side.

::

                                       +-- wan1 198.51.100.2 (public subnet, NAT A)
    CH 198.51.100.10 --+               |
    eve 198.51.100.66 -+-- sw (bridge) +-- wan2 198.51.100.3 (NAT B)
                                       |
                                       R (forwards; nft table ip natlab)
                                       |
            pub  203.0.113.1/24 -------+------- pub  MH 203.0.113.20   routed, no NAT
            lana 10.77.1.1/24   -------+------- lana MH 10.77.1.20     NAT A: masquerade
            lanb 10.77.2.1/24   -------+------- lanb MH 10.77.2.20     NAT B: fully-random

* ``ch`` is the correspondent host on the "Internet" segment 198.51.100.0/24 (a
  bridge in namespace ``sw``), its default route via the router's 198.51.100.2.
* ``r`` is the router, with two uplinks into that segment: ``wan1``
  (198.51.100.2) and ``wan2`` (198.51.100.3). The public MH subnet and private
  subnet A leave through ``wan1`` (main table); subnet B leaves through ``wan2``
  (policy routing: ``from 10.77.2.0/24`` looks up table 102, where the segment is
  reached through ``wan2``). Masquerade takes the egress interface's address, so A
  leaves as 198.51.100.2 (port-preserving ``masquerade``) and B as 198.51.100.3
  (``masquerade fully-random``, iptables' ``--random-fully``: a random source
  port for every mapping). Like a real NAT, the router forwards nothing to the
  private subnets that is not the reply of a mapping, and answers nothing
  unsolicited on its uplinks (input drop).
* ``mh`` has one link per MH subnet (``pub``, ``lana``, ``lanb``); exactly one of
  them is up and has an address at a time. :meth:`NatLab.move_to` is a hard
  handoff (the old address goes, with its link when the subnet changes; the new one
  comes with a default route via that subnet's gateway); each move is recorded with
  the wall-clock times of both. The router filters what each MH link sends by
  source (rp_filter, BCP 38): nothing the MH still sends from an address it left
  gets through another network.
* ``eve`` is another host on the CH's segment (198.51.100.66), for spoofed packets.

:meth:`NatLab.capture` runs tcpdump on the CH's interface: everything that crosses
between the CH and the router's uplinks (and eve); :func:`conversations` sums it up
by flow. :meth:`NatLab.udp_timeouts` lowers the router's conntrack UDP timeouts.
:class:`NatDaemon` runs ``dime nat`` (an IHMP-aware NAT) in the router. The traffic
the tests need besides testbed.xfer's is in :mod:`testbed.natflows`; the benchmark
is :mod:`testbed.nat_bench`.

As a command (as root)::

    python -m testbed.nat up        # namespaces natlab-{sw,ch,eve,r,mh}, MH on the public subnet
    python -m testbed.nat down      # removes them, whatever runs inside
    python -m testbed.nat bench     # the move sequence with dime: results/nat.{json,md}

Addresses are documentation ranges (RFC 5737) and 10.77.0.0/16 (RFC 1918) only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.capture import Capture, Packet
from testbed.netns import Namespace, Topology, build_named, remove_named
from testbed.runner import Dime, KernelState, Stopped, kernel_state, residue

WAN = "198.51.100.0/24"
WAN1 = "198.51.100.2"  # the router's first uplink: the public subnet and NAT A leave here
WAN2 = "198.51.100.3"  # the second uplink: NAT B
CH_ADDR = "198.51.100.10"
EVE_ADDR = "198.51.100.66"
WAN_PLEN = 24
B_TABLE = 102  # the router's routing table for what leaves through wan2
IHMP_PORT = 4731
NAT_AGENT_PORT = 4733  # dime nat's own UDP port (its config's nat_port, by default)


@dataclass(frozen=True)
class NatSubnet:
    """One of the MH's subnets: its link (the same name on the MH and the router),
    the router's address there, the MH's default address, the NAT the router applies
    (nft statement, "" for none) and the address the CH sees the MH's packets from
    ("" for none: its own)."""

    name: str
    dev: str
    prefix: str
    gateway: str
    plen: int
    host: str
    nat: str
    public: str

    def address(self, host: int | str | None = None) -> str:
        """The MH's address here: the default, host number ``host`` of the subnet
        (e.g. 21), or ``host`` itself (an address)."""
        if host is None:
            return self.host
        if isinstance(host, int):
            return f"{self.host.rsplit('.', 1)[0]}.{host}"
        return host

    def seen_as(self, addr: str) -> str:
        """The source address the CH sees for the MH at ``addr`` here."""
        return self.public or addr


PUBLIC = NatSubnet("public", "pub", "203.0.113.0/24", "203.0.113.1", 24, "203.0.113.20", "", "")
NAT_A = NatSubnet("A", "lana", "10.77.1.0/24", "10.77.1.1", 24, "10.77.1.20", "masquerade", WAN1)
NAT_B = NatSubnet(
    "B", "lanb", "10.77.2.0/24", "10.77.2.1", 24, "10.77.2.20", "masquerade fully-random", WAN2
)
SUBNETS = {s.name: s for s in (PUBLIC, NAT_A, NAT_B)}

#: The move sequence of the tests and the benchmark, from the public subnet: into NAT
#: A; a new private address behind the same NAT (its mappings change port: the old
#: address's still hold theirs); from the port-preserving NAT to the port-randomizing
#: one, with another public address; back to the public subnet.
MOVES: tuple[tuple[str, int | None], ...] = (("A", None), ("A", 21), ("B", None), ("public", None))

#: The router's NAT and its firewall: masquerade A on wan1 and B on wan2; from the
#: uplinks, nothing reaches a private subnet but the replies of a mapping, and nothing
#: unsolicited reaches the router itself (a real NAT drops it, rather than answering
#: with ICMP errors or resets).
NAT_RULES = f"""
table ip natlab {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {NAT_A.prefix} oifname "wan1" {NAT_A.nat}
    ip saddr {NAT_B.prefix} oifname "wan2" {NAT_B.nat}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {{ "wan1", "wan2" }} ip daddr 10.77.0.0/16 ct status snat accept
    iifname {{ "wan1", "wan2" }} ip daddr 10.77.0.0/16 counter drop
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {{ "wan1", "wan2" }} ct state established,related accept
    iifname {{ "wan1", "wan2" }} icmp type echo-request accept
    iifname {{ "wan1", "wan2" }} counter drop
  }}
}}
"""


@dataclass(frozen=True)
class Move:
    """One hard handoff of the MH: from ``old`` to ``new`` (addresses) on subnet
    ``subnet``; wall-clock times when the old address was gone and when the new one
    was up (with its default route)."""

    what: str
    old: str
    new: str
    subnet: str
    lost: float
    up: float


@dataclass
class NatLab:
    topo: Topology
    sw: Namespace
    ch: Namespace
    eve: Namespace
    r: Namespace
    mh: Namespace
    subnet: NatSubnet = PUBLIC  # where the MH is
    addr: str = PUBLIC.host  # its address there
    moves: list[Move] = field(default_factory=list)

    @classmethod
    def build(cls, topo: Topology, start: str = "public", host: int | str | None = None) -> NatLab:
        """The namespaces, links, routes and NAT; the MH on subnet ``start``."""
        sw, ch, eve = topo.add_ns("sw"), topo.add_ns("ch"), topo.add_ns("eve")
        r, mh = topo.add_ns("r"), topo.add_ns("mh")
        # The "Internet" segment: the CH, eve and both router uplinks on one bridge.
        topo.link(ch, "eth0", sw, "ch")
        topo.link(eve, "eth0", sw, "eve")
        topo.link(r, "wan1", sw, "w1")
        topo.link(r, "wan2", sw, "w2")
        topo.bridge(sw, "br0", ["ch", "eve", "w1", "w2"])
        for sub in SUBNETS.values():
            topo.link(mh, sub.dev, r, sub.dev)
            r.addr_add(sub.dev, f"{sub.gateway}/{sub.plen}")
            # Ingress filtering (BCP 38): each MH subnet's link takes only its own
            # subnet's sources (what the MH still sends from an address it left, over
            # another link, is dropped, as another network's router would).
            r.run("sysctl", "-qw", f"net.ipv4.conf.{sub.dev}.rp_filter=1")
        for key, value in (
            ("net.ipv4.ip_forward", 1),
            # Two addresses of one router on one segment: each answers ARP on its own
            # link only, and asks with the address of the link it asks on.
            ("net.ipv4.conf.all.arp_ignore", 1),
            ("net.ipv4.conf.all.arp_announce", 2),
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
        ):
            r.run("sysctl", "-qw", f"{key}={value}")
        r.addr_add("wan1", f"{WAN1}/{WAN_PLEN}")
        # wan2's address without a route in the main table: only B's packets (and the
        # router's own from WAN2) reach the segment through wan2.
        r.addr_add("wan2", f"{WAN2}/{WAN_PLEN}", "noprefixroute")
        r.ip("route", "add", WAN, "dev", "wan2", "src", WAN2, "table", str(B_TABLE))
        r.ip("rule", "add", "from", NAT_B.prefix, "lookup", str(B_TABLE), "pref", "1000")
        r.ip("rule", "add", "from", WAN2, "lookup", str(B_TABLE), "pref", "1001")
        r.sh(f"nft -f - <<'EOF'\n{NAT_RULES}\nEOF")
        for ns, addr in ((ch, CH_ADDR), (eve, EVE_ADDR)):
            ns.addr_add("eth0", f"{addr}/{WAN_PLEN}")
            ns.ip("route", "add", "default", "via", WAN1)
        first = SUBNETS[start]
        lab = cls(topo, sw, ch, eve, r, mh, first, first.address(host))
        for sub in SUBNETS.values():
            if sub is not first:
                mh.ip("link", "set", sub.dev, "down")
        mh.addr_add(first.dev, f"{lab.addr}/{first.plen}")
        mh.ip("route", "replace", "default", "via", first.gateway, "dev", first.dev)
        return lab

    # -- where the MH is -----------------------------------------------------------------

    @property
    def seen_as(self) -> str:
        """The source address the CH sees for the MH where it is now."""
        return self.subnet.seen_as(self.addr)

    @property
    def behind_nat(self) -> bool:
        return bool(self.subnet.nat)

    def move_to(self, subnet: str, host: int | str | None = None, gap: float = 0.0) -> Move:
        """Hard handoff of the MH to ``subnet`` (its default address, or host number /
        address ``host``): its address goes (and, to another subnet, its link: it left
        that network), ``gap`` s later the new one comes (on its link, brought up),
        with the default route via that subnet's gateway. On the same subnet (a new
        private address behind the same NAT) the link stays up."""
        new_sub = SUBNETS[subnet]
        new = new_sub.address(host)
        old_sub, old = self.subnet, self.addr
        if (new_sub, new) == (old_sub, old):
            raise ValueError(f"the MH is at {old} on {subnet} already")
        self.mh.addr_del(old_sub.dev, f"{old}/{old_sub.plen}")
        if new_sub is not old_sub:
            self.mh.ip("link", "set", old_sub.dev, "down")
        lost = time.time()
        if gap:
            time.sleep(gap)
        if new_sub is not old_sub:
            self.mh.ip("link", "set", new_sub.dev, "up")
        self.mh.addr_add(new_sub.dev, f"{new}/{new_sub.plen}")
        self.mh.ip("route", "replace", "default", "via", new_sub.gateway, "dev", new_sub.dev)
        up = time.time()
        self.subnet, self.addr = new_sub, new
        move = Move(f"{old_sub.name} {old} -> {subnet} {new}", old, new, subnet, lost, up)
        self.moves.append(move)
        return move

    # -- the router ----------------------------------------------------------------------

    def udp_timeouts(self, seconds: int) -> None:
        """The router's conntrack UDP timeouts (unreplied and stream) to ``seconds``:
        its NAT forgets an idle UDP mapping that soon."""
        for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            self.r.run("sysctl", "-qw", f"net.netfilter.{key}={seconds}")

    def conntrack_udp_timeouts(self) -> tuple[int, int]:
        out = []
        for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            out.append(int(self.r.run("sysctl", "-n", f"net.netfilter.{key}").strip()))
        return out[0], out[1]

    def open_ihmp(self, *ports: int) -> None:
        """Let UDP to ``ports`` from the uplinks reach the router itself, unsolicited:
        for ``dime nat`` (default: the IHMP port and dime nat's own, ``nat_port``)."""
        for port in ports or (IHMP_PORT, NAT_AGENT_PORT):
            self.r.run(
                "nft", "insert", "rule", "ip", "natlab", "input",
                "iifname", "{", "wan1", ",", "wan2", "}", "udp", "dport", str(port), "accept",
            )  # fmt: skip

    def dropped(self) -> dict[str, int]:
        """What the router's NAT firewall dropped so far (packets): towards the
        private subnets ("forward") and to the router itself ("input")."""
        out = {}
        for chain in ("forward", "input"):
            listing = self.r.run("nft", "list", "chain", "ip", "natlab", chain)
            out[chain] = sum(
                int(line.split("packets")[1].split()[0])
                for line in listing.splitlines()
                if "counter packets" in line
            )
        return out

    # -- the wire between the CH and the router -------------------------------------------

    def capture(self, path: Path, bpf: str = "ip") -> Capture:
        """tcpdump on the CH's interface (every packet between the CH, the router's
        uplinks and eve), started; :meth:`Capture.stop` returns the packets."""
        cap = Capture(self.ch, "eth0", bpf, path)
        cap.start()
        return cap


# -- what crossed the wire -----------------------------------------------------------------


def conversations(
    packets: list[Packet], host: str, since: float = 0.0, until: float = float("inf")
) -> dict[tuple[str, str, int, int], int]:
    """Packets with payload to or from ``host`` between the two wall-clock times, by
    (protocol, the other end's address, its port, ``host``'s port)."""
    out: dict[tuple[str, str, int, int], int] = {}
    for p in packets:
        if not since <= p.t < until or not p.payload:
            continue
        if p.src == host:
            key = (_proto(p.proto), p.dst, p.dport, p.sport)
        elif p.dst == host:
            key = (_proto(p.proto), p.src, p.sport, p.dport)
        else:
            continue
        out[key] = out.get(key, 0) + 1
    return out


def _proto(num: int) -> str:
    return {6: "tcp", 17: "udp"}.get(num, str(num))


# -- how long data took to come back after a move ------------------------------------------

SLOT = 0.1  # s: testbed.xfer's timeline resolution


def resumed_tcp(received: dict[str, Any], up: float, lost: float | None = None) -> float | None:
    """Seconds from ``up`` (the new address) to the middle of the first 100 ms slot
    with data at a testbed.xfer TCP receiver (its result: ``timeline``, ``start``);
    None if nothing arrived after ``up``. With ``lost`` (the old address gone, less
    than a slot before ``up``), data up to the first empty slot after ``lost`` was
    on its way before the outage, and does not count; no empty slot within a second
    of ``up``: no outage (0)."""
    timeline: list[int] = received["timeline"]
    start: float = received["start"]
    a = max(int((up - start) / SLOT), 0)
    if lost is not None:
        gap = next((i for i in range(max(int((lost - start) / SLOT), 0), a + int(1 / SLOT))
                    if i >= len(timeline) or not timeline[i]), None)  # fmt: skip
        if gap is None:
            return 0.0
        a = max(a, gap)
    first = next((i for i in range(a, len(timeline)) if timeline[i]), None)
    if first is None:
        return None
    return round(max(start + (first + 0.5) * SLOT - up, 0.0), 2)


def resumed_udp(reply_times: list[float], up: float) -> float | None:
    """Seconds from ``up`` to the first UDP reply after it (wall-clock reply times of
    testbed.natflows udp-client); None if none came."""
    later = [t for t in reply_times if t > up]
    return round(min(later) - up, 3) if later else None


# -- an IHMP-aware NAT in the router -------------------------------------------------------

#: What ``dime nat`` logs once it is up (as ``dime up`` logs "dime up:").
NAT_READY_LINE = "dime nat:"
NAT_CONFIG = 'log_level = "info"\n'


@dataclass
class NatDaemon(Dime):
    """``dime nat --config FILE`` in the router (an IHMP-aware NAT), with the same
    conventions as :class:`Dime` (state dir in DIME_STATE_DIR, the log in ``log``,
    no systemd socket): started with :meth:`start`, ready when its log has a line
    with ``dime nat:``, stopped
    with SIGTERM (:meth:`terminate`: exit status 0 and nothing left behind)."""

    config: Path | None = None
    config_text: str = NAT_CONFIG

    @classmethod
    def in_dir(cls, ns: Namespace, tmp: Path, name: str) -> NatDaemon:
        return cls(
            ns,
            tmp / f"state-{name}",
            tmp / f"dime-{name}.log",
            name,
            config=tmp / f"dime-{name}.toml",
        )

    def start(self, *args: str) -> None:
        """``dime nat --config FILE ARGS`` in the background, logging to ``log``."""
        assert self.config is not None
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text)
        self.spawn("nat", "--config", str(self.config), *args)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Ready when its log says ``dime nat:`` (it has no control socket)."""

        def ready() -> dict[str, Any] | None:
            return {} if NAT_READY_LINE in self.log_text() else None

        return self.await_ready(ready, timeout, "dime nat")

    def terminate(self, timeout: float = 30.0) -> Stopped:
        """SIGTERM, then wait: how it went and what it left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        code = self.wait_exit(timeout)
        left = (
            residue(_uncounted(self.before), _uncounted(kernel_state(self.ns)))
            if self.before is not None
            else []
        )
        return Stopped(self.name, code, "SIGTERM", tuple(left), self.log_tail())


def _uncounted(state: KernelState) -> KernelState:
    """``state`` without the router's counter values (its NAT's drop counters move
    with the traffic, not with dime)."""
    return state._replace(
        ruleset=re.sub(r"counter packets \d+ bytes \d+", "counter", state.ruleset)
    )


# -- as a command ------------------------------------------------------------------------

NAME_PREFIX = "natlab"
SHORT_NAMES = ("sw", "ch", "eve", "r", "mh")


def up() -> NatLab:
    """Build the testbed with fixed names; on any failure (or Ctrl-C), remove it."""
    return build_named(NAME_PREFIX, NatLab.build)


def down() -> list[str]:
    """Remove the namespaces ``up`` made (killing what runs in them); their names."""
    return remove_named(NAME_PREFIX, SHORT_NAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m testbed.nat",
        description="Build or remove the NAT testbed, or run the NAT move benchmark.",
    )
    p.add_argument("action", choices=("up", "down", "bench"))
    a, rest = p.parse_known_args(argv)
    if os.geteuid() != 0:
        p.error("must run as root (it creates network namespaces)")
    if a.action == "bench":
        from testbed.nat_bench import main as bench_main

        return int(bench_main(rest))
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.action == "down":
        gone = down()
        print(f"removed {', '.join(gone)}" if gone else "nothing to remove")
        return 0
    lab = up()
    n = lab.mh.name.rsplit("-", 1)[0]
    print(
        f"NAT testbed up: CH {CH_ADDR} ({n}-ch), eve {EVE_ADDR} ({n}-eve), router {n}-r "
        f"(uplinks {WAN1}, {WAN2}), MH {lab.addr} on {lab.subnet.dev} ({n}-mh)\n"
        f"  MH subnets: public {PUBLIC.prefix} (routed), A {NAT_A.prefix} (masquerade as "
        f"{WAN1}), B {NAT_B.prefix} (masquerade fully-random as {WAN2})\n"
        f"  move the MH, e.g. to A:\n"
        f"    ip -n {n}-mh addr del {lab.addr}/{lab.subnet.plen} dev {lab.subnet.dev}\n"
        f"    ip -n {n}-mh addr add {NAT_A.host}/{NAT_A.plen} dev {NAT_A.dev}\n"
        f"    ip -n {n}-mh route replace default via {NAT_A.gateway} dev {NAT_A.dev}\n"
        f"  remove it: python -m testbed.nat down",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
