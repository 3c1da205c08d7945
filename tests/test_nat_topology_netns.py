"""The NAT testbed (testbed/nat.py) itself, with plain traffic and no dime.

From each of the MH's subnets, TCP and UDP reach the CH, and the CH sees the source
the subnet's NAT gives it: the MH's own address on the public subnet, the router's
198.51.100.2 with the MH's port behind NAT A (port-preserving masquerade, also from
a second private address), 198.51.100.3 with another port behind NAT B (masquerade
fully-random). Nothing unsolicited gets through the NAT; a capture on the CH's
interface shows the flows with their own ports; an idle UDP mapping expires once
the router's UDP timeouts are lowered (what the keepalive test of
test_nat_netns.py relies on); eve can send packets with forged sources to the CH.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.nat import (
    CH_ADDR,
    NAT_A,
    NAT_B,
    PUBLIC,
    WAN1,
    WAN2,
    NatLab,
    conversations,
)
from testbed.natflows import answer, ask, tell
from testbed.netns import Namespace, add_rst_counter, rst_count, topology
from tests.netns_util import ROOT, py, result, wait_for

pytestmark = pytest.mark.netns

NATFLOWS = str(ROOT / "testbed" / "natflows.py")
WHOAMI_PORT = 7000


def whoami(ns: Namespace, proto: str, bind_port: int, timeout: float = 5) -> dict[str, Any]:
    proc = py(ns, NATFLOWS, "whoami", "--connect", CH_ADDR, "--port", str(WHOAMI_PORT),
              "--proto", proto, "--bind-port", str(bind_port),
              "--timeout", str(timeout))  # fmt: skip
    return result(proc, timeout + 10)


def seen(out: dict[str, Any]) -> tuple[str, int]:
    assert out["error"] is None and isinstance(out["seen"], str), out
    addr, _, port = out["seen"].rpartition(":")
    return addr, int(port)


def test_each_subnet_reaches_the_ch_through_its_nat(tmp_path: Path) -> None:
    """public -> A (10.77.1.20) -> A (10.77.1.21) -> B: TCP and UDP from the MH reach
    the CH from the expected source address; A keeps the MH's port, B changes it."""
    with topology("natt") as topo:
        lab = NatLab.build(topo)
        server = py(lab.ch, NATFLOWS, "whoami-server", "--bind", CH_ADDR,
                    "--port", str(WHOAMI_PORT), "--duration", "120")  # fmt: skip
        wait_for(server, "listening", 10)
        cap = lab.capture(tmp_path / "wire.pcap")
        seen_ports: dict[tuple[str, str], list[tuple[int, int]]] = {}
        try:
            steps: list[tuple[str, int | None]] = [("public", None), ("A", None),
                                                   ("A", 21), ("B", None)]  # fmt: skip
            for i, (subnet, host) in enumerate(steps):
                if i:
                    lab.move_to(subnet, host)
                assert (
                    lab.mh.run("ip", "-4", "-o", "addr", "show", "scope", "global").count("inet ")
                    == 1
                ), "the MH must have exactly one address"
                up = lab.mh.run("ip", "-br", "link", "show", "up").splitlines()
                links = [line.split()[0].split("@")[0] for line in up]
                assert [d for d in ("pub", "lana", "lanb") if d in links] == [lab.subnet.dev]
                for proto in ("tcp", "udp"):
                    for j in range(2):
                        # A fresh port each time: a NAT keeps a closed connection's
                        # mapping for a while, and would not reuse its port at once.
                        port = 41000 + 10 * i + j
                        addr, got = seen(whoami(lab.mh, proto, port))
                        assert addr == lab.seen_as, (subnet, host, proto, addr)
                        seen_ports.setdefault((lab.addr, proto), []).append((port, got))
                        if subnet != "B":
                            assert got == port, (subnet, host, proto, port, got)
            # Ingress filtering: from B's link, only B's sources get through.
            lab.mh.addr_add("lo", "203.0.113.99/32")
            spoofed = lab.mh.run("ping", "-c", "1", "-W", "1", "-I", "203.0.113.99", CH_ADDR,
                                 check=False)  # fmt: skip
            assert " 0 received" in spoofed, spoofed
            lab.mh.addr_del("lo", "203.0.113.99/32")
            for proto in ("tcp", "udp"):
                pairs = seen_ports[(NAT_B.host, proto)]
                assert any(p != g for p, g in pairs), f"NAT B kept the ports: {pairs}"
            # Unsolicited from the CH: the private subnets and the router's uplinks
            # answer nothing (dropped, not refused).
            assert " 0 received" in lab.ch.run("ping", "-c", "1", "-W", "1", NAT_B.host,
                                               check=False)  # fmt: skip
            probe = py(lab.ch, NATFLOWS, "whoami", "--connect", WAN2, "--port", "22",
                       "--proto", "tcp", "--timeout", "1")  # fmt: skip
            refused = result(probe, 10)
            assert "timed out" in str(refused["error"]), refused
            dropped = lab.dropped()
            assert dropped["forward"] >= 1 and dropped["input"] >= 1, dropped
        finally:
            packets = cap.stop()
            server.kill()
            server.wait()
        assert [m.subnet for m in lab.moves] == ["A", "A", "B"]
        assert [m.new for m in lab.moves] == [NAT_A.host, "10.77.1.21", NAT_B.host]
        assert all(m.lost <= m.up for m in lab.moves)
        # The wire between the CH and the router: each flow from its public source,
        # with its own ports.
        conv = conversations(packets, CH_ADDR)
        assert ("tcp", PUBLIC.host, 41000, WHOAMI_PORT) in conv, sorted(conv)
        assert ("udp", WAN1, 41011, WHOAMI_PORT) in conv, sorted(conv)
        for (_, proto), pairs in seen_ports.items():
            for _, got in pairs:
                assert any(k[0] == proto and k[2] == got for k in conv), (proto, got)
        for key in conv:
            assert key[1] in (PUBLIC.host, WAN1, WAN2), f"a third host on the wire: {key}"


def test_an_idle_udp_mapping_expires_when_the_timeouts_are_lowered(tmp_path: Path) -> None:
    """Behind NAT B, a TCP connection and a UDP socket pair (testbed.natflows peer-*)
    work both ways; with the router's UDP timeouts at 2 s and 4 s of silence, the
    CH's UDP no longer reaches the MH (its mapping is gone) while TCP still does."""
    with topology("natidle") as topo:
        lab = NatLab.build(topo, start="B")
        lab.udp_timeouts(2)
        assert lab.conntrack_udp_timeouts() == (2, 2)
        server = py(lab.ch, NATFLOWS, "peer-server", "--bind", CH_ADDR,
                    "--tcp-port", "5010", "--udp-port", "5310")  # fmt: skip
        client: subprocess.Popen[bytes] | None = None
        try:
            wait_for(server, "listening", 10)
            client = py(lab.mh, NATFLOWS, "peer-client", "--connect", CH_ADDR,
                        "--tcp-port", "5010", "--udp-port", "5310", "--timeout", "3")  # fmt: skip
            wait_for(client, "ready", 10)
            pong = ask(client, "ping", 10)
            assert pong["tcp"] is not None and pong["udp"] is not None, pong
            assert push_and_receive(server, client)["udp"] is not None
            time.sleep(4)
            late = push_and_receive(server, client)
            assert late["tcp"] is not None, late
            assert late["udp"] is None, f"the idle UDP mapping should have expired: {late}"
            report = ask(server, "report", 10)
            udp_in: list[list[str]] = report["udp"]
            assert udp_in, report
            assert {peer.split(":")[0] for peer, _ in udp_in} == {WAN2}, report
        finally:
            for proc in (client, server):
                if proc is not None:
                    proc.kill()
                    proc.wait()


def push_and_receive(
    server: subprocess.Popen[bytes], client: subprocess.Popen[bytes]
) -> dict[str, Any]:
    """The CH's peer-server pushes (TCP and UDP); what the MH's peer-client got."""
    tell(client, "recv")
    time.sleep(0.2)
    pushed = ask(server, "push", 10)
    assert pushed["error"] is None, pushed
    return answer(client, 10)


def test_eve_can_forge_the_nat_address(tmp_path: Path) -> None:
    """Packets from eve with a spoofed source (the NAT's public address, the MH's
    public one) reach the CH: UDP to an echo server, TCP to a closed port (the CH
    answers those with resets)."""
    with topology("nateve") as topo:
        lab = NatLab.build(topo)
        add_rst_counter(lab.ch)
        echo = py(lab.ch, NATFLOWS, "udp-echo", "--bind", CH_ADDR, "--port", "5300",
                  "--duration", "30")  # fmt: skip
        try:
            wait_for(echo, "listening", 10)
            forge = py(lab.eve, NATFLOWS, "forge", "--dst", CH_ADDR,
                       "--src", f"{WAN2},{PUBLIC.host}", "--sports", "20000-20001",
                       "--udp-dport", "5300", "--tcp-dports", "5001")  # fmt: skip
            assert result(forge, 60)["sent"] == 8
            time.sleep(0.5)
            echo.terminate()
            out = result(echo, 10)
        finally:
            echo.kill()
        assert out["foreign_count"] == 4, out
        assert bytes.fromhex(out["foreign"][0]).startswith(b"EVE"), out
        assert {f"{WAN2}:20000", f"{PUBLIC.host}:20001"} <= set(out["peers"]), out
        assert rst_count(lab.ch) == 4
