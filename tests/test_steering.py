"""Per-flow locators without a kernel: the policy and ``dime move`` steer a flow to
another local address of ours (asked of the peer, then ``via`` and a ``wsrc``
element), the peer's FLOW_MOVE pins a flow to one of its addresses, and the
user-space path sends a steered flow from its own locator."""

from __future__ import annotations

from ipaddress import ip_address

from ihmp.flows import FlowSpec
from ihmp.hosts import HidTable
from ihmp.states import Trigger
from stacktrans.dataplane import Dataplane
from stacktrans.nft import _via_elements
from stacktrans.packet import parse
from stacktrans.policy import Policy, Rule
from stacktrans.service import DataplaneConfig, StackTrans
from stacktrans.socket_table import TCP, FlowKey, SocketEntry
from stacktrans.userspace import UserspacePath
from tests.test_dataplane import LOCAL, PEER, PEER2, FakeNft, dataplane
from tests.test_nat_dataplane import _l4_ok, _tcp

A = ip_address
ADDR2, ADDR3 = A("192.0.2.2"), A("192.0.2.3")
KEY = FlowKey(TCP, LOCAL, 40000, PEER, 80)
NAMES = {LOCAL: "m1", ADDR2: "m2", ADDR3: "m3"}
WSRC2 = f"wsrc4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 : {ADDR2} }}"


def steered(
    policy: Policy | None = None,
) -> tuple[Dataplane, HidTable, FakeNft, int]:
    """One flow (KEY) on LOCAL (m1); the peer reaches us at ADDR2 (m2) and ADDR3
    (m3) as well, all three working; ``policy`` set, effects so far taken."""
    nft = FakeNft()
    tr, table, _ = dataplane(nft)
    tr.set_local_addresses(set(NAMES))
    tr.set_interfaces(dict(NAMES))
    assert tr.flow_seen(KEY, now=0.0) is not None
    host = table.lookup(PEER)
    assert host is not None
    hid = host.hid
    table.transition(hid, Trigger.HELLO_ACKED)
    for addr in NAMES:
        table.add_local(hid, addr)
    if policy is not None:
        tr.set_policy(policy)
    return tr, table, nft, hid


def _text(nft: FakeNft) -> str:
    return "\n".join(nft.batches)


def _entry(tr: Dataplane) -> SocketEntry:
    entry = tr.sockets.get(KEY)
    assert entry is not None
    return entry


def _moved(tr: Dataplane, via: object) -> None:
    """The peer acknowledged the move the Dataplane asked for."""
    moves = tr.take_effects().moves
    assert moves == {KEY: via}
    tr.move_started(KEY, moves[KEY])
    tr.move_done(KEY, moves[KEY])


# -- the policy ----------------------------------------------------------------------


def test_a_policy_rule_places_a_flow_on_its_interface() -> None:
    tr, _, nft, _ = steered(Policy((Rule(0, via=("m2",)),)))
    assert tr.take_effects().moves == {KEY: ADDR2}
    tr.move_started(KEY, ADDR2)
    tr.set_local_addresses(set(NAMES))  # the same again: asked already, not twice
    assert tr.take_effects().moves == {}
    assert not tr.is_at(KEY, ADDR2)  # in flight
    assert WSRC2 not in _text(nft)
    tr.move_done(KEY, ADDR2)
    assert _entry(tr).via == ADDR2 and tr.via_of(_entry(tr)) == ADDR2
    assert tr.is_at(KEY, ADDR2)
    assert f"add element inet dime {WSRC2}" in _text(nft)
    assert tr.take_effects().moves == {}  # where the rule wants it
    # Back to its identifier: no locator of its own, the element goes.
    nft.batches.clear()
    tr.move_started(KEY, LOCAL)
    tr.move_done(KEY, LOCAL)
    assert _entry(tr).via is None and tr.via_of(_entry(tr)) == LOCAL
    assert f"delete element inet dime wsrc4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 }}" in _text(nft)


def test_without_a_policy_nothing_is_ever_asked() -> None:
    tr, table, nft, hid = steered()
    tr.flow_seen(FlowKey(TCP, ADDR2, 40001, PEER, 80), now=0.0)
    tr.local_removed(ADDR3)
    tr.local_added(ADDR3)
    table.remove_local(hid, ADDR3)
    tr.set_interfaces({LOCAL: "m1", ADDR2: "m2"})
    assert tr.take_effects().moves == {}
    assert "wsrc" not in _text(nft)
    assert all(e.via is None and e.rule is None for e in tr.sockets)


def test_a_rule_for_other_flows_asks_nothing() -> None:
    tr, _, nft, _ = steered(Policy((Rule(0, local_port=5001, via=("m2",)),)))
    assert tr.take_effects().moves == {}
    assert "wsrc" not in _text(nft) and _entry(tr).rule is None


def test_a_policy_that_goes_asks_the_flow_back_to_its_identifier() -> None:
    tr, _, _, _ = steered(Policy((Rule(0, via=("m2",)),)))
    _moved(tr, ADDR2)
    tr.set_policy(Policy())
    assert tr.take_effects().moves == {KEY: LOCAL}


# -- dime move -----------------------------------------------------------------------


def test_request_move_refuses_what_cannot_be() -> None:
    tr, table, _, hid = steered()
    unknown = FlowKey(TCP, LOCAL, 49999, PEER, 80)
    assert "no flow" in (tr.request_move(unknown, ADDR2) or "")
    not_verified = A("192.0.2.4")  # ours, but the peer has not verified it
    tr.local_added(not_verified)
    assert "not verified" in (tr.request_move(KEY, not_verified) or "")
    v6 = A("2001:db8::1")  # ours and verified, but the flow is IPv4
    tr.local_added(v6)
    table.add_local(hid, v6)
    assert "IP version" in (tr.request_move(KEY, v6) or "")
    assert tr.take_effects().moves == {}
    assert _entry(tr).via is None


def test_request_move_asks_the_peer_and_is_done_when_it_acknowledges() -> None:
    tr, _, nft, _ = steered()
    assert tr.request_move(KEY, ADDR3) is None
    moves = tr.take_effects().moves
    assert moves == {KEY: ADDR3}
    tr.move_started(KEY, ADDR3)
    assert not tr.is_at(KEY, ADDR3)
    tr.move_done(KEY, ADDR3)
    assert tr.is_at(KEY, ADDR3) and not tr.is_at(KEY, LOCAL)
    assert f"wsrc4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 : {ADDR3} }}" in _text(nft)
    assert tr.take_effects().moves == {}  # the user's choice stays


def test_a_failed_move_is_asked_again_on_the_next_change() -> None:
    tr, _, _, _ = steered(Policy((Rule(0, via=("m2",)),)))
    assert tr.take_effects().moves == {KEY: ADDR2}
    tr.move_started(KEY, ADDR2)
    tr.move_failed(KEY)
    tr.set_local_addresses(set(NAMES))
    assert tr.take_effects().moves == {KEY: ADDR2}


# -- addresses that go and come back -------------------------------------------------


def test_a_local_address_that_goes_drops_via_at_once_and_asks_for_the_backup() -> None:
    tr, _, nft, _ = steered(Policy((Rule(0, via=("m2",), backup=("m3",)),)))
    _moved(tr, ADDR2)
    nft.batches.clear()
    tr.local_removed(ADDR2)
    assert _entry(tr).via is None and tr.via_of(_entry(tr)) == LOCAL
    assert f"delete element inet dime wsrc4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 }}" in _text(nft)
    assert tr.take_effects().moves == {KEY: ADDR3}


def test_with_return_false_a_flow_whose_address_goes_still_takes_the_backup() -> None:
    """Not its identifier, which the rule does not name: "does not go back" keeps a
    flow only where the rule allows it."""
    tr, _, _, _ = steered(Policy((Rule(0, via=("m2",), backup=("m3",), return_=False),)))
    _moved(tr, ADDR2)
    tr.local_removed(ADDR2)
    assert _entry(tr).via is None
    assert tr.take_effects().moves == {KEY: ADDR3}


def _on_backup(return_: bool) -> Dataplane:
    """Placed on ADDR2, fell back to ADDR3 when ADDR2 went, then ADDR2 came back."""
    tr, _, _, _ = steered(Policy((Rule(0, via=("m2",), backup=("m3",), return_=return_),)))
    _moved(tr, ADDR2)
    tr.local_removed(ADDR2)
    _moved(tr, ADDR3)
    assert _entry(tr).via == ADDR3
    tr.local_added(ADDR2)
    return tr


def test_with_return_false_a_flow_stays_on_its_backup() -> None:
    tr = _on_backup(return_=False)
    assert tr.take_effects().moves == {}
    assert _entry(tr).via == ADDR3


def test_with_return_true_a_flow_goes_back_to_its_preferred_address() -> None:
    tr = _on_backup(return_=True)
    assert tr.take_effects().moves == {KEY: ADDR2}


# -- the peer's FLOW_MOVE: a flow pinned to one of its addresses ---------------------


def _pinnable() -> tuple[Dataplane, HidTable, FakeNft, int]:
    tr, table, nft, hid = steered()
    table.add_active(hid, PEER2)  # the host's second address, PEER still preferred
    nft.batches.clear()
    return tr, table, nft, hid


SPEC = FlowSpec(TCP, PEER, 80, LOCAL, 40000)  # KEY as the peer's socket sees it


def test_the_peer_pins_a_flow_to_its_other_address() -> None:
    tr, _, nft, hid = _pinnable()
    entry = tr.pin(hid, SPEC, PEER2)
    assert entry is not None and entry.key == KEY
    assert entry.wire == (PEER2, 80) and entry.pinned == PEER2
    assert tr.remote_of(entry) == PEER2
    text = _text(nft)
    assert f"add element inet dime wdst4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 : {PEER2} }}" in (
        text
    )
    assert f"add element inet dime wport4 {{ tcp . {LOCAL} . 40000 . {PEER2} . 80 : 80 }}" in text
    # To its own identifier again: host-wide.
    assert tr.pin(hid, SPEC, PEER) is entry
    assert entry.wire is None and entry.pinned is None and tr.remote_of(entry) == PEER
    assert f"delete element inet dime wdst4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 }}" in (
        _text(nft)
    )


def test_a_pin_to_an_address_the_host_does_not_have_active_changes_nothing() -> None:
    tr, _, nft, hid = _pinnable()
    assert tr.pin(hid, SPEC, A("203.0.113.99")) is None
    assert tr.pin(hid + 1, SPEC, PEER2) is None  # not that host's flow
    assert tr.pin(hid, FlowSpec(TCP, PEER, 81, LOCAL, 40000), PEER2) is None  # no such flow
    assert _entry(tr).wire is None and _entry(tr).pinned is None
    assert nft.batches == []


def test_a_pin_is_dropped_when_the_host_loses_the_address() -> None:
    tr, table, nft, hid = _pinnable()
    tr.pin(hid, SPEC, PEER2)
    nft.batches.clear()
    table.remove_address(hid, PEER2)
    entry = _entry(tr)
    assert entry.pinned is None and entry.wire is None
    assert f"delete element inet dime wdst4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 }}" in (
        _text(nft)
    )


def test_a_pinned_flow_stays_when_the_host_prefers_another_address() -> None:
    tr, table, _, hid = _pinnable()
    tr.pin(hid, SPEC, PEER2)
    table.add_active(hid, PEER, prefer=True)  # no change: still preferred
    third = A("203.0.113.3")
    table.add_active(hid, third, prefer=True)
    assert _entry(tr).wire == (PEER2, 80) and tr.remote_of(_entry(tr)) == PEER2


# -- kernel elements and the user-space path ---------------------------------------------


def test_a_wired_flows_wsrc_element_is_keyed_by_its_wire() -> None:
    entry = SocketEntry(KEY, 1, 0.0, 0.0, wire=(PEER2, 61000), via=ADDR2)
    assert _via_elements(entry, entry.wire, entry.via) == [
        ("wsrc", f"tcp . {LOCAL} . 40000 . {PEER2} . 61000", ADDR2)
    ]
    assert _via_elements(entry, None, entry.via) == [
        ("wsrc", f"tcp . {LOCAL} . 40000 . {PEER} . 80", ADDR2)
    ]
    assert _via_elements(entry, entry.wire, None) == []


def test_a_pinned_and_steered_flows_wsrc_follows_its_wire() -> None:
    tr, _, nft, hid = _pinnable()
    assert tr.request_move(KEY, ADDR2) is None
    _moved(tr, ADDR2)
    nft.batches.clear()
    tr.pin(hid, SPEC, PEER2)
    text = _text(nft)
    assert f"delete element inet dime wsrc4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 }}" in text
    assert f"add element inet dime wsrc4 {{ tcp . {LOCAL} . 40000 . {PEER2} . 80 : {ADDR2} }}" in (
        text
    )


def test_user_space_sends_a_steered_flow_from_its_own_locator() -> None:
    tr, _, _, _ = steered()
    path = UserspacePath(tr, lambda: 0.0)
    before = path.outbound(_tcp(str(LOCAL), 40000, str(PEER), 80, b"data"))
    assert before is None  # nothing to rewrite yet
    assert tr.request_move(KEY, ADDR2) is None
    _moved(tr, ADDR2)
    out = path.outbound(_tcp(str(LOCAL), 40000, str(PEER), 80, b"data"))
    assert out is not None
    info = parse(out)
    assert (A(info.src), info.sport, A(info.dst), info.dport) == (ADDR2, 40000, PEER, 80)
    assert _l4_ok(out)


# -- following the kernel's route (config follow_routes) -----------------------------


def test_a_flow_without_a_rule_follows_the_preferred_source_once_verified() -> None:
    tr, table, nft, hid = steered()
    fresh = A("192.0.2.9")  # ours, the new default route's source, not verified yet
    tr.local_added(fresh)
    tr.set_preferred({PEER: fresh})
    assert tr.take_effects().moves == {}  # the peer does not reach us there yet
    assert tr.route_moves == 0
    table.add_local(hid, fresh)  # ... now it does (IHMP verified it)
    _moved(tr, fresh)
    assert tr.route_moves == 1
    assert tr.via_of(_entry(tr)) == fresh and _entry(tr).rule is None
    assert f"wsrc4 {{ tcp . {LOCAL} . 40000 . {PEER} . 80 : {fresh} }}" in _text(nft)
    tr.set_preferred({PEER: fresh})  # the same again: nothing new asked or counted
    assert tr.take_effects().moves == {} and tr.route_moves == 1


def test_a_route_back_to_the_flows_own_address_moves_it_back() -> None:
    tr, _, _, _ = steered()
    tr.set_preferred({PEER: ADDR2})
    _moved(tr, ADDR2)
    tr.set_preferred({PEER: LOCAL})
    assert tr.take_effects().moves == {KEY: LOCAL}
    assert tr.route_moves == 1  # counted once asked of the peer
    tr.move_started(KEY, LOCAL)
    assert tr.route_moves == 2


def test_a_route_move_that_cannot_be_asked_is_not_counted_each_time_it_is_wanted() -> None:
    """Behind a NAT, say, the peer cannot be asked: the move is wanted again at each
    change, and counted only when it is asked."""
    tr, _, _, _ = steered()
    for _ in range(3):
        tr.set_preferred({})
        tr.set_preferred({PEER: ADDR2})
        assert tr.take_effects().moves == {KEY: ADDR2}
    assert tr.route_moves == 0
    tr.move_started(KEY, ADDR2)
    assert tr.route_moves == 1


def test_no_preference_leaves_a_followed_flow_where_it_is() -> None:
    """The route's source went (only one address left: nothing to follow): the flow
    stays on the address it followed while that works."""
    tr, _, _, _ = steered()
    tr.set_preferred({PEER: ADDR2})
    _moved(tr, ADDR2)
    tr.local_removed(LOCAL)
    tr.set_preferred({})
    assert tr.take_effects().moves == {}
    assert tr.via_of(_entry(tr)) == ADDR2


def test_a_policy_rule_wins_over_the_route() -> None:
    tr, _, _, _ = steered(Policy((Rule(0, via=("m3",)),)))
    _moved(tr, ADDR3)
    tr.set_preferred({PEER: ADDR2})
    assert tr.take_effects().moves == {}
    assert tr.route_moves == 0


def test_a_route_of_the_other_ip_version_is_not_followed() -> None:
    tr, table, _, hid = steered()
    v6 = A("2001:db8::9")
    tr.local_added(v6)
    table.add_local(hid, v6)
    tr.set_preferred({PEER: v6})
    assert tr.take_effects().moves == {}


def test_a_handoff_that_already_put_the_flow_there_asks_nothing() -> None:
    """Hard handoff: the flow's own address went; its host's translation sends it
    from the new one, which is also the route's: no FLOW_MOVE for it."""
    tr, table, _, hid = steered()
    for gone in (LOCAL, ADDR3):
        tr.local_removed(gone)
        table.remove_local(hid, gone)  # as IHMP does with our address events
    assert tr.via_of(_entry(tr)) == ADDR2
    tr.take_effects()
    tr.set_preferred({PEER: ADDR2})
    assert tr.take_effects().moves == {}
    assert tr.route_moves == 0


def test_moves_of_one_host_to_one_address_are_asked_sixteen_flows_at_a_time() -> None:
    """One FLOW_MOVE exchange per 16 flows of a host (MORE_FLOWS), not one per flow."""
    tr, _, _, hid = steered()
    keys = [KEY] + [FlowKey(TCP, LOCAL, 40001 + i, PEER, 80) for i in range(19)]
    for key in keys[1:]:
        assert tr.flow_seen(key, now=0.0) is not None
    service = StackTrans(DataplaneConfig(), clock=lambda: 0.0, hid_for=lambda *a: None)
    service.dataplane = tr
    asked: list[tuple[int, list[FlowSpec], object]] = []
    service.on_move = lambda h, flows, via: asked.append((h, flows, via)) is None
    service._ask_moves({key: ADDR2 for key in keys})
    assert [(h, len(flows), via) for h, flows, via in asked] == [(hid, 16, ADDR2), (hid, 4, ADDR2)]
    assert [f.lport for _, flows, _ in asked for f in flows] == [k.lport for k in keys]
    assert all(not tr.is_at(k, ADDR2) for k in keys)  # asked: in flight until ACKed
