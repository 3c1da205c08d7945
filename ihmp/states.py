"""Where IHMP stands with a remote host, and every way that can change.

In the style of h11's ``_state.py``: the states, the triggers that move a host from
one to another, and one table holding every allowed transition, so a reader can
check the whole state machine in one place. The engine changes a host's state only
through :meth:`ihmp.hosts.HidTable.transition`, which consults :data:`TRANSITIONS`.
"""

from __future__ import annotations

import enum
from typing import Final


class HidState(enum.Enum):
    """Where IHMP stands with a remote host."""

    HELLO_PENDING = "hello-pending"  # HELLO sent (or awaited), no exchange done yet
    ESTABLISHED = "established"  # HELLO/ACK done: the peer runs DIME
    LEGACY = "legacy"  # the peer never answered: it runs no DIME; do not signal it
    # (No "nat-forced": a host behind a NAT is established like any other, see
    # docs/architecture.md, "Through NATs".)


class Trigger(enum.Enum):
    """What happened; its value is the reason logged with the change."""

    HELLO_SENT = "HELLO sent"
    # A stranger started a flow to us: its HELLO is awaited (if it runs DIME, its
    # first packet made it say one); ours would go to an address that may be spoofed.
    FLOW_RECEIVED = "flow from a new host"
    HELLO_RECEIVED = "HELLO received"
    HELLO_ACKED = "ACK of HELLO"
    HELLO_UNANSWERED = "HELLO unanswered"  # only for a peer that never answered anything


S, T = HidState, Trigger

#: (state, trigger) -> next state. A pair that is missing cannot happen; the table
#: refuses it (a bug, never a peer's doing: triggers come from the engine's logic).
TRANSITIONS: Final[dict[HidState, dict[Trigger, HidState]]] = {
    S.HELLO_PENDING: {
        T.HELLO_SENT: S.HELLO_PENDING,
        T.HELLO_RECEIVED: S.ESTABLISHED,
        T.HELLO_ACKED: S.ESTABLISHED,
        T.HELLO_UNANSWERED: S.LEGACY,
    },
    S.ESTABLISHED: {
        # Both ends said HELLO at once: the other's HELLO, then the ACK of ours.
        # (No HELLO_UNANSWERED: a peer that ever answered is never demoted.)
        T.HELLO_RECEIVED: S.ESTABLISHED,
        T.HELLO_ACKED: S.ESTABLISHED,
    },
    S.LEGACY: {
        T.HELLO_SENT: S.HELLO_PENDING,  # its hold-down is over: try again
        T.HELLO_RECEIVED: S.ESTABLISHED,
    },
}

#: The state of a host created by each trigger (a HELLO from a stranger, or our own).
INITIAL: Final[dict[Trigger, HidState]] = {
    T.HELLO_SENT: S.HELLO_PENDING,
    T.FLOW_RECEIVED: S.HELLO_PENDING,
    T.HELLO_RECEIVED: S.ESTABLISHED,
}


class TransitionError(ValueError):
    """A (state, trigger) pair that :data:`TRANSITIONS` does not allow."""


def next_state(state: HidState, trigger: Trigger) -> HidState:
    """The state after ``trigger`` in ``state``; TransitionError if it cannot happen."""
    try:
        return TRANSITIONS[state][trigger]
    except KeyError:
        raise TransitionError(f"{trigger.name} cannot happen in {state.value}") from None
