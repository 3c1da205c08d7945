"""A StackTrans node for the data-plane tests, run inside a network namespace.

It runs the real StackTransService (nft maps, NFQUEUE, ghosts, routes), with a test
double in place of IHMP: the test sets the HID table the way IHMP would, through
JSON commands on stdin, one per line; each gets one JSON reply line on stdout.

  {"cmd": "host", "addr": A, "active": [...], "local": [...], "state": "established"}
      find the HID owning A (or create it) and make its sets exactly these
  {"cmd": "locals", "addrs": [...]}       this host's current addresses
  {"cmd": "dump"}                          HIDs, flows, translations
  {"cmd": "stop"}                          clean up and exit
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from ipaddress import ip_address
from typing import Any

from dime.hid_table import HidState, HidTable
from stacktrans.kernel_flows import existing_flows
from stacktrans.service import DataplaneConfig, DataplaneMode, StackTransService


class Node:
    def __init__(self, mode: str, locals_: list[str]) -> None:
        self.table = HidTable()
        self.new_hids: list[int] = []
        loop = asyncio.get_event_loop()
        self.service = StackTransService(
            self.table,
            DataplaneConfig(mode=DataplaneMode(mode)),
            clock=loop.time,
            on_new_hid=lambda hid, local: self.new_hids.append(hid),
            existing_flows=existing_flows,
        )
        self.locals = {ip_address(a) for a in locals_}

    def host(self, msg: dict[str, Any]) -> dict[str, Any]:
        addr = ip_address(msg["addr"])
        entry = self.table.lookup(addr)
        if entry is None:
            entry = self.table.create([addr])
        hid = entry.hid
        active = [ip_address(a) for a in msg.get("active", [])]
        local = [ip_address(a) for a in msg.get("local", [])]
        for a in reversed(active):
            self.table.add_active(hid, a, prefer=True)
        for a in list(entry.active):
            if a not in active:
                self.table.remove_address(hid, a)
        for a in reversed(local):
            self.table.add_local(hid, a, prefer=True)
        for a in list(entry.local):
            if a not in local:
                self.table.remove_local(hid, a)
        self.table.set_state(hid, HidState(msg.get("state", "established")))
        return {"hid": hid}

    def dump(self) -> dict[str, Any]:
        tr = self.service.translator
        assert tr is not None
        return {
            "mode": self.service.mode.value,
            "hids": [
                {
                    "hid": e.hid,
                    "active": [str(a) for a in e.active],
                    "local": [str(a) for a in e.local],
                }
                for e in self.table
            ],
            "flows": [
                {
                    "flow": str(e.key),
                    "hid": e.hid,
                    "local": str(e.key.local),
                    "remote": str(e.key.remote),
                }
                for e in tr.sockets
            ],
            "ghosts": sorted(map(str, self.service.continuity.ghosts)),
            "new_hids": self.new_hids,
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
                    assert self.service.translator is not None
                    self.service.translator.set_local_addresses(
                        {ip_address(a) for a in msg["addrs"]}
                    )
                    out = {}
                else:
                    out = self.dump()
                await self.service.settle()  # ghosts and routes are in the kernel now
                print(json.dumps(out), flush=True)
        finally:
            await self.service.stop()
            print(json.dumps({"stopped": True}), flush=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    mode, *locals_ = sys.argv[1:]

    async def run() -> None:
        await Node(mode, locals_).serve()

    asyncio.run(run())


if __name__ == "__main__":
    main()
