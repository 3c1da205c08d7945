"""IPv4 <-> IPv6 handover on the real kernel: a flow outlives the loss of every address
of its own IP version at one end (stacktrans.family, stacktrans.carry).

The Fig. 7 testbed made dual-stack on the CH's and the MH's first links (the router
forwards both). `dime up` in the CH and the MH. Each scenario carries a paced TCP
transfer each way and a UDP request/response stream in the flows' IP version, then
one end loses its addresses of that version (the address goes, and with it its
routes): the flows go on in the other version, carried across by both daemons; the
address comes back: they go on in their own again. A bulk transfer sends
full-size segments all along (no path MTU black hole: IPv6's header is 20 bytes
longer). Every byte intact (SHA-256), no reset, UDP answered at the end; `dime down`
leaves nothing behind. (A connection opened while its IP version is gone is refused:
it is not carried across.)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.fig7 import DUAL, V4
from testbed.netns import rst_count
from tests.netns_util import (
    XFER,
    Fig7Daemons,
    daemons_stopped,
    fig7_testbed,
    py,
    read_line,
    result,
    tcp_transfer,
    wait_for,
)

pytestmark = pytest.mark.netns

RATE = 2.0  # Mbit/s each way
BULK = 40.0  # Mbit/s: full-size segments, as fast as the user-space path may need to go
SUBNETS = {("ch", 4): V4.c1, ("mh", 4): V4.m1, ("ch", 6): DUAL["ch"], ("mh", 6): DUAL["mh"]}
ADDRS = {k: sub.host for k, sub in SUBNETS.items()}
CH6 = ADDRS[("ch", 6)]
DEVS = {"ch": "c1", "mh": "m1"}
NARROW = 1400  # the "narrow" variant's MTU between the router and the CH


class Bed(Fig7Daemons):
    def drop(self, who: str, version: int) -> None:
        """``who`` loses its address of ``version`` (its routes go with it)."""
        addr = SUBNETS[(who, version)].host_cidr()
        self.ns(who).ip(*(["-6"] if version == 6 else []), "addr", "del", addr, "dev", DEVS[who])

    def restore(self, who: str, version: int) -> None:
        family = ["-6"] if version == 6 else []
        sub = SUBNETS[(who, version)]
        self.ns(who).ip(*family, "addr", "add", sub.host_cidr(), "dev", DEVS[who], "nodad")
        self.ns(who).ip(*family, "route", "replace", "default", "via", sub.router)

    def across(self, name: str, want: bool, timeout: float = 30) -> None:
        """Until every flow in ``name``'s socket table is carried across (or none)."""

        def ok(st: dict[str, Any]) -> bool:
            flows = st["sockets"]
            return bool(flows) and all(s["across"] is want for s in flows)

        self.dime(name).wait_status(ok, timeout, f"flows across = {want}")


@contextlib.contextmanager
def dual_stack(tmp_path: Path, tag: str, args: tuple[str, ...], variant: str = "") -> Iterator[Bed]:
    """``variant``: "strict": the hosts filter IPv4 by strict reverse path
    (rp_filter 1); "narrow": the router's link to the CH takes only NARROW bytes."""
    with fig7_testbed(tag) as fig:
        fig.add_ipv6()
        b = Bed(fig, tmp_path)
        for name in ("ch", "mh") if variant == "strict" else ():
            b.ns(name).run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
        if variant == "narrow":
            fig.r.ip("link", "set", "dev", "rc1", "mtu", str(NARROW))
            b.ns("ch").ip("link", "set", "dev", "c1", "mtu", str(NARROW))
        b.ns("mh").run("ping", "-6", "-c", "1", "-W", "5", CH6)  # (neighbours resolved)
        with daemons_stopped(b.daemons.values, b.logs):
            b.dime("ch").up("-v", *args)
            b.dime("mh").up("-v", *args)
            yield b


@pytest.mark.parametrize(
    ("version", "who", "dataplane", "variant"),
    [
        (4, "mh", "nft", ""),
        (6, "mh", "nft", ""),
        (4, "ch", "nft", ""),
        (4, "mh", "nfqueue", ""),
        (4, "mh", "nft", "strict"),
        (4, "mh", "nfqueue", "narrow"),
    ],
    ids=[
        "v4-flow-mh-to-v6-only",
        "v6-flow-mh-to-v4-only",
        "v4-flow-ch-to-v6-only",
        "v4-flow-mh-nfqueue",
        "v4-flow-mh-strict-rp-filter",
        "v4-flow-mh-narrow-path",
    ],
)
def test_flows_outlive_the_loss_of_their_ip_version(
    tmp_path: Path, version: int, who: str, dataplane: str, variant: str
) -> None:
    tag = f"xf{version}{who[0]}{dataplane[1]}{variant[:1]}"
    with dual_stack(tmp_path, tag, ("--dataplane", dataplane), variant) as b:
        ch, mh = ADDRS[("ch", version)], ADDRS[("mh", version)]
        nbytes = int(RATE * 1e6 / 8 * 20)
        up = tcp_transfer(b.ns("mh"), b.ns("ch"), ch, nbytes, RATE, 5001, 90, hold_open=True)
        down = tcp_transfer(b.ns("ch"), b.ns("mh"), mh, nbytes, RATE, 5002, 90, hold_open=True)
        # A bulk transfer through both moves: full-size segments (no path MTU black hole).
        big = int(BULK * 1e6 / 8 * 15)
        bulk = tcp_transfer(b.ns("mh"), b.ns("ch"), ch, big, BULK, 5003, 90, hold_open=True)
        echo = py(b.ns("ch"), XFER, "udp-echo", "--bind", ch, "--port", "5300", "--duration", "90")
        wait_for(echo, "listening", 10)
        t0 = time.time()
        client = py(b.ns("mh"), XFER, "udp-client", "--connect", ch, "--port", "5300",
                    "--duration", "120", "--interval", "0.05")  # fmt: skip
        wait_for(client, "ready", 10)
        # The mover's peer has verified its address of the other version.
        b.dime("ch" if who == "mh" else "mh").wait_status(
            lambda st: any(ADDRS[(who, 10 - version)] in h["active"] for h in st["hids"]),
            20, "the mover's other address verified")  # fmt: skip
        time.sleep(1.0)

        b.drop(who, version)
        for name in ("ch", "mh"):
            b.across(name, True)
        st = b.dime("mh").status()
        carried = [s for s in st["sockets"] if s["across"]]
        assert all(":" in s["to"] if version == 4 else "." in s["to"] for s in carried), carried
        time.sleep(3.0)

        b.restore(who, version)
        for name in ("ch", "mh"):
            b.across(name, False)
        moved_back = time.time()
        time.sleep(2.0)

        for name, (server, sender), size in (("up", up, nbytes), ("down", down, nbytes),
                                             ("bulk", bulk, big)):  # fmt: skip
            sent, got = result(sender, 120), result(server, 120)
            assert sent["error"] is None and got["error"] is None, (name, sent, got, b.logs())
            assert got["bytes"] == sent["bytes"] == size, name
            assert got["sha256"] == sent["sha256"], name
        for ns in (b.ns("ch"), b.ns("mh")):
            assert rst_count(ns) == 0, f"TCP reset in {ns.name}\n{b.logs()}"
        client.terminate()
        udp = result(client, 30)
        echo.terminate()
        echo.wait(10)
        assert any(r > moved_back - t0 for r in udp["reply_times"]), "no UDP reply at the end"
        counters = {name: b.dime(name).status()["counters"] for name in ("ch", "mh")}
        assert counters["mh"]["packets_carried_across"] > 0
        # Carried packets went in whole through packet sockets (the kernel cut them
        # into segments and summed them); with strict reverse-path filtering the
        # IPv4 ones delivered to our own stack take the raw socket instead (a packet
        # from a remote address arriving on lo would be dropped).
        # (A packet also goes raw while its next hop's link-layer address is unknown.)
        strict = variant == "strict"
        for name in ("ch", "mh"):
            whole, raw = (counters[name][f"packets_carried_{k}"] for k in ("whole", "raw"))
            assert whole > 0 and (raw > 0 if strict else whole > raw), counters
        # On the narrow path the router's "packet too big" about the carried IPv6
        # packets was heard and passed on to the IPv4 flows' stack (no black hole).
        heard = counters["mh"]["path_mtu_errors_heard"]
        assert heard > 0 if variant == "narrow" else heard == 0, counters
        for d in b.daemons.values():
            d.down().check()


#: A connected UDP socket that says "ready" once answered, then on each line of
#: stdin sends again and prints what came back: "reply", "refused" or "timeout".
ASKER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(5)
s.send(b"hello"); s.recv(100)
print("ready", file=sys.stderr, flush=True)
for _ in sys.stdin:
    s.send(b"again")
    try:
        s.recv(100); print("reply", flush=True)
    except ConnectionRefusedError:
        print("refused", flush=True)
    except TimeoutError:
        print("timeout", flush=True)
"""


def test_icmp_errors_of_a_carried_flow_reach_its_socket(tmp_path: Path) -> None:
    """A UDP flow carried across IPv6 whose peer closes its port: the CH's stack
    answers with an ICMP port unreachable; its daemon sends it as ICMPv6 to the MH's
    locator, whose daemon passes it on to the IPv4 socket: ECONNREFUSED, as
    without the move (without dime's translation the error would reach nobody)."""
    with dual_stack(tmp_path, "xficmp", ("--dataplane", "nft")) as b:
        ch = ADDRS[("ch", 4)]
        echo = py(b.ns("ch"), XFER, "udp-echo", "--bind", ch, "--port", "5301", "--duration", "60")
        wait_for(echo, "listening", 10)
        asker = py(b.ns("mh"), "-c", ASKER, ch, "5301")
        wait_for(asker, "ready", 10)
        b.dime("ch").wait_status(
            lambda st: any(ADDRS[("mh", 6)] in h["active"] for h in st["hids"]),
            20, "the MH's IPv6 address verified")  # fmt: skip
        b.drop("mh", 4)
        for name in ("ch", "mh"):
            b.across(name, True)
        assert asker.stdin is not None
        asker.stdin.write(b"\n")
        asker.stdin.flush()
        assert read_line(asker, 10) == "reply"  # carried across
        echo.terminate()
        echo.wait(10)
        asker.stdin.write(b"\n")
        asker.stdin.flush()
        assert read_line(asker, 10) == "refused"
        asker.terminate()
        for name in ("ch", "mh"):
            assert b.dime(name).status()["counters"]["icmp_errors_carried"] > 0
        for d in b.daemons.values():
            d.down().check()
