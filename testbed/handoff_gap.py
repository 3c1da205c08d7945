"""The handoff gap: the one definition the demo and the goodput experiment report.

The README calls it "from the new address up to the first 100 ms with data at the
CH". Precisely:

* The receiver's interface counter (bytes received) is sampled every ``SAMPLE``
  = 10 ms, in the same clock as the handoff's events (:class:`RxSampler`).
* The reference instant ``ref`` is when the new address was configured (``ip addr
  add`` returned) for a hard handoff, when the old address was removed for a soft one.
* "With data" means carrying at least half the pre-handoff rate: the mean rate from
  1 s after the transfer's start (or 40 % of the way to the first handoff event, if
  that comes sooner: slow start is over either way) to that first event.
* Windows of ``WINDOW`` = 100 ms start every ``SAMPLE`` from ``ref``. The gap runs
  from ``ref`` to the middle of the first window with data after the first window
  without (the middle: a flow that resumes at full rate at t is measured as resuming
  at t). Data still in flight at ``ref`` may arrive before the dip: the gap counts
  from ``ref`` all the same.
* If the 100 ms before ``ref`` already lacked data (a hard handoff: the flow has been
  without a path since the old address went), the flow counts as disrupted from
  ``ref`` on, and the gap ends at the middle of the first window with data: at least
  half a window (50 ms) however fast data comes back.
* 0 when no window starting within ``HORIZON`` = 1 s of ``ref`` lacked data (the
  handoff disrupted nothing); None when data never came back before the end.

The gap includes TCP's own recovery (retransmission timer, slow start): it is what
an application sees, not only dime's reaction.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE = 0.01  # s between two readings of the receiver's counter
WINDOW = 0.1  # s: a window this long must carry half the pre-handoff rate
HORIZON = 1.0  # s: a handoff that disrupts the flow does so within this time of ref
PRE_SKIP = 1.0  # s: the pre-handoff rate is taken from this long after the start ...
PRE_SKIP_SHARE = 0.4  # ... or from this share of the way to the first event, if sooner

Samples = list[tuple[float, int]]  # (time, cumulative bytes received), time ascending


@dataclass(frozen=True)
class Gap:
    """A handoff gap (s; None: data never came back) and the pre-handoff rate (bit/s)."""

    seconds: float | None
    pre_bps: float


def bytes_at(samples: Samples, t: float) -> float:
    """The cumulative counter at time ``t``, linearly interpolated."""
    if not samples:
        return 0.0
    if t <= samples[0][0]:
        return float(samples[0][1])
    lo, hi = 0, len(samples) - 1
    if t >= samples[hi][0]:
        return float(samples[hi][1])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if samples[mid][0] <= t:
            lo = mid
        else:
            hi = mid
    (ta, ba), (tb, bb) = samples[lo], samples[hi]
    return ba + (bb - ba) * (t - ta) / (tb - ta)


def pre_handoff_rate(samples: Samples, start: float, first_event: float) -> float:
    """Bytes/s from ``start`` + min(1 s, 40 % of the way) to ``first_event``."""
    a = start + min(PRE_SKIP, PRE_SKIP_SHARE * (first_event - start))
    if first_event <= a:
        return 0.0
    return (bytes_at(samples, first_event) - bytes_at(samples, a)) / (first_event - a)


def handoff_gap(
    samples: Samples, ref: float, *, start: float, first_event: float, end: float
) -> Gap:
    """The gap after a handoff (see the module's docstring).

    ``ref``: the reference instant; ``start``: the transfer's start; ``first_event``:
    the handoff's first event (the pre-handoff rate ends there); ``end``: the
    transfer's end (no window reaches past it). All in the samples' clock.
    """
    pre = pre_handoff_rate(samples, start, first_event)
    need = 0.5 * pre * WINDOW
    if need <= 0:
        return Gap(None, 0.0)
    steps = int((end - WINDOW - ref) / SAMPLE) + 1
    dipped = bytes_at(samples, ref) - bytes_at(samples, ref - WINDOW) < need
    for k in range(max(steps, 0)):
        t = ref + k * SAMPLE
        good = bytes_at(samples, t + WINDOW) - bytes_at(samples, t) >= need
        if not dipped:
            if good and t - ref >= HORIZON:
                return Gap(0.0, pre * 8)
            dipped = not good
        elif good:
            return Gap(t + WINDOW / 2 - ref, pre * 8)
    return Gap(None if dipped else 0.0, pre * 8)


def rx_bytes(net_dev: str, devs: tuple[str, ...]) -> int | None:
    """The rx bytes of ``devs`` summed, from the text of /proc/net/dev; None when none
    of them is there. A device that is absent is left out (a sum over those present):
    a device that is down still has its counter, so a moving host's old and new
    interfaces can be summed across its handoff."""
    total, found = 0, False
    for line in net_dev.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() in devs:
            try:
                total += int(rest.split()[0])
            except (ValueError, IndexError):
                continue
            found = True
    return total if found else None


class RxSampler(threading.Thread):
    """The rx bytes of one or more interfaces of a namespace (summed: those present)
    every ``SAMPLE`` s, in ``time.monotonic()``'s clock, read through a process in it
    (/proc/PID/net/dev shows that process's network namespace: no process is started
    per reading)."""

    def __init__(self, pid: int, *devs: str) -> None:
        super().__init__(daemon=True)
        if not devs:
            raise ValueError("RxSampler needs at least one device")
        self.path = Path(f"/proc/{pid}/net/dev")
        self.devs = devs
        self.samples: Samples = []
        self._halt = threading.Event()

    def read(self) -> int | None:
        try:
            return rx_bytes(self.path.read_text(), self.devs)
        except OSError:
            return None

    def run(self) -> None:
        nxt = time.monotonic()
        while not self._halt.is_set():
            v = self.read()
            if v is not None:
                self.samples.append((time.monotonic(), v))
            nxt += SAMPLE
            delay = nxt - time.monotonic()
            if delay > 0:
                self._halt.wait(delay)
            else:
                nxt = time.monotonic()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)

    def rate_bps(self, span: float = 0.25) -> float:
        """The rate over the last ``span`` seconds of samples (bit/s)."""
        s = self.samples
        if len(s) < 2:
            return 0.0
        t1, b1 = s[-1]
        i = len(s) - 1
        while i > 0 and t1 - s[i][0] < span:
            i -= 1
        t0, b0 = s[i]
        return (b1 - b0) * 8 / (t1 - t0) if t1 > t0 else 0.0
