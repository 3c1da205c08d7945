"""Undoing TCP's timer backoff when a path comes back (stacktrans/rto_revert.py).

The messages are checked byte by byte. The real-kernel test stalls a TCP flow
between two namespaces until its timer has backed off to seconds, restores the
path, and checks that a prompt makes the flow send at once, and that without it the
flow keeps waiting for its timer. Two stalls: data in flight and the peer silent
(the retransmission timer; ICMP, RFC 6069) and no route at all, so new data never
left (the probe timer; a pure ACK). Over IPv6 the retransmission timer gets a path MTU
signal instead. And when the peer's old locator is gone before any timer backed
off: a window in flight is retransmitted at once, and a receiver acknowledges again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as TCPLayer
from scapy.layers.inet6 import IPv6

from stacktrans.kernel_flows import TcpProgress
from stacktrans.packet import checksum
from stacktrans.rto_revert import (
    FlowSeq,
    Remedy,
    ack_packet,
    error_message,
    prompt,
    ptb_message,
    ptb_mtu,
    rcv_nxt,
    remedies,
    revert_message,
    snd_una,
)
from stacktrans.socket_table import TCP, FlowKey
from testbed.netns import Namespace, topology
from tests.netns_util import py, read_line

V4 = FlowKey(TCP, IPv4Address("192.0.2.1"), 40000, IPv4Address("198.51.100.2"), 80)
V6 = FlowKey(TCP, IPv6Address("2001:db8::1"), 40000, IPv6Address("2001:db8:1::2"), 80)


def test_sequence_numbers_wrap_around() -> None:
    assert snd_una(100, 1) == 101
    assert snd_una(0xFFFFFFFF, 2) == 1
    assert rcv_nxt(0xFFFFFFFF, 5) == 5


def _p(
    backoff: int, retransmits: int, snd_wnd: int = 65535, unacked: int = 0, mss: int = 1448
) -> TcpProgress:
    return TcpProgress(backoff, retransmits, 1, 0, snd_wnd, 0, unacked, mss, 1500, True)


def test_remedy_follows_the_timer_that_backed_off() -> None:
    v4, v6 = FlowSeq(V4, 1, 2), FlowSeq(V6, 1, 2)
    assert remedies(v4, _p(0, 0, unacked=5)) == []  # not stalled, nothing lost
    assert remedies(v4, _p(3, 3)) == [Remedy.REVERT]  # retransmission timer
    # No RFC 6069 for IPv6 in Linux: a path MTU one byte smaller retransmits instead.
    assert remedies(v6, _p(3, 3, mss=1428)) == [Remedy.RETRANSMIT]
    assert remedies(v4, _p(3, 0)) == [Remedy.ACK]  # probe timer
    assert remedies(v6, _p(3, 0)) == [Remedy.ACK]
    assert remedies(FlowSeq(V4, 1, None), _p(3, 0)) == []  # peer's ISN unknown
    assert remedies(v4, _p(3, 0, snd_wnd=0)) == []  # would close the window


def test_a_lost_peer_locator_means_retransmit_and_acknowledge_again() -> None:
    lost = FlowSeq(V4, 1, 2, peer_lost=True)
    assert remedies(lost, _p(0, 0, unacked=5)) == [Remedy.RETRANSMIT, Remedy.REACK]
    assert remedies(lost, _p(0, 0)) == [Remedy.REACK]  # nothing in flight: ACK only
    assert remedies(FlowSeq(V4, 1, None, True), _p(0, 0, unacked=5)) == [Remedy.RETRANSMIT]
    assert remedies(lost, _p(3, 3)) == [Remedy.REVERT]  # backed off: the timer first


def test_the_mtu_shortens_segments_by_one_byte() -> None:
    # 1448 = 1500 - 20 (IP) - 20 (TCP) - 12 (timestamps)
    assert ptb_mtu(V4, _p(0, 0)) == 1499
    assert ptb_mtu(V6, _p(0, 0, mss=1428)) == 1499
    # The peer's MSS caps segments below the path's: a path MTU that shortens them
    # would cut every flow to that identifier by far more than a byte. None.
    assert ptb_mtu(V4, _p(0, 0, mss=1200)) is None
    # Below what the kernel accepts from ICMP, or no segment size known: no message.
    assert ptb_mtu(V6, _p(0, 0, mss=1208)) is None
    assert ptb_mtu(V4, _p(0, 0, mss=0)) is None


def test_ptb_messages_carry_the_mtu_and_quote_the_segment() -> None:
    msg = ptb_message(V4, 0xDEADBEEF, 1499)
    assert msg[:2] == bytes([3, 4]) and checksum(msg) == 0  # fragmentation needed
    assert struct.unpack("!H", msg[6:8]) == (1499,)
    assert struct.unpack("!HHI", msg[28:36]) == (40000, 80, 0xDEADBEEF)
    msg6 = ptb_message(V6, 7, 1280)
    assert msg6[:2] == bytes([2, 0]) and struct.unpack("!I", msg6[4:8]) == (1280,)
    assert struct.unpack("!HHI", msg6[48:56]) == (40000, 80, 7)


def test_ipv4_message_is_a_host_unreachable_quoting_the_segment() -> None:
    msg = revert_message(V4, 0xDEADBEEF)
    assert msg[:2] == bytes([3, 1])  # destination unreachable, host unreachable
    assert checksum(msg) == 0
    ip = msg[8:28]
    assert ip[0] == 0x45 and ip[9] == TCP and checksum(ip) == 0
    assert ip[12:16] == V4.local.packed and ip[16:20] == V4.remote.packed
    assert struct.unpack("!HHI", msg[28:36]) == (40000, 80, 0xDEADBEEF)
    assert len(msg) == 36


@pytest.mark.parametrize("key", [V4, V6], ids=["v4", "v6"])
def test_ack_is_from_the_peer_to_the_socket_with_valid_checksums(key: FlowKey) -> None:
    pkt = ack_packet(key, 111, 222, 333)
    parsed = (IP if key.local.version == 4 else IPv6)(pkt)
    tcp = parsed[TCPLayer]
    assert (parsed.src, parsed.dst) == (str(key.remote), str(key.local))
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.window) == (80, 40000, 111, 222, 333)
    assert tcp.flags == "A" and bytes(tcp.payload) == b""
    sent_sum = tcp.chksum
    del tcp.chksum
    if key.local.version == 4:
        sent_ip = parsed.chksum
        del parsed.chksum
        rebuilt = IP(bytes(parsed))
        assert rebuilt.chksum == sent_ip
        assert rebuilt[TCPLayer].chksum == sent_sum
    else:
        assert IPv6(bytes(parsed))[TCPLayer].chksum == sent_sum


def test_ipv6_message_is_an_address_unreachable_quoting_the_segment() -> None:
    msg = revert_message(V6, 7)
    assert msg[:2] == bytes([1, 3])  # destination unreachable, address unreachable
    ip6 = msg[8:48]
    assert ip6[0] >> 4 == 6 and ip6[6] == TCP
    assert ip6[8:24] == V6.local.packed and ip6[24:40] == V6.remote.packed
    assert struct.unpack("!HHI", msg[48:56]) == (40000, 80, 7)


# Runs in namespace "a": connects to b, learns both ISNs from the handshake
# (AF_PACKET), sends (bulk: all it can; bursty: 20 kB every 50 ms, nothing in flight
# most of the time), and on command reports its timer state or prompts itself.
SENDER = r"""
import json, socket, struct, sys, threading, time
from ipaddress import ip_address
from stacktrans.rto_revert import FlowSeq, prompt
from stacktrans.socket_table import TCP, FlowKey
from stacktrans.userspace import acked_from
dst, dev, style, flags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
lost, passive = "lost" in flags, "passive" in flags
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sniff.bind((dev, 0))
if passive:  # the peer connects to us: we answer its SYN
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("", 5000))
    ls.listen()
    print("listening", flush=True)
    s, _ = ls.accept()
else:
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.connect((dst, 5000))
isn = peer_isn = None
while isn is None or peer_isn is None:
    frame = sniff.recv(2048)
    l3 = frame[14:]
    if fam == socket.AF_INET and frame[12:14] == b"\x08\x00" and l3[9] == 6:
        tcp = l3[(l3[0] & 15) * 4:]
    elif fam == socket.AF_INET6 and frame[12:14] == b"\x86\xdd" and l3[6] == 6:
        tcp = l3[40:]
    else:
        continue
    ports = struct.unpack("!HH", tcp[:4])
    seq = struct.unpack("!I", tcp[4:8])[0]
    if ports[1] == 5000 and tcp[13] & 0x12 == 0x02:  # the SYN
        peer_isn, isn = (seq, isn) if passive else (peer_isn, seq)
    elif ports[0] == 5000 and tcp[13] & 0x12 == 0x12:  # the SYN-ACK
        isn, peer_isn = (acked_from(seq, answered=True), peer_isn) if passive else (isn, seq)
sniff.close()
s.setblocking(False)
def pump():
    while True:
        try:
            if style == "receive":
                s.recv(65536)
            else:
                s.send(b"x" * (65536 if style == "bulk" else 20000))
        except BlockingIOError:
            pass
        time.sleep(0.005 if style != "bursty" else 0.05)
threading.Thread(target=pump, daemon=True).start()
def info():
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)
    return {"retransmits": raw[2], "probes": raw[3], "backoff": raw[4],
            "rto_us": struct.unpack_from("I", raw, 8)[0],
            "total_retrans": struct.unpack_from("I", raw, 100)[0],
            "bytes_acked": struct.unpack_from("Q", raw, 120)[0],
            "bytes_received": struct.unpack_from("Q", raw, 128)[0],
            "unacked": struct.unpack_from("I", raw, 24)[0]}
local, remote = s.getsockname(), s.getpeername()
flow = FlowSeq(FlowKey(TCP, ip_address(local[0]), local[1], ip_address(remote[0]), remote[1]),
               isn, peer_isn, peer_lost=lost)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "info":
        print(json.dumps(info()), flush=True)
    elif cmd in ("prompt", "wait"):
        before = info()
        t0 = time.monotonic()
        n = sum(prompt([flow]).values()) if cmd == "prompt" else 0
        after = info()
        while after["bytes_acked"] == before["bytes_acked"] and time.monotonic() - t0 < 0.5:
            time.sleep(0.005)
            after = info()
        print(json.dumps({"prompted": n, "before": before, "after": after,
                          "seconds": time.monotonic() - t0}), flush=True)
"""

SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
if sys.argv[2:] == ["connect"]:  # the prompted side listens (it answers the SYN)
    s.connect((sys.argv[1], 5000))
    c = s
else:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 5000))
    s.listen()
    print("listening", flush=True)
    c, _ = s.accept()
if sys.argv[2:] == ["send"]:
    c.sendall(b"y" * 100_000)
while c.recv(65536):
    pass
"""


def _cmd(proc: subprocess.Popen[bytes], line: str, timeout: float = 10) -> dict[str, Any]:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    return dict(json.loads(read_line(proc, timeout)))


def _stall(sender: subprocess.Popen[bytes], counter: str) -> dict[str, Any]:
    """Until the timer has backed off to >= 3.2 s and has just fired (``counter``
    moved): its next expiry is then seconds away."""
    for _ in range(300):
        st = _cmd(sender, "info")
        if st["backoff"] >= 4:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the flow never backed off: {st}")
    while (now := _cmd(sender, "info"))[counter] == st[counter]:
        time.sleep(0.01)
    return now


# timer -> (sender style, counter that moves when the timer fires)
STALLS = {"retransmission": ("bulk", "total_retrans"), "probe": ("bursty", "probes")}
ADDRS = {4: ("10.77.0.1", "10.77.0.2", 24), 6: ("2001:db8:77::1", "2001:db8:77::2", 64)}


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.parametrize(
    ("timer", "family", "prompted"),
    [
        # each timer, prompted and (the control: the test can fail) left alone; the
        # probe timer's ACK both ways (no RFC 6069 in IPv6's TCP)
        ("retransmission", 4, True),
        ("retransmission", 6, True),  # no RFC 6069 in IPv6: a path MTU signal
        ("retransmission", 4, False),
        ("probe", 6, True),
        ("probe", 4, False),
    ],
    ids=["prompt-retransmission-4", "prompt-retransmission-6", "no-prompt-retransmission-4",
         "prompt-probe-6", "no-prompt-probe-4"],
)  # fmt: skip
def test_a_prompt_makes_a_stalled_flow_send_now(timer: str, family: int, prompted: bool) -> None:
    a_addr, b_addr, plen = ADDRS[family]
    style, counter = STALLS[timer]
    with topology("rto") as topo:
        a, b = topo.add_ns("a"), topo.add_ns("b")
        topo.link(a, "va", b, "vb")
        a.addr_add("va", f"{a_addr}/{plen}")
        b.addr_add("vb", f"{b_addr}/{plen}")
        server = py(b, "-c", SERVER, b_addr)
        sender = None
        try:
            assert read_line(server, 10) == "listening"
            sender = py(a, "-c", SENDER, b_addr, "va", style)
            assert read_line(sender, 10) == "ready"
            if timer == "retransmission":  # the peer goes silent: data stays in flight
                b.run(
                    "nft",
                    "add table inet rtotest; add chain inet rtotest in "
                    "{ type filter hook input priority 0; }; "
                    "add rule inet rtotest in tcp dport 5000 drop",
                )
            else:  # no route at all: new data never leaves
                time.sleep(0.02)  # between bursts, all acknowledged
                a.ip("route", "del", _net(family), "dev", "va")
            stalled = _stall(sender, counter)
            assert (stalled["retransmits"] > 0) == (timer == "retransmission"), stalled
            if timer == "retransmission":
                b.run("nft", "delete table inet rtotest")  # the path is back
            else:
                a.ip("route", "add", _net(family), "dev", "va")
            res = _cmd(sender, "prompt" if prompted else "wait")
        finally:
            for p in (sender, server):
                if p is not None:
                    p.kill()
                    p.wait()
    before, after = res["before"], res["after"]
    assert before["rto_us"] >= 200_000 and before["backoff"] >= 4, res
    if prompted:
        assert res["prompted"] == 1, res
        assert after["bytes_acked"] > before["bytes_acked"], res
    else:
        # The control: left alone, the flow waits for its (seconds-long) timer.
        assert res["prompted"] == 0 and after["bytes_acked"] == before["bytes_acked"], res


def _net(family: int) -> str:
    return "10.77.0.0/24" if family == 4 else "2001:db8:77::/64"


@contextlib.contextmanager
def _pair(
    family: int, style: str, lost: bool, send: bool = False, passive: bool = False
) -> Iterator[Pair]:
    """Namespaces a and b, a TCP flow from a to b (``style`` as SENDER takes it); b
    opens it where ``passive``."""
    a_addr, b_addr, plen = ADDRS[family]
    with topology("rto") as topo:
        a, b = topo.add_ns("a"), topo.add_ns("b")
        topo.link(a, "va", b, "vb")
        a.addr_add("va", f"{a_addr}/{plen}")
        b.addr_add("vb", f"{b_addr}/{plen}")
        # Timers far from the test's half second: only a prompt can make it send.
        host = f"{b_addr}/{32 if family == 4 else 128}"
        a.ip("route", "add", host, "dev", "va", "rto_min", "10s")
        flags = [*(["lost"] if lost else []), *(["passive"] if passive else [])]
        server = sender = None
        try:
            if passive:
                sender = py(a, "-c", SENDER, b_addr, "va", style, *flags)
                assert read_line(sender, 10) == "listening"
                server = py(b, "-c", SERVER, a_addr, "connect")
            else:
                server = py(b, "-c", SERVER, b_addr, *(["send"] if send else []))
                assert read_line(server, 10) == "listening"
                sender = py(a, "-c", SENDER, b_addr, "va", style, *flags)
            assert read_line(sender, 10) == "ready"
            yield Pair(a, b, sender)
        finally:
            for p in (sender, server):
                if p is not None:
                    p.kill()
                    p.wait()


@dataclass
class Pair:
    a: Namespace
    b: Namespace
    sender: subprocess.Popen[bytes]


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.parametrize(
    ("family", "prompted", "passive"),
    [(4, True, False), (6, True, False), (4, True, True), (4, False, False)],
    ids=["prompt-4", "prompt-6", "prompt-4-server", "no-prompt-4"],
)  # fmt: skip
def test_a_window_lost_with_the_peers_locator_is_sent_again_now(
    family: int, prompted: bool, passive: bool
) -> None:
    """The peer's old locator went with a window in flight; no timer has backed off
    (the retransmission timer is 10 s away). The prompt retransmits it at once; also
    from a socket that answered the SYN (its byte count starts after it)."""
    with _pair(family, "bulk", lost=True, passive=passive) as pair:
        pair.b.run("nft", DROP_FROM_5000 if passive else DROP_TO_5000)  # in flight: lost
        time.sleep(0.3)  # the tail-loss probe is lost too; the timer is 10 s away
        pair.b.run("nft", "delete table inet rtotest")
        res = _cmd(pair.sender, "prompt" if prompted else "wait")
    before, after = res["before"], res["after"]
    assert before["backoff"] == 0 and before["unacked"] > 0, res
    if prompted:
        assert res["prompted"] == 2, res  # retransmit, and acknowledge again
        assert after["bytes_acked"] > before["bytes_acked"], res
    else:
        assert res["prompted"] == 0 and after["bytes_acked"] == before["bytes_acked"], res


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.parametrize(
    ("family", "prompted"), [(4, True), (6, True), (6, False)],
    ids=["prompt-4", "prompt-6", "no-prompt-6"],
)  # fmt: skip
def test_a_receiver_acknowledges_again_when_the_peers_locator_is_lost(
    family: int, prompted: bool
) -> None:
    """Our ACKs to the peer's old locator were lost: the prompt makes TCP send its
    current ACK once more, and nothing else."""
    with _pair(family, "receive", lost=True, send=True) as pair:
        for _ in range(200):
            if _cmd(pair.sender, "info")["bytes_received"] >= 100_000:
                break
            time.sleep(0.02)
        time.sleep(0.3)  # delayed ACKs are out: the flow is idle
        pair.a.run("nft", COUNT_TO_5000)
        res = _cmd(pair.sender, "prompt" if prompted else "wait")
        out = pair.a.run("nft", "list chain inet rtocount out")
    sent = int(re.search(r"counter packets (\d+)", out).group(1))  # type: ignore[union-attr]
    assert res["before"]["bytes_received"] >= 100_000, res
    if prompted:
        assert res["prompted"] == 1 and sent == 1, (res, out)  # nothing in flight: no PTB
    else:
        assert res["prompted"] == 0 and sent == 0, (res, out)


DROP_TO_5000 = (
    "add table inet rtotest; add chain inet rtotest in { type filter hook input priority 0; }; "
    "add rule inet rtotest in tcp dport 5000 drop"
)
DROP_FROM_5000 = DROP_TO_5000.replace("dport", "sport")
COUNT_TO_5000 = (
    "add table inet rtocount; add chain inet rtocount out "
    "{ type filter hook output priority 0; }; add rule inet rtocount out tcp dport 5000 counter"
)


def test_no_flows_no_prompts() -> None:
    assert not prompt([])


def test_an_error_about_a_udp_datagram_quotes_its_header() -> None:
    key = FlowKey(17, IPv4Address("192.0.2.1"), 5301, IPv4Address("198.51.100.2"), 40000)
    msg = error_message(key, 0, 3, 3)
    assert checksum(msg) == 0  # (an ICMPv4 checksum over the whole message)
    quote = IP(msg[8:])
    assert (quote.src, quote.dst, quote.proto, quote.len) == ("192.0.2.1", "198.51.100.2", 17, 28)
    assert struct.unpack("!HHHH", bytes(quote.payload)[:8]) == (5301, 40000, 8, 0)
    v6 = FlowKey(17, IPv6Address("2001:db8::1"), 5301, IPv6Address("2001:db8::2"), 40000)
    head = error_message(v6, 0, 1, 4)
    assert head[:4] == b"\x01\x04\x00\x00" and IPv6(head[8:]).nh == 17
