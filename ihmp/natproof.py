"""Which IHMP-aware NATs are proven to receive at their public addresses.

A NAT_ENTRY (from ``dime nat``) is signed with the NAT's own key, which nobody has
vouched for. Before an entry moves any flow, the key must answer a challenge sent
to the NAT's address (a PATH_PROBE nonce, echoed in an ACK it signs): an attacker who
spoofs the NAT's address never sees the nonce. :class:`NatProofs` keeps that state
for :class:`ihmp.engine.IhmpEngine`: the proven key of each NAT address, the
challenge in flight to one that is not proven yet, and what waits for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ihmp.addr import IPAddress

W = TypeVar("W")  # what waits for a proof (the engine: an entry and where it came from)


@dataclass
class NatCheck(Generic[W]):
    """A challenge to a NAT's address: does ``key`` receive there?"""

    key: bytes
    nonce: bytes
    sent_at: float
    waiting: list[W] = field(default_factory=list)


class NatProofs(Generic[W]):
    def __init__(self, rng: random.Random, nonce_len: int) -> None:
        self._rng = rng
        self._nonce_len = nonce_len
        self._keys: dict[IPAddress, bytes] = {}
        self._checks: dict[IPAddress, NatCheck[W]] = {}
        self._answered: dict[IPAddress, bytes] = {}  # the nonce, for late copies

    def proven(self, addr: IPAddress, key: bytes) -> bool:
        return self._keys.get(addr) == key

    def challenge(
        self, addr: IPAddress, key: bytes, waiting: W, now: float, resend_after: float
    ) -> tuple[bytes, bool] | None:
        """``waiting`` waits until ``key`` is proven at ``addr``. Returns the nonce to
        challenge ``addr`` with and whether it is a new challenge, or None when the
        one sent less than ``resend_after`` seconds ago answers for this one too."""
        check = self._checks.get(addr)
        if check is not None and check.key == key:
            check.waiting.append(waiting)
            if now - check.sent_at < resend_after:
                return None
            check.sent_at = now
            return check.nonce, False
        nonce = self._rng.getrandbits(8 * self._nonce_len).to_bytes(self._nonce_len, "big")
        self._checks[addr] = NatCheck(key, nonce, now, [waiting])
        return nonce, True

    def challenged(self, addr: IPAddress) -> bool:
        return addr in self._checks

    def answered(
        self, addr: IPAddress, nonce: bytes | None, signed_by: Callable[[bytes], bool]
    ) -> list[W] | None:
        """An answer from ``addr`` echoing ``nonce``, ``signed_by(key)`` telling
        whether ``key`` signed it: what waited for the proof, or None if this is not
        the answer to our challenge."""
        check = self._checks.get(addr)
        if check is None or nonce != check.nonce or not signed_by(check.key):
            return None
        del self._checks[addr]
        self._keys[addr] = check.key
        self._answered[addr] = check.nonce
        return check.waiting

    def late_copy(self, addr: IPAddress, nonce: bytes | None) -> bool:
        """Another copy of an answer already taken (one per challenge sent)."""
        return nonce is not None and self._answered.get(addr) == nonce
