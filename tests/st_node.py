"""A StackTrans node for the data-plane tests, run inside a network namespace.

It runs the real StackTrans service (nft maps, NFQUEUE, ghosts, routes), with a test
double in place of IHMP: the test sets the hosts the way IHMP would, through JSON
commands on stdin, one per line; each gets one JSON reply line on stdout. The double
hands StackTrans the same HostChanged events the engine would.

  {"cmd": "host", "addr": A, "active": [...], "local": [...], "state": "established"}
      find the HID owning A (or create it) and make its sets exactly these
  {"cmd": "locals", "addrs": [...]}       this host's current addresses
  {"cmd": "dump"}                          HIDs, flows, translations
  {"cmd": "stop"}                          clean up and exit

Flows end only when asked for: with ``--deaths`` (before the mode) the node hears the
kernel's destroy events and drops ended flows, with the periodic sweep an hour
away; without it, flows stay in the table whatever becomes of their sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from ipaddress import ip_address
from typing import Any

from ihmp.addr import IPAddress
from ihmp.hosts import ChangeKind, FlowOrigin, HidState, HostChanged, HostSnapshot
from stacktrans.flow_death import check_flows
from stacktrans.kernel_flows import alive_flows, existing_flows
from stacktrans.service import DataplaneConfig, DataplaneMode, KernelFlows, StackTrans


class Node:
    def __init__(self, mode: str, locals_: list[str], deaths: bool = False) -> None:
        self.hosts: dict[int, HostSnapshot] = {}
        self.new_hids: list[int] = []
        self.loop = asyncio.get_event_loop()
        kernel_flows = KernelFlows(existing=existing_flows, alive=None, prompt=None, check=None)
        if deaths:
            kernel_flows = KernelFlows(existing_flows, alive_flows, prompt=None, check=check_flows)
        self.service = StackTrans(
            DataplaneConfig(mode=DataplaneMode(mode), sweep_interval=3600, safety_sweep=3600),
            clock=self.loop.time,
            hid_for=self.hid_for,
            kernel_flows=kernel_flows,
        )
        self.locals = {ip_address(a) for a in locals_}

    def lookup(self, addr: IPAddress) -> HostSnapshot | None:
        return next((h for h in self.hosts.values() if addr in h.active), None)

    def hid_for(
        self, remote: IPAddress, local: IPAddress, now: float, origin: FlowOrigin
    ) -> int | None:
        """What the engine's flow_started does, without the HELLO."""
        host = self.lookup(remote)
        if host is not None:
            return host.hid
        hid = max(self.hosts, default=0) + 1
        self.new_hids.append(hid)
        # Like the engine's events: they reach StackTrans after this packet's verdict.
        self.set(HostSnapshot(hid, (remote,), frozenset(), (), None, HidState.HELLO_PENDING))
        return hid

    def set(self, after: HostSnapshot) -> None:
        before = self.hosts.get(after.hid)
        self.hosts[after.hid] = after
        kind = ChangeKind.CREATED if before is None else ChangeKind.UPDATED
        change = HostChanged(kind, after.hid, before, after, "test")
        self.loop.call_soon(self.service.host_changed, change)

    def host(self, msg: dict[str, Any]) -> dict[str, Any]:
        addr = ip_address(msg["addr"])
        host = self.lookup(addr)
        hid = host.hid if host is not None else max(self.hosts, default=0) + 1
        self.set(
            HostSnapshot(
                hid,
                tuple(ip_address(a) for a in msg.get("active", [])),
                frozenset(),
                tuple(ip_address(a) for a in msg.get("local", [])),
                None,
                HidState(msg.get("state", "established")),
            )
        )
        return {"hid": hid}

    def dump(self) -> dict[str, Any]:
        dp = self.service.dataplane
        assert dp is not None
        return {
            "mode": self.service.mode.value,
            "hids": [
                {
                    "hid": h.hid,
                    "active": [str(a) for a in h.active],
                    "local": [str(a) for a in h.local],
                }
                for h in self.hosts.values()
            ],
            "flows": [
                {
                    "flow": str(e.key),
                    "hid": e.hid,
                    "local": str(e.key.local),
                    "remote": str(e.key.remote),
                    "rport": e.key.rport,
                }
                for e in dp.sockets
            ],
            "ghosts": sorted(map(str, self.service.ghosts.addresses)),
            "new_hids": self.new_hids,
            "counters": self.service.counters(),
        }

    async def serve(self) -> None:
        await self.service.start(self.locals)
        print(json.dumps({"ready": True, "mode": self.service.mode.value}), flush=True)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        try:
            while line := await reader.readline():
                msg = json.loads(line)
                cmd = msg["cmd"]
                if cmd == "stop":
                    break
                if cmd == "host":
                    out = self.host(msg)
                elif cmd == "locals":
                    self.service.set_local_addresses({ip_address(a) for a in msg["addrs"]})
                    out = {}
                else:
                    out = self.dump()
                await asyncio.sleep(0)  # the host changes reach StackTrans
                self.service.flush()
                await self.service.settle()  # ghosts and routes are in the kernel now
                print(json.dumps(out), flush=True)
        finally:
            await self.service.stop()
            print(json.dumps({"stopped": True}), flush=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    args = sys.argv[1:]
    deaths = args[:1] == ["--deaths"]
    mode, *locals_ = args[1:] if deaths else args

    async def run() -> None:
        await Node(mode, locals_, deaths).serve()

    asyncio.run(run())


if __name__ == "__main__":
    main()
