"""Network namespaces for tests, the demo and the testbed.

A :class:`Topology` creates namespaces, veth links and bridges with ``ip``, runs
commands inside them, and deletes everything it created when closed, also when the
code using it failed. Namespace names carry a per-process prefix, so parallel runs
and leftovers of a killed run never collide; :func:`sweep_stale` removes the
leftovers of runs whose process is gone.

Nothing here touches the root namespace except creating and deleting the namespaces
themselves and the veth pairs while they are being moved into them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

PREFIX = "dm"


class CommandError(RuntimeError):
    """A command in a namespace failed; the message holds its stderr."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    for _ in range(5):
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
        # An nft dump (list, reset) that a concurrent ruleset change interrupted (a
        # daemon in the namespace): nft says so and gives up; the next try succeeds.
        if "Interrupted system call" not in proc.stderr:
            break
    if check and proc.returncode != 0:
        cmd = shlex.join(argv)
        raise CommandError(f"{cmd}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def sweep_stale() -> list[str]:
    """Delete namespaces left by runs whose process no longer exists. Returns their names."""
    removed = []
    for name in _run(["ip", "netns", "list"]).split():
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if not os.path.exists(f"/proc/{parts[1]}"):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


def read_line(pipe: IO[bytes], timeout: float) -> tuple[str | None, bytes]:
    """One line from a child's pipe within ``timeout`` seconds: (line without its
    newline, b"") or, at timeout or EOF, (None, what was read)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([pipe], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        ch = os.read(pipe.fileno(), 1)
        if not ch:
            break
        if ch == b"\n":
            return buf.decode(errors="replace"), b""
        buf += ch
    return None, buf


def read_reply(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """One line from a helper's text stdout within ``timeout`` seconds; RuntimeError
    (naming ``what`` it was asked) if it ends or stays silent."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line
            break
        if proc.poll() is not None:
            break
    raise RuntimeError(f"{proc.args!r} did not answer {what!r}")


@dataclass
class Namespace:
    name: str

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run ``cmd`` in this namespace and return its stdout."""
        return _run(self.argv(*cmd), check=check, timeout=timeout)

    def sh(self, script: str, check: bool = True, timeout: float = 30) -> str:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def popen(self, *cmd: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """``cmd`` in this namespace; bytes or text pipes as ``kwargs`` say."""
        return subprocess.Popen(self.argv(*cmd), **kwargs)

    def ip(self, *args: str, check: bool = True) -> str:
        # `ip -n` enters the namespace itself: one exec fewer than `ip netns exec`.
        return _run(["ip", "-n", self.name, *args], check=check)

    def addr_add(self, dev: str, cidr: str, *extra: str) -> None:
        # nodad: IPv6 addresses are usable at once, as a test wants.
        flags = ("nodad",) if ":" in cidr else ()
        self.ip("addr", "add", cidr, "dev", dev, *flags, *extra)

    def addr_del(self, dev: str, cidr: str) -> None:
        self.ip("addr", "del", cidr, "dev", dev)


#: TCP resets a namespace sends or takes in, counted in a table of its own (the
#: tests', the demo's and the benchmarks' proof that no connection was reset).
RST_COUNTER = """
table inet dmrst {
  counter rst_out { }
  counter rst_in { }
  chain o { type filter hook postrouting priority 0; tcp flags rst counter name rst_out; }
  chain i { type filter hook input priority 0; tcp flags rst counter name rst_in; }
}
"""


def add_rst_counter(ns: Namespace) -> None:
    ns.sh(f"nft -f - <<'EOF'\n{RST_COUNTER}\nEOF")


def rst_count(ns: Namespace) -> int:
    """TCP resets counted since :func:`add_rst_counter`, both ways."""
    out = json.loads(ns.run("nft", "-j", "list", "counters", "table", "inet", "dmrst"))
    return sum(item["counter"]["packets"] for item in out["nftables"] if "counter" in item)


@dataclass
class Topology:
    """Namespaces and links that exist only while the topology is open."""

    tag: str = "t"
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    _links: int = 0
    #: Fixed namespace names ``<name_prefix>-<short>`` instead of per-process ones,
    #: for a topology that outlives its process (``python -m testbed.fig7 up``).
    name_prefix: str | None = None

    def __post_init__(self) -> None:
        self._prefix = self.name_prefix or f"{PREFIX}-{os.getpid()}-{self.tag}"

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_ns(self, short: str) -> Namespace:
        name = f"{self._prefix}-{short}"
        _run(["ip", "netns", "add", name])
        ns = self.namespaces[short] = Namespace(name)
        ns.ip("link", "set", "lo", "up")
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        return ns

    def link(self, a: Namespace, a_dev: str, b: Namespace, b_dev: str) -> None:
        """A veth pair from ``a``'s ``a_dev`` to ``b``'s ``b_dev``, both up."""
        self._links += 1
        tmp_a, tmp_b = (
            f"dmA{os.getpid() % 100000}x{self._links}",
            f"dmB{os.getpid() % 100000}x{self._links}",
        )
        _run(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
        try:
            _run(["ip", "link", "set", tmp_a, "netns", a.name])
            _run(["ip", "link", "set", tmp_b, "netns", b.name])
        except CommandError:
            _run(["ip", "link", "del", tmp_a], check=False)
            raise
        a.ip("link", "set", tmp_a, "name", a_dev)
        b.ip("link", "set", tmp_b, "name", b_dev)
        a.ip("link", "set", a_dev, "up")
        b.ip("link", "set", b_dev, "up")

    def bridge(self, ns: Namespace, name: str, ports: Sequence[str]) -> None:
        ns.ip("link", "add", name, "type", "bridge")
        for port in ports:
            ns.ip("link", "set", port, "master", name)
        ns.ip("link", "set", name, "up")

    def close(self) -> None:
        for ns in list(self.namespaces.values()):
            # Kill whatever still runs inside, then delete the namespace.
            pids = _run(["ip", "netns", "pids", ns.name], check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()


@contextlib.contextmanager
def topology(tag: str = "t") -> Iterator[Topology]:
    topo = Topology(tag)
    try:
        yield topo
    finally:
        topo.close()


T = TypeVar("T")


def build_named(prefix: str, build: Callable[[Topology], T]) -> T:
    """A testbed whose namespaces are named ``PREFIX-SHORT`` (for people to enter,
    ``python -m testbed.<bed> up``); on any failure (or Ctrl-C), removed again."""
    topo = Topology(name_prefix=prefix)
    try:
        return build(topo)
    except BaseException:
        topo.close()
        raise


def remove_named(prefix: str, shorts: Sequence[str]) -> list[str]:
    """Remove the namespaces ``PREFIX-SHORT`` that exist (killing what runs in
    them), as ``build_named`` made them; their names."""
    topo = Topology(name_prefix=prefix)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    present = {line.split()[0] for line in listed.splitlines() if line.strip()}
    for short in shorts:
        if f"{prefix}-{short}" in present:
            topo.namespaces[short] = Namespace(f"{prefix}-{short}")
    gone = [ns.name for ns in topo.namespaces.values()]
    topo.close()
    return gone
