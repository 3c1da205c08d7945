"""Run the experiments and regenerate docs/RESULTS.md.

    python -m testbed.experiments [NAME ...] [--runs N] [--smoke] [--out DIR]
    python -m testbed.experiments report [--out DIR]

With no NAME every experiment runs, then the report is regenerated. ``--smoke`` is
one short run of each (CI), written to a scratch directory unless ``--out`` is given.
Must run as root: everything happens in network namespaces this run creates.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from testbed.experiments import NAMES, load
from testbed.experiments.common import DEFAULT_OUT, RunContext, progress_done
from testbed.experiments.report import write_report
from testbed.netns import sweep_stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.experiments")
    p.add_argument("names", nargs="*", help=f"experiments ({', '.join(NAMES)}) or 'report'")
    p.add_argument("--runs", type=int, default=10, help="repetitions where they apply")
    p.add_argument("--smoke", action="store_true", help="one short run of each (CI)")
    p.add_argument("--out", type=Path, help=f"results directory (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    names = a.names or list(NAMES)
    if names == ["report"]:
        write_report(a.out or DEFAULT_OUT)
        return 0
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        p.error(f"unknown experiment(s): {', '.join(unknown)}")
    if os.geteuid() != 0:
        p.error("must run as root (it creates network namespaces)")
    # SIGTERM unwinds like Ctrl-C: every experiment's cleanup runs (its daemons are
    # stopped, its namespaces removed) instead of leaving them behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sweep_stale()
    out = a.out or (Path(tempfile.mkdtemp(prefix="dime-smoke-")) if a.smoke else DEFAULT_OUT)
    failed = []
    with tempfile.TemporaryDirectory(prefix="dime-exp-") as tmp:
        for name in names:
            ctx = RunContext(out=out, runs=a.runs, smoke=a.smoke, tmp=Path(tmp))
            start = time.monotonic()
            print(f"== {name}: {load(name).TITLE}", file=sys.stderr, flush=True)
            try:
                path = load(name).run(ctx)
            except Exception as exc:  # one experiment failing must not lose the others
                progress_done(f"!! {name} failed: {exc!r}")
                failed.append(name)
                continue
            progress_done(f"   {name}: {path} ({time.monotonic() - start:.0f} s)")
    write_report(out)
    print(f"results in {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
