"""Many real UDP flows from one namespace, held open by helper processes.

A :class:`Flows` opens connected UDP sockets (one flow each) in a namespace and sends
one datagram on each when told, so that dime learns every flow from its first packet
(its socket table, and in ``nft`` mode the kernel's flow set and maps) and keeps it
while the socket lives. :func:`sink` drops those datagrams on the other end before
its dime and conntrack see them, so that only the sender's table grows. Used by the
scalability and footprint experiments.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Any

from testbed.netns import Namespace, read_reply

SINK_PORTS = (20000, 20999)  # ports the background flows go to (dropped there)
FLOW_LPORT = 10000  # local ports of the background flows: 10000 + i // 1000
SEED_LPORT = 9000  # the one flow that establishes the peer and keeps the ghost

# One helper process: connected UDP sockets, one flow each, from ``bind`` to ``dst``.
# Flow i uses local port llo + i // span and remote port rlo + i % span (SO_REUSEADDR
# lets several connected sockets share a local port), so every flow is distinct.
HOLDER = r"""
import resource, socket, sys
dst, rlo, span, bind, llo, first = sys.argv[1:7]
rlo, span, llo, first = int(rlo), int(span), int(llo), int(first)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
print("cap", max(hard - 64, 1), flush=True)
socks = []
for line in sys.stdin:
    cmd, *arg = line.split()
    err = ""
    if cmd == "grow":
        try:
            while len(socks) < int(arg[0]):
                i = first + len(socks)
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((bind, llo + i // span))
                s.connect((dst, rlo + i % span))
                socks.append(s)
        except OSError as exc:
            err = repr(exc).replace(" ", "_")
    elif cmd == "send":
        for s in socks[int(arg[0]):int(arg[1])]:
            try:
                s.send(b"dime-bench")
            except OSError:
                pass
    print("ok", len(socks), err, flush=True)
"""


def queue_backlog(ns: Namespace) -> int:
    """Packets waiting in this namespace's NFQUEUEs (0 when the daemon has caught up)."""
    try:
        text = ns.run("cat", "/proc/net/netfilter/nfnetlink_queue", check=False, timeout=10)
    except subprocess.TimeoutExpired:
        return 0
    total = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2].isdigit():
            total += int(fields[2])
    return total


def wait_queues(ns: Namespace, timeout: float = 120.0) -> bool:
    """Wait until dime has taken every queued packet (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if queue_backlog(ns) == 0:
            return True
        time.sleep(0.05)
    return False


class Flows:
    """``n`` real UDP flows from ``ns`` (bound to ``bind``) to ``dst``, held open by
    helper processes (each stays below its RLIMIT_NOFILE hard limit)."""

    def __init__(
        self,
        ns: Namespace,
        dst: str,
        bind: str,
        *,
        lport: int = FLOW_LPORT,
        ports: tuple[int, int] = SINK_PORTS,
    ) -> None:
        self.ns, self.dst, self.bind, self.lport = ns, dst, bind, lport
        self.rlo, self.span = ports[0], ports[1] - ports[0] + 1
        self.holders: list[tuple[subprocess.Popen[str], list[int]]] = []  # (proc, [count])
        self.cap = 0
        self.sent = 0  # flows [0, sent) have sent their first datagram

    def __len__(self) -> int:
        return sum(c[0] for _, c in self.holders)

    def _cmd(self, proc: subprocess.Popen[str], line: str, timeout: float = 300) -> str:
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        return read_reply(proc, timeout, line)

    def _spawn(self) -> tuple[subprocess.Popen[str], list[int]]:
        first = len(self)
        proc = self.ns.popen(
            sys.executable,
            "-c",
            HOLDER,
            self.dst,
            str(self.rlo),
            str(self.span),
            self.bind,
            str(self.lport),
            str(first),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = read_reply(proc, 30, "start").split()
        if len(line) != 2 or line[0] != "cap":
            raise RuntimeError(f"flow holder failed to start: {line!r}")
        self.cap = int(line[1])
        h = (proc, [0])
        self.holders.append(h)
        return h

    def open(self, n: int) -> None:
        """Open sockets until there are ``n`` (no traffic yet)."""
        while len(self) < n:
            h = self.holders[-1] if self.holders and self.holders[-1][1][0] < self.cap else None
            if h is None:
                h = self._spawn()
            k = min(n - len(self), self.cap - h[1][0])
            reply = self._cmd(h[0], f"grow {h[1][0] + k}").split()
            h[1][0] = int(reply[1])
            if len(reply) > 2:
                raise RuntimeError(f"opening flow sockets failed: {reply[2]}")

    def send(self, start: int, stop: int, *, chunk: int = 2000, drain: bool = True) -> None:
        """One datagram on flows [start, stop), ``chunk`` at a time, each chunk taken by
        dime (its queues empty) before the next: its NFQUEUE holds 8192 packets."""
        base = 0
        for proc, count in self.holders:
            lo, hi = max(start - base, 0), min(stop - base, count[0])
            for a in range(lo, hi, chunk):
                self._cmd(proc, f"send {a} {min(a + chunk, hi)}")
                if drain:
                    wait_queues(self.ns)
            base += count[0]

    def send_new(self, **kw: Any) -> None:
        self.send(self.sent, len(self), **kw)
        self.sent = len(self)

    def refresh(self, **kw: Any) -> None:
        self.send(0, len(self), **kw)

    def close(self) -> None:
        for proc, _ in self.holders:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.close()
        for proc, _ in self.holders:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.holders.clear()


def sink(ns: Namespace, ports: tuple[int, int] = SINK_PORTS) -> None:
    """Drop UDP to ``ports`` in ``ns`` before anything else sees it (dime, conntrack)."""
    ns.run(
        "nft",
        "add table inet dmbench; "
        "add chain inet dmbench pre { type filter hook prerouting priority -400; }; "
        f"add rule inet dmbench pre udp dport {ports[0]}-{ports[1]} drop",
    )
