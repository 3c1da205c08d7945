"""StackTrans as a running service: kernel rules, queues, translator, continuity.

The daemon runs one :class:`StackTransService` next to the IHMP engine; the
StackTrans tests run one driven by a test double of IHMP. Everything it puts into
the kernel it records in a :class:`Residue`, so that a later run can remove it
after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from dime.hid_table import HidTable
from stacktrans.continuity import Continuity
from stacktrans.nft import Nft, NftError, NftTable, QueueSpec
from stacktrans.packet_path import PacketPath
from stacktrans.queue import PacketQueue, QueueError
from stacktrans.queue_rules import XtQueueRules, nft_queue_supported
from stacktrans.rto_revert import FlowSeq, Remedy
from stacktrans.socket_table import TCP, FlowKey, SocketEntry
from stacktrans.translator import Translator

IPAddress = IPv4Address | IPv6Address
log = logging.getLogger("dime.stacktrans")


class DataplaneMode(enum.Enum):
    AUTO = "auto"
    NFT = "nft"  # kernel rewrites known flows (nft maps); first packets via NFQUEUE
    NFQUEUE = "nfqueue"  # every packet through user space


class StartError(RuntimeError):
    """A start-up precondition failed; the message says what and how to fix it."""


@dataclass
class DataplaneConfig:
    mode: DataplaneMode = DataplaneMode.AUTO
    queue_out: int = 4731
    queue_in: int = 4732
    ihmp_port: int = 4731
    sweep_interval: float = 2.0
    udp_idle: float = 120.0  # nfqueue mode: a UDP flow silent this long has ended
    adopt: bool = True


@dataclass
class Residue:
    """What this run put into the kernel, for cleanup by a later run."""

    nft_table: bool = False
    xt_rules: dict[str, Any] | None = None
    continuity: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "nft_table": self.nft_table,
            "xt_rules": self.xt_rules,
            "continuity": self.continuity,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Residue:
        return cls(
            bool(data.get("nft_table")), data.get("xt_rules"), dict(data.get("continuity") or {})
        )


#: A sweep lists every socket (and, in nft mode, conntrack entry): at 10k-100k flows
#: that takes seconds of CPU. Waiting SWEEP_DUTY times as long as the last one took
#: keeps it to 1/SWEEP_DUTY of a core; below ~1k flows the interval rules.
SWEEP_DUTY = 20


def sweep_delay(interval: float, last_sweep: float) -> float:
    """Seconds until the next sweep: ``interval``, or longer after a costly sweep."""
    return max(interval, SWEEP_DUTY * last_sweep)


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise StartError(
            "dime needs root (CAP_NET_ADMIN) to install packet rules: run it with sudo"
        )


def resolve_mode(mode: DataplaneMode, nft: Nft) -> DataplaneMode:
    """AUTO -> NFT when the kernel can rewrite with nft maps, else NFQUEUE."""
    if mode is not DataplaneMode.AUTO:
        return mode
    probe = (
        "add table inet dime_probe\n"
        "add map inet dime_probe m { type ipv4_addr : ipv4_addr; }\n"
        "add chain inet dime_probe c { type route hook output priority -140; }\n"
        "add rule inet dime_probe c ip daddr @m ip daddr set ip daddr map @m\n"
        "delete table inet dime_probe\n"
    )
    try:
        nft.run(probe)
    except NftError:
        return DataplaneMode.NFQUEUE
    return DataplaneMode.NFT


class StackTransService:
    def __init__(
        self,
        table: HidTable,
        config: DataplaneConfig,
        *,
        clock: Callable[[], float],
        on_new_hid: Callable[[int, IPAddress], None],
        on_residue: Callable[[Residue], None] = lambda r: None,
        existing_flows: Callable[[], list[FlowKey]] | None = None,
        alive_flows: Callable[[bool], Container[FlowKey]] | None = None,
        prompt_retransmit: Callable[[list[FlowSeq]], Counter[Remedy]] | None = None,
    ) -> None:
        """``existing_flows``, ``alive_flows`` and ``prompt_retransmit`` reach into the
        kernel (sock_diag, raw sockets; see :mod:`stacktrans.adopt`,
        :mod:`stacktrans.sweep`, :mod:`stacktrans.rto_revert`); None turns that part off.
        """
        self.table = table
        self.config = config
        self.clock = clock
        self.residue = Residue()
        self._on_residue = on_residue
        self._on_new_hid = on_new_hid
        self._existing_flows = existing_flows
        self._alive_flows = alive_flows
        self._prompt_retransmit = prompt_retransmit
        self._stalled_hids: set[int] = set()
        self._prompt_task: asyncio.Task[None] | None = None
        self.prompts: Counter[Remedy] = Counter()  # what rto_revert did (status counters)
        self.mode = config.mode
        self.nft: Nft | None = None
        self.kernel: NftTable | None = None
        self.rules: XtQueueRules | None = None
        self.translator: Translator | None = None
        self.path: PacketPath | None = None
        self.continuity = Continuity(on_record=self._record)
        self.queues: list[PacketQueue] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._reconcile_pending = False
        self._reconcile_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, local_addresses: set[IPAddress]) -> None:
        """Install everything; on any failure, remove what was installed and raise."""
        check_privileges()
        try:
            await self._start(local_addresses)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, local_addresses: set[IPAddress]) -> None:
        try:
            self.nft = Nft()
        except NftError as exc:
            raise StartError(str(exc)) from exc
        self.mode = resolve_mode(self.config.mode, self.nft)
        fast = self.mode is DataplaneMode.NFT
        queue = None
        if nft_queue_supported(self.nft):
            # The kernel has the nft queue statement: everything in our own table.
            queue = QueueSpec(
                self.config.queue_out, self.config.queue_in, self.config.ihmp_port, not fast
            )
        loop = asyncio.get_running_loop()
        # New flows' elements are batched for up to 5 ms (one libnftables call for a
        # burst of new flows); a flow that needs rewriting at once flushes at once.
        self.kernel = NftTable(
            self.nft, fast_path=fast, queue=queue, defer=lambda fn: loop.call_later(0.005, fn)
        )
        try:
            self.kernel.install()
        except NftError as exc:
            raise StartError(f"cannot install the nft table inet dime: {exc}") from exc
        self.residue.nft_table = True
        self._record()
        if queue is None:
            self._install_xt_rules(fast)
        log.info("queue rules: %s", "nft queue" if queue else "iptables NFQUEUE target")
        self.translator = Translator(
            self.table,
            self.kernel,
            on_new_hid=self._on_new_hid,
            on_host_gone=self._host_gone,
            on_change=self.schedule_reconcile,
            on_path_change=self._path_changed,
        )
        self.translator.set_local_addresses(local_addresses)
        self.path = PacketPath(self.translator, self.table, self.clock)
        for num, handler in (
            (self.config.queue_out, self.path.outbound),
            (self.config.queue_in, self.path.inbound),
        ):
            pq = PacketQueue(num, handler)
            try:
                pq.start(loop)
            except QueueError as exc:
                raise StartError(str(exc)) from exc
            self.queues.append(pq)
        if self.config.adopt and self._existing_flows is not None:
            flows = await asyncio.to_thread(self._existing_flows)
            n = self.translator.adopt(flows, self.clock())
            log.info("adopted %d existing flows", n)
        if self._alive_flows is not None:
            self._tasks.append(asyncio.create_task(self._sweeper()))
        log.info("StackTrans up: dataplane %s", self.mode.value)

    def _install_xt_rules(self, fast: bool) -> None:
        assert self.nft is not None
        self.rules = XtQueueRules(
            self.config.queue_out,
            self.config.queue_in,
            self.config.ihmp_port,
            every_packet=not fast,
        )
        # Recorded before installing: a crash half-way must still be cleaned up.
        self.residue.xt_rules = {"created_tables": [], **self._rules_json()}
        self._record()
        try:
            self.rules.install(self.nft)
        except RuntimeError as exc:
            raise StartError(str(exc)) from exc
        self.residue.xt_rules = self._rules_json()
        self._record()

    async def stop(self) -> None:
        """Remove everything this run installed. Safe to call more than once."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for queue in self.queues:
            queue.stop()
        self.queues.clear()
        if self.kernel is not None:
            self.kernel.flush()  # the table goes next: nothing may be left queued
        if self.translator is not None:
            self.translator.close()
        for pending in (self._reconcile_task, self._prompt_task):
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        await cleanup(self.residue, self.nft, self.continuity)
        self._record()

    def _rules_json(self) -> dict[str, Any]:
        assert self.rules is not None
        return {
            "created_tables": list(self.rules.created_tables),
            "queues": [self.config.queue_out, self.config.queue_in],
            "port": self.config.ihmp_port,
        }

    def _record(self) -> None:
        self.residue.continuity = self.continuity.state()
        self._on_residue(self.residue)

    # -- addresses --------------------------------------------------------------------

    def local_added(self, addr: IPAddress) -> None:
        if self.translator is not None:
            self.translator.local_added(addr)

    def local_removed(self, addr: IPAddress) -> None:
        if self.translator is not None:
            self.translator.local_removed(addr)

    def is_ghost(self, addr: IPAddress) -> bool:
        return addr in self.continuity.ghosts

    # -- continuity -------------------------------------------------------------------

    def schedule_reconcile(self) -> None:
        """Coalesce ghost/route reconciliation into one task at a time."""
        if self._reconcile_pending:
            return
        self._reconcile_pending = True
        self._reconcile_task = asyncio.get_running_loop().create_task(self._reconcile())

    async def settle(self) -> None:
        """Wait until pending ghost/route changes are in the kernel."""
        while self._reconcile_task is not None and not self._reconcile_task.done():
            await asyncio.gather(self._reconcile_task, return_exceptions=True)

    async def _reconcile(self) -> None:
        await asyncio.sleep(0)
        self._reconcile_pending = False
        if self.translator is None:
            return
        await self.continuity.reconcile(
            self.translator.ghosts_needed(), self.translator.translated_remotes()
        )

    # -- flows ------------------------------------------------------------------------

    async def _sweeper(self) -> None:
        assert self._alive_flows is not None
        delay = self.config.sweep_interval
        while True:
            await asyncio.sleep(delay)
            taken_at = self.clock()
            started = time.monotonic()
            try:
                # conntrack only where it times UDP flows out: in nfqueue mode the
                # daemon does (and listing 100k conntrack entries costs seconds).
                alive = await asyncio.to_thread(self._alive_flows, self.mode is DataplaneMode.NFT)
            except Exception:
                log.exception("listing live flows failed")
                continue
            finally:
                delay = sweep_delay(self.config.sweep_interval, time.monotonic() - started)
            if self.translator is not None:
                # In nfqueue mode every packet refreshes last_seen: idle UDP times out.
                idle = self.config.udp_idle if self.mode is DataplaneMode.NFQUEUE else None
                gone = self.translator.sweep(alive, self.clock(), idle, taken_at)
                if gone:
                    log.info("%d flows ended", len(gone))

    def _path_changed(self, hid: int) -> None:
        if self._prompt_retransmit is None:
            return
        self._stalled_hids.add(hid)
        if self._prompt_task is None or self._prompt_task.done():
            self._prompt_task = asyncio.get_running_loop().create_task(self._prompt_stalled())

    async def _prompt_stalled(self) -> None:
        """TCP flows of hosts whose path changed send now, not when their backed-off
        timer says (:mod:`stacktrans.rto_revert`)."""
        assert self._prompt_retransmit is not None
        await asyncio.sleep(0)  # the rest of this burst of table changes first
        while self._stalled_hids and self.translator is not None:
            hids, self._stalled_hids = self._stalled_hids, set()
            if self.kernel is not None:
                self.kernel.flush()  # the new locators must be in the kernel first
            flows = [
                FlowSeq(e.key, e.isn, e.peer_isn)
                for hid in hids
                for e in self.translator.sockets.flows_of(hid)
                if e.key.proto == TCP and e.isn is not None
            ]
            log.debug("path changed for HIDs %s: %d TCP flows with a known ISN", hids, len(flows))
            if not flows:
                continue
            try:
                done = await asyncio.to_thread(self._prompt_retransmit, flows)
            except Exception:
                log.exception("prompting TCP flows failed")
                continue
            self.prompts.update(done)
            if done:
                log.info("%d stalled TCP flows prompted to send", sum(done.values()))

    def _host_gone(self, flows: list[SocketEntry]) -> None:
        # The nft reject path answers the next packet; destroying the TCP sockets
        # now means even an idle application learns it at once.
        tcp = [e for e in flows if e.key.proto == TCP]
        if tcp:
            asyncio.get_running_loop().create_task(destroy_sockets(tcp))


async def destroy_sockets(flows: list[SocketEntry]) -> None:
    """Close TCP sockets with sock_diag's SOCK_DESTROY (``ss -K``), one call per 50."""
    for i in range(0, len(flows), 50):
        terms = [
            f"( src {_ss_addr(e.key.local)} and sport = :{e.key.lport} "
            f"and dst {_ss_addr(e.key.remote)} and dport = :{e.key.rport} )"
            for e in flows[i : i + 50]
        ]
        proc = await asyncio.create_subprocess_exec(
            "ss",
            "-K",
            "-t",
            " or ".join(terms),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await proc.wait()


def _ss_addr(addr: IPAddress) -> str:
    return f"[{addr}]" if addr.version == 6 else str(addr)


async def cleanup(residue: Residue, nft: Nft | None, continuity: Continuity | None = None) -> None:
    """Remove everything ``residue`` says was installed (also after a crash)."""
    if continuity is None:
        continuity = Continuity.from_state(residue.continuity)
    await continuity.clear()
    residue.continuity = continuity.state()
    if residue.xt_rules is not None:
        rules = XtQueueRules(
            0,
            0,
            0,
            every_packet=False,
            created_tables=list(residue.xt_rules.get("created_tables", [])),
        )
        try:
            rules.remove(nft)
        except NftError as exc:
            log.warning("removing queue rules: %s", exc)
        residue.xt_rules = None
    if residue.nft_table and nft is not None:
        try:
            NftTable(nft, fast_path=False).uninstall()
        except NftError as exc:
            log.warning("removing table inet dime: %s", exc)
        residue.nft_table = False
