"""Key files: the host key, the paper's set_local_key bindings, and trusted peer keys.

Private keys are PKCS#8 PEM files with mode 0600. Bindings made with the CLI
(``dime set-local-key``, ``dime trust``) persist in ``bindings.json`` in the state
directory, next to the host key, and add to those of the config file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dime.config import Config, state_dir
from ihmp.keys import LocalKeys, TrustStore, parse_scope
from ihmp.wire import public_key_bytes

HOST_KEY = "host.key"
BINDINGS = "bindings.json"

# An unencrypted Ed25519 PKCS#8 key (RFC 8410) is this DER prefix and the 32-byte
# seed, in a PEM "PRIVATE KEY" block: what :func:`generate` writes and ``openssl
# genpkey -algorithm ed25519`` too. Read and written here, because cryptography's
# serialization package costs 1.5 MiB of RSS and 10 ms to import; other forms (a
# key file written by another tool) go through it.
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----"


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file."""


def generate(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key, written to ``path`` with mode 0600 (never readable by others)."""
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = _pem(_PKCS8_ED25519 + key.private_bytes_raw())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key: {exc.strerror}") from exc
    seed = _ed25519_seed(data)
    if seed is not None:
        return Ed25519PrivateKey.from_private_bytes(seed)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return key


def _pem(der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return b"\n".join([_PEM_BEGIN, *lines, _PEM_END]) + b"\n"


def _ed25519_seed(data: bytes) -> bytes | None:
    """The seed of an unencrypted Ed25519 PKCS#8 PEM key; None for anything else."""
    text = data.strip()
    if not (text.startswith(_PEM_BEGIN) and text.endswith(_PEM_END)):
        return None
    try:
        der = base64.b64decode(
            b"".join(text[len(_PEM_BEGIN) : -len(_PEM_END)].split()), validate=True
        )
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_PKCS8_ED25519) + 32 or not der.startswith(_PKCS8_ED25519):
        return None
    return der[len(_PKCS8_ED25519) :]


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


@dataclass(frozen=True)
class Keyring:
    """Everything IHMP signs and verifies with, as the daemon loads it."""

    host_key: Ed25519PrivateKey
    host_key_created: bool  # generated by this load (first start)
    host_key_path: Path
    local: LocalKeys
    trust: TrustStore


def load_keyring(cfg: Config) -> Keyring:
    """The host key (created on first use), the config file's bindings and the CLI's
    (``bindings.json``). Raises KeyFileError naming a file that cannot be used."""
    sdir = state_dir(cfg)
    host_key, created = load_or_create_host_key(sdir)
    bindings = Bindings.load(sdir)
    local = [(b.file, b.addr) for b in cfg.local_key]
    local += [(Path(b["file"]), b["addr"]) for b in bindings.local_keys]
    trusted = [(b.key, b.addr) for b in cfg.trust]
    try:
        trusted += [(bytes.fromhex(b["key"]), b["addr"]) for b in bindings.trust]
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyFileError(f"{sdir / BINDINGS}: bad trust entry") from exc
    keys, trust = build_keyring(host_key, local, trusted)
    return Keyring(host_key, created, sdir / HOST_KEY, keys, trust)
