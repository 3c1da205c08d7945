"""A stand-alone NFQUEUE rewriter for tests: ``python -m tests.nfq_node QOUT QIN VIRT REAL``.

Serves queue QOUT (outbound: destination VIRT -> REAL) and QIN (inbound: source
REAL -> VIRT) with :class:`stacktrans.nfqueue.PacketQueue` and the rewrite of
:mod:`stacktrans.packet`, like dime's nfqueue data plane does. Prints ``ready``,
then on a line on stdin (or its end) one JSON line of counters and stops.
"""

from __future__ import annotations

import asyncio
import json
import sys
from ipaddress import ip_address

from stacktrans.nfqueue import PacketQueue
from stacktrans.packet import RewriteError, parse, rewrite_addresses


def main() -> None:
    qout, qin, virt, real = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    v, r = ip_address(virt).packed, ip_address(real).packed
    seen = {"largest": 0, "in_largest": 0, "out": 0, "in": 0}

    def outbound(data: bytes) -> bytes | None:
        seen["largest"] = max(seen["largest"], len(data))
        info = parse(data)
        if info.dst != v:
            return None
        buf = bytearray(data)
        rewrite_addresses(buf, info, None, r)
        seen["out"] += 1
        return bytes(buf)

    def inbound(data: bytes) -> bytes | None:
        seen["in_largest"] = max(seen["in_largest"], len(data))
        try:
            info = parse(data)
        except RewriteError:
            return None
        if info.src != r:
            return None
        buf = bytearray(data)
        rewrite_addresses(buf, info, v, None)
        seen["in"] += 1
        return bytes(buf)

    loop = asyncio.new_event_loop()
    queues = [PacketQueue(qout, outbound), PacketQueue(qin, inbound)]
    for q in queues:
        q.start(loop)
    done = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), finish)
    print("ready", file=sys.stderr, flush=True)
    loop.run_until_complete(done)
    for q in queues:
        q.stop()
    counters = {
        k: sum(getattr(q, k) for q in queues)
        for k in ("packets", "errors", "malformed", "rewritten", "cut", "verdict_errors")
    }
    print(json.dumps({**seen, **counters}), flush=True)


if __name__ == "__main__":
    main()
