"""StackTrans' state: the socket table, per-host translations, and the kernel maps.

The :class:`Translator` subscribes to the HID table. Every change of an entry (IHMP
learned an address, a handoff, a state change) is turned at once into the entry's
new :class:`~stacktrans.translation.HidTranslation` and applied to the kernel in one
update, whatever the number of flows. New flows come from the packet path (first
packets) or from adoption at start-up (sock_diag).

Pure bookkeeping plus calls into :class:`~stacktrans.nft.NftTable`; no I/O of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from dime.hid_table import ChangeKind, HidState, HidTable, TableChange
from ihmp.reachability import usable
from stacktrans.socket_table import UDP, FlowKey, SocketEntry, SocketTable
from stacktrans.translation import HidTranslation, compute

IPAddress = IPv4Address | IPv6Address
log = logging.getLogger("dime.stacktrans")


class KernelMaps(Protocol):
    """What the Translator needs from the kernel: :class:`~stacktrans.nft.NftTable`.

    A protocol so tests can record the calls, and mypy checks the recorder.
    """

    def add_flows(self, entries: Iterable[SocketEntry]) -> None: ...
    def remove_flows(self, entries: Iterable[SocketEntry]) -> None: ...
    def kill_flows(self, entries: Iterable[SocketEntry]) -> None: ...
    def forget_dead(self, entries: Iterable[SocketEntry]) -> None: ...
    def update_hid(self, new: HidTranslation | None, hid: int) -> None: ...
    def flush(self) -> None:
        """Apply deferred element updates now."""


class Translator:
    def __init__(
        self,
        table: HidTable,
        kernel: KernelMaps,
        *,
        on_new_hid: Callable[[int, IPAddress], None],
        on_host_gone: Callable[[list[SocketEntry]], None] = lambda flows: None,
        on_change: Callable[[], None] = lambda: None,
        on_path_change: Callable[[int], None] = lambda hid: None,
    ) -> None:
        """``on_new_hid(hid, local)``: a first packet created a HID (say HELLO).
        ``on_host_gone(flows)``: a HID was removed; its flows must fail now.
        ``on_change()``: ghost addresses or routes may need reconciling.
        ``on_path_change(hid)``: the locators of an existing host's flows changed
        (a handoff, either end): its stalled TCP flows may send again.
        """
        self.table = table
        self.kernel = kernel
        self.sockets = SocketTable()
        self.local_addresses: set[IPAddress] = set()
        self._translations: dict[int, HidTranslation] = {}
        self._dead: dict[FlowKey, SocketEntry] = {}
        self._on_new_hid = on_new_hid
        self._on_host_gone = on_host_gone
        self._on_change = on_change
        self._on_path_change = on_path_change
        self._unsubscribe = table.subscribe(self._on_table_change)

    def close(self) -> None:
        self._unsubscribe()

    # -- queries ----------------------------------------------------------------------

    def translation(self, hid: int) -> HidTranslation | None:
        return self._translations.get(hid)

    def ghosts_needed(self) -> set[IPAddress]:
        """Local identifiers in use that this host no longer has: keep them on ``lo``."""
        return {a for a in self.sockets.local_identifiers() if a not in self.local_addresses}

    def translated_remotes(self) -> dict[IPAddress, IPAddress]:
        """Remote identifier -> locator, for every identifier rewritten now."""
        out: dict[IPAddress, IPAddress] = {}
        for tr in self._translations.values():
            out.update(tr.remote)
        return out

    # -- flows ------------------------------------------------------------------------

    def flow_seen(self, key: FlowKey, now: float) -> SocketEntry | None:
        """The first packet of ``key`` (either direction): record it, and its HID.

        Returns the flow's entry, or None for traffic dime leaves alone. Never
        waits for IHMP: a new HID only *prompts* a HELLO.
        """
        entry = self.sockets.get(key)
        if entry is not None:
            entry.last_seen = now
            return entry
        if not (usable(key.remote) and usable(key.local)) or key.remote == key.local:
            return None
        host = self.table.lookup(key.remote)
        created = host is None
        if host is None:
            host = self.table.create([key.remote], state=HidState.HELLO_PENDING, reason="new flow")
        entry = self.sockets.add(key, host.hid, now)
        if entry is None:
            log.warning(
                "flow %s collides with another flow of HID %d; not translated", key, host.hid
            )
            return None
        log.debug("flow %s -> HID %d", key, host.hid)
        self.kernel.add_flows([entry])
        self._refresh(host.hid)
        tr = self._translations.get(host.hid)
        if tr is not None and (
            tr.outbound(key.local, key.remote) != (None, None) or key.remote not in host.active
        ):
            self.kernel.flush()  # its packets need rewriting from the start
        if created or host.state is HidState.LEGACY:
            self._on_new_hid(host.hid, key.local)
        return entry

    def adopt(self, keys: Iterable[FlowKey], now: float) -> int:
        """Take over flows that existed before we started. Returns how many."""
        return sum(1 for key in keys if self.flow_seen(key, now) is not None)

    def sweep(
        self,
        alive: Container[FlowKey],
        now: float,
        udp_idle: float | None = None,
        taken_at: float | None = None,
    ) -> list[SocketEntry]:
        """Drop flows whose socket is gone (``alive`` holds those that still exist),
        and UDP flows idle for more than ``udp_idle`` seconds (when the caller sees
        every packet, so that ``last_seen`` means something).

        ``taken_at`` is when the snapshot ``alive`` began. Flows first seen since
        then are kept whatever it says: a snapshot of 100k sockets takes seconds,
        and a flow born meanwhile may be missing from it. Dropping such a flow
        would be for good in ``nft`` mode, whose packets are no longer "new".
        """
        gone = [
            e
            for e in self.sockets
            if (taken_at is None or e.created < taken_at)
            and (
                e.key not in alive
                or (udp_idle is not None and e.key.proto == UDP and now - e.last_seen > udp_idle)
            )
        ]
        self._remove_flows(gone)
        dead_gone = [e for k, e in self._dead.items() if k not in alive]
        if dead_gone:
            self.kernel.forget_dead(dead_gone)
            for e in dead_gone:
                del self._dead[e.key]
        return gone

    def _remove_flows(self, entries: list[SocketEntry]) -> None:
        if not entries:
            return
        for e in entries:
            self.sockets.remove(e.key)
        self.kernel.remove_flows(entries)
        for hid in {e.hid for e in entries}:
            self._refresh(hid)
        self._on_change()

    # -- this host's addresses ---------------------------------------------------------

    def set_local_addresses(self, addrs: Iterable[IPAddress]) -> None:
        self.local_addresses = set(addrs)
        for hid in list(self._translations):
            self._refresh(hid)
        self._on_change()

    def local_added(self, addr: IPAddress) -> None:
        self.set_local_addresses(self.local_addresses | {addr})

    def local_removed(self, addr: IPAddress) -> None:
        self.set_local_addresses(self.local_addresses - {addr})

    # -- HID table changes -------------------------------------------------------------

    def _on_table_change(self, change: TableChange) -> None:
        if change.kind is ChangeKind.REMOVED:
            self._host_gone(change.hid)
        else:
            self._refresh(change.hid)

    def _refresh(self, hid: int) -> None:
        if hid not in self.table:
            return
        new = compute(self.table.get(hid), self.sockets.pairs_of(hid), self.local_addresses)
        old = self._translations.get(hid)
        if new == old:
            return
        self._translations[hid] = new
        self.kernel.update_hid(new, hid)
        if old is None or old.remote != new.remote or old.local != new.local:
            log.info(
                "HID %d: rewrite remote %s local %s",
                hid,
                {str(k): str(v) for k, v in new.remote.items()},
                {f"{k[0]}>{k[1]}": str(v) for k, v in new.local.items()},
            )
            self._on_change()
            if old is not None:
                self._on_path_change(hid)

    def _host_gone(self, hid: int) -> None:
        flows = self.sockets.remove_hid(hid)
        self._translations.pop(hid, None)
        self.kernel.update_hid(None, hid)
        if flows:
            self.kernel.remove_flows(flows)
            self.kernel.kill_flows(flows)
            for e in flows:
                self._dead[e.key] = e
            log.info("HID %d removed: failing %d flows", hid, len(flows))
            self._on_host_gone(flows)
        self._on_change()
