"""iperf3 and ping between the testbed's namespaces, for the experiments."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from testbed.netns import Namespace

PORT = 5201


def wait_listening(ns: Namespace, port: int, timeout: float = 10.0) -> None:
    """Until a TCP socket listens on ``port`` in ``ns`` (iperf3 -s -J prints nothing
    before its test: this is its readiness). RuntimeError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.run("ss", "-Hltn", f"sport = :{port}", check=False).strip():
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} in {ns.name} after {timeout:g} s")


def iperf3_server(
    ns: Namespace, *args: str, port: int = PORT, prefix: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """``iperf3 -s -1 -J ARGS`` in ``ns`` (``prefix``: e.g. mptcpize run), listening
    when this returns."""
    proc = ns.popen(
        *prefix, "iperf3", "-s", "-1", "-p", str(port), "-J", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_listening(ns, port)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise
    return proc


def iperf3_client(
    ns: Namespace, server: str, *args: str, port: int = PORT, prefix: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    return ns.popen(
        *prefix, "iperf3", "-c", server, "-p", str(port), "-J", *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def iperf3_json(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The JSON report of a finished iperf3, or ``{"error": ...}``."""
    out, err = proc.communicate(timeout=timeout)
    try:
        return dict(json.loads(out))
    except ValueError:
        return {"error": f"iperf3 printed no JSON: {err.decode()[-500:]}"}


def ping_rtt_ms(ns: Namespace, addr: str, count: int = 5, family: int | None = None) -> float:
    """Mean RTT to ``addr`` by ping (what the experiment actually had); NaN if none.
    ``family`` 4 or 6: ping -4 / -6 (else ping picks it from the address)."""
    fam = (f"-{family}",) if family else ()
    out = ns.run("ping", *fam, "-c", str(count), "-i", "0.2", "-q", addr, check=False, timeout=30)
    for line in out.splitlines():
        if "min/avg/max" in line:
            return float(line.split("=")[1].split("/")[1])
    return float("nan")


def iperf3_reports(
    client: subprocess.Popen[bytes], server: subprocess.Popen[bytes], timeout: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both ends' JSON reports (client within ``timeout`` s, then the server's); both
    processes are gone when this returns, whatever happened."""
    try:
        return iperf3_json(client, timeout), iperf3_json(server, 15)
    finally:
        for p in (client, server):
            if p.poll() is None:
                p.kill()
                p.wait()
