"""The C heap's free pages, given back to the kernel.

glibc keeps what ``free()`` released in the middle of its heap: after libnftables
parsed a batch of 10k flows' elements, 19 MiB that ``malloc_trim`` returns (and
1.1 MiB after the ruleset is loaded at start-up). Called after such bursts only: it
walks the heap (2 ms after a 2,000-flow batch).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc


def trim_heap(collect: bool = False) -> None:
    """Give the C heap's free pages back to the kernel (glibc; elsewhere a no-op).
    ``collect``: run Python's cycle collector first, so what it frees goes too."""
    if collect:
        gc.collect()
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)
