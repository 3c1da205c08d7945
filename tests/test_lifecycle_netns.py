"""The daemon's life cycle on the real kernel: up, status, the per-namespace lock,
down, signals, crash cleanup, failed starts and non-root refusal.

Every daemon runs in a namespace of its own (a veth pair to a second one), and
every check of "nothing left behind" compares the namespace's whole kernel state
(nft ruleset, addresses, routes, iptables-save, ip rules) with the state before ``dime up``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dime import keystore
from testbed.netns import Namespace, Topology, topology
from testbed.runner import Dime, dime_executable, kernel_state, stop_all
from tests.netns_util import read_line

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.timeout(180),
]

STATE_ROOT = Path("/var/lib/dime")
RUN_ROOT = Path("/run/dime")
IHMP_PORT = 4731
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0

State = tuple[str, str, str, str, str]
COUNTER = re.compile(r"counter packets \d+ bytes \d+")
XT_COUNTER = re.compile(r"\[\d+:\d+\]")


def settled_state(ns: Namespace, timeout: float = 5.0) -> State:
    """kernel_state once two readings in a row agree (e.g. link-local addresses are in)."""
    deadline = time.monotonic() + timeout
    last = kernel_state(ns)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = kernel_state(ns)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the kernel state of {ns.name} never settled")


def diff(before: State, after: State) -> str:
    names = ("nft ruleset", "addresses", "routes", "iptables-save", "ip rules")
    parts = [
        f"-- {name} before:\n{b}\n-- after:\n{a}"
        for name, b, a in zip(names, before, after, strict=True)
        if a != b
    ]
    return "\n".join(parts) or "(same)"


def no_counters(state: State) -> State:
    """``state`` without rule counters, which traffic (e.g. IPv6 multicast) moves."""
    nft, addrs, routes, xt, rules = state
    return (COUNTER.sub("counter", nft), addrs, routes, XT_COUNTER.sub("[]", xt), rules)


ELEMENTS = re.compile(r"\n\t*elements = \{[^}]*\}")


def rules_only(state: State) -> State:
    """``state`` without counters and set/map elements, which the daemon's own flows
    move (a flow ends, the liveness sweep drops its elements)."""
    nft, addrs, routes, xt, rules = no_counters(state)
    return (ELEMENTS.sub("", nft), addrs, routes, xt, rules)


def one_line(text: str) -> str:
    lines = text.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r}"
    return lines[0]


@dataclass
class Host:
    """A namespace with its inode, which names its default state and run dirs."""

    ns: Namespace
    addrs: tuple[str, ...]
    inode: str = ""

    @property
    def netns_id(self) -> str:
        return f"netns-{self.inode}"

    @property
    def default_state_dir(self) -> Path:
        return STATE_ROOT / self.netns_id

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.netns_id


def host_key(d: Dime) -> str:
    """The host key a daemon announced in its log."""
    for line in d.log_text().splitlines():
        if " dime: host key " in line:
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"no host key in the log:\n{d.log_text()}")


@dataclass
class Bed:
    topo: Topology
    tmp: Path
    a: Host
    b: Host
    daemons: list[Dime] = field(default_factory=list)

    def dime_of(self, host: Host, state: bool = True) -> Dime:
        """dime (``testbed.runner``) in ``host``'s namespace: a tmp state dir, or with
        ``state`` False no DIME_STATE_DIR (dime's own per-namespace default)."""
        return Dime(
            host.ns,
            self.tmp / f"state-{host.inode}" if state else None,
            self.tmp / f"dime-{host.ns.name}-{len(self.daemons)}.log",
        )

    def dime(
        self, host: Host, *args: str, state: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """A one-shot dime command in ``host``'s namespace."""
        return self.dime_of(host, state).cli(*args, timeout=timeout)

    def start(self, host: Host, *args: str, state: bool = True) -> Dime:
        """``dime up -v`` in ``host``'s namespace, not waiting for it."""
        d = self.dime_of(host, state)
        d.start("-v", *args)
        self.daemons.append(d)
        return d

    def status(self, host: Host) -> dict[str, Any]:
        res = self.dime(host, "status", "--json")
        assert res.returncode == 0, res.stderr
        parsed = json.loads(res.stdout)  # the whole output is one JSON object
        assert isinstance(parsed, dict)
        return parsed

    def wait_ready(self, d: Dime) -> dict[str, Any]:
        return d.wait_ready(READY_TIMEOUT)

    def up(self, host: Host, *args: str, state: bool = True) -> tuple[Dime, dict[str, Any]]:
        d = self.start(host, *args, state=state)
        return d, self.wait_ready(d)

    def wait_exit(self, d: Dime) -> int:
        code = d.wait_exit(STOP_TIMEOUT)
        assert code is not None, f"dime did not stop within {STOP_TIMEOUT} s:\n{d.log_text()}"
        return code


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    """Namespaces a and b joined by a veth pair, with v4 and v6 documentation addresses.

    Afterwards every daemon is stopped (or killed), and the per-namespace state and
    run dirs this test created are removed while the namespaces still exist (so that
    no other namespace can have taken their inode meanwhile).
    """
    with topology("life") as topo:
        a = Host(topo.add_ns("a"), ("192.0.2.1", "2001:db8:a::1"))
        b = Host(topo.add_ns("b"), ("192.0.2.2", "2001:db8:a::2"))
        topo.link(a.ns, "e0", b.ns, "e0")
        for host in (a, b):
            host.inode = host.ns.run("stat", "-L", "-c", "%i", "/proc/self/ns/net").strip()
            host.ns.addr_add("e0", f"{host.addrs[0]}/24")
            host.ns.addr_add("e0", f"{host.addrs[1]}/64")
        assert a.inode != b.inode
        existed = {p for h in (a, b) for p in (h.default_state_dir, h.run_dir) if p.exists()}
        bd = Bed(topo, tmp_path, a, b)
        try:
            yield bd
        finally:
            for d in bd.daemons:  # shown by pytest only when the test failed
                print(f"== {d.log}\n{d.log_text()[-4000:]}")
            stop_all(bd.daemons)
            for h in (a, b):
                for p in (h.default_state_dir, h.run_dir):
                    if p not in existed and p.exists():
                        shutil.rmtree(p, ignore_errors=True)


# -- up, status, down ---------------------------------------------------------------------


def test_up_status_down_restores_the_kernel_state(bed: Bed) -> None:
    a = bed.a
    before = settled_state(a.ns)
    d, st = bed.up(a)
    assert st["pid"] == d.proc.pid  # `ip netns exec` runs dime itself: signals reach it
    for key in ("hids", "sockets", "counters"):
        assert key in st, key
    assert isinstance(st["hids"], list) and isinstance(st["sockets"], list)
    c = st["counters"]
    assert isinstance(c["messages_sent"], int)
    assert isinstance(c["messages_received"], int)
    assert isinstance(c["messages_rejected"], dict)
    assert set(a.addrs) <= set(st["local_addresses"])
    assert st["port"] == IHMP_PORT
    assert st["dataplane"] in ("nft", "nfqueue")

    text = bed.dime(a, "status")
    assert text.returncode == 0
    assert text.stdout.startswith(f"dime pid {d.proc.pid}, up ")
    assert "IHMP: " in text.stdout

    during = kernel_state(a.ns)
    assert "table inet dime" in during[0]
    assert (a.run_dir / "residue.json").exists()
    # the host key was generated in the state dir given by DIME_STATE_DIR
    key_file = bed.tmp / f"state-{a.inode}" / keystore.HOST_KEY
    assert keystore.public_hex(keystore.load(key_file)) == host_key(d)

    res = bed.dime(a, "down")
    assert res.returncode == 0, res.stderr
    assert one_line(res.stdout) == "dime stopped"
    assert bed.wait_exit(d) == 0, d.log_text()
    after = kernel_state(a.ns)
    assert after == before, diff(before, after)
    assert not a.run_dir.exists()
    assert "dime down: rules, maps and ghost addresses removed" in d.log_text()

    res = bed.dime(a, "status")
    assert res.returncode != 0
    assert "not running" in one_line(res.stderr)
    res = bed.dime(a, "down")
    assert res.returncode == 0
    assert one_line(res.stdout) == "dime is not running here"


def test_a_second_up_in_the_same_namespace_fails_at_once(bed: Bed) -> None:
    a = bed.a
    before = settled_state(a.ns)
    d, st = bed.up(a)
    during = kernel_state(a.ns)
    t0 = time.monotonic()
    res = bed.dime(a, "up", "-v", timeout=20)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    line = one_line(res.stderr)
    assert line.startswith("dime: ") and "already running" in line, line
    assert elapsed < 10, f"the second dime up took {elapsed:.1f} s to fail"
    # the first one is untouched: still running, still answering, rules still in place
    assert d.proc.poll() is None
    assert bed.status(a)["pid"] == st["pid"] == d.proc.pid
    now = kernel_state(a.ns)
    assert no_counters(now) == no_counters(during), diff(during, now)
    assert (a.run_dir / "residue.json").exists()
    # also with another port and data plane: the lock is the namespace, not the port
    res = bed.dime(a, "up", "--port", "4999", "--dataplane", "nfqueue", timeout=20)
    assert res.returncode != 0 and "already running" in res.stderr
    assert d.proc.poll() is None

    assert bed.dime(a, "down").returncode == 0
    assert bed.wait_exit(d) == 0
    after = kernel_state(a.ns)
    assert after == before, diff(before, after)


def test_two_namespaces_two_daemons_without_flags(bed: Bed) -> None:
    a, b = bed.a, bed.b
    before_a, before_b = settled_state(a.ns), settled_state(b.ns)
    # no DIME_STATE_DIR, no flags: each daemon finds its own per-namespace state dir
    da = bed.start(a, state=False)
    db = bed.start(b, state=False)
    st_a, st_b = bed.wait_ready(da), bed.wait_ready(db)
    assert st_a["pid"] == da.proc.pid and st_b["pid"] == db.proc.pid
    assert set(a.addrs) <= set(st_a["local_addresses"])
    assert set(b.addrs) <= set(st_b["local_addresses"])
    assert not set(b.addrs) & set(st_a["local_addresses"])

    key_a, key_b = host_key(da), host_key(db)
    assert key_a != key_b
    for host, key in ((a, key_a), (b, key_b)):
        path = host.default_state_dir / keystore.HOST_KEY
        assert keystore.public_hex(keystore.load(path)) == key

    # they talk to each other, each with its own key: a UDP datagram from a to b
    # makes a's daemon say HELLO, and each learns the other's key
    a.ns.run(
        sys.executable,
        "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.sendto(b'hi', ('{b.addrs[0]}', 9))",
    )
    deadline = time.monotonic() + 15
    while True:
        st_a, st_b = bed.status(a), bed.status(b)
        keys_a = {h["key"] for h in st_a["hids"] if b.addrs[0] in h["active"]}
        keys_b = {h["key"] for h in st_b["hids"] if a.addrs[0] in h["active"]}
        if keys_a == {key_b} and keys_b == {key_a}:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"no key exchange:\n{st_a['hids']}\n{st_b['hids']}")
        time.sleep(0.1)
    assert st_a["counters"]["messages_rejected"] == {}
    assert st_b["counters"]["messages_rejected"] == {}

    # stopping one leaves the other running, with its rules in place
    during_b = rules_only(kernel_state(b.ns))
    res = bed.dime(a, "down", state=False)
    assert res.returncode == 0 and one_line(res.stdout) == "dime stopped"
    assert bed.wait_exit(da) == 0
    assert db.proc.poll() is None
    assert bed.status(b)["pid"] == db.proc.pid
    assert rules_only(kernel_state(b.ns)) == during_b
    after_a = kernel_state(a.ns)
    assert after_a == before_a, diff(before_a, after_a)

    assert bed.dime(b, "down", state=False).returncode == 0
    assert bed.wait_exit(db) == 0
    after_b = kernel_state(b.ns)
    assert after_b == before_b, diff(before_b, after_b)


# -- signals and crashes ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_it_cleanly(bed: Bed, sig: signal.Signals) -> None:
    a = bed.a
    before = settled_state(a.ns)
    d, st = bed.up(a)
    assert st["pid"] == d.proc.pid
    assert kernel_state(a.ns) != before
    d.proc.send_signal(sig)
    assert bed.wait_exit(d) == 0, d.log_text()
    after = kernel_state(a.ns)
    assert after == before, diff(before, after)
    assert not a.run_dir.exists()
    assert "Traceback" not in d.log_text()
    assert "dime down: rules, maps and ghost addresses removed" in d.log_text()
    res = bed.dime(a, "status")
    assert res.returncode != 0 and "not running" in res.stderr


def test_kill_9_then_down_cleans_up(bed: Bed) -> None:
    a = bed.a
    before = settled_state(a.ns)
    d, _ = bed.up(a)
    d.proc.kill()
    assert d.proc.wait(timeout=10) == -signal.SIGKILL
    left = kernel_state(a.ns)
    assert left != before
    assert "table inet dime" in left[0]
    assert (a.run_dir / "residue.json").exists()

    res = bed.dime(a, "down")
    assert res.returncode == 0, res.stderr
    assert one_line(res.stdout) == "dime was not running; removed what it had left behind"
    after = kernel_state(a.ns)
    assert after == before, diff(before, after)
    assert not a.run_dir.exists()
    res = bed.dime(a, "down")
    assert res.returncode == 0
    assert one_line(res.stdout) == "dime is not running here"


def test_kill_9_then_up_takes_over_and_down_cleans_up(bed: Bed) -> None:
    a = bed.a
    before = settled_state(a.ns)
    d, _ = bed.up(a)
    d.proc.kill()
    d.proc.wait(timeout=10)
    assert kernel_state(a.ns) != before
    d2, _ = bed.up(a)
    assert "taking over what an earlier dime left here" in d2.log_text()
    assert bed.dime(a, "down").returncode == 0
    assert bed.wait_exit(d2) == 0
    after = kernel_state(a.ns)
    assert after == before, diff(before, after)
    assert not a.run_dir.exists()


# -- failed starts ------------------------------------------------------------------------


def quiet_config(bed: Bed) -> str:
    path = bed.tmp / "quiet.toml"
    path.write_text('log_level = "error"\n')
    return str(path)


def test_a_failed_start_leaves_nothing(bed: Bed) -> None:
    a = bed.a
    holder = a.ns.popen(
        sys.executable,
        "-u",
        "-c",
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.bind(('0.0.0.0', {IHMP_PORT}))\n"
        "print('bound')\n"
        "time.sleep(120)\n",
        stdout=subprocess.PIPE,
    )
    try:
        assert read_line(holder, 10) == "bound"
        before = settled_state(a.ns)
        res = bed.dime(a, "up", "--config", quiet_config(bed), timeout=40)
        assert res.returncode != 0
        line = one_line(res.stderr)
        assert line == f"dime: cannot bind the IHMP port {IHMP_PORT}: Address already in use"
        after = kernel_state(a.ns)
        assert after == before, diff(before, after)
        assert not a.run_dir.exists()
        # the lock went with it
        res = bed.dime(a, "status")
        assert res.returncode != 0 and "not running" in res.stderr
        # with the default logging too, the error is the one line that is not a log line
        res = bed.dime(a, "up", timeout=40)
        assert res.returncode != 0
        own = [x for x in res.stderr.splitlines() if x.startswith("dime: ")]
        assert own == [line]
        assert res.stderr.splitlines()[-1] == line
        assert "Traceback" not in res.stderr
        after = kernel_state(a.ns)
        assert after == before, diff(before, after)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # with the port free again it starts and stops cleanly
    d, _ = bed.up(a)
    assert bed.dime(a, "down").returncode == 0
    assert bed.wait_exit(d) == 0
    after = kernel_state(a.ns)
    assert after == before, diff(before, after)


def test_a_bad_config_in_a_namespace_touches_nothing(bed: Bed) -> None:
    a = bed.a
    before = settled_state(a.ns)
    bad = bed.tmp / "bad.toml"
    bad.write_text("port = 4731\nnot_a_key = true\n")
    res = bed.dime(a, "up", "-v", "--config", str(bad))
    assert res.returncode == 2
    assert res.stdout == ""
    assert one_line(res.stderr).startswith("dime: config: not_a_key: unknown key")
    after = kernel_state(a.ns)
    assert after == before, diff(before, after)
    assert not a.run_dir.exists()
    assert not (bed.tmp / f"state-{a.inode}").exists()


def _as_nobody(bed: Bed, host: Host) -> list[str] | None:
    """A prefix that runs a command as nobody and can run dime's Python, or None."""
    candidates = []
    if shutil.which("setpriv"):
        candidates.append(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    if shutil.which("runuser"):
        candidates.append(["runuser", "-u", "nobody", "--"])
    probe = "import os, dime.cli; print(os.geteuid())"
    for prefix in candidates:
        res = subprocess.run(
            host.ns.argv(*prefix, sys.executable, "-c", probe),
            capture_output=True,
            text=True,
            timeout=30,
            env=bed.dime_of(host).env(),
        )
        if res.returncode == 0 and res.stdout.strip() == "65534":
            return prefix
    return None


def test_up_as_non_root_is_refused(bed: Bed) -> None:
    a = bed.a
    prefix = _as_nobody(bed, a)
    if prefix is None:
        pytest.skip("neither setpriv nor runuser can run the venv's python as nobody here")
    before = settled_state(a.ns)
    state_existed = a.default_state_dir.exists()
    for env_state in (True, False):
        res = subprocess.run(
            a.ns.argv(*prefix, dime_executable(), "up", "-v"),
            capture_output=True,
            text=True,
            timeout=30,
            env=bed.dime_of(a, env_state).env(),
        )
        assert res.returncode != 0
        line = one_line(res.stderr)
        assert line.startswith("dime: ") and "root" in line, line
        after = kernel_state(a.ns)
        assert after == before, diff(before, after)
        assert not a.run_dir.exists()
        assert not (bed.tmp / f"state-{a.inode}").exists()
        assert a.default_state_dir.exists() == state_existed
    # and no lock was left: root can start it right after
    d, _ = bed.up(a)
    assert bed.dime(a, "down").returncode == 0
    assert bed.wait_exit(d) == 0
