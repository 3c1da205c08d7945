"""dime in a network namespace: the one way the demo, the experiments and the
namespace tests run the daemon.

A :class:`Dime` is the ``dime`` command line in one namespace with one state
directory (or dime's own per-namespace default) and one log file::

    d = Dime.in_dir(fig.mh, tmp, "mh")
    d.up("-v", "--dataplane", "nft")     # dime up; returns when `dime status` answers
    d.status()                           # dime status --json, as a dict
    d.down().check()                     # dime down: exit status 0, nothing left behind

Readiness is ``dime status --json`` answering (the daemon serves its control socket
only once its rules are installed); a ``dime up`` that exits before that fails at
once with the tail of its log. ``down`` compares the namespace's nft ruleset,
iptables rules and addresses on ``lo`` with what they were before ``up``; ``stop``
is the quiet cleanup for ``finally`` blocks. Several daemons at once: :func:`up_all`,
:func:`down_all`, :func:`stop_all`, :func:`statuses` and the :func:`running` block.

The ``dime`` executable is the one of the running interpreter's environment (the
venv this runs in), else the first on ``PATH``: never a path inside the repository.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from testbed.netns import Namespace

T = TypeVar("T")

READY_TIMEOUT = 30.0  # s from `dime up` to `dime status` answering
STOP_TIMEOUT = 30.0  # s from `dime down` to the daemon's exit
POLL = 0.1  # s between two status polls
#: What the daemon logs (at level info) once it is up; a hint to ask for its status.
READY_LINE = "dime up:"

Status = dict[str, Any]


class DimeError(RuntimeError):
    """dime did not start, answer or stop as it should; the message says why (with
    the tail of its log where there is one)."""


def dime_executable() -> str:
    """``dime`` next to the running interpreter (its venv), else the one on PATH."""
    here = Path(sys.executable).parent / "dime"  # not resolved: a venv's python is a link
    if here.exists():
        return str(here)
    found = shutil.which("dime")
    if found is None:
        raise DimeError(f"no dime executable next to {sys.executable} or on PATH")
    return found


# -- what dime may leave behind ----------------------------------------------------------


class KernelState(NamedTuple):
    """A namespace's kernel state as text, for "nothing left behind" checks."""

    ruleset: str  # nft list ruleset
    addresses: str  # ip -o addr show
    routes: str  # ip route show table all
    iptables: str  # iptables-save + ip6tables-save, without their time-stamped comments
    rules: str = ""  # ip rule show + ip -6 rule show


def kernel_state(ns: Namespace) -> KernelState:
    return KernelState(
        ns.run("nft", "list", "ruleset"),
        ns.run("ip", "-o", "addr", "show"),
        ns.run("ip", "route", "show", "table", "all"),
        _no_comments(ns.run("iptables-save") + ns.run("ip6tables-save")),
        ns.run("ip", "rule", "show") + ns.run("ip", "-6", "rule", "show"),
    )


def _no_comments(text: str) -> str:
    # iptables-save stamps the time in comment lines.
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def lo_addresses(state: KernelState) -> list[str]:
    """The addresses on ``lo`` (where dime keeps ghost addresses), as ``addr/len``."""
    fields = (line.split() for line in state.addresses.splitlines())
    return [f[3] for f in fields if len(f) > 3 and f[1] == "lo"]


def _changed(before: str, after: str, most: int = 6) -> str:
    """The first lines that differ, ``-`` gone and ``+`` new."""
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    lines = [d.strip() for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    return " | ".join(lines[:most]) + (" | ..." if len(lines) > most else "")


def residue(before: KernelState, after: KernelState) -> list[str]:
    """What dime left behind: its rules or ghost addresses, compared with ``before``.

    Only what dime touches is compared: the other addresses and the routes change
    with the moves a test makes, not with dime.
    """
    found = []
    if after.ruleset != before.ruleset:
        found.append(
            f"nft ruleset differs after dime down ({_changed(before.ruleset, after.ruleset)})"
        )
    if after.iptables != before.iptables:
        found.append(
            f"iptables rules differ after dime down ({_changed(before.iptables, after.iptables)})"
        )
    if after.rules != before.rules:
        found.append("routing rules differ after dime down")
    ours = [r for r in after.routes.splitlines() if "proto 209" in r]
    if ours and ours != [r for r in before.routes.splitlines() if "proto 209" in r]:
        found.append(f"route left behind: {ours[0]}")
    lo_before, lo_after = lo_addresses(before), lo_addresses(after)
    if lo_after != lo_before:
        extra = [a for a in lo_after if a not in lo_before] or lo_after
        found.append(f"ghost address left on lo: {', '.join(extra)}")
    return found


@dataclass(frozen=True)
class Stopped:
    """How ``dime down`` went: the daemon's exit status (None: it had to be killed),
    what ``dime down`` printed, and what was left behind."""

    name: str
    code: int | None
    output: str
    residue: tuple[str, ...]
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.residue

    def describe(self) -> str:
        code = "killed" if self.code is None else f"exit status {self.code}"
        left = f"; left behind: {', '.join(self.residue)}" if self.residue else ""
        return f"{self.output} ({code}){left}"

    def check(self) -> None:
        """DimeError unless the daemon exited with 0 and left nothing behind."""
        if not self.ok:
            raise DimeError(f"{self.name}: {self.describe()}\n{self.log_tail}")


# -- one daemon --------------------------------------------------------------------------


@dataclass
class Dime:
    """The ``dime`` CLI in ``ns`` with its own state dir (None: dime's per-namespace
    default) and ``dime up``'s output in ``log``."""

    ns: Namespace
    state_dir: Path | None
    log: Path
    name: str = ""  # how messages name it (default: the namespace)
    proc: subprocess.Popen[bytes] | None = None
    before: KernelState | None = None  # taken when `dime up` starts
    exe: str = field(default_factory=dime_executable, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or self.ns.name

    @classmethod
    def in_dir(cls, ns: Namespace, tmp: Path, name: str) -> Dime:
        """State dir ``tmp/state-NAME`` and log ``tmp/dime-NAME.log``."""
        return cls(ns, tmp / f"state-{name}", tmp / f"dime-{name}.log", name)

    # -- commands ----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """This environment, with the state dir set (or unset) and no systemd socket:
        a caller's DIME_STATE_DIR or NOTIFY_SOCKET must not reach the daemon."""
        env = {k: v for k, v in os.environ.items() if k not in ("DIME_STATE_DIR", "NOTIFY_SOCKET")}
        if self.state_dir is not None:
            env["DIME_STATE_DIR"] = str(self.state_dir)
        return env

    def argv(self, *args: str) -> list[str]:
        return self.ns.argv(self.exe, *args)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """One ``dime`` command in the namespace (text output, not checked)."""
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, env=self.env()
        )

    # -- up ----------------------------------------------------------------------------

    def start(self, *args: str) -> None:
        """``dime up ARGS`` in the background (not waiting for it), logging to ``log``."""
        self.spawn("up", *args)

    def spawn(self, *args: str) -> None:
        """``dime ARGS`` in the background, logging to ``log``; the kernel state
        before it is taken first (what it must leave as it found)."""
        self.before = kernel_state(self.ns)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv(*args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                # Ctrl-C on the terminal is the caller's to handle, not the daemon's.
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Status:
        """The first answer of ``dime status --json``; DimeError (with the log's tail)
        as soon as ``dime up`` exits, or after ``timeout`` seconds.

        Each status poll starts a Python process (a fifth of a second of CPU), so it
        polls as soon as the log says the daemon is up, else once a second (a daemon
        configured to log only errors says nothing)."""
        next_poll = time.monotonic() + 1.0

        def status() -> Status | None:
            nonlocal next_poll
            if READY_LINE not in self.log_text() and time.monotonic() < next_poll:
                return None
            next_poll = time.monotonic() + 1.0
            return self.try_status()

        return self.await_ready(status, timeout, "dime up")

    def await_ready(self, ready: Callable[[], T | None], timeout: float, what: str) -> T:
        """What ``ready()`` returns first (polled); DimeError (with the log's tail) as
        soon as the process exits, or after ``timeout`` seconds."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise DimeError(f"{what} in {self.name} exited {code}:\n{self.log_tail()}")
            got = ready()
            if got is not None:
                return got
            if time.monotonic() > deadline:
                raise DimeError(
                    f"{what} in {self.name} not ready after {timeout:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def up(self, *args: str, timeout: float = READY_TIMEOUT) -> Status:
        """``dime up ARGS``, ready when this returns (its first status)."""
        self.start(*args)
        return self.wait_ready(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The daemon's pid (``ip netns exec`` runs dime itself, so it is the process's)."""
        assert self.proc is not None, "start() first"
        return self.proc.pid

    # -- status ------------------------------------------------------------------------

    def try_status(self, timeout: float = 30) -> Status | None:
        """``dime status --json``, or None while no daemon answers."""
        try:
            res = self.cli("status", "--json", timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if res.returncode != 0 or not res.stdout.lstrip().startswith("{"):
            return None
        return dict(json.loads(res.stdout))

    def status(self, tries: int = 1, timeout: float = 60) -> Status:
        """``dime status --json``; DimeError when it has not answered in ``tries`` tries
        a second apart (a status of 100k flows is a big answer)."""
        for i in range(tries):
            st = self.try_status(timeout)
            if st is not None:
                return st
            if i + 1 < tries:
                time.sleep(1)
        raise DimeError(f"dime status in {self.name} did not answer:\n{self.log_tail()}")

    def wait_status(
        self, pred: Callable[[Status], Any], timeout: float = 20, what: str = "", tries: int = 1
    ) -> Status:
        """Poll ``dime status`` until ``pred`` holds; DimeError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(tries)
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise DimeError(
                    f"{self.name}: status never matched {what or pred!r}: "
                    f"{json.dumps(st)[:2000]}\n{self.log_tail()}"
                )
            time.sleep(POLL)

    # -- logs --------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        lines = self.log_text().splitlines()[-n:]
        return "\n".join(f"    {self.name}| {line}" for line in lines) or "    (empty log)"

    # -- down --------------------------------------------------------------------------

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """The daemon's exit status, or None if it did not exit in time (it is then
        killed)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def down(self, timeout: float = STOP_TIMEOUT) -> Stopped:
        """``dime down``, then wait for the daemon; how it went and what it left."""
        try:
            res = self.cli("down", timeout=timeout + 10)
            output = (res.stdout + res.stderr).strip()
        except subprocess.TimeoutExpired:
            output = "dime down timed out"
        code = self.wait_exit(timeout)
        left = residue(self.before, kernel_state(self.ns)) if self.before is not None else []
        return Stopped(self.name, code, output, tuple(left), self.log_tail())

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Cleanup: SIGTERM if the daemon still runs (it then stops as ``dime down``
        would, without starting a process for it), killing it if it does not exit.
        Never raises (for ``finally`` blocks)."""
        if self.proc is None or not self.running:
            return
        with contextlib.suppress(OSError):
            self.proc.terminate()
        self.wait_exit(timeout)


# -- many daemons ------------------------------------------------------------------------


def _each(daemons: Sequence[Dime], fn: Callable[[Dime], Any]) -> list[Any]:
    """``fn`` on every daemon at once (threads: the work is waiting on processes)."""
    if not daemons:
        return []
    with ThreadPoolExecutor(min(len(daemons), 16)) as pool:
        return list(pool.map(fn, daemons))


def up_all(daemons: Sequence[Dime], *args: str, batch: int = 10) -> list[Status]:
    """``dime up ARGS`` in every namespace, ``batch`` at a time (each batch's start-up
    shares the CPUs), ready when this returns; on failure, every one is stopped."""
    statuses: list[Status] = []
    try:
        for i in range(0, len(daemons), batch):
            group = daemons[i : i + batch]
            for d in group:
                d.start(*args)
            statuses += _each(group, Dime.wait_ready)
    except BaseException:
        stop_all(daemons)
        raise
    return statuses


def down_all(daemons: Sequence[Dime]) -> list[Stopped]:
    """:meth:`Dime.down` on every daemon at once."""
    return _each(daemons, Dime.down)


def stop_all(daemons: Sequence[Dime]) -> None:
    """:meth:`Dime.stop` on every daemon at once."""
    _each(daemons, Dime.stop)


def statuses(daemons: Sequence[Dime]) -> list[Status]:
    """``dime status --json`` of every daemon at once ({} where one did not answer)."""
    return [st or {} for st in _each(daemons, Dime.try_status)]


@contextlib.contextmanager
def running(daemons: Sequence[Dime], *args: str, batch: int = 10) -> Iterator[list[Dime]]:
    """Every daemon up (``dime up ARGS``) for the block, stopped after it."""
    up_all(daemons, *args, batch=batch)
    try:
        yield list(daemons)
    finally:
        stop_all(daemons)


# -- what status says --------------------------------------------------------------------


def established(addr: str) -> Callable[[Status], bool]:
    """Status predicate: a peer at ``addr`` has finished its HELLO exchange."""
    return lambda st: any(h["state"] == "established" and addr in h["active"] for h in st["hids"])


def any_established(st: Status) -> bool:
    """Status predicate: some peer has finished its HELLO exchange."""
    return any(h["state"] == "established" for h in st["hids"])


def handed_off(old: str, new: str) -> Callable[[Status], bool]:
    """Status predicate (the CH's view): the peer's HANDOFF from ``old`` to ``new``
    has been applied."""
    return lambda st: any(new in h["active"] and old not in h["active"] for h in st["hids"])
