"""Host key files: written and read without cryptography's serialization package for
the usual form (Ed25519 PKCS#8 PEM), through it for any other."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from dime import keystore


def test_a_generated_key_is_standard_pkcs8_and_loads_back(tmp_path: Path) -> None:
    key = keystore.generate(tmp_path / "k")
    pem = (tmp_path / "k").read_bytes()
    assert pem == key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    theirs = load_pem_private_key(pem, password=None)
    assert isinstance(theirs, Ed25519PrivateKey)
    assert theirs.private_bytes_raw() == key.private_bytes_raw()
    assert keystore.load(tmp_path / "k").private_bytes_raw() == key.private_bytes_raw()


def test_other_forms_of_an_ed25519_key_still_load(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    # OpenSSH's own format: not the PKCS#8 block read directly.
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    (tmp_path / "k").write_bytes(pem)
    with pytest.raises(keystore.KeyFileError):
        keystore.load(tmp_path / "k")  # not PEM PKCS#8: refused, as before
    pkcs8 = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    (tmp_path / "k").write_bytes(b"\n" + pkcs8.replace(b"\n", b"\r\n"))
    assert keystore.load(tmp_path / "k").private_bytes_raw() == key.private_bytes_raw()


def test_a_key_of_another_kind_is_refused(tmp_path: Path) -> None:
    ec = generate_private_key(SECP256R1())
    (tmp_path / "k").write_bytes(
        ec.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    with pytest.raises(keystore.KeyFileError, match="not an Ed25519 key"):
        keystore.load(tmp_path / "k")
    (tmp_path / "k").write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(keystore.KeyFileError):
        keystore.load(tmp_path / "k")
