"""Shared parts of the experiments: results files, live progress, dime in a namespace.

Every experiment writes ``<out>/<name>.json``::

    {"experiment": name, "meta": {...}, "config": {...}, "results": {...}}

``meta`` says how it was measured: the exact command, the machine, the date, the
link rate and the RTT the experiment actually had. ``docs/RESULTS.md`` is
regenerated from these files (``python -m testbed.experiments report``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.netns import Namespace

ROOT = Path(__file__).resolve().parent.parent.parent
DIME = str(ROOT / ".venv" / "bin" / "dime")
PYTHON = sys.executable
DEFAULT_OUT = ROOT / "testbed" / "results"


def command_line() -> str:
    """How this run was started, as one would type it."""
    prog = Path(sys.argv[0])
    if prog.name == "__main__.py":
        head = ["python", "-m", ".".join(prog.resolve().parent.relative_to(ROOT).parts)]
    else:
        head = [prog.name]
    return shlex.join([*head, *sys.argv[1:]])


@dataclass
class RunContext:
    """What every experiment gets from the runner."""

    out: Path
    runs: int
    smoke: bool
    tmp: Path
    command: str = field(default_factory=lambda: command_line())

    def n(self, full: int) -> int:
        """A repeat count: ``full`` normally (or --runs), 1 in smoke mode."""
        return 1 if self.smoke else full


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
    }


def write_result(
    ctx: RunContext,
    name: str,
    config: dict[str, Any],
    results: dict[str, Any],
    **meta: Any,
) -> Path:
    ctx.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "experiment": name,
        "meta": {
            "command": ctx.command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "smoke": ctx.smoke,
            **meta,
        },
        "config": config,
        "results": results,
    }
    path = ctx.out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


#: How the experiments without shaping or delay describe their links (``write_result``).
UNSHAPED = {"link": "unshaped veth (no rate limit)", "delay_ms": 0, "delay": "none added"}


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def progress(text: str) -> None:
    """One live status line on the terminal (overwritten by the next one)."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text)
    else:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def progress_done(text: str = "") -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if text:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def median(xs: list[float]) -> float:
    s = sorted(xs)
    if not s:
        return 0.0
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# -- dime in a namespace -----------------------------------------------------------------


@dataclass
class DimeProc:
    ns: Namespace
    proc: subprocess.Popen[bytes]
    log: Path
    state: Path

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.ns.run(DIME, "status", "--json")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.ns.run(DIME, "down", check=False, timeout=60)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except OSError:
            return ""


def start_dime(ns: Namespace, tmp: Path, name: str, *args: str, config: str = "") -> DimeProc:
    """``dime up`` in ``ns`` (keys and logs in ``tmp``), ready when this returns."""
    state = tmp / f"state-{name}"
    log = tmp / f"dime-{name}.log"
    argv = ["env", f"DIME_STATE_DIR={state}", DIME, "up", *args]
    if config:
        cfg = tmp / f"dime-{name}.toml"
        cfg.write_text(config)
        argv += ["--config", str(cfg)]
    proc = ns.popen(*argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
    d = DimeProc(ns, proc, log, state)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dime up failed in {ns.name}:\n{d.log_tail()}")
        if ns.run(DIME, "status", "--json", check=False).startswith("{"):
            return d
        time.sleep(0.1)
    d.stop()
    raise RuntimeError(f"dime up not ready in {ns.name}:\n{d.log_tail()}")


@contextmanager
def dime_on(
    *hosts: tuple[Namespace, str], tmp: Path, args: tuple[str, ...] = (), config: str = ""
) -> Iterator[list[DimeProc]]:
    procs: list[DimeProc] = []
    try:
        for ns, name in hosts:
            procs.append(start_dime(ns, tmp, name, *args, config=config))
        yield procs
    finally:
        for d in procs:
            d.stop()


# -- iperf3 -------------------------------------------------------------------------------


def iperf3_server(ns: Namespace, port: int = 5201) -> subprocess.Popen[bytes]:
    proc = ns.popen(
        "iperf3", "-s", "-1", "-p", str(port), "-J", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(0.3)  # iperf3 has no readiness signal; it binds at once
    return proc


def iperf3_client(
    ns: Namespace, server: str, *args: str, port: int = 5201, prefix: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    return ns.popen(
        *prefix,
        "iperf3",
        "-c",
        server,
        "-p",
        str(port),
        "-J",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def iperf3_json(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    try:
        return dict(json.loads(out))
    except ValueError:
        return {"error": f"iperf3 printed no JSON: {err.decode()[-500:]}"}


def goodput_bps(report: dict[str, Any]) -> float:
    """Receiver-side goodput of an iperf3 TCP report (bits/s)."""
    end = report.get("end", {})
    rx = end.get("sum_received") or end.get("sum") or {}
    return float(rx.get("bits_per_second", 0.0))


def ping_rtt_ms(ns: Namespace, addr: str, count: int = 5) -> float:
    """Mean RTT to ``addr`` by ping (what the experiment actually had)."""
    out = ns.run("ping", "-c", str(count), "-i", "0.2", "-q", addr, check=False, timeout=30)
    for line in out.splitlines():
        if "min/avg/max" in line:
            return float(line.split("=")[1].split("/")[1])
    return float("nan")


# -- helper processes and reports ------------------------------------------------------


def read_reply(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """One line from a helper's stdout, within ``timeout`` seconds."""
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


def plot_path(out: Path, md_dir: Path, name: str) -> str:
    return os.path.relpath((out / name).resolve(), md_dir.resolve())


def machine_line(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    return (
        f"{m['cpu'] or m['arch']} ({m['cpus']} CPUs), Linux {m['kernel']}, "
        f"Python {m['python']}; {meta['date']}"
    )


def smoke_note(meta: dict[str, Any]) -> list[str]:
    if meta.get("smoke"):
        return ["*Smoke run: tiny sizes and one short run; the figures are not meaningful.*", ""]
    return []
