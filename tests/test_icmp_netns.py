"""ICMP errors through StackTrans on the real kernel: "port unreachable" after a move.

The CH has a *connected* UDP socket to the MH's old identifier, at a port where
nothing listens. After the MH moved (m1 -> m2), the CH's datagrams still reach the
MH (translated to m2 and back to the identifier m1, a ghost on the MH's ``lo``), and
the MH's kernel answers "port unreachable" quoting the identifiers. The MH's dime
translates the error out (locators on the wire), the CH's dime translates it back
in, and only then does the CH's kernel match it with the socket, which sees
ECONNREFUSED.

Control: the same error as it is on the wire (locators), injected from the router,
reaches the socket only while the CH's dime runs; with the identifiers it reaches
the socket even without dime. So the socket saw the error because of the
translation, not by chance.
"""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.packet import Packet, Raw

from testbed.fig7 import V4, V6, Fig7, Plan
from testbed.netns import Namespace, topology
from tests.netns_util import StNode, py, read_line

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

CLOSED_PORT = 7777  # nothing listens there on the MH
PAYLOAD = b"probe"

# A connected UDP socket driven by commands on stdin, one JSON reply line each:
#   "send T":  send a datagram every 0.3 s until one is refused, at most T seconds
#   "check T": send nothing; wait up to T seconds for a pending socket error
#              (SO_ERROR, which reading clears; "check 0" just clears it)
PROBE = r"""
import json, select, socket, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.connect((addr, port))
print(json.dumps({"ready": True, "lport": s.getsockname()[1]}), flush=True)
for line in sys.stdin:
    cmd, arg = line.split()
    t0 = time.monotonic()
    deadline = t0 + float(arg)
    if cmd == "send":
        refused, sends = False, 0
        while not refused and time.monotonic() < deadline:
            try:
                s.send(b"probe")
                sends += 1
                wait = min(0.3, max(deadline - time.monotonic(), 0))
                if select.select([s], [], [], wait)[0]:
                    s.recv(2048)
            except ConnectionRefusedError:
                refused = True
        out = {"refused": refused, "sends": sends, "elapsed": time.monotonic() - t0}
    else:
        while True:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        out = {"error": err, "elapsed": time.monotonic() - t0}
    print(json.dumps(out), flush=True)
"""

# Capture the ICMP errors crossing device argv[1] (as hex IP packets) until a line
# arrives on stdin, at most argv[2] seconds.
SNIFF = r"""
import json, select, socket, sys, time
dev, secs = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((dev, 0))
print(json.dumps({"ready": True}), flush=True)
found = []
deadline = time.monotonic() + secs
while (left := deadline - time.monotonic()) > 0:
    ready = select.select([s, sys.stdin], [], [], left)[0]
    while select.select([s], [], [], 0)[0]:  # everything captured so far, also on stop
        frame = s.recv(65535)
        kind, ip = int.from_bytes(frame[12:14], "big"), frame[14:]
        if kind == 0x0800 and ip[9] == 1 and ip[(ip[0] & 15) * 4] == 3:
            found.append(ip.hex())
        elif kind == 0x86DD and ip[6] == 58 and ip[40] == 1:
            found.append(ip.hex())
    if sys.stdin in ready:
        break
print(json.dumps({"packets": found}), flush=True)
"""

# Send one raw IP packet (hex in argv[1]) towards argv[2], addresses as in the header.
INJECT = r"""
import socket, sys
data, dst = bytes.fromhex(sys.argv[1]), sys.argv[2]
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(data, (dst, 0))
print('{"sent": true}', flush=True)
"""


class Probe:
    def __init__(self, ns: Namespace, addr: str, port: int) -> None:
        self.proc = py(ns, "-c", PROBE, addr, str(port))
        ready = self._reply(10)
        assert ready.get("ready"), ready
        self.lport = int(ready["lport"])

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            return dict(json.loads(read_line(self.proc, timeout)))
        except AssertionError:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            raise AssertionError(f"probe: no reply; stderr: {err.decode()[-2000:]}") from None

    def cmd(self, cmd: str, seconds: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd} {seconds}\n".encode())
        self.proc.stdin.flush()
        return self._reply(seconds + 10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def moved(ch: StNode, mh: StNode, p: Plan) -> None:
    """What IHMP leaves in both tables after the MH's handoff m1 -> m2 (HANDOFF + ACK)."""
    ch.send(cmd="host", addr=p.m1.host, active=[p.m2.host], local=[p.c1.host])
    mh.send(cmd="locals", addrs=[p.m2.host])
    mh.send(cmd="host", addr=p.c1.host, active=[p.c1.host], local=[p.m2.host])


def port_unreachable(p: Plan, src: str, quoted_dst: str, lport: int) -> bytes:
    """The MH's "port unreachable" for the CH's datagram c1:lport -> quoted_dst."""
    quote: Packet
    err: Packet
    if p.family == 4:
        quote = IP(src=p.c1.host, dst=quoted_dst, ttl=63) / UDP(sport=lport, dport=CLOSED_PORT)
        err = IP(src=src, dst=p.c1.host) / ICMP(type=3, code=3)
    else:
        quote = IPv6(src=p.c1.host, dst=quoted_dst, hlim=63) / UDP(sport=lport, dport=CLOSED_PORT)
        err = IPv6(src=src, dst=p.c1.host) / ICMPv6DestUnreach(code=4)
    return bytes(err / Raw(bytes(quote / Raw(PAYLOAD))))


def inject(r: Namespace, packet: bytes, dst: str) -> None:
    """Send ``packet`` from the router namespace (as if forwarded from the MH's side)."""
    proc = py(r, "-c", INJECT, packet.hex(), dst)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and b"sent" in out, err.decode()[-2000:]


class Sniffer:
    def __init__(self, ns: Namespace, dev: str) -> None:
        self.proc = py(ns, "-c", SNIFF, dev, "30")
        assert json.loads(read_line(self.proc, 10)).get("ready")

    def stop(self) -> list[bytes]:
        """The ICMP errors seen so far, as IP packets."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.flush()
        out = json.loads(read_line(self.proc, 40))
        self.proc.wait(timeout=10)
        return [bytes.fromhex(h) for h in out["packets"]]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def addresses(packet: bytes) -> tuple[str, str, str, str, int, int]:
    """(outer src, outer dst, quoted src, quoted dst, quoted sport, quoted dport)."""
    outer: Packet
    quoted: Packet
    if packet[0] >> 4 == 4:
        hl = (packet[0] & 15) * 4
        outer, quoted = IP(packet), IP(packet[hl + 8 :])
    else:
        outer, quoted = IPv6(packet), IPv6(packet[48:])
    udp = quoted[UDP]
    return outer.src, outer.dst, quoted.src, quoted.dst, udp.sport, udp.dport


def flows(node: StNode) -> list[tuple[str, str]]:
    return [(f["local"], f["remote"]) for f in node.send(cmd="dump")["flows"]]


# The kernel path of each data plane once, IPv4 for one and IPv6 for the other (the
# user-space translation of ICMP errors is checked for both in tests/test_userspace.py).
@pytest.mark.parametrize(
    ("mode", "plan"), [("nft", V4), ("nfqueue", V6)], ids=["nft-v4", "nfqueue-v6"]
)
def test_port_unreachable_reaches_the_socket_after_a_move(mode: str, plan: Plan) -> None:
    p = plan
    with topology(f"icmp{p.family}{mode[:3]}") as topo:
        fig = Fig7.build(topo, p)
        ch = mh = None
        probe = None
        sniffer: Sniffer | None = None
        try:
            ch = StNode.start(fig.ch, mode, [p.c1.host])
            mh = StNode.start(fig.mh, mode, [p.m1.host])
            probe = Probe(fig.ch, p.m1.host, CLOSED_PORT)

            # Before the move: no translation due; the port is really closed, and both
            # sides learn the flow from its first datagram.
            before = probe.cmd("send", 3)
            assert before["refused"], before
            assert flows(ch) == [(p.c1.host, p.m1.host)]
            assert flows(mh) == [(p.m1.host, p.c1.host)]

            fig.hard_handoff_mh()
            moved(ch, mh, p)
            assert mh.send(cmd="dump")["ghosts"] == [p.m1.host]
            probe.cmd("check", 0)  # nothing left over from before the move

            sniffer = Sniffer(fig.r, "rc1")  # what reaches the CH's link
            after = probe.cmd("send", 3)
            seen = sniffer.stop()
            assert after["refused"], f"no ECONNREFUSED within 3 s after the move: {after}"
            # On the wire the error is in locators: the MH's dime translated it out.
            wire_form = (p.m2.host, p.c1.host, p.c1.host, p.m2.host, probe.lport, CLOSED_PORT)
            assert seen, "no ICMP error crossed the router"
            assert {addresses(pkt) for pkt in seen} == {wire_form}
            assert flows(ch) == [(p.c1.host, p.m1.host)]  # the identifier never changed

            # The error as it is on the wire (from and quoting the locator m2): the
            # CH's dime makes it the socket's.
            time.sleep(0.5)
            probe.cmd("check", 0)
            wire = port_unreachable(p, p.m2.host, p.m2.host, probe.lport)
            inject(fig.r, wire, p.c1.host)
            assert probe.cmd("check", 3)["error"] == errno.ECONNREFUSED

            # Control, without dime: the wire error is not the socket's...
            ch.stop()
            mh.stop()
            time.sleep(0.5)
            probe.cmd("check", 0)
            inject(fig.r, wire, p.c1.host)
            assert probe.cmd("check", 1.5)["error"] == 0
            # ... while the same error in identifiers is (so the injection works).
            ident = port_unreachable(p, p.m1.host, p.m1.host, probe.lport)
            inject(fig.r, ident, p.c1.host)
            assert probe.cmd("check", 3)["error"] == errno.ECONNREFUSED
        finally:
            if probe is not None:
                probe.close()
            if sniffer is not None:
                sniffer.close()
            for node in (ch, mh):
                if node is not None:
                    node.stop()
