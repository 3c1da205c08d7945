"""Redirect flooding on the real kernel (issue 10): a signed peer hands off to a
victim's address, and the victim gets no flow data.

The Fig. 7 testbed (CH, router, MH) plus a *victim* namespace on a subnet of its own
behind the router (198.18.0.0/24, the benchmarking range: "public" to IHMP, as a
victim on the Internet would be, and not used by Fig. 7). The victim's firewall
drops everything it would send (it never answers a challenge) and counts what it
receives: IHMP (UDP port 4731) apart from everything else.

dime runs, signed (the default), on the CH and the MH; a TCP transfer runs each way
and the CH sends the MH a paced UDP request stream (echoed). Then the MH turns
hostile: it drops its address and takes the victim's on its own link (its packets
leave from there through the router; the replies go to the real victim), and its
dime sends its real, signed HANDOFF. The documented bound (docs/architecture.md,
"Threat model"): no flow data at all reaches the victim, only IHMP: path challenges,
one per retransmission timeout (the ACK of the HANDOFF waits for the answer, which
never comes); here at most 20 IHMP datagrams and 4,000 bytes of IHMP in the ~8 s the
test watches. The CH keeps the victim's address "unreachable" and
keeps sending the MH's flows where they went before (the MH's identifier, the last
address it proved). When the MH then moves to a real address of its own (m2), the
CH validates that one, moves the flows there, and every byte arrives intact.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ihmp.wire import MessageType
from testbed.fig7 import Fig7, Subnet
from testbed.netns import Namespace
from testbed.runner import Dime, Status, established, up_all
from tests.netns_util import (
    XFER,
    check_transfer,
    daemons_stopped,
    fig7_testbed,
    py,
    result,
    rst_count,
    tcp_transfer,
    wait_for,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

VICTIM = Subnet("198.18.0.0/24", "198.18.0.254", "198.18.0.1", 24)
IHMP_PORT = 4731
ATTACK = 8.0  # s the MH claims the victim's address
#: The documented bound for that window: IHMP only (path challenges, at most one
#: per retransmission timeout; no ACK: it waits for the answer).
MAX_IHMP_PACKETS = 20
MAX_IHMP_BYTES = 4000
RATE = 4.0  # Mbit/s each TCP transfer
SECONDS = 6.0  # of data each way at RATE: some before the attack, most after it
UDP_PORT = 5300

#: The victim: it receives and counts, and never sends (no ACK, no ICMP, no RST).
VICTIM_FIREWALL = f"""
table inet victim {{
  counter ihmp {{ }}
  counter challenges {{ }}
  counter acks {{ }}
  counter tcp_data {{ }}
  counter udp_data {{ }}
  counter other {{ }}
  counter refused {{ }}
  chain rx {{
    type filter hook prerouting priority -300; policy accept;
    udp sport {IHMP_PORT} @th,72,8 {int(MessageType.PATH_PROBE)} counter name challenges
    udp sport {IHMP_PORT} @th,72,8 {int(MessageType.ACK)} counter name acks
    udp dport {IHMP_PORT} counter name ihmp accept
    udp sport {IHMP_PORT} counter name ihmp accept
    meta l4proto tcp counter name tcp_data accept
    meta l4proto udp counter name udp_data accept
    counter name other
  }}
  chain tx {{
    type filter hook output priority -300; policy drop;
    counter name refused drop
  }}
}}
"""


def router_watch(fig: Fig7) -> str:
    """Flow data the router forwards from the CH to the MH's identifier (its old,
    validated address), and anything but IHMP it forwards to the victim."""
    ch, m1 = fig.plan.c1.host, fig.plan.m1.host
    return f"""
table inet watch {{
  counter ch_to_old {{ }}
  counter to_victim {{ }}
  counter ihmp_from_victim_addr {{ }}
  chain f {{
    type filter hook forward priority 0; policy accept;
    ip saddr {ch} ip daddr {m1} udp dport {IHMP_PORT} accept
    ip saddr {ch} ip daddr {m1} meta l4proto {{ tcp, udp }} counter name ch_to_old
    ip saddr {VICTIM.host} udp dport {IHMP_PORT} counter name ihmp_from_victim_addr
    ip daddr {VICTIM.host} udp dport {IHMP_PORT} accept
    ip daddr {VICTIM.host} udp sport {IHMP_PORT} accept
    ip daddr {VICTIM.host} counter name to_victim
  }}
}}
"""


def nft_load(ns: Namespace, ruleset: str) -> None:
    ns.sh(f"nft -f - <<'EOF'\n{ruleset}\nEOF")


def counters(ns: Namespace, table: str) -> dict[str, tuple[int, int]]:
    """The named counters of ``inet table``: name -> (packets, bytes)."""
    listing = json.loads(ns.run("nft", "-j", "list", "counters", "table", "inet", table))
    return {
        c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
        for c in listing["nftables"]
        if "counter" in c
    }


def add_victim(fig: Fig7) -> Namespace:
    """The victim's namespace, linked to the router on its own subnet, IPv4 only
    (nothing but what the test sends it shows up in its counters), firewalled."""
    victim = fig.topo.add_ns("victim")
    for conf in ("all", "default"):
        victim.run("sysctl", "-qw", f"net.ipv6.conf.{conf}.disable_ipv6=1")
    fig.topo.link(victim, "eth0", fig.r, "rv")
    fig.r.run("sysctl", "-qw", "net.ipv6.conf.rv.disable_ipv6=1")
    fig.r.addr_add("rv", f"{VICTIM.router}/{VICTIM.plen}")
    victim.addr_add("eth0", VICTIM.host_cidr())
    victim.ip("route", "add", "default", "via", VICTIM.router)
    nft_load(victim, VICTIM_FIREWALL)
    # The router must forward what the MH sends from the victim's address on its m1
    # link (a source the router routes elsewhere): no reverse-path filter there.
    for conf in ("all", "default", "rm1"):
        fig.r.run("sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0")
    for conf in ("all", "rm1"):
        value = fig.r.run("sysctl", "-n", f"net.ipv4.conf.{conf}.rp_filter").strip()
        assert value == "0", (conf, value)
    nft_load(fig.r, router_watch(fig))
    # The victim is there and answers nobody: the router reaches it (ARP is not in
    # the inet family, so the victim still answers that), nothing comes back.
    pings = fig.r.run("ping", "-c", "2", "-i", "0.2", "-W", "1", VICTIM.host, check=False)
    assert " 100% packet loss" in pings, pings
    victim.run("nft", "reset", "counters", "table", "inet", "victim")
    return victim


def mh_hid(st: Status, *addrs: str) -> dict[str, Any]:
    """The CH's HID of the MH: the one naming any of ``addrs`` (active or not)."""
    for h in st["hids"]:
        if any(a in h["active"] or a in h["unreachable"] for a in addrs):
            return dict(h)
    raise AssertionError(f"no HID with any of {addrs}: {st['hids']}")


def logged_at(d: Dime, text: str, since: float) -> float | None:
    """Wall-clock time of the first line of ``d``'s log after ``since`` containing
    ``text`` (the log's time stamps are local time, to the millisecond)."""
    for line in d.log_text().splitlines():
        if text not in line:
            continue
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if stamp >= since - 0.001:
            return stamp
    return None


def turn_hostile(fig: Fig7) -> None:
    """The MH leaves its address and takes the victim's on its own link; its packets
    leave through the router from there (the router replies to the victim)."""
    fig.mh.addr_del("m1", fig.plan.m1.host_cidr())
    fig.mh.addr_add("m1", f"{VICTIM.host}/32")
    fig.mh.ip("route", "replace", "default", "via", fig.plan.m1.router, "dev", "m1", "onlink")
    fig.events.append((time.monotonic(), f"{fig.mh.name}: {VICTIM.host} (the victim's) on m1"))


def move_away(fig: Fig7) -> None:
    """The MH leaves the victim's address and link for a real address of its own."""
    fig.mh.addr_del("m1", f"{VICTIM.host}/32")
    fig.mh.ip("link", "set", "m1", "down")
    fig.attach(fig.mh, "m2", fig.plan.m2)


def test_handoff_to_a_victim_sends_it_no_flow_data(tmp_path: Path) -> None:
    with fig7_testbed("redir") as fig:
        p = fig.plan
        m1, m2 = p.m1.host, p.m2.host
        daemons = {name: Dime.in_dir(getattr(fig, name), tmp_path, name) for name in ("ch", "mh")}

        def logs() -> str:
            return "\n\n".join(f"== {n}\n{d.log_tail(80)}" for n, d in daemons.items())

        procs: list[Any] = []
        with daemons_stopped(daemons.values, logs):
            try:
                victim = add_victim(fig)
                up_all(list(daemons.values()), "-v")
                ch, mh = daemons["ch"], daemons["mh"]

                # -- traffic: TCP each way (held open), UDP requests CH -> MH, echoed --
                nbytes = int(RATE * 1e6 / 8 * SECONDS)
                up = tcp_transfer(fig.mh, fig.ch, p.c1.host, nbytes, RATE, 5001, 90, True)
                down = tcp_transfer(fig.ch, fig.mh, m1, nbytes, RATE, 5002, 90, True)
                procs += [*up, *down]
                echo = py(fig.mh, XFER, "udp-echo", "--bind", m1, "--port", str(UDP_PORT),
                          "--duration", "120")  # fmt: skip
                procs.append(echo)
                wait_for(echo, "listening", 10)
                udp = py(fig.ch, XFER, "udp-client", "--connect", m1, "--port", str(UDP_PORT),
                         "--duration", "120", "--interval", "0.05")  # fmt: skip
                procs.append(udp)
                wait_for(udp, "ready", 10)
                udp_start = time.monotonic()
                ch.wait_status(established(m1), timeout=15)
                mh.wait_status(established(p.c1.host), timeout=15)
                time.sleep(1)
                before = ch.status()

                # -- the MH turns hostile, and its dime says HANDOFF (signed) ----------
                fig.r.run("nft", "reset", "counters", "table", "inet", "watch")
                attack = time.monotonic()
                turn_hostile(fig)
                ch.wait_status(
                    lambda st: VICTIM.host in str(st["hids"]),
                    timeout=ATTACK - 1,
                    what="the HANDOFF to the victim's address applied",
                )
                time.sleep(max(attack + ATTACK - time.monotonic(), 0))
                seen = counters(victim, "victim")
                watched = counters(fig.r, "watch")
                window = time.monotonic() - attack
                during = ch.status()

                ihmp_packets, ihmp_bytes = seen["ihmp"]
                print(f"\nvictim, {window:.1f} s of attack: {ihmp_packets} IHMP datagrams "
                      f"({seen['acks'][0]} ACKs, {seen['challenges'][0]} challenges), "
                      f"{ihmp_bytes} bytes; TCP {seen['tcp_data'][0]}, other UDP "
                      f"{seen['udp_data'][0]}, other {seen['other'][0]} packets (it tried to "
                      f"send {seen['refused'][0]}); the MH sent "
                      f"{watched['ihmp_from_victim_addr'][0]} IHMP datagrams from the victim's "
                      f"address; the router forwarded {watched['ch_to_old'][0]} flow packets "
                      f"CH -> {m1} (the MH's identifier)")  # fmt: skip
                context = f"victim {seen}, router {watched}\n{logs()}"
                # No flow data at all reached the victim: not one packet but IHMP.
                assert seen["tcp_data"] == (0, 0), context
                assert seen["udp_data"] == (0, 0), context
                assert seen["other"] == (0, 0), context
                assert watched["to_victim"] == (0, 0), context
                # IHMP within the bound: challenges at most one per retransmission
                # timeout (0.5, 1, then 2 s), and no ACK of the HANDOFF (it waits for
                # the answer). But some: the victim was reachable and named.
                assert 1 <= ihmp_packets <= MAX_IHMP_PACKETS, context
                assert ihmp_bytes <= MAX_IHMP_BYTES, context
                assert seen["challenges"][0] == ihmp_packets, context
                assert seen["acks"][0] == 0, context
                assert 1 <= seen["challenges"][0] <= 3 + math.ceil(window / 2), context
                # The CH holds the victim's address unverified (never active), and
                # kept sending the flows where they went before: to the MH's
                # identifier, the last address it had proved.
                hid = mh_hid(during, VICTIM.host, m1)
                print(f"the CH's HID of the MH: active {hid['active']}, unreachable "
                      f"{hid['unreachable']}")  # fmt: skip
                assert VICTIM.host not in hid["active"], (hid, context)
                assert VICTIM.host in hid["unreachable"], (hid, context)
                c_before, c_during = before["counters"], during["counters"]
                assert c_during["challenges_sent"] >= c_before["challenges_sent"] + 1, context
                validated = c_during["addresses_validated"]
                assert validated == c_before["addresses_validated"], context
                assert watched["ch_to_old"][0] > 0, context

                # -- the MH moves to a real address of its own ---------------------------
                move_away(fig)
                moved, moved_wall = time.monotonic(), time.time()
                at_move = counters(victim, "victim")
                after = ch.wait_status(
                    lambda st: any(h["active"][:1] == [m2] for h in st["hids"]),
                    timeout=20,
                    what=f"the MH at {m2}",
                )
                hid = mh_hid(after, m2)
                assert VICTIM.host not in hid["active"], (hid, logs())
                assert after["counters"]["addresses_validated"] > validated, logs()
                used = logged_at(ch, f"active [{m2}", moved_wall)
                took = "?" if used is None else f"{used - moved_wall:.3f}"
                print(f"the CH had {m2} as the MH's active address {took} s after the MH had "
                      f"it (status: active {hid['active']}, unreachable "
                      f"{hid['unreachable']})")  # fmt: skip

                # -- the flows go on: every byte, no reset, UDP answered again ---------
                time.sleep(3)
                check_transfer((fig.ch, fig.mh), *up, nbytes, logs())
                check_transfer((fig.ch, fig.mh), *down, nbytes, logs())
                udp.terminate()
                replies = result(udp, 30)
                echo.terminate()
                echo.wait(10)
                times = replies["reply_times"]
                late = [t for t in times if t > moved - udp_start + 0.5]
                hostile = [t for t in times if attack - udp_start < t < moved - udp_start]
                print(f"UDP CH -> MH: {replies['sent']} sent, {replies['received']} echoed, "
                      f"{len(hostile)} while the MH claimed the victim's address (sent to its "
                      f"identifier), {len(late)} after the move")  # fmt: skip
                if not late:
                    sockets = {n: d.status()["sockets"] for n, d in daemons.items()}
                    raise AssertionError(
                        f"no UDP reply after the move; sockets {sockets}\n{logs()}"
                    )
                for ns in (fig.ch, fig.mh):
                    assert rst_count(ns) == 0, f"TCP reset in {ns.name}\n{logs()}"

                # Still nothing but IHMP at the victim, over the whole run; and the
                # challenge to its address stopped when the MH withdrew it (at most
                # one copy was on its way), not at its 30 s deadline.
                final = counters(victim, "victim")
                print(f"victim since the move ({time.monotonic() - moved:.1f} s): "
                      f"{final['challenges'][0] - at_move['challenges'][0]} challenges, "
                      f"{final['acks'][0] - at_move['acks'][0]} ACKs; over the whole run: "
                      f"{final}")  # fmt: skip
                assert final["tcp_data"] == final["udp_data"] == final["other"] == (0, 0), final
                assert final["challenges"][0] - at_move["challenges"][0] <= 1, final

                for d in daemons.values():
                    d.down().check()
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
