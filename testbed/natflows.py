"""Traffic for the NAT testbed (:mod:`testbed.nat`), run inside its namespaces.

Paced TCP transfers come from :mod:`testbed.xfer`; this module has what the NAT
tests need besides: UDP that records what it receives, the addresses a server sees
(what a NAT made of the client), a pair of idle flows driven from stdin, and the
forged packets of an off-path attacker. Every mode prints one JSON object on stdout
when done (the driven modes one per command).

  natflows udp-echo --bind ADDR --port P [--peer ADDR:PORT] [--duration S]
      echo every datagram; with --peer, a socket connected to that peer (it gets only
      that peer's datagrams, as an application's connected socket would). SIGTERM
      ends it early: {"echoed", "peers", "foreign", "foreign_count"} (foreign: what
      was not a 4-byte request of udp-client, first 20, hex)
  natflows udp-client --connect ADDR --port P [--bind-port N] [--duration S] [--interval S]
      a request every interval (4-byte counter), until SIGTERM:
      {"sent", "received", "reply_times", "send_errors", "start", "error"}
      (reply_times: wall clock of each reply; start: wall clock of the first request)
  natflows tcp-send-server --bind ADDR --port P --bytes N [--rate MBIT] [--hold-open]
  natflows tcp-recv-client --connect ADDR --port P
      testbed.xfer's transfer the other way round: the server sends (the same bytes as
      xfer's tcp-client), the client receives ({"bytes", "sha256", "error",
      "timeline", "start"}, as xfer's tcp-server): data to a host that opened the
      connection, where no one can connect to it (behind a NAT)
  natflows whoami-server --bind ADDR --port P [--duration S]
      TCP and UDP on port P: answers each connection / datagram with "ADDR:PORT",
      the client's address as this host sees it
  natflows whoami --connect ADDR --port P --proto tcp|udp [--bind-port N]
      {"seen": "ADDR:PORT", "local_port": N, "error"}
  natflows peer-server --bind ADDR --tcp-port P --udp-port Q
      one TCP connection and a UDP socket, echoing each "ping-N"; commands on stdin:
      "push" (one "push-N" on TCP, and over UDP to the last UDP peer, five times),
      "report" (everything received), "quit"
  natflows peer-client --connect ADDR --tcp-port P --udp-port Q [--bind-port N]
      commands on stdin: "ping" (TCP and UDP, UDP sent again every 0.3 s until
      answered) -> {"tcp": seconds or null, "udp": ..., "error"}; "recv" (wait for
      the next push on each) -> the same; "quit"
  natflows forge --dst ADDR --src ADDR[,ADDR...] --sports A-B|P,Q,... [--udp-dport P]
                 [--tcp-dports P,Q] [--tag TEXT]
      spoofed UDP datagrams and TCP ACKs with payload ("TAG-udp", "TAG-tcp"; random
      sequence and acknowledgment numbers) from every source address and port to
      the destination (built with scapy, sent through a raw socket): {"sent": N}

``listening`` / ``ready`` on stderr say when a server is bound or a client started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from testbed.netns import read_line
from testbed.xfer import Tally, receive, send_paced

REQUEST_SIZE = 4  # bytes of a udp-client request: its counter


def _say(word: str) -> None:
    print(word, file=sys.stderr, flush=True)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _stop_event() -> threading.Event:
    """Set on SIGTERM: the mode then stops and prints its result all the same."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _addr_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- UDP request/response ------------------------------------------------------------------


def udp_echo(bind: str, port: int, peer: str | None, duration: float) -> dict[str, Any]:
    stop = _stop_event()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    if peer:
        sock.connect(_addr_port(peer))
    sock.settimeout(0.2)
    _say("listening")
    end = time.monotonic() + duration
    echoed = 0
    peers: set[str] = set()
    foreign: list[str] = []
    foreign_count = 0
    while time.monotonic() < end and not stop.is_set():
        try:
            data, src = sock.recvfrom(2048)
        except TimeoutError:
            continue
        except OSError:  # ICMP errors on a connected socket
            continue
        peers.add(f"{src[0]}:{src[1]}")
        if len(data) != REQUEST_SIZE:
            foreign_count += 1
            if len(foreign) < 20:
                foreign.append(data[:64].hex())
            continue
        try:
            if peer:
                sock.send(data)
            else:
                sock.sendto(data, src)
            echoed += 1
        except OSError:
            pass
    return {
        "echoed": echoed,
        "peers": sorted(peers),
        "foreign": foreign,
        "foreign_count": foreign_count,
    }


def udp_client(
    connect: str, port: int, bind_port: int, duration: float, interval: float
) -> dict[str, Any]:
    stop = _stop_event()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if bind_port:
        sock.bind(("0.0.0.0", bind_port))
    sock.connect((connect, port))
    _say("ready")
    start = time.time()
    sent = received = send_errors = 0
    reply_times: list[float] = []
    while time.time() - start < duration and not stop.is_set():
        try:
            sock.send(sent.to_bytes(REQUEST_SIZE, "big"))
            sent += 1
        except OSError:  # no address, no route: while a host moves
            send_errors += 1
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.recv(2048)
                received += 1
                reply_times.append(round(time.time(), 4))
            except TimeoutError:
                break
            except OSError:  # an ICMP error reported on the socket
                time.sleep(max(deadline - time.monotonic(), 0))
                break
    return {
        "sent": sent,
        "received": received,
        "reply_times": reply_times,
        "send_errors": send_errors,
        "start": start,
        "error": None,
    }


# -- TCP the other way round: the server sends -------------------------------------------


def tcp_send_server(
    bind: str, port: int, nbytes: int, rate_mbit: float, timeout: float, hold_open: bool
) -> dict[str, Any]:
    """Accept one connection and send it ``nbytes`` paced bytes, the same bytes as
    testbed.xfer's tcp-client; with ``hold_open``, close only once stdin closes."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(1)
    srv.settimeout(timeout)
    _say("listening")
    error = None
    tally = Tally(time.monotonic())
    try:
        conn, _ = srv.accept()
        conn.settimeout(timeout)
        tally.start = time.monotonic()
        send_paced(conn, nbytes, rate_mbit, hold_open, tally)
        conn.close()
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {**tally.result(error), "seconds": time.monotonic() - tally.start}


def tcp_recv_client(connect: str, port: int, timeout: float) -> dict[str, Any]:
    """Connect and read to EOF: testbed.xfer tcp-server's result (``timeline``: bytes
    per 100 ms from ``start``, wall clock)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    error = None
    tally = Tally(time.time())
    try:
        sock.connect((connect, port))
        tally.start = time.time()
        _say("ready")
        receive(sock, tally)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    return {**tally.result(error), "start": tally.start}


# -- who does the server see ---------------------------------------------------------------


def whoami_server(bind: str, port: int, duration: float) -> dict[str, Any]:
    stop = _stop_event()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((bind, port))
    tcp.listen(16)
    tcp.settimeout(0.1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((bind, port))
    udp.settimeout(0.1)
    _say("listening")
    seen: list[str] = []
    end = time.monotonic() + duration
    while time.monotonic() < end and not stop.is_set():
        try:
            conn, src = tcp.accept()
            with conn:
                conn.sendall(f"{src[0]}:{src[1]}\n".encode())
            seen.append(f"tcp {src[0]}:{src[1]}")
        except TimeoutError:
            pass
        try:
            _, src = udp.recvfrom(2048)
            udp.sendto(f"{src[0]}:{src[1]}".encode(), src)
            seen.append(f"udp {src[0]}:{src[1]}")
        except TimeoutError:
            pass
    return {"seen": seen}


def whoami(connect: str, port: int, proto: str, bind_port: int, timeout: float) -> dict[str, Any]:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.settimeout(timeout)
    if bind_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", bind_port))
    seen = None
    error = None
    try:
        sock.connect((connect, port))
        if proto == "tcp":
            seen = sock.makefile().readline().strip()
        else:
            deadline = time.monotonic() + timeout
            while seen is None and time.monotonic() < deadline:
                sock.send(b"who")
                sock.settimeout(0.5)
                try:
                    seen = sock.recv(2048).decode()
                except TimeoutError:
                    continue
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    local_port = sock.getsockname()[1]
    sock.close()
    return {"seen": seen, "local_port": local_port, "error": error}


# -- a pair of flows that mostly sit idle --------------------------------------------------


def _lines(conn: socket.socket, out: queue.Queue[str]) -> None:
    """Each line read from ``conn`` onto ``out``; "" when the connection ends."""
    buf = b""
    try:
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                out.put(line.decode(errors="replace"))
    except OSError as exc:
        out.put(f"error {type(exc).__name__}: {exc}")
    out.put("")


def peer_server(bind: str, tcp_port: int, udp_port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, tcp_port))
    srv.listen(1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((bind, udp_port))
    _say("listening")
    lock = threading.Lock()
    got_tcp: list[str] = []
    got_udp: list[list[str]] = []
    last_udp_peer: list[tuple[str, int]] = []
    conn_box: list[socket.socket] = []

    def tcp_side() -> None:
        conn, _ = srv.accept()
        conn_box.append(conn)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_lines, args=(conn, lines), daemon=True).start()
        while True:
            line = lines.get()
            if not line:
                return
            with lock:
                got_tcp.append(line)
            if line.startswith("ping-"):
                conn.sendall(f"{line}\n".encode())

    def udp_side() -> None:
        while True:
            data, src = udp.recvfrom(2048)
            text = data.decode(errors="replace")
            with lock:
                got_udp.append([f"{src[0]}:{src[1]}", text])
                last_udp_peer[:] = [src]
            if text.startswith("ping-"):
                with contextlib.suppress(OSError):  # its address gone for a moment (a move)
                    udp.sendto(data, src)

    threading.Thread(target=tcp_side, daemon=True).start()
    threading.Thread(target=udp_side, daemon=True).start()
    pushes = 0
    for raw in sys.stdin:
        cmd = raw.strip()
        if cmd == "push":
            pushes += 1
            msg = f"push-{pushes}"
            error = None
            try:
                conn_box[0].sendall(f"{msg}\n".encode())
                for _ in range(5):
                    udp.sendto(msg.encode(), last_udp_peer[0])
                    time.sleep(0.2)
            except (OSError, IndexError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            _emit({"pushed": msg, "error": error})
        elif cmd == "report":
            with lock:
                _emit({"tcp": list(got_tcp), "udp": [list(u) for u in got_udp]})
        elif cmd == "quit":
            break


def peer_client(connect: str, tcp_port: int, udp_port: int, bind_port: int, timeout: float) -> None:
    tcp = socket.create_connection((connect, tcp_port), timeout=10)
    tcp.settimeout(None)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if bind_port:
        udp.bind(("0.0.0.0", bind_port))
    udp.connect((connect, udp_port))
    tcp_in: queue.Queue[str] = queue.Queue()
    udp_in: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(tcp, tcp_in), daemon=True).start()

    def udp_side() -> None:
        while True:
            try:
                udp_in.put(udp.recv(2048).decode(errors="replace"))
            except OSError:  # an ICMP error while the path is broken
                time.sleep(0.05)

    threading.Thread(target=udp_side, daemon=True).start()
    _say("ready")

    def wait(q: queue.Queue[str], want: str, t0: float) -> tuple[float | None, str | None]:
        while True:
            left = t0 + timeout - time.monotonic()
            if left <= 0:
                return None, None
            try:
                item = q.get(timeout=min(left, 0.3))
            except queue.Empty:
                if q is udp_in and want.startswith("ping-"):
                    with contextlib.suppress(OSError):
                        udp.send(want.encode())  # not answered yet: again
                continue
            if item.startswith("error ") or item == "":
                return None, item or "connection closed"
            if item == want:
                return round(time.monotonic() - t0, 3), None

    pings = pushes = 0
    for raw in sys.stdin:
        cmd = raw.strip()
        t0 = time.monotonic()
        if cmd == "ping":
            pings += 1
            msg = f"ping-{pings}"
            error = None
            try:
                tcp.sendall(f"{msg}\n".encode())
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):  # no route yet, say: sent again below
                udp.send(msg.encode())
            t_tcp, err_tcp = wait(tcp_in, msg, t0)
            t_udp, _ = wait(udp_in, msg, t0)
            _emit({"tcp": t_tcp, "udp": t_udp, "error": error or err_tcp})
        elif cmd == "recv":
            pushes += 1  # the server numbers its pushes 1, 2, ...
            t_tcp, err_tcp = wait(tcp_in, f"push-{pushes}", t0)
            t_udp, _ = wait(udp_in, f"push-{pushes}", t0)
            _emit({"tcp": t_tcp, "udp": t_udp, "error": err_tcp})
        elif cmd == "quit":
            break


# -- an off-path attacker ------------------------------------------------------------------


def forge(
    dst: str, srcs: list[str], sports: list[int], udp_dport: int, tcp_dports: list[int], tag: str
) -> dict[str, Any]:
    """Built with scapy (checksums included), sent through a raw socket: the kernel
    routes them and keeps the forged source."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.packet import Raw

    rng = random.Random()
    pkts: list[bytes] = []
    for src in srcs:
        for sport in sports:
            if udp_dport:
                udp = UDP(sport=sport, dport=udp_dport) / Raw(f"{tag}-udp".encode())
                pkts.append(bytes(IP(src=src, dst=dst) / udp))
            for dport in tcp_dports:
                tcp = TCP(
                    sport=sport,
                    dport=dport,
                    flags="PA",
                    seq=rng.getrandbits(32),
                    ack=rng.getrandbits(32),
                    window=65535,
                )
                pkts.append(bytes(IP(src=src, dst=dst) / tcp / Raw(f"{tag}-tcp".encode())))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    for pkt in pkts:
        raw.sendto(pkt, (dst, 0))
        time.sleep(0.005)
    raw.close()
    return {"sent": len(pkts)}


# -- driving peer-server / peer-client from a test ----------------------------------------


def tell(proc: subprocess.Popen[bytes], cmd: str) -> None:
    """One command to a running peer-server or peer-client (not waiting)."""
    assert proc.stdin is not None
    proc.stdin.write(f"{cmd}\n".encode())
    proc.stdin.flush()


def answer(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Its JSON answer to the last command; RuntimeError if none within ``timeout`` s."""
    assert proc.stdout is not None
    line, buf = read_line(proc.stdout, timeout)
    if line is None:
        raise RuntimeError(f"{proc.args!r} did not answer within {timeout} s (got {buf!r})")
    return dict(json.loads(line))


def ask(proc: subprocess.Popen[bytes], cmd: str, timeout: float) -> dict[str, Any]:
    tell(proc, cmd)
    return answer(proc, timeout)


def _ports(text: str) -> list[int]:
    """ "A-B" or "A,B,C" (or both: "A-B,C")."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="natflows")
    p.add_argument(
        "mode",
        choices=[
            "udp-echo",
            "udp-client",
            "tcp-send-server",
            "tcp-recv-client",
            "whoami-server",
            "whoami",
            "peer-server",
            "peer-client",
            "forge",
        ],
    )
    p.add_argument("--bind")
    p.add_argument("--connect")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tcp-port", type=int, default=0)
    p.add_argument("--udp-port", type=int, default=0)
    p.add_argument("--bind-port", type=int, default=0)
    p.add_argument("--peer")
    p.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--dst")
    p.add_argument("--src", default="")
    p.add_argument("--sports", default="20000-20009")
    p.add_argument("--udp-dport", type=int, default=0)
    p.add_argument("--tcp-dports", default="")
    p.add_argument("--tag", default="EVE")
    p.add_argument("--bytes", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=0.0, help="Mbit/s, 0 = unpaced")
    p.add_argument("--hold-open", action="store_true")
    a = p.parse_args(argv)
    out: dict[str, Any] | None
    if a.mode == "udp-echo":
        out = udp_echo(a.bind, a.port, a.peer, a.duration)
    elif a.mode == "udp-client":
        out = udp_client(a.connect, a.port, a.bind_port, a.duration, a.interval)
    elif a.mode == "tcp-send-server":
        out = tcp_send_server(a.bind, a.port, a.bytes, a.rate, a.timeout, a.hold_open)
    elif a.mode == "tcp-recv-client":
        out = tcp_recv_client(a.connect, a.port, a.timeout)
    elif a.mode == "whoami-server":
        out = whoami_server(a.bind, a.port, a.duration)
    elif a.mode == "whoami":
        out = whoami(a.connect, a.port, a.proto, a.bind_port, a.timeout)
    elif a.mode == "peer-server":
        peer_server(a.bind, a.tcp_port, a.udp_port)
        out = None
    elif a.mode == "peer-client":
        peer_client(a.connect, a.tcp_port, a.udp_port, a.bind_port, a.timeout)
        out = None
    else:
        tcp_dports = [int(x) for x in a.tcp_dports.split(",") if x]
        out = forge(a.dst, a.src.split(","), _ports(a.sports), a.udp_dport, tcp_dports, a.tag)
    if out is not None:
        _emit(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
