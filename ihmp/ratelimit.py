"""Token buckets: how often a source that proved nothing may cost us work or an answer.

:class:`TokenBucket` is one budget; :class:`PerSource` keeps one per source address in
a bounded table (the least recently seen source is forgotten first), so that a flood
from many spoofed sources cannot grow it. Time is passed in, as everywhere in IHMP.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ihmp.addr import IPAddress


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float = -1.0  # -1: full at the first take
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.tokens < 0:
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class PerSource:
    """A :class:`TokenBucket` per source address, for at most ``capacity`` sources."""

    def __init__(self, rate: float, burst: float, capacity: int = 4096) -> None:
        self.rate, self.burst, self.capacity = rate, burst, capacity
        self._buckets: OrderedDict[IPAddress, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, src: IPAddress, now: float) -> bool:
        bucket = self._buckets.get(src)
        if bucket is None:
            if len(self._buckets) >= self.capacity:
                self._buckets.popitem(last=False)
            bucket = self._buckets[src] = TokenBucket(self.rate, self.burst)
        else:
            self._buckets.move_to_end(src)
        return bucket.take(now)
