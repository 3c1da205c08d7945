"""Key bindings of IHMP: which local key signs, which peer keys are trusted a priori.

Pure in-memory objects; loading and storing key files is the daemon's business
(``dime/keystore.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_network

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ihmp.addr import IPAddress, IPNetwork


def parse_scope(scope: str) -> IPNetwork | None:
    """``"*"`` -> None (all addresses); an address or prefix -> its network.

    Raises ValueError for anything else.
    """
    if scope == "*":
        return None
    return ip_network(scope, strict=False)


@dataclass
class LocalKeys:
    """The paper's ``set_local_key``: private keys bound to ``*`` or to prefixes.

    The most specific binding that contains the source address wins; ``*`` is the
    least specific.
    """

    _bindings: dict[IPNetwork | None, Ed25519PrivateKey] = field(default_factory=dict)

    def set_local_key(self, key: Ed25519PrivateKey, scope: str = "*") -> None:
        """Bind ``key`` to ``scope`` (``*``, an address or a prefix), replacing any old one."""
        self._bindings[parse_scope(scope)] = key

    def key_for(self, src: IPAddress) -> Ed25519PrivateKey | None:
        """The key that signs messages sent from ``src``, or None (send unsigned)."""
        best: Ed25519PrivateKey | None = None
        best_len = -1
        for net, key in self._bindings.items():
            if net is None:
                if best_len < 0:
                    best, best_len = key, 0
            elif net.version == src.version and src in net and net.prefixlen + 1 > best_len:
                best, best_len = key, net.prefixlen + 1
        return best

    def __bool__(self) -> bool:
        return bool(self._bindings)


@dataclass
class TrustStore:
    """Peer public keys configured a priori, bound to addresses or prefixes."""

    _keys: dict[IPNetwork, bytes] = field(default_factory=dict)

    def trust(self, public_key: bytes, scope: str) -> None:
        """Trust ``public_key`` (raw 32 bytes) for the hosts at ``scope`` (address/prefix)."""
        net = parse_scope(scope)
        if net is None:
            raise ValueError("a trusted key must be bound to an address or prefix, not '*'")
        if len(public_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        self._keys[net] = public_key

    def key_for(self, addr: IPAddress) -> bytes | None:
        """The most specific key configured for ``addr``, or None."""
        best: bytes | None = None
        best_len = -1
        for net, key in self._keys.items():
            if net.version == addr.version and addr in net and net.prefixlen > best_len:
                best, best_len = key, net.prefixlen
        return best

    def keys(self) -> set[bytes]:
        return set(self._keys.values())
