"""Replay protection: a sliding window over each sender's 64-bit counter.

The same scheme as IPsec's anti-replay window (RFC 4303, 3.4.3): a counter is fresh
if it is above the highest seen, or within ``size`` below it and not seen yet.
Senders start their counter at the wall clock in microseconds, so it keeps growing
across restarts of the sender.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplayWindow:
    size: int = 64
    highest: int = -1
    _seen: int = 0  # bit i set: counter (highest - i) was accepted

    @classmethod
    def restored(cls, highest: int) -> ReplayWindow:
        """A window that takes nothing at or below ``highest``: after a restart, the
        counters between the last save and the crash are unknown, so all count as
        seen."""
        return cls(highest=highest, _seen=(1 << cls.size) - 1)

    def fresh(self, counter: int) -> bool:
        """Whether ``counter`` has not been accepted and is not too old. Changes nothing."""
        if counter > self.highest:
            return True
        offset = self.highest - counter
        return offset < self.size and not (self._seen >> offset) & 1

    def accept(self, counter: int) -> None:
        """Record ``counter`` as accepted. Call only after :meth:`fresh` said yes."""
        if counter > self.highest:
            # Capped: bits shifted past the window are gone anyway, and a jump of 2^40
            # (any peer may send one) must not build a 2^40-bit integer.
            shift = min(counter - self.highest, self.size) if self.highest >= 0 else self.size
            self._seen = ((self._seen << shift) | 1) & ((1 << self.size) - 1)
            self.highest = counter
        else:
            self._seen |= 1 << (self.highest - counter)
