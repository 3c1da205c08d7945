"""HELLO cookies: a host that says HELLO from an address must show it receives there.

A HELLO from an address no peer of ours has been verified at is answered only with a
cookie (an ACK carrying COOKIE, smaller than the HELLO), and nothing is kept. The
sender says HELLO again with the cookie; only then is the HELLO taken in. The cookie
is a MAC over what the HELLO came with, under a secret of this host and the current
time period, so checking it needs no state (as DTLS's HelloVerifyRequest and QUIC's
Retry token): a flood of HELLOs from spoofed sources creates nothing, and is answered
with no more bytes than it sent.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from ihmp.addr import IPAddress
from ihmp.wire import COOKIE_LEN, encode_address

#: How long a cookie stays good: one period at least, two at most. A HELLO's
#: retransmissions all fit in it.
COOKIE_PERIOD = 30.0


class CookieJar:
    """Makes and checks cookies. ``secret`` must be unpredictable (32 random bytes)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def make(self, src: IPAddress, port: int | None, dst: IPAddress, now: float) -> bytes:
        """The cookie for a HELLO from ``src``:``port`` to our ``dst`` at ``now``."""
        return self._mac(self._period(now), src, port, dst)

    def valid(
        self, cookie: bytes, src: IPAddress, port: int | None, dst: IPAddress, now: float
    ) -> bool:
        """Whether ``cookie`` is one :meth:`make` gave this source, now or one period ago."""
        period = self._period(now)
        return any(
            hmac.compare_digest(cookie, self._mac(p, src, port, dst)) for p in (period, period - 1)
        )

    @staticmethod
    def _period(now: float) -> int:
        return int(now // COOKIE_PERIOD)

    def _mac(self, period: int, src: IPAddress, port: int | None, dst: IPAddress) -> bytes:
        data = struct.pack("!qH", period, port or 0) + encode_address(src) + encode_address(dst)
        return hmac.new(self._secret, data, hashlib.sha256).digest()[:COOKIE_LEN]
