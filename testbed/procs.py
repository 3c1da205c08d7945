"""Python processes of the project in a namespace (traffic generators, helpers), and
what they say: the tests, the benchmarks and the demo share these."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.netns import Namespace
from testbed.netns import read_line as netns_read_line

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def py(ns: Namespace, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    """A python process in ``ns`` with the project on its path, its pipes ours."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return ns.popen(
        PY,
        *args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=str(ROOT),
        **kw,
    )


def read_line(proc: subprocess.Popen[bytes], timeout: float, stream: str = "stdout") -> str:
    """One line from the process, or AssertionError after ``timeout`` seconds."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    line, buf = netns_read_line(pipe, timeout)
    if line is not None:
        return line
    raise AssertionError(f"no line from {proc.args!r} within {timeout}s (got {buf!r})")


def wait_for(proc: subprocess.Popen[bytes], word: str, timeout: float) -> None:
    """Wait for a stderr line containing ``word`` (e.g. "ready", "listening")."""
    deadline = time.monotonic() + timeout
    while True:
        line = read_line(proc, max(deadline - time.monotonic(), 0.01), "stderr")
        if word in line:
            return


def result(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The JSON object a process (testbed.xfer, testbed.natflows) prints when done."""
    out, err = proc.communicate(timeout=timeout)
    lines = out.decode().strip().splitlines()
    assert lines, f"{proc.args!r} printed nothing; stderr: {err.decode()[-2000:]}"
    return dict(json.loads(lines[-1]))
