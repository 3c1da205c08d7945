"""Packet capture in a namespace: tcpdump to a pcap file, read back as packets."""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from testbed.netns import Namespace


@dataclass
class Packet:
    t: float
    src: str
    dst: str
    proto: int
    sport: int
    dport: int
    payload: bytes
    seq: int | None = None  # TCP's sequence number
    size: int = -1  # the L4 payload's length on the wire (``payload`` may be cut short)


@dataclass
class Capture:
    """tcpdump in ``ns`` on ``dev``, to a pcap file; packets parsed after ``stop``."""

    ns: Namespace
    dev: str
    bpf: str
    path: Path
    proc: subprocess.Popen[bytes] | None = None
    packets: list[Packet] = field(default_factory=list)

    def start(self, timeout: float = 10.0) -> None:
        self.proc = self.ns.popen(
            # --immediate-mode: without it packets reach tcpdump in blocks, up to a second
            # late, and the block still open when it is stopped is lost.
            "tcpdump", "-i", self.dev, "-nn", "-U", "--immediate-mode", "-s", "256",
            "-w", str(self.path),
            *self.bpf.split(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                if b"listening on" in buf:
                    return
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"tcpdump did not start in {self.ns.name}: {buf.decode()[-300:]}")

    def stop(self) -> list[Packet]:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self.packets = read_pcap(self.path) if self.path.exists() else []
        return self.packets


def read_pcap(path: Path) -> list[Packet]:
    """IPv4 UDP/TCP packets of a classic pcap file (Ethernet or Linux cooked)."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    l2 = {1: 14, 113: 16, 276: 20}.get(linktype)
    if l2 is None:
        raise ValueError(f"pcap link type {linktype} not handled")
    out, off = [], 24
    while off + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + "IIII", data[off : off + 16])
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        ethertype = {1: frame[12:14], 113: frame[14:16], 276: frame[0:2]}[linktype]
        if ethertype != b"\x08\x00" or len(frame) < l2 + 20:
            continue
        ip = frame[l2:]
        ihl = (ip[0] & 0x0F) * 4
        proto = ip[9]
        if proto not in (6, 17) or len(ip) < ihl + (8 if proto == 17 else 20):
            continue
        sport, dport = struct.unpack("!HH", ip[ihl : ihl + 4])
        l4 = 8 if proto == 17 else ((ip[ihl + 12] >> 4) * 4 if len(ip) > ihl + 12 else 20)
        out.append(
            Packet(
                sec + frac / (1e9 if nano else 1e6),
                str(IPv4Address(ip[12:16])),
                str(IPv4Address(ip[16:20])),
                proto,
                sport,
                dport,
                bytes(ip[ihl + l4 :]),
                struct.unpack("!I", ip[ihl + 4 : ihl + 8])[0] if proto == 6 else None,
                struct.unpack("!H", ip[2:4])[0] - ihl - l4,
            )
        )
    return out
