"""ihmp.timers: named deadlines, earliest first, with moves and cancellations."""

from __future__ import annotations

import random

from ihmp.timers import Timers


def test_next_is_the_earliest_armed_deadline() -> None:
    t: Timers[str] = Timers()
    assert t.next() is None
    t.set("a", 5.0)
    t.set("b", 3.0)
    assert t.next() == 3.0
    t.cancel("b")
    assert t.next() == 5.0
    t.set("a", 9.0)  # moved later: the old deadline no longer counts
    assert t.next() == 9.0 and t.when("a") == 9.0


def test_expired_returns_due_keys_in_order_and_disarms_them() -> None:
    t: Timers[str] = Timers()
    for key, when in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("d", 7.0)):
        t.set(key, when)
    assert t.expired(2.5) == ["a", "b"]
    assert "a" not in t and "c" in t
    assert t.expired(2.5) == []
    assert t.expired(10) == ["c", "d"]
    assert t.next() is None and len(t) == 0


def test_against_a_plain_model() -> None:
    """Random sets, cancels and expiries agree with a dict scanned in full."""
    rng = random.Random(7)
    t: Timers[int] = Timers()
    model: dict[int, float] = {}
    now = 0.0
    for _ in range(5000):
        op = rng.random()
        key = rng.randrange(50)
        if op < 0.5:
            when = now + rng.uniform(0, 10)
            t.set(key, when)
            model[key] = when
        elif op < 0.7:
            t.cancel(key)
            model.pop(key, None)
        else:
            now += rng.uniform(0, 3)
            due = t.expired(now)
            expect = sorted((w, k) for k, w in model.items() if w <= now)
            assert sorted(due) == sorted(k for _, k in expect)
            for k in due:
                del model[k]
        assert t.next() == min(model.values(), default=None)
