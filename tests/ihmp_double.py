"""IHMP's part, for StackTrans tests that run without an engine.

A real HID table whose every change goes straight to a Dataplane (as the engine's
HostChanged events do through the daemon's pump), and a ``hid_for`` that creates a
host for a new flow's unknown address, as :meth:`IhmpEngine.flow_started` does,
minus the HELLO: new hosts are recorded in ``new_hids`` instead.
"""

from __future__ import annotations

from ihmp.addr import IPAddress
from ihmp.hosts import FlowOrigin, HidTable, HostChanged
from ihmp.states import Trigger
from stacktrans.dataplane import Dataplane, KernelMaps


class IhmpDouble:
    def __init__(self) -> None:
        self.table = HidTable(self._changed)
        self.new_hids: list[tuple[int, IPAddress]] = []
        self.origins: list[FlowOrigin] = []  # whose packet made each new host
        self.dataplane: Dataplane | None = None

    def attach(self, kernel: KernelMaps) -> Dataplane:
        """A Dataplane over ``kernel`` that follows this table."""
        self.dataplane = Dataplane(kernel, self.hid_for)
        return self.dataplane

    def hid_for(self, remote: IPAddress, local: IPAddress, now: float, origin: FlowOrigin) -> int:
        host = self.table.lookup(remote)
        if host is None:
            host = self.table.create([remote], Trigger.HELLO_SENT)
            self.new_hids.append((host.hid, local))
            self.origins.append(origin)
        return host.hid

    def _changed(self, change: HostChanged) -> None:
        if self.dataplane is not None:
            self.dataplane.host_changed(change)
