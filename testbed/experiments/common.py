"""Shared parts of the experiments: results files, live progress, plots, statistics.

dime itself runs through :mod:`testbed.runner`; traffic helpers are in
:mod:`testbed.iperf3`, :mod:`testbed.flows` and :mod:`testbed.capture`.

Every experiment writes ``<out>/<name>.json``::

    {"experiment": name, "meta": {...}, "config": {...}, "results": {...}}

``meta`` says how it was measured: the exact command, the machine, the date, the
link rate and the RTT the experiment actually had. ``docs/RESULTS.md`` is
regenerated from these files (``python -m testbed.experiments report``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
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
            "commit": commit(),
            "smoke": ctx.smoke,
            **meta,
        },
        "config": config,
        "results": results,
    }
    path = ctx.out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


#: Outputs, not code: results written earlier in a batch do not make a run "+".
OUTPUTS = ("testbed/results", "docs/RESULTS.md")


def commit() -> str:
    """The checkout's commit (``+`` if its tracked files other than results differ
    from it), or ""."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", ".",
             *(f":!{path}" for path in OUTPUTS)],
        ).returncode  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty else "")


def write_bench(
    out: Path,
    name: str,
    experiment: str,
    command: str,
    results: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
) -> tuple[Path, Path]:
    """A benchmark's results as ``out/NAME.json`` (with the command, date, machine and
    commit) and ``out/NAME.md`` (``markdown`` of that document); their paths."""
    doc = {
        "experiment": experiment,
        "meta": {
            "command": command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "commit": commit(),
        },
        **results,
    }
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"
    js.write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(markdown(doc))
    return js, md


def finish_bench(js: Path, md: Path, ok: bool, logs: Path) -> int:
    """Print a benchmark's table and where it went; its exit status. The daemons'
    logs in ``logs`` are kept (and named) when a run went wrong, else removed."""
    print(md.read_text())
    print(f"wrote {js} and {md}")
    if not ok:
        print(f"daemon logs in {logs}", file=sys.stderr)
        return 1
    shutil.rmtree(logs, ignore_errors=True)
    return 0


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


def nearest_rank(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0 < q <= 1) by the nearest-rank method: the smallest value
    with at least a share ``q`` of the values at or below it (always one of them; no
    interpolation). 0.0 for no values, as :func:`median`."""
    if not 0 < q <= 1:
        raise ValueError(f"quantile {q} not in (0, 1]")
    s = sorted(xs)
    if not s:
        return 0.0
    return s[max(math.ceil(q * len(s)), 1) - 1]


def plot_path(out: Path, md_dir: Path, name: str) -> str:
    return os.path.relpath((out / name).resolve(), md_dir.resolve())


def machine_line(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    # Results written before commits were recorded have none.
    at = f"; commit {meta['commit']}" if meta.get("commit") else ""
    return (
        f"{m['cpu'] or m['arch']} ({m['cpus']} CPUs), Linux {m['kernel']}, "
        f"Python {m['python']}; {meta['date']}{at}"
    )


def smoke_note(meta: dict[str, Any]) -> list[str]:
    if meta.get("smoke"):
        return ["*Smoke run: tiny sizes and one short run; the figures are not meaningful.*", ""]
    return []


def fixed(v: Any, digits: int) -> str:
    """``v`` with ``digits`` decimals, "-" for None (a report's empty cell)."""
    return "-" if v is None else f"{v:.{digits}f}"
