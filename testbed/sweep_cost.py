"""What one liveness sweep costs, by source: sock_diag, /proc, conntrack.

    python -m testbed.sweep_cost [--flows N]     (as root)

Opens N connected UDP flows (each sends one datagram, so conntrack has an entry)
in a namespace of its own, times each way of listing sockets and conntrack (CPU
seconds of this process), prints the figures as JSON and removes the namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Sized
from typing import Any

from testbed.netns import topology

CHILD = "--in-namespace"


def _cpu(fn: Callable[[], Any]) -> dict[str, float]:
    t0 = time.process_time()
    out = fn()
    rows = out[0] if isinstance(out, tuple) else out
    return {
        "cpu_s": round(time.process_time() - t0, 3),
        "rows": len(rows) if isinstance(rows, Sized) else 0,
    }


def measure(n: int) -> dict[str, Any]:
    """Runs inside the namespace: open the flows, time every source."""
    from stacktrans.kernel_flows import (
        conntrack_udp,
        conntrack_udp4,
        existing_flows,
        kernel_sockets,
        proc_sockets,
        udp_bindings,
    )

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = min(n, hard - 64)
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("10.79.0.1", 10000 + i // 1000))
        s.connect(("10.79.0.2", 20000 + i % 1000))
        s.send(b"x")
        socks.append(s)
    return {
        "flows": n,
        # pyroute2's DiagSocket, measured here until dime stopped using it: 2.6 s at
        # 19k flows (testbed/results/sweep_cost.json), against 0.6 for the lean parser.
        "sockets_sock_diag_adoption": _cpu(existing_flows),
        "sockets_and_bindings_sock_diag_lean": _cpu(kernel_sockets),
        "sockets_proc": _cpu(proc_sockets),
        "udp_bindings_proc": _cpu(udp_bindings),
        "conntrack_ctnetlink_pyroute2": _cpu(conntrack_udp4),
        "conntrack_proc": _cpu(conntrack_udp),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.sweep_cost", description=__doc__)
    p.add_argument("--flows", type=int, default=9000)
    p.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.in_namespace:
        print(json.dumps(measure(a.flows)))
        return 0
    if os.geteuid() != 0:
        p.error("must run as root (it creates a network namespace)")
    with topology("swc") as topo:
        ns = topo.add_ns("a")
        ns.ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
        ns.addr_add("va", "10.79.0.1/24")
        ns.ip("link", "set", "va", "up")
        ns.ip("link", "set", "vb", "up")
        # conntrack runs in a namespace once a rule there needs it, as dime's do
        ns.run("nft", "add table inet t; add chain inet t o { type filter hook output "
               "priority 0; }; add rule inet t o ct state new accept")  # fmt: skip
        out = ns.run(sys.executable, "-m", "testbed.sweep_cost", CHILD, "--flows",
                     str(a.flows), timeout=600)  # fmt: skip
    print(out.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
