"""The Dataplane and translation rules, with a recording stand-in for the kernel.

A HID table stands in for IHMP: its changes go straight to the Dataplane, as the
engine's HostChanged events do in the daemon.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from ihmp.addr import IPAddress
from ihmp.hosts import HidTable
from ihmp.states import Trigger
from stacktrans.dataplane import Dataplane
from stacktrans.nft import NftError, NftTable
from stacktrans.service import SWEEP_DUTY, sweep_delay
from stacktrans.socket_table import TCP, UDP, FlowKey
from stacktrans.translation import HidTranslation
from tests.ihmp_double import IhmpDouble

A = ip_address
LOCAL, PEER, PEER2 = A("192.0.2.1"), A("198.51.100.2"), A("203.0.113.2")


class FakeNft:
    """Records the batches NftTable would hand to libnftables."""

    def __init__(self) -> None:
        self.batches: list[str] = []

    def run(self, commands: str) -> str:
        self.batches.append(commands)
        return ""


def dataplane(nft: FakeNft) -> tuple[Dataplane, HidTable, list[tuple[int, IPAddress]]]:
    """A Dataplane following a HID table, whose new flows create hosts in it."""
    kernel = NftTable(nft, fast_path=True)  # type: ignore[arg-type]
    kernel.install()
    nft.batches.clear()
    return dataplane_over(kernel)


def dataplane_over(kernel: NftTable) -> tuple[Dataplane, HidTable, list[tuple[int, IPAddress]]]:
    ihmp = IhmpDouble()
    return ihmp.attach(kernel), ihmp.table, ihmp.new_hids


def make(n_flows: int = 3) -> tuple[Dataplane, HidTable, FakeNft, list[tuple[int, IPAddress]]]:
    nft = FakeNft()
    tr, table, new_hids = dataplane(nft)
    tr.set_local_addresses({LOCAL})
    for i in range(n_flows):
        tr.flow_seen(FlowKey(TCP, LOCAL, 40000 + i, PEER, 80), now=0.0)
    return tr, table, nft, new_hids


def test_first_flow_creates_one_hid_and_prompts_one_hello() -> None:
    tr, table, _, new_hids = make(3)
    assert len(table) == 1 and new_hids == [(table.lookup(PEER).hid, LOCAL)]  # type: ignore[union-attr]
    assert len(tr.sockets) == 3


def test_a_handoff_is_one_kernel_batch_whatever_the_number_of_flows() -> None:
    for n in (1, 50, 500):
        tr, table, nft, _ = make(n)
        hid = table.lookup(PEER).hid  # type: ignore[union-attr]
        table.transition(hid, Trigger.HELLO_ACKED)
        nft.batches.clear()
        # What IHMP does on a HANDOFF: the new address first, then the old one goes.
        table.add_active(hid, PEER2, prefer=True)
        table.remove_address(hid, PEER)
        rewrites = [b for b in nft.batches if "rloc4" in b]
        assert len(rewrites) == 1, (n, nft.batches)
        assert f"add element inet dime rloc4 {{ {PEER} : {PEER2} }}" in rewrites[0]
        assert all("flows4" not in b for b in nft.batches)  # no per-flow update
        learnable = frozenset({(LOCAL, PEER2)})
        want = HidTranslation(hid, {PEER: PEER2}, {}, frozenset({PEER2}), learnable)
        assert tr.translation(hid) == want


def test_local_side_rewrite_only_when_the_peer_cannot_reach_the_identifier() -> None:
    tr, table, _, _ = make(1)
    hid = table.lookup(PEER).hid  # type: ignore[union-attr]
    table.add_local(hid, LOCAL)
    assert tr.translation(hid).local == {}  # type: ignore[union-attr]
    new_local = A("192.0.2.99")
    tr.set_local_addresses({new_local})
    table.remove_local(hid, LOCAL)
    table.add_local(hid, new_local)
    assert tr.translation(hid).local == {(LOCAL, PEER): new_local}  # type: ignore[union-attr]
    assert tr.ghosts_needed() == {LOCAL}


def test_legacy_hosts_are_never_rewritten() -> None:
    tr, table, _, _ = make(1)
    hid = table.lookup(PEER).hid  # type: ignore[union-attr]
    table.add_active(hid, PEER2, prefer=True)
    table.remove_address(hid, PEER)
    table.transition(hid, Trigger.HELLO_UNANSWERED)
    assert tr.translation(hid).remote == {}  # type: ignore[union-attr]


def test_sweep_drops_dead_flows_and_idle_udp() -> None:
    tr, _, _, _ = make(2)
    udp = FlowKey(UDP, LOCAL, 5000, PEER, 53)
    tr.flow_seen(udp, now=0.0)
    alive: set[Any] = {FlowKey(TCP, LOCAL, 40000, PEER, 80), udp}
    assert tr.sweep(alive, now=8.0) == []  # missed once: maybe a snapshot's miss
    gone = tr.sweep(alive, now=10.0)
    assert [e.key.lport for e in gone] == [40001]
    assert tr.sweep(alive, now=200.0, udp_idle=120.0)[0].key == udp
    assert {e.key for e in tr.sockets} == {FlowKey(TCP, LOCAL, 40000, PEER, 80)}


def test_sweep_keeps_flows_born_while_the_snapshot_was_taken() -> None:
    """A slow snapshot (100k sockets) misses flows that start meanwhile: keep them."""
    tr, _, _, _ = make(1)
    old = FlowKey(TCP, LOCAL, 40000, PEER, 80)
    born = FlowKey(UDP, LOCAL, 5000, PEER, 53)
    tr.flow_seen(born, now=5.0)  # first packet after the snapshot began at 4.0
    assert tr.sweep(set(), now=3.0, taken_at=2.0) == []  # old: first miss
    gone = tr.sweep(set(), now=6.0, taken_at=4.0)
    assert [e.key for e in gone] == [old]
    assert {e.key for e in tr.sockets} == {born}
    assert tr.sweep(set(), now=9.0, taken_at=6.0) == []
    assert [e.key for e in tr.sweep(set(), now=12.0, taken_at=10.0)] == [born]


def test_a_flow_missing_from_one_snapshot_only_stays() -> None:
    """The kernel's listings can skip a live entry while other namespaces churn
    theirs: a flow found again by the next sweep is not dropped."""
    tr, _, _, _ = make(1)
    key = FlowKey(TCP, LOCAL, 40000, PEER, 80)
    for now in (2.0, 6.0, 10.0):
        assert tr.sweep(set(), now=now) == []  # missed ...
        assert tr.missing_once == {key}
        assert tr.sweep({key}, now=now + 2) == []  # ... and found again
        assert tr.missing_once == set()
    assert {e.key for e in tr.sockets} == {key}


def test_removed_hid_fails_its_flows() -> None:
    nft = FakeNft()
    tr, table, _ = dataplane(nft)
    tr.set_local_addresses({LOCAL})
    tr.flow_seen(FlowKey(TCP, LOCAL, 40000, PEER, 80), now=0.0)
    tr.take_effects()
    table.remove(table.lookup(PEER).hid)  # type: ignore[union-attr]
    failed = tr.take_effects().failed
    assert [e.key.lport for e in failed] == [40000]
    assert len(tr.sockets) == 0
    assert any("add element inet dime dead4" in b for b in nft.batches)


def test_a_costly_sweep_waits_longer_before_the_next() -> None:
    assert sweep_delay(2.0, 0.01) == 2.0  # cheap: the configured interval
    assert sweep_delay(2.0, 1.5) == 1.5 * SWEEP_DUTY  # 1.5 s of work: 1/20 of a core


class RefusingNft(FakeNft):
    """Refuses any batch holding ``bad`` (an element the kernel would not take)."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    def run(self, commands: str) -> str:
        if self.bad in commands:
            raise NftError(f"refused: {self.bad}")
        return super().run(commands)


def test_install_with_a_refused_element_installs_the_rest() -> None:
    """A takeover's first batch holds the tables and every element at once; one bad
    element must not keep dime from starting, nor cost the other elements."""
    nft = RefusingNft("203.0.113.9")
    kernel = NftTable(nft, fast_path=True)  # type: ignore[arg-type]
    tr, _, _ = dataplane_over(kernel)
    tr.set_local_addresses({LOCAL})
    tr.flow_seen(FlowKey(TCP, LOCAL, 40000, PEER, 80), now=0.0)
    tr.flow_seen(FlowKey(TCP, LOCAL, 40001, A("203.0.113.9"), 80), now=0.0)
    kernel.install()
    assert kernel.installed
    assert any("table inet dime" in b for b in nft.batches)  # the tables alone
    assert any(f"{PEER}" in b and "flows4" in b for b in nft.batches)  # the good flow


def test_a_refused_batch_is_retried_command_by_command_as_queued() -> None:
    """A batch goes to libnftables with each set's elements merged into one command;
    refused, its commands are retried one by one as they were queued, so that one
    bad element costs no other (merged with it or not)."""
    nft = RefusingNft("203.0.113.9")
    kernel = NftTable(nft, fast_path=True, defer=lambda fn: None)  # type: ignore[arg-type]
    tr, _, _ = dataplane_over(kernel)
    tr.set_local_addresses({LOCAL})
    kernel.install()
    nft.batches.clear()
    tr.flow_seen(FlowKey(TCP, LOCAL, 40000, PEER, 80), now=0.0)
    tr.flow_seen(FlowKey(TCP, LOCAL, 40001, A("203.0.113.9"), 80), now=0.0)
    tr.flow_seen(FlowKey(TCP, LOCAL, 40002, PEER, 80), now=0.0)
    kernel.flush()
    flows = [b for b in nft.batches if b.startswith("add element inet dime flows4")]
    assert flows and all(b.count("\n") == 0 for b in nft.batches)  # one by one
    assert any(" 40000 " in b for b in flows) and any(" 40002 " in b for b in flows)
    assert not any("203.0.113.9" in b for b in nft.batches)


def test_a_batch_merges_each_sets_elements_into_one_command() -> None:
    nft = FakeNft()
    kernel = NftTable(nft, fast_path=True, defer=lambda fn: None)  # type: ignore[arg-type]
    tr, _, _ = dataplane_over(kernel)
    tr.set_local_addresses({LOCAL})
    kernel.install()
    nft.batches.clear()
    for port in (40000, 40001, 40002):
        tr.flow_seen(FlowKey(TCP, LOCAL, port, PEER, 80), now=0.0)
    kernel.flush()
    lines = "\n".join(nft.batches).splitlines()
    flows = [line for line in lines if line.startswith("add element inet dime flows4 ")]
    assert len(flows) == 1 and flows[0].count(",") == 2, lines


# -- what the kernel may learn by itself (nft mode) ---------------------------------------


def test_the_kernel_learns_flows_only_where_the_daemon_would_decide_nothing_new() -> None:
    """learnable: a new flow to an active address from an address the peer reaches
    (or from any of ours while it has none) changes no rewrite; to another address of
    the host, from an address it does not reach, or to a host behind a NAT, it may."""
    tr, table, nft, _ = make(1)
    hid = table.lookup(PEER).hid  # type: ignore[union-attr]
    other = A("192.0.2.7")
    tr.set_local_addresses({LOCAL, other, A("2001:db8::1")})
    assert tr.translation(hid).learnable == {(LOCAL, PEER), (other, PEER)}  # type: ignore[union-attr]
    table.transition(hid, Trigger.HELLO_ACKED)
    table.add_local(hid, LOCAL)
    table.add_active(hid, PEER2, prefer=True)
    table.mark_unreachable(hid, PEER)
    tr.set_local_addresses({LOCAL, other})
    # PEER is unreachable now: flows to it are rewritten, so the daemon decides.
    assert tr.translation(hid).learnable == {(LOCAL, PEER2)}  # type: ignore[union-attr]
    batch = "\n".join(nft.batches)
    assert f"add element inet dime learn4 {{ {LOCAL} . {PEER2} : {hid} }}" in batch
    assert f"delete element inet dime learn4 {{ {other} . {PEER} }}" in batch
    table.set_nat(hid, PEER2, A("10.0.0.2"))
    assert tr.translation(hid).learnable == frozenset()  # type: ignore[union-attr]


def test_a_flow_the_kernel_learned_is_not_added_again_and_still_moves() -> None:
    """A notice says the kernel holds the flow (it learned it): no element goes
    through libnftables again when the pair is one the kernel learns for that host;
    for a host the kernel could not have learned it for, its elements are added. A
    learned flow moves with its host all the same, and is removed when it ends."""
    tr, table, nft, _ = make(1)
    hid = table.lookup(PEER).hid  # type: ignore[union-attr]
    nft.batches.clear()
    learned = FlowKey(TCP, LOCAL, 41000, PEER, 80)
    assert tr.flow_seen(learned, 0.0, in_kernel=True) is not None
    assert not any(":41000" in b or " 41000 " in b for b in nft.batches), nft.batches
    assert tr.learned_by_kernel == 1
    # A new host has no translation yet: the kernel learned nothing for it.
    stranger = FlowKey(TCP, LOCAL, 41001, A("198.51.100.9"), 80)
    tr.flow_seen(stranger, 0.0, in_kernel=True)
    assert any("flows4" in b and " 41001 " in b for b in nft.batches), nft.batches
    assert tr.learned_by_kernel == 1
    # The host moves: its rewrite covers the learned flow (keyed by identifier).
    table.transition(hid, Trigger.HELLO_ACKED)
    table.add_active(hid, PEER2, prefer=True)
    table.remove_address(hid, PEER)
    assert tr.translation(hid).outbound(LOCAL, PEER) == (None, PEER2)  # type: ignore[union-attr]
    assert any(f"rloc4 {{ {PEER} : {PEER2} }}" in b for b in nft.batches), nft.batches
    nft.batches.clear()
    tr.sweep(alive=set(), now=1.0)
    tr.sweep(alive=set(), now=2.0)
    assert any("delete element" in b and " 41000 " in b for b in nft.batches), nft.batches


def test_a_flow_on_a_pair_in_use_leaves_the_translation_as_it_was() -> None:
    """A new flow between addresses the host's flows use already changes nothing of
    its translation; a new pair does."""
    tr, table, nft, _ = make(1)
    hid = table.lookup(PEER).hid  # type: ignore[union-attr]
    other = A("192.0.2.7")
    tr.set_local_addresses({LOCAL, other})
    table.transition(hid, Trigger.HELLO_ACKED)
    table.add_local(hid, LOCAL)  # the peer reaches us at LOCAL only
    before = tr.translation(hid)
    nft.batches.clear()
    for i in range(5):
        tr.flow_seen(FlowKey(TCP, LOCAL, 42000 + i, PEER, 80), 0.0)
    assert tr.translation(hid) == before
    assert not any("rloc4" in b or "lloc4" in b for b in nft.batches)
    tr.flow_seen(FlowKey(TCP, other, 42100, PEER, 80), 0.0)
    assert tr.translation(hid).outbound(other, PEER) == (LOCAL, None)  # type: ignore[union-attr]
    assert any(f"lloc4 {{ {other} . {PEER} : {LOCAL} }}" in b for b in nft.batches)


def test_a_legacy_host_is_learnable_at_all_its_addresses() -> None:
    tr, table, _, _ = make(1)
    hid = table.lookup(PEER).hid  # type: ignore[union-attr]
    table.add_active(hid, PEER2)
    table.mark_unreachable(hid, PEER2)
    table.transition(hid, Trigger.HELLO_UNANSWERED)
    assert tr.translation(hid).learnable == {(LOCAL, PEER), (LOCAL, PEER2)}  # type: ignore[union-attr]
