"""Traffic for tests and the demo: a paced TCP transfer with SHA-256, UDP echo.

Run inside a namespace; every mode prints one JSON object on stdout when done.

  xfer tcp-server --bind ADDR --port P
      accept one connection, read to EOF: {"bytes", "sha256", "error"}
  xfer tcp-client --connect ADDR --port P --bytes N [--rate MBIT] [--bind ADDR] [--hold-open]
      send N deterministic pseudo-random bytes: {"bytes", "sha256", "error", "timeline"}
      (timeline: bytes sent per 100 ms); with --hold-open, close only once stdin
      closes (a test's moves are over: a late duplicate a move delayed, arriving
      after a normal close, would rightly draw a reset and look like a failure)
  xfer udp-echo --bind ADDR --port P --duration S
  xfer udp-client --connect ADDR --port P --duration S [--interval S]
      (stops early on SIGTERM) {"sent", "received", "reply_times", "send_errors", "error"}

The client's ``ready`` line on stderr (when connected) lets a test start the
handoff mid-transfer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import socket
import sys
import threading
import time


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


GAP_MIN = 0.02  # s: silences shorter than this are not recorded
MAX_GAPS = 10_000


class Tally:
    """The bytes of one direction of a transfer: how many, their SHA-256, and how
    many in each 100 ms from ``start`` (the timeline a test reads stalls from)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.bytes = 0
        self.digest = hashlib.sha256()
        self.timeline: list[int] = []
        #: (when, how long) of each silence of GAP_MIN or more between two reads: a
        #: move's gap, finer than the timeline's slots (at most MAX_GAPS kept).
        self.gaps: list[tuple[float, float]] = []
        self._last: float | None = None

    def add(self, chunk: bytes, at: float) -> None:
        self.digest.update(chunk)
        self.bytes += len(chunk)
        slot = int((at - self.start) * 10)
        while len(self.timeline) <= slot:
            self.timeline.append(0)
        self.timeline[slot] += len(chunk)
        if self._last is not None and at - self._last >= GAP_MIN and len(self.gaps) < MAX_GAPS:
            self.gaps.append((self._last, round(at - self._last, 4)))
        self._last = at

    def result(self, error: str | None) -> dict[str, object]:
        return {
            "bytes": self.bytes,
            "sha256": self.digest.hexdigest(),
            "error": error,
            "timeline": self.timeline,
            "gaps": self.gaps,
        }


def receive(conn: socket.socket, tally: Tally) -> None:
    """Read ``conn`` to EOF into ``tally`` (wall clock). OSError goes to the caller."""
    while chunk := conn.recv(1 << 16):
        tally.add(chunk, time.time())


def send_paced(
    sock: socket.socket, nbytes: int, rate_mbit: float, hold_open: bool, tally: Tally
) -> None:
    """Send ``nbytes`` deterministic pseudo-random bytes at ``rate_mbit`` (0: as fast
    as it goes) into ``tally`` (monotonic clock), then close our side; with
    ``hold_open``, only once stdin closes (a test's moves are over); wait for the
    other end's close: every byte was read. OSError goes to the caller."""
    rng = random.Random(1234)
    while tally.bytes < nbytes:
        chunk = rng.randbytes(min(16384, nbytes - tally.bytes))
        sock.sendall(chunk)
        now = time.monotonic()
        tally.add(chunk, now)
        if rate_mbit > 0:
            ahead = tally.bytes * 8 / (rate_mbit * 1e6) - (now - tally.start)
            if ahead > 0:
                time.sleep(ahead)
    if hold_open:
        sys.stdin.buffer.read()
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(4096):
        pass


def _error(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc}"


def tcp_server(bind: str, port: int, timeout: float) -> dict[str, object]:
    srv = socket.socket(_family(bind), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(1)
    srv.settimeout(timeout)
    print("listening", file=sys.stderr, flush=True)
    tally = Tally(time.time())  # timeline: bytes received per 100 ms since the connection
    error = None
    try:
        conn, _peer = srv.accept()
        conn.settimeout(timeout)
        tally.start = time.time()
        receive(conn, tally)
        conn.close()
    except OSError as exc:
        error = _error(exc)
    # start: wall clock, to line the timeline up with events
    return {**tally.result(error), "start": tally.start}


def tcp_client(
    connect: str,
    port: int,
    nbytes: int,
    rate_mbit: float,
    bind: str | None,
    timeout: float,
    hold_open: bool = False,
) -> dict[str, object]:
    sock = socket.socket(_family(connect), socket.SOCK_STREAM)
    if bind:
        sock.bind((bind, 0))
    sock.settimeout(timeout)
    error = None
    tally = Tally(time.monotonic())
    try:
        sock.connect((connect, port))
        print("ready", file=sys.stderr, flush=True)
        send_paced(sock, nbytes, rate_mbit, hold_open, tally)
    except OSError as exc:
        error = _error(exc)
    finally:
        sock.close()
    return {**tally.result(error), "seconds": time.monotonic() - tally.start}


def udp_echo(bind: str, port: int, duration: float) -> dict[str, object]:
    sock = socket.socket(_family(bind), socket.SOCK_DGRAM)
    sock.bind((bind, port))
    sock.settimeout(0.2)
    print("listening", file=sys.stderr, flush=True)
    end = time.monotonic() + duration
    echoed = send_errors = 0
    peers: set[str] = set()
    while time.monotonic() < end:
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        try:
            sock.sendto(data, peer)
        except OSError:
            # The address it is bound to may be gone for a moment (a move, before
            # dime puts it back on lo as a ghost): a server goes on, as a real one would.
            send_errors += 1
            continue
        peers.add(str(peer[0]))
        echoed += 1
    return {"echoed": echoed, "peers": sorted(peers), "send_errors": send_errors}


def udp_client(connect: str, port: int, duration: float, interval: float) -> dict[str, object]:
    """Requests every ``interval`` for ``duration`` seconds, or until SIGTERM (then
    the result is printed all the same)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sock = socket.socket(_family(connect), socket.SOCK_DGRAM)
    sock.connect((connect, port))
    sock.settimeout(interval)
    print("ready", file=sys.stderr, flush=True)
    start = time.monotonic()
    sent = received = 0
    reply_times: list[float] = []
    send_errors = 0  # e.g. "network unreachable" while a host has no address at all
    while time.monotonic() - start < duration and not stop.is_set():
        try:
            sock.send(sent.to_bytes(4, "big"))
            sent += 1
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    sock.recv(2048)
                    received += 1
                    reply_times.append(time.monotonic() - start)
                except TimeoutError:
                    break
        except OSError:
            send_errors += 1
            time.sleep(interval)
    return {
        "sent": sent,
        "received": received,
        "reply_times": reply_times,
        "send_errors": send_errors,
        "error": None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xfer")
    p.add_argument("mode", choices=["tcp-server", "tcp-client", "udp-echo", "udp-client"])
    p.add_argument("--bind")
    p.add_argument("--connect")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, default=10_000_000)
    p.add_argument("--rate", type=float, default=0.0, help="Mbit/s, 0 = unpaced")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--hold-open", action="store_true")
    a = p.parse_args(argv)
    if a.mode == "tcp-server":
        out = tcp_server(a.bind, a.port, a.timeout)
    elif a.mode == "tcp-client":
        out = tcp_client(a.connect, a.port, a.bytes, a.rate, a.bind, a.timeout, a.hold_open)
    elif a.mode == "udp-echo":
        out = udp_echo(a.bind, a.port, a.duration)
    else:
        out = udp_client(a.connect, a.port, a.duration, a.interval)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
