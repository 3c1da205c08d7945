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
from stacktrans.netlink import attr, message


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


class OverflowingSocket:
    """recv(): ENOBUFS once (the kernel dropped notices), one batch, then empty."""

    def __init__(self, batch: bytes) -> None:
        self.results: list[Any] = [OSError(errno.ENOBUFS, "overflow"), batch, BlockingIOError()]

    def recv(self, size: int) -> bytes:
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return bytes(result)


def test_an_overflow_is_counted_reported_and_reading_goes_on() -> None:
    lost: list[bool] = []
    got: list[bytes] = []
    notices = nflog.FlowNotices(7, lambda d, o, p: got.append(d), lambda: lost.append(True))
    notices._sock = OverflowingSocket(packet_message(b"after", 3))  # type: ignore[assignment]
    notices.read()
    assert lost == [True] and notices.overflows == 1 and got == [b"after"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    notices, _ = collector()
    notices.feed(data)
