"""A process's CPU time and memory, from /proc (the daemon's footprint)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcCpu:
    """utime+stime and memory of a process, from /proc."""

    pid: int

    def ticks(self) -> int:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def rss_kib(self) -> int:
        """Resident memory now (VmRSS)."""
        return self._status_kib("VmRSS")

    def hwm_kib(self) -> int:
        """Peak resident memory (VmHWM)."""
        return self._status_kib("VmHWM")


@contextlib.contextmanager
def cpu_meter(pid: int) -> Iterator[dict[str, float]]:
    """Yields a dict filled on exit with ``cpu_pct`` (of one core) and ``seconds``
    over the block."""
    p = ProcCpu(pid)
    out: dict[str, float] = {}
    t0, c0 = time.monotonic(), p.ticks()
    try:
        yield out
    finally:
        with contextlib.suppress(OSError):
            dt = time.monotonic() - t0
            out["cpu_pct"] = round(100.0 * (p.ticks() - c0) / HZ / dt, 1) if dt > 0 else 0.0
            out["seconds"] = round(dt, 2)
