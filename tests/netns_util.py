"""Helpers for tests that run real traffic in network namespaces."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.fig7 import V4, Fig7, Plan
from testbed.netns import Namespace, add_rst_counter, rst_count, topology
from testbed.procs import ROOT as ROOT  # re-exported for the tests
from testbed.procs import py as py
from testbed.procs import read_line as read_line
from testbed.procs import result as result
from testbed.procs import wait_for as wait_for
from testbed.runner import Dime, stop_all
from testbed.runner import kernel_state as kernel_state  # re-exported for the tests


@dataclass
class StNode:
    """tests/st_node.py running in a namespace."""

    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, ns: Namespace, mode: str, locals_: list[str], deaths: bool = False) -> StNode:
        """``deaths``: drop flows as the kernel's destroy events say they ended."""
        proc = py(ns, "-m", "tests.st_node", *(["--deaths"] if deaths else []), mode, *locals_)
        node = cls(proc)
        ready = node._reply(timeout=30)
        assert ready.get("ready"), ready
        return node

    def _reply(self, timeout: float = 20) -> dict[str, Any]:
        line = read_line(self.proc, timeout)
        return dict(json.loads(line))

    def send(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()
        return self._reply()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="stop")
                self.proc.wait(timeout=20)
            except (AssertionError, BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


XFER = str(ROOT / "testbed" / "xfer.py")


def tcp_transfer(
    sender: Namespace,
    receiver: Namespace,
    server_addr: str,
    nbytes: int,
    rate: float,
    port: int = 5001,
    timeout: float = 60,
    hold_open: bool = False,
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A paced testbed.xfer TCP transfer sender -> receiver, connected when this returns.
    ``hold_open``: the sender closes only once its stdin is closed (``result`` does)."""
    server = py(receiver, XFER, "tcp-server", "--bind", server_addr, "--port", str(port))
    wait_for(server, "listening", 10)
    client = py(
        sender,
        XFER,
        "tcp-client",
        "--connect",
        server_addr,
        "--port",
        str(port),
        "--bytes",
        str(nbytes),
        "--rate",
        str(rate),
        "--timeout",
        str(timeout),
        *(["--hold-open"] if hold_open else []),
    )
    wait_for(client, "ready", 10)
    return server, client


def check_transfer(
    namespaces: tuple[Namespace, ...],
    server: subprocess.Popen[bytes],
    client: subprocess.Popen[bytes],
    nbytes: int,
    context: str = "",
) -> None:
    """Every byte arrived intact (SHA-256), no error, no TCP reset in ``namespaces``."""
    sent, got = result(client, 120), result(server, 120)
    assert sent["error"] is None, f"sender: {sent['error']}\n{context}"
    assert got["error"] is None, f"receiver: {got['error']}\n{context}"
    assert got["bytes"] == sent["bytes"] == nbytes
    assert got["sha256"] == sent["sha256"]
    for ns in namespaces:
        assert rst_count(ns) == 0, f"TCP reset seen in {ns.name}\n{context}"


@dataclass
class OnFig7:
    """A test's view of the Fig. 7 testbed: its CH and its mobile host MH."""

    fig: Fig7

    @property
    def ch(self) -> Namespace:
        return self.fig.ch

    @property
    def mh(self) -> Namespace:
        return self.fig.mh


@dataclass
class Fig7Daemons:
    """A test's Fig. 7 testbed and the `dime` of each of its hosts, by name ("ch",
    "mh"), started on demand in ``tmp``, with their logs."""

    fig: Fig7
    tmp: Path
    daemons: dict[str, Dime] = field(default_factory=dict)

    def ns(self, name: str) -> Namespace:
        ns: Namespace = getattr(self.fig, name)
        return ns

    def dime(self, name: str) -> Dime:
        if name not in self.daemons:
            self.daemons[name] = Dime.in_dir(self.ns(name), self.tmp, name)
        return self.daemons[name]

    def logs(self) -> str:
        return "\n".join(d.log_tail(80) for d in self.daemons.values())


@contextlib.contextmanager
def fig7_testbed(tag: str, plan: Plan = V4) -> Iterator[Fig7]:
    """The Fig. 7 testbed, TCP resets counted in the CH and the MH; removed after."""
    with topology(tag) as topo:
        fig = Fig7.build(topo, plan)
        for ns in (fig.ch, fig.mh):
            add_rst_counter(ns)
        yield fig


@contextlib.contextmanager
def daemons_stopped(
    daemons: Callable[[], Iterable[Dime]], logs: Callable[[], str]
) -> Iterator[None]:
    """Print the daemons' logs if the block fails; stop every daemon after it."""
    try:
        yield
    except BaseException:
        print(logs())
        raise
    finally:
        stop_all(list(daemons()))
