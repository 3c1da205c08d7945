"""Named deadlines, earliest first: what the engine's ``get_timer`` reads.

Each timer has a key (the engine uses a retransmission per message, a grace period
per peer); setting a key again moves its deadline, cancelling forgets it. A heap
with lazy deletion keeps :meth:`Timers.next` at O(log n) amortised, however many
peers and messages there are, instead of scanning them all on every call.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Timers(Generic[K]):
    def __init__(self) -> None:
        self._deadline: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()  # ties expire in the order they were set

    def __len__(self) -> int:
        return len(self._deadline)

    def __contains__(self, key: object) -> bool:
        return key in self._deadline

    def set(self, key: K, when: float) -> None:
        """Arm ``key`` for ``when``, replacing any deadline it had."""
        self._deadline[key] = when
        heapq.heappush(self._heap, (when, next(self._order), key))

    def cancel(self, key: K) -> None:
        """Forget ``key``; unknown keys are ignored."""
        self._deadline.pop(key, None)

    def when(self, key: K) -> float | None:
        return self._deadline.get(key)

    def next(self) -> float | None:
        """The earliest deadline, or None when no timer is armed."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def expired(self, now: float) -> list[K]:
        """Disarm and return the keys due at ``now``, earliest first."""
        due: list[K] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, key = heapq.heappop(self._heap)
            del self._deadline[key]
            due.append(key)

    def _drop_stale(self) -> None:
        # An entry is stale when its key was cancelled or set again since.
        heap = self._heap
        while heap and self._deadline.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
