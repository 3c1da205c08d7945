"""Our nfnetlink_queue client without a kernel: the messages it builds, the ones it
reads, the order of its verdicts, and the partial checksums it completes."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from stacktrans import netlink as nl
from stacktrans import nfqueue as q
from stacktrans.packet import checksum, fill_l4_checksum, parse, rewrite_addresses

NUM = 4731


def packet_message(
    packet_id: int, payload: bytes, skb_info: int | None = None, hook: int = 1
) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it."""
    attrs = nl.attr(q.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, hook))
    attrs += nl.attr(q.NFQA_PAYLOAD, payload)
    if skb_info is not None:
        attrs += nl.attr(q.NFQA_SKB_INFO, struct.pack("!I", skb_info))
    body = struct.pack("!BBH", socket.AF_INET, 0, NUM) + attrs
    return nl.message(q._PACKET_TYPE, 0, 0, body)


def decode(datagram: bytes) -> list[tuple[int, int, int, bytes | None]]:
    """(message type, verdict, id, payload) of each verdict in a datagram we sent."""
    out = []
    for kind, _, payload in nl.messages(datagram):
        assert struct.unpack_from("!BBH", payload) == (socket.AF_UNSPEC, 0, NUM)
        verdict = pkt = None
        data = None
        for akind, value in nl.attributes(payload, 4):
            if akind == q.NFQA_VERDICT_HDR:
                verdict, pkt = struct.unpack("!II", value)
            elif akind == q.NFQA_PAYLOAD:
                data = bytes(value)
        assert verdict is not None and pkt is not None
        out.append((kind & 0xFF, verdict, pkt, data))
    return out


class FakeSocket:
    def __init__(self, incoming: list[bytes]) -> None:
        self.incoming = list(incoming)
        self.sent: list[bytes] = []
        self.sndbuf = 1 << 30

    def recv_into(self, buf: bytearray) -> int:
        if not self.incoming:
            raise BlockingIOError
        data = self.incoming.pop(0)
        buf[: len(data)] = data
        return len(data)

    def sendmsg(self, bufs: list[bytes]) -> int:
        data = b"".join(bufs)
        if len(data) > self.sndbuf:
            raise OSError(errno.EMSGSIZE, "Message too long")
        self.sent.append(data)
        return len(data)


def serve(handler: q.Handler, incoming: list[bytes]) -> tuple[q.PacketQueue, list[Any]]:
    pq = q.PacketQueue(NUM, handler)
    sock = FakeSocket(incoming)
    pq._sock = sock  # type: ignore[assignment]
    pq._on_readable()
    return pq, [v for d in sock.sent for v in decode(d)]


def test_config_message_binds_with_gso_and_fail_open() -> None:
    msg = q.config_message(NUM, 1000, seq=9)
    [(kind, seq, payload)] = list(nl.messages(msg))
    assert kind == (3 << 8) | q.NFQNL_MSG_CONFIG and seq == 9
    flags = nl.NLMSG.unpack_from(msg)[2]
    assert flags & nl.NLM_F_ACK
    assert struct.unpack_from("!BBH", payload) == (socket.AF_UNSPEC, 0, NUM)
    attrs = {k: bytes(v) for k, v in nl.attributes(payload, 4)}
    assert attrs[q.NFQA_CFG_CMD][0] == q.NFQNL_CFG_CMD_BIND
    assert struct.unpack("!IB", attrs[q.NFQA_CFG_PARAMS]) == (0xFFFF, q.NFQNL_COPY_PACKET)
    assert struct.unpack("!I", attrs[q.NFQA_CFG_QUEUE_MAXLEN]) == (1000,)
    wanted = q.NFQA_CFG_F_GSO | q.NFQA_CFG_F_FAIL_OPEN
    assert struct.unpack("!I", attrs[q.NFQA_CFG_FLAGS]) == (wanted,)
    assert struct.unpack("!I", attrs[q.NFQA_CFG_MASK]) == (wanted,)


def test_packet_message_is_parsed() -> None:
    frame = memoryview(packet_message(42, b"abc", q.NFQA_SKB_CSUMNOTREADY | q.NFQA_SKB_GSO))
    pkt = q.parse_packet(frame)
    assert (pkt.id, pkt.payload, pkt.partial, pkt.cut) == (42, b"abc", True, False)


def test_payload_verdict_is_one_padded_message() -> None:
    datagram = b"".join(q.payload_verdict(NUM, 7, b"12345"))
    assert len(datagram) % 4 == 0
    assert decode(datagram) == [(q.NFQNL_MSG_VERDICT, q.NF_ACCEPT, 7, b"12345")]


def test_unchanged_runs_are_batched_and_order_is_kept() -> None:
    # 1, 2 pass, 3 rewritten, 4 passes, 5 dropped, 6, 7 pass.
    def handler(data: bytes) -> bytes | None:
        return {b"3": b"three", b"5": q.DROP}.get(data)

    incoming = [packet_message(i, str(i).encode()) for i in range(1, 8)]
    pq, verdicts = serve(handler, incoming)
    assert verdicts == [
        (q.NFQNL_MSG_VERDICT_BATCH, q.NF_ACCEPT, 2, None),
        (q.NFQNL_MSG_VERDICT, q.NF_ACCEPT, 3, b"three"),
        (q.NFQNL_MSG_VERDICT_BATCH, q.NF_ACCEPT, 4, None),
        (q.NFQNL_MSG_VERDICT, q.NF_DROP, 5, None),
        (q.NFQNL_MSG_VERDICT_BATCH, q.NF_ACCEPT, 7, None),
    ]
    assert (pq.packets, pq.rewritten, pq.dropped) == (7, 1, 1)


def test_all_verdicts_of_one_wakeup_go_in_one_sendmsg() -> None:
    incoming = [packet_message(i, b"x%d" % i) for i in range(1, 11)]
    pq = q.PacketQueue(NUM, lambda d: d + b"!")
    sock = FakeSocket(incoming)
    pq._sock = sock  # type: ignore[assignment]
    pq._on_readable()
    assert len(sock.sent) == 1 and len(decode(sock.sent[0])) == 10


def test_malformed_messages_and_handler_errors_are_counted_not_raised() -> None:
    def handler(data: bytes) -> bytes | None:
        raise RuntimeError("boom")

    no_header = nl.message(q._PACKET_TYPE, 0, 0, struct.pack("!BBH", 2, 0, NUM))
    truncated = packet_message(1, b"abc")[:-3]  # a message that claims more than it has
    pq, verdicts = serve(handler, [no_header, truncated, packet_message(2, b"ok")])
    assert pq.malformed == 1 and pq.errors == 1 and pq.packets == 1
    assert verdicts == [(q.NFQNL_MSG_VERDICT_BATCH, q.NF_ACCEPT, 2, None)]


def test_a_packet_cut_short_is_passed_unchanged() -> None:
    frame = packet_message(3, b"abc")
    extra = nl.attr(q.NFQA_CAP_LEN, struct.pack("!I", 70000))
    frame = struct.pack("=I", len(frame) + len(extra)) + frame[4:] + extra
    pq, verdicts = serve(lambda d: b"zzz", [frame])
    assert pq.cut == 1
    assert verdicts == [(q.NFQNL_MSG_VERDICT_BATCH, q.NF_ACCEPT, 3, None)]


# -- partial checksums ----------------------------------------------------------------------


def partial(pkt: bytes) -> bytes:
    """``pkt`` as CHECKSUM_PARTIAL leaves it: the L4 field holds fold(pseudo-header sum)."""
    info = parse(pkt)
    at = info.l4_offset + (16 if info.proto == 6 else 6)
    buf = bytearray(pkt)
    buf[at : at + 2] = b"\0\0"
    length = info.end - info.l4_offset
    if info.version == 4:
        pseudo = info.src + info.dst + bytes((0, info.proto)) + length.to_bytes(2, "big")
    else:
        pseudo = info.src + info.dst + length.to_bytes(4, "big") + bytes((0, 0, 0, info.proto))
    buf[at : at + 2] = (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big")
    return bytes(buf)


def kernel_completes(pkt: bytes) -> bytes:
    """What skb_checksum_help does: field = ~fold(sum of the L4 bytes, field included)."""
    info = parse(pkt)
    at = info.l4_offset + (16 if info.proto == 6 else 6)
    buf = bytearray(pkt)
    buf[at : at + 2] = checksum(pkt[info.l4_offset : info.end]).to_bytes(2, "big")
    return bytes(buf)


BUILDS = {
    "tcp4": lambda s, d, p: IP(src=s, dst=d) / TCP(sport=1, dport=2, flags="A") / p,
    "udp4": lambda s, d, p: IP(src=s, dst=d) / UDP(sport=1, dport=2) / p,
    "tcp6": lambda s, d, p: IPv6(src=s, dst=d) / TCP(sport=1, dport=2, flags="A") / p,
}
ADDRS = {
    "tcp4": (("10.0.0.1", "10.0.0.2"), ("192.0.2.7", "198.51.100.9")),
    "udp4": (("10.0.0.1", "10.0.0.2"), ("192.0.2.7", "198.51.100.9")),
    "tcp6": (("2001:db8::1", "2001:db8::2"), ("2001:db8:ff::7", "fd00::9")),
}


@pytest.mark.parametrize("kind", list(BUILDS))
@settings(deadline=None)  # scapy builds, on a shared CPU
@given(payload=st.binary(max_size=3000))
def test_partial_checksum_completed_after_rewrite(kind: str, payload: bytes) -> None:
    (s, d), (ns, nd) = ADDRS[kind]
    full_old = bytes(BUILDS[kind](s, d, payload))
    full_new = bytes(BUILDS[kind](ns, nd, payload))
    # The model of CHECKSUM_PARTIAL is right: the kernel would complete it to scapy's.
    assert kernel_completes(partial(full_old)) == full_old
    # Rewritten (the field's incremental update is meaningless), then filled.
    buf = bytearray(partial(full_old))
    info = parse(buf)
    rewrite_addresses(buf, info, socket.inet_pton(_fam(ns), ns), socket.inet_pton(_fam(nd), nd))
    fill_l4_checksum(buf, parse(buf))
    assert bytes(buf) == full_new
    # The queue's own completion does the same.
    again = bytearray(partial(full_old))
    rewrite_addresses(again, parse(again), *(socket.inet_pton(_fam(a), a) for a in (ns, nd)))
    assert q._complete(bytes(again)) == full_new


def _fam(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def test_partial_packets_are_completed_only_when_rewritten() -> None:
    full = bytes(BUILDS["tcp4"]("10.0.0.1", "10.0.0.2", b"data" * 100))
    part = partial(full)
    flag = q.NFQA_SKB_CSUMNOTREADY | q.NFQA_SKB_GSO

    def handler(data: bytes) -> bytes | None:
        info = parse(data)
        if info.sport != 1:
            return None
        buf = bytearray(data)
        rewrite_addresses(buf, info, None, socket.inet_aton("198.51.100.9"))
        return bytes(buf)

    _, verdicts = serve(handler, [packet_message(1, part, flag)])
    expected = bytes(BUILDS["tcp4"]("10.0.0.1", "198.51.100.9", b"data" * 100))
    assert verdicts == [(q.NFQNL_MSG_VERDICT, q.NF_ACCEPT, 1, expected)]
    # Without the partial flag the handler's incremental update is what goes out.
    _, verdicts = serve(handler, [packet_message(1, full)])
    assert verdicts == [(q.NFQNL_MSG_VERDICT, q.NF_ACCEPT, 1, expected)]


def test_outbound_tcp_gso_packets_are_left_to_segmentation() -> None:
    full = bytes(BUILDS["tcp4"]("10.0.0.1", "10.0.0.2", b"data" * 100))
    gso = q.NFQA_SKB_CSUMNOTREADY | q.NFQA_SKB_GSO
    out = q.Packet(1, full, gso, False, q.NF_INET_LOCAL_OUT)
    assert not out.needs_checksum(full)  # tcp4_gso_segment sets the checksum up
    assert q.Packet(1, full, gso, False, q.NF_INET_PRE_ROUTING).needs_checksum(full)
    assert q.Packet(1, full, q.NFQA_SKB_CSUMNOTREADY, False, 3).needs_checksum(full)
    assert not q.Packet(1, full, 0, False, 0).needs_checksum(full)  # complete already
    udp = bytes(BUILDS["udp4"]("10.0.0.1", "10.0.0.2", b"data"))
    assert q.Packet(1, udp, gso, False, q.NF_INET_LOCAL_OUT).needs_checksum(udp)


def test_verdicts_go_one_by_one_when_the_send_buffer_is_small() -> None:
    incoming = [packet_message(i, b"x" * 3000) for i in range(1, 4)]
    pq = q.PacketQueue(NUM, lambda d: d[:-1] + b"!")
    sock = FakeSocket(incoming)
    sock.sndbuf = 5000
    pq._sock = sock  # type: ignore[assignment]
    pq._on_readable()
    assert [v[2] for d in sock.sent for v in decode(d)] == [1, 2, 3]
    assert len(sock.sent) == 3 and pq.verdict_errors == 0
