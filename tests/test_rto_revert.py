"""Prompting stalled TCP flows to retransmit (RFC 6069 on the local stack).

The message layout is checked byte by byte; the real-kernel test stalls a TCP flow
between two namespaces until its retransmission timer has backed off to seconds,
restores the path, and checks that a prompt makes the kernel retransmit at once,
and that without it the flow keeps waiting for its timer.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from stacktrans.rto_revert import _checksum, prompt, revert_message, snd_una
from stacktrans.socket_table import TCP, FlowKey
from testbed.netns import topology
from tests.netns_util import py, read_line

V4 = FlowKey(TCP, IPv4Address("192.0.2.1"), 40000, IPv4Address("198.51.100.2"), 80)
V6 = FlowKey(TCP, IPv6Address("2001:db8::1"), 40000, IPv6Address("2001:db8:1::2"), 80)


def test_snd_una_wraps_around() -> None:
    assert snd_una(100, 1) == 101
    assert snd_una(0xFFFFFFFF, 2) == 1


def test_ipv4_message_is_a_host_unreachable_quoting_the_segment() -> None:
    msg = revert_message(V4, 0xDEADBEEF)
    assert msg[:2] == bytes([3, 1])  # destination unreachable, host unreachable
    assert _checksum(msg) == 0
    ip = msg[8:28]
    assert ip[0] == 0x45 and ip[9] == TCP and _checksum(ip) == 0
    assert ip[12:16] == V4.local.packed and ip[16:20] == V4.remote.packed
    assert struct.unpack("!HHI", msg[28:36]) == (40000, 80, 0xDEADBEEF)
    assert len(msg) == 36


def test_ipv6_message_is_an_address_unreachable_quoting_the_segment() -> None:
    msg = revert_message(V6, 7)
    assert msg[:2] == bytes([1, 3])  # destination unreachable, address unreachable
    ip6 = msg[8:48]
    assert ip6[0] >> 4 == 6 and ip6[6] == TCP
    assert ip6[8:24] == V6.local.packed and ip6[24:40] == V6.remote.packed
    assert struct.unpack("!HHI", msg[48:56]) == (40000, 80, 7)


# Runs in namespace "a": connects to b, learns its ISN from its own SYN (AF_PACKET),
# keeps sending, and on command reports its retransmission state or prompts itself.
SENDER = r"""
import json, socket, struct, sys, threading, time
from ipaddress import ip_address
from stacktrans.rto_revert import prompt
from stacktrans.socket_table import TCP, FlowKey
dst, dev = sys.argv[1], sys.argv[2]
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sniff.bind((dev, 0))
s = socket.socket(fam, socket.SOCK_STREAM)
s.connect((dst, 5000))
isn = None
while isn is None:
    frame = sniff.recv(2048)
    l3 = frame[14:]
    if fam == socket.AF_INET and frame[12:14] == b"\x08\x00" and l3[9] == 6:
        tcp = l3[(l3[0] & 15) * 4:]
    elif fam == socket.AF_INET6 and frame[12:14] == b"\x86\xdd" and l3[6] == 6:
        tcp = l3[40:]
    else:
        continue
    if struct.unpack("!H", tcp[2:4])[0] == 5000 and tcp[13] & 0x12 == 0x02:
        isn = struct.unpack("!I", tcp[4:8])[0]
sniff.close()
s.setblocking(False)
def pump():
    while True:
        try:
            s.send(b"x" * 1000)
        except BlockingIOError:
            pass
        time.sleep(0.005)
threading.Thread(target=pump, daemon=True).start()
def info():
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    rto, = struct.unpack_from("I", raw, 8)
    total, = struct.unpack_from("I", raw, 100)
    return {"backoff": raw[4], "rto_us": rto, "total_retrans": total}
local, remote = s.getsockname(), s.getpeername()
key = FlowKey(TCP, ip_address(local[0]), local[1], ip_address(remote[0]), remote[1])
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "info":
        print(json.dumps(info()), flush=True)
    elif cmd in ("prompt", "wait"):
        before = info()
        t0 = time.monotonic()
        n = prompt([(key, isn)]) if cmd == "prompt" else 0
        after = info()
        while after["total_retrans"] == before["total_retrans"] and time.monotonic() - t0 < 0.5:
            time.sleep(0.005)
            after = info()
        print(json.dumps({"prompted": n, "before": before, "after": after,
                          "seconds": time.monotonic() - t0}), flush=True)
"""

SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5000))
s.listen()
print("listening", flush=True)
c, _ = s.accept()
while c.recv(65536):
    pass
"""


def _cmd(proc: subprocess.Popen[bytes], line: str, timeout: float = 10) -> dict[str, Any]:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    return dict(json.loads(read_line(proc, timeout)))


def _stall(sender: subprocess.Popen[bytes]) -> None:
    """Until the timer has backed off to >= 3.2 s and has just fired: the next
    retransmission is then seconds away."""
    for _ in range(300):
        st = _cmd(sender, "info")
        if st["backoff"] >= 4:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the flow never backed off: {st}")
    start = st["total_retrans"]
    while _cmd(sender, "info")["total_retrans"] == start:
        time.sleep(0.01)


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.parametrize("family", [4])  # Linux has RFC 6069 for IPv4 only
@pytest.mark.parametrize("prompted", [True, False], ids=["prompt", "no-prompt"])
def test_a_prompt_makes_a_backed_off_flow_retransmit_now(family: int, prompted: bool) -> None:
    a_addr, b_addr, plen = (
        ("10.77.0.1", "10.77.0.2", 24) if family == 4 else ("2001:db8:77::1", "2001:db8:77::2", 64)
    )
    with topology("rto") as topo:
        a, b = topo.add_ns("a"), topo.add_ns("b")
        topo.link(a, "va", b, "vb")
        a.addr_add("va", f"{a_addr}/{plen}")
        b.addr_add("vb", f"{b_addr}/{plen}")
        server = py(b, "-c", SERVER, b_addr)
        sender = None
        try:
            assert read_line(server, 10) == "listening"
            sender = py(a, "-c", SENDER, b_addr, "va")
            assert read_line(sender, 10) == "ready"
            # The path goes away: b drops the flow's segments; a's timer backs off.
            b.run(
                "nft",
                "add table inet rtotest; add chain inet rtotest in "
                "{ type filter hook input priority 0; }; "
                "add rule inet rtotest in tcp dport 5000 drop",
            )
            _stall(sender)
            b.run("nft", "delete table inet rtotest")  # the path is back
            res = _cmd(sender, "prompt" if prompted else "wait")
        finally:
            for p in (sender, server):
                if p is not None:
                    p.kill()
                    p.wait()
    before, after = res["before"], res["after"]
    assert before["rto_us"] >= 3_000_000, res
    if prompted:
        assert res["prompted"] == 1, res
        assert after["total_retrans"] > before["total_retrans"], res
        assert after["backoff"] < before["backoff"], res
    else:
        # The control: left alone, the flow waits for its (seconds-long) timer.
        assert res["prompted"] == 0 and after["total_retrans"] == before["total_retrans"], res


def test_ipv6_flows_are_left_to_their_timers() -> None:
    # Linux's tcp_v6_err has no RFC 6069 revert: nothing is sent, nothing is asked.
    assert prompt([(V6, 1)]) == 0
