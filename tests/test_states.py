"""ihmp.states: every transition of a host's state, and the table refusing others."""

from __future__ import annotations

import pytest

from ihmp.addr import IPAddress
from ihmp.hosts import ChangeKind, HidState, HidTable, HostChanged
from ihmp.states import INITIAL, TRANSITIONS, TransitionError, Trigger, next_state
from tests.ihmp_sim import A


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(TRANSITIONS) == set(HidState)
    for row in TRANSITIONS.values():
        assert set(row.values()) <= set(HidState)
    assert set(INITIAL.values()) <= set(HidState)


def test_a_new_host_can_always_be_told_hello() -> None:
    # Whatever state a host is in, a valid HELLO from it establishes it.
    for state in HidState:
        assert next_state(state, Trigger.HELLO_RECEIVED) is HidState.ESTABLISHED


def test_an_established_host_is_never_sent_a_new_hello() -> None:
    with pytest.raises(TransitionError):
        next_state(HidState.ESTABLISHED, Trigger.HELLO_SENT)


def test_the_table_changes_state_only_through_transitions() -> None:
    changes: list[HostChanged] = []
    table = HidTable(changes.append)
    addr: IPAddress = A("192.0.2.1")
    hid = table.create([addr], Trigger.HELLO_SENT).hid
    assert table.get(hid).state is HidState.HELLO_PENDING
    assert table.transition(hid, Trigger.HELLO_ACKED)
    assert not table.transition(hid, Trigger.HELLO_ACKED)  # no change, no event
    with pytest.raises(TransitionError):
        table.transition(hid, Trigger.HELLO_SENT)
    assert table.get(hid).state is HidState.ESTABLISHED  # the refusal changed nothing
    assert [(c.kind, c.reason) for c in changes] == [
        (ChangeKind.CREATED, "HELLO sent"),
        (ChangeKind.STATE, "ACK of HELLO"),
    ]


def test_a_retired_address_taken_by_another_host_leaves_the_first() -> None:
    changes: list[HostChanged] = []
    table = HidTable(changes.append)
    old, new = A("192.0.2.1"), A("192.0.2.2")
    first = table.create([old], Trigger.HELLO_SENT)
    table.add_active(first.hid, new, prefer=True)
    table.remove_address(first.hid, old, retire=True)
    assert table.lookup(old) is None and table.lookup_retired(old) is first
    assert changes[-1].after is not None and changes[-1].after.sources() == {old, new}
    # Another host is at that address now (a flow to it, say).
    second = table.create([old], Trigger.HELLO_SENT)
    assert table.lookup(old) is second and table.lookup_retired(old) is None
    assert first.retired == set()
    # The first host's change came out as an event too, before the second's creation.
    assert [c.kind for c in changes[-2:]] == [ChangeKind.UPDATED, ChangeKind.CREATED]
    assert changes[-2].after is not None and changes[-2].after.retired == frozenset()
