"""Key files: the host key, the paper's set_local_key bindings, and trusted peer keys.

Private keys are PKCS#8 PEM files with mode 0600. Bindings made with the CLI
(``dime set-local-key``, ``dime trust``) persist in ``bindings.json`` in the state
directory, next to the host key, and add to those of the config file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from ihmp.keys import LocalKeys, TrustStore, parse_scope
from ihmp.wire import public_key_bytes

HOST_KEY = "host.key"
BINDINGS = "bindings.json"


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file."""


def generate(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key, written to ``path`` with mode 0600 (never readable by others)."""
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key: {exc.strerror}") from exc
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def load_or_create_host_key(state_dir: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The host key, generated on first use. Returns (key, created)."""
    path = state_dir / HOST_KEY
    if path.exists():
        return load(path), False
    return generate(path), True


def public_hex(key: Ed25519PrivateKey) -> str:
    return public_key_bytes(key).hex()


@dataclass
class Bindings:
    """Bindings added from the command line, persisted as JSON."""

    local_keys: list[dict[str, str]] = field(default_factory=list)  # {"file", "addr"}
    trust: list[dict[str, str]] = field(default_factory=list)  # {"key" (hex), "addr"}

    @classmethod
    def load(cls, state_dir: Path) -> Bindings:
        path = state_dir / BINDINGS
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(list(data.get("local_keys", [])), list(data.get("trust", [])))
        except (OSError, ValueError, AttributeError) as exc:
            raise KeyFileError(f"{path}: unreadable bindings: {exc}") from exc

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / BINDINGS
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"local_keys": self.local_keys, "trust": self.trust}, indent=2))
        tmp.replace(path)

    def set_local_key(self, file: Path, addr: str) -> None:
        parse_scope(addr)
        load(file)  # refuse a bad key now, not at the next start
        self.local_keys = [b for b in self.local_keys if b["addr"] != addr]
        self.local_keys.append({"file": str(file.resolve()), "addr": addr})

    def add_trust(self, key: bytes, addr: str) -> None:
        if parse_scope(addr) is None:
            raise ValueError("a trusted key needs an address or prefix, not '*'")
        self.trust = [b for b in self.trust if b["addr"] != addr]
        self.trust.append({"key": key.hex(), "addr": addr})


def build_keyring(
    host_key: Ed25519PrivateKey,
    local: list[tuple[Path, str]],
    trusted: list[tuple[bytes, str]],
) -> tuple[LocalKeys, TrustStore]:
    """The engine's key objects: the host key on ``*``, then the more specific bindings."""
    keys = LocalKeys()
    keys.set_local_key(host_key, "*")
    for path, addr in local:
        keys.set_local_key(load(path), addr)
    trust = TrustStore()
    for key, addr in trusted:
        trust.trust(key, addr)
    return keys, trust
