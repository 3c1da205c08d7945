"""Our nfnetlink_queue client on a real kernel, in network namespaces: GSO-sized
packets reach the handler, and rewritten ones (partial checksums completed) arrive
intact."""

from __future__ import annotations

import json

import pytest

from testbed.netns import add_rst_counter, topology
from tests.netns_util import XFER, check_transfer, py, read_line, wait_for

pytestmark = pytest.mark.netns

VIRT, REAL = "10.77.9.2", "10.77.0.2"


def test_large_tcp_transfer_through_rewriting_queues() -> None:
    with topology("nfq") as topo:
        a, b = topo.add_ns("a"), topo.add_ns("b")
        topo.link(a, "eth0", b, "eth0")
        a.addr_add("eth0", "10.77.0.1/24")
        b.addr_add("eth0", REAL + "/24")
        a.ip("route", "add", VIRT + "/32", "via", REAL)
        for ns in (a, b):
            add_rst_counter(ns)
        # A talks to VIRT; its queues turn VIRT into REAL going out and back coming in.
        a.run("iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "-j", "NFQUEUE",
              "--queue-num", "7001")  # fmt: skip
        a.run("iptables", "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-j", "NFQUEUE",
              "--queue-num", "7002")  # fmt: skip
        node = py(a, "-m", "tests.nfq_node", "7001", "7002", VIRT, REAL)
        try:
            wait_for(node, "ready", 20)
            nbytes = 200 << 20
            server = py(b, XFER, "tcp-server", "--bind", "0.0.0.0", "--port", "5001")
            wait_for(server, "listening", 10)
            client = py(a, XFER, "tcp-client", "--connect", VIRT, "--port", "5001",
                        "--bytes", str(nbytes), "--timeout", "90")  # fmt: skip
            wait_for(client, "ready", 10)
            check_transfer((a, b), server, client, nbytes)
            # And B -> A: A's socket sees B as VIRT; the data comes in as GSO packets
            # (completed checksums), A's ACKs go out.
            server = py(a, XFER, "tcp-server", "--bind", "0.0.0.0", "--port", "5002")
            wait_for(server, "listening", 10)
            client = py(b, XFER, "tcp-client", "--connect", "10.77.0.1", "--port", "5002",
                        "--bytes", str(nbytes), "--timeout", "90")  # fmt: skip
            wait_for(client, "ready", 10)
            check_transfer((a, b), server, client, nbytes)
        finally:
            if node.poll() is None:
                assert node.stdin is not None
                node.stdin.write(b"\n")
                node.stdin.flush()
        counters = json.loads(read_line(node, 20))
        node.wait(10)
        assert counters["errors"] == counters["malformed"] == counters["cut"] == 0, counters
        assert counters["verdict_errors"] == 0, counters
        assert counters["out"] > 0 and counters["in"] > 0, counters
        assert counters["largest"] > 1500, f"no GSO packet reached the handler: {counters}"
        assert counters["in_largest"] > 1500, f"no GRO packet came in: {counters}"
