"""The recovery benchmark's reading of a capture (testbed/recovery_bench.py) and the
pcap reader's TCP fields it relies on (testbed/capture.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from ihmp.wire import MessageType
from testbed.capture import Packet, read_pcap
from testbed.experiments.goodput import _recovery_note
from testbed.iperf3 import PORT
from testbed.recovery_bench import IHMP_PORT, SEGMENT, markdown, recovery, summary

MH, CH = "203.0.113.2", "192.0.2.1"
ISN = 2**32 - 3 * SEGMENT  # the relative sequence numbers must survive a wrap


def data(t: float, seg: int, n: int = 1, src: str = CH, sport: int = PORT) -> Packet:
    return Packet(t, src, MH, 6, sport, 40000, b"", (ISN + seg * SEGMENT) % 2**32, n * SEGMENT)


def handoff(t: float) -> Packet:
    return Packet(t, MH, CH, 17, IHMP_PORT, IHMP_PORT, bytes([1, MessageType.HANDOFF]), None, 60)


def test_recovery_counts_what_the_sender_sends_again_and_per_round() -> None:
    before = [data(0.01 * i, i) for i in range(10)]  # segments 0..9 sent, all lost
    after = [
        data(1.10, 0),  # round 0: the retransmission of the first
        data(1.16, 1, 2),  # round 1: two segments
        data(1.22, 3, 4),  # round 2: four
        data(1.28, 7, 8),  # round 3: 3 again (7..9) and 5 new
    ]
    control = Packet(1.2, CH, MH, 6, PORT, 40001, b"", 5, 37)  # iperf3's control connection
    ack = Packet(1.15, MH, CH, 6, 40000, PORT, b"", 1, 0)
    res = recovery([*before, handoff(1.05), control, ack, *after], {CH}, 0.061, rounds=5)
    assert res["first_data_ms"] == pytest.approx(50.0)
    assert res["resent_segments"] == 10
    assert res["segments_per_round"] == [1, 2, 4, 8, 0]


def test_recovery_without_a_handoff_or_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="HANDOFF"):
        recovery([data(0.0, 0)], {CH}, 0.061)
    with pytest.raises(ValueError, match="no data"):
        recovery([handoff(0.0), data(0.1, 0, src=MH)], {CH}, 0.061)


def test_summary_and_markdown_per_case() -> None:
    runs = [
        {"path": "v4 CH->MH", "cc": "bbr", "run": i, "gap_s": g, "resent_segments": r,
         "segments_per_round": [1, 2]}
        for i, (g, r) in enumerate(((0.5, 170), (0.6, 180)))
    ]  # fmt: skip
    runs.append({"path": "v4 CH->MH", "cc": "cubic", "run": 0, "gap_s": None, "error": "x"})
    doc = {"meta": {"command": "c", "date": "d"}, "rounds": 2, "runs": runs}
    bbr, cubic = summary(doc)
    assert (bbr["gap_ms"], bbr["resent"], bbr["rounds"]) == (550, 175, [[1, 2], [1, 2]])
    assert (cubic["gap_ms"], cubic["resent"], cubic["rounds"]) == (None, None, [])
    md = markdown(doc)
    assert "| v4 CH->MH | bbr | 2 | 550 ms | 175 | 1, 2; 1, 2 |" in md
    assert "| v4 CH->MH | cubic | 1 | - | - |  |" in md


def test_read_pcap_gives_tcp_sequence_numbers_and_sizes_on_the_wire(tmp_path: Path) -> None:
    payload = 1000
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, 123456789, 0, 8 << 4, 0x10, 64, 0, 0)
    tcp += b"\x01\x01\x08\x0a" + bytes(8)  # 12 bytes of options: a 32-byte header
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + payload, 0, 0, 64, 6, 0,
                     bytes([192, 0, 2, 1]), bytes([203, 0, 113, 2]))  # fmt: skip
    frame = bytes(12) + b"\x08\x00" + ip + tcp + bytes(40)  # cut at 40 bytes of payload
    head = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 128, 1)
    rec = struct.pack("<IIII", 1, 500000, len(frame), 14 + len(ip) + len(tcp) + payload)
    (tmp_path / "x.pcap").write_bytes(head + rec + frame)
    (p,) = read_pcap(tmp_path / "x.pcap")
    assert (p.src, p.dst, p.sport, p.dport, p.seq, p.size) == (
        "192.0.2.1", "203.0.113.2", 5201, 40000, 123456789, payload
    )  # fmt: skip
    assert p.t == pytest.approx(1.5) and len(p.payload) == 40


def test_the_goodput_report_quotes_the_recovery_results(tmp_path: Path) -> None:
    assert _recovery_note(tmp_path) == []  # not run: nothing said
    runs = [
        {"path": "v4 CH->MH", "cc": "bbr", "run": 0, "gap_s": 0.56, "resent_segments": 220,
         "segments_per_round": [0, 1, 4]}
    ]  # fmt: skip
    doc = {"meta": {"command": "python -m testbed.recovery_bench", "date": "d"}, "runs": runs}
    (tmp_path / "recovery.json").write_text(json.dumps(doc))
    (text,) = [line for line in _recovery_note(tmp_path) if line]
    assert "v4 CH->MH, bbr: gap 560 ms, 220 segments sent again, per round trip 0, 1, 4" in text
