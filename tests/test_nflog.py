"""The NFLOG client (stacktrans.nflog): message parsing and overflow, no kernel.

The real-kernel path (the learn chains logging to a bound group) is exercised by
tests/test_stacktrans_netns.py.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from stacktrans import nflog
from stacktrans.netlink import attr, attributes, message, messages
from stacktrans.service import DEATH_BATCH_S


def packet_message(data: bytes, hook: int, group: int = 7, prefix: str | None = None) -> bytes:
    body = struct.pack("!BBH", socket.AF_INET, 0, group)
    body += attr(nflog.NFULA_PACKET_HDR, struct.pack("!HBB", 0x0800, hook, 0))
    body += attr(2, struct.pack("!I", 0))  # NFULA_MARK: skipped
    if prefix is not None:
        body += attr(nflog.NFULA_PREFIX, prefix.encode() + b"\0")
    body += attr(nflog.NFULA_PAYLOAD, data)
    return message(nflog.NFULNL_MSG_PACKET, 0, 0, body)


def collector() -> tuple[nflog.FlowNotices, list[tuple[bytes, bool, str]]]:
    got: list[tuple[bytes, bool, str]] = []
    return nflog.FlowNotices(7, lambda *notice: got.append(notice)), got


def test_each_packet_of_a_batch_reaches_the_handler_with_its_direction_and_prefix() -> None:
    notices, got = collector()
    batch = packet_message(b"\x45out", nflog.NF_INET_LOCAL_OUT) + packet_message(
        b"\x45in!", 0, prefix="k"
    )
    notices.feed(batch)
    assert got == [(b"\x45out", True, ""), (b"\x45in!", False, "k")]
    assert notices.received == 2


def test_messages_without_a_header_or_a_payload_are_skipped() -> None:
    notices, got = collector()
    head = struct.pack("!BBH", socket.AF_INET, 0, 7)
    no_payload = message(nflog.NFULNL_MSG_PACKET, 0, 0, head + attr(1, b"\x08\x00\x03\x00"))
    other_type = message(nflog.NFULNL_MSG_CONFIG, 0, 0, head)
    notices.feed(no_payload + other_type + packet_message(b"ok", 3)[:-3])  # last one cut
    assert got == [] and notices.received == 0


def test_a_failing_handler_is_counted_and_the_next_notice_still_handled() -> None:
    calls: list[bytes] = []

    def handler(data: bytes, outbound: bool, prefix: str) -> None:
        calls.append(data)
        if data == b"bad":
            raise ValueError("boom")

    notices = nflog.FlowNotices(7, handler)
    notices.feed(packet_message(b"bad", 3) + packet_message(b"good", 3))
    assert calls == [b"bad", b"good"] and notices.errors == 1


class ScriptedSocket:
    """recv_into(): each of ``results`` in turn (an exception is raised, bytes are
    copied in as far as they fit, their whole length returned as with MSG_TRUNC),
    then empty."""

    def __init__(self, *results: Any) -> None:
        self.results: list[Any] = [*results, BlockingIOError()]
        self.flags: list[int] = []

    def recv_into(self, buf: bytearray, size: int, flags: int) -> int:
        self.flags.append(flags)
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        n = min(len(result), size)
        buf[:n] = result[:n]
        return len(result)


def overflowing_socket(batch: bytes) -> ScriptedSocket:
    """ENOBUFS once (the kernel dropped notices), one batch, then empty."""
    return ScriptedSocket(OSError(errno.ENOBUFS, "overflow"), batch)


def test_an_overflow_is_counted_reported_and_reading_goes_on() -> None:
    lost: list[bool] = []
    got: list[bytes] = []
    notices = nflog.FlowNotices(7, lambda d, o, p: got.append(d), lambda: lost.append(True))
    notices._sock = overflowing_socket(packet_message(b"after", 3))  # type: ignore[assignment]
    notices.read()
    assert lost == [True] and notices.overflows == 1 and got == [b"after"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    notices, _ = collector()
    notices.feed(data)


def test_a_datagram_cut_by_the_read_buffer_counts_as_lost_and_its_whole_messages_go_on() -> None:
    lost: list[bool] = []
    got: list[bytes] = []
    notices = nflog.FlowNotices(7, lambda d, o, p: got.append(d), lambda: lost.append(True))
    first = packet_message(b"first", 3)
    filler = packet_message(b"x" * 200, 3)
    big = first + filler * (nflog.READ_SIZE // len(filler) + 1)
    sock = ScriptedSocket(big, packet_message(b"next", 3))
    notices._sock = sock  # type: ignore[assignment]
    notices.read()
    assert sock.flags and all(f & socket.MSG_TRUNC for f in sock.flags)  # else no length
    assert lost == [True] and notices.overflows == 1 and notices.reads == 2
    assert got[0] == b"first" and got[-1] == b"next"
    assert len(got) == 2 + nflog.READ_SIZE // len(filler) - 1  # the cut message: not handed on


def test_reads_are_counted_per_datagram_not_per_notice() -> None:
    notices, got = collector()
    notices._sock = ScriptedSocket(  # type: ignore[assignment]
        packet_message(b"a", 3) + packet_message(b"b", 3) + packet_message(b"c", 3)
    )
    notices.read()
    assert len(got) == 3 and notices.received == 3 and notices.reads == 1


def config_attributes(msg: bytes) -> dict[int, bytes]:
    ((kind, _, payload),) = list(messages(msg))
    assert kind == nflog.NFULNL_MSG_CONFIG
    return {k: bytes(v) for k, v in attributes(payload, 4)}


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def test_an_unbatched_group_is_bound_with_a_queue_threshold_of_one() -> None:
    msg = nflog._config(4731, nflog.NFULNL_CFG_CMD_BIND, 1)
    assert msg[16:20] == struct.pack("!BBH", socket.AF_UNSPEC, 0, 4731)
    assert config_attributes(msg) == {
        nflog.NFULA_CFG_CMD: bytes([nflog.NFULNL_CFG_CMD_BIND]),
        nflog.NFULA_CFG_QTHRESH: u32(1),
    }


def test_a_batched_group_is_bound_with_its_threshold_timeout_and_buffer() -> None:
    batch = nflog.Batch(threshold=50, timeout_cs=2, bufsize=20000)
    msg = nflog._config(4732, nflog.NFULNL_CFG_CMD_BIND, 1, batch)
    assert msg[16:20] == struct.pack("!BBH", socket.AF_UNSPEC, 0, 4732)
    assert config_attributes(msg) == {
        nflog.NFULA_CFG_CMD: bytes([nflog.NFULNL_CFG_CMD_BIND]),
        nflog.NFULA_CFG_NLBUFSIZ: u32(20000),
        nflog.NFULA_CFG_TIMEOUT: u32(2),
        nflog.NFULA_CFG_QTHRESH: u32(50),
    }
    # (the kernel's attribute numbers, include/uapi/linux/netfilter/nfnetlink_log.h)
    assert (nflog.NFULA_CFG_NLBUFSIZ, nflog.NFULA_CFG_TIMEOUT, nflog.NFULA_CFG_QTHRESH) == (3, 4, 5)
    unbind = nflog._config(4732, nflog.NFULNL_CFG_CMD_UNBIND, 2, batch)
    assert config_attributes(unbind) == {nflog.NFULA_CFG_CMD: bytes([nflog.NFULNL_CFG_CMD_UNBIND])}


def test_held_notices_are_batched_within_what_the_kernel_and_the_daemon_allow() -> None:
    b = nflog.HELD_BATCH
    assert b.threshold > 1 and b.timeout_cs >= 1
    assert 4096 <= b.bufsize <= 131072  # the kernel's range for NFULA_CFG_NLBUFSIZ
    assert b.bufsize <= nflog.READ_SIZE  # a whole batch is read at once
    # A notice: header, hook, marks and interfaces, hardware header, prefix and the
    # packet's head (snaplen): about 200 bytes; a full batch fits in the buffer.
    assert b.threshold * 200 <= b.bufsize
    # A short flow's notice may come after its socket's end: the daemon looks the
    # flow up DEATH_BATCH_S after the end, by when its notice must have come.
    assert b.delay < DEATH_BATCH_S
