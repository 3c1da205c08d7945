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
