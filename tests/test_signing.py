"""Ed25519 keys, pinned keys and the trust store: who may have sent a message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cipherface.exceptions import ConfigError, SignatureError
from cipherface.signing import PinnedKey, SigningKey, TrustStore, VerifyKey


def test_signature_verifies_only_under_its_own_key_and_data() -> None:
    key, other = SigningKey.generate("onprem"), SigningKey.generate("onprem")
    signature = key.sign(b"block 3 version 7")
    key.verify_key.verify(signature, b"block 3 version 7")
    with pytest.raises(SignatureError):
        key.verify_key.verify(signature, b"block 3 version 99")
    with pytest.raises(SignatureError):
        other.verify_key.verify(signature, b"block 3 version 7")
    with pytest.raises(SignatureError):
        PinnedKey(other.verify_key).verify("onprem", signature, b"block 3 version 7")


def test_key_files_round_trip_and_the_secret_half_is_private(tmp_path: Path) -> None:
    key = SigningKey.generate("onprem")
    path = tmp_path / "signing.key"
    key.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert VerifyKey.load(path.with_suffix(".pub")) == key.verify_key
    loaded = SigningKey.load(path, "onprem")
    key.verify_key.verify(loaded.sign(b"x"), b"x")
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        SigningKey.load(path, "onprem")


def test_verify_key_text_is_checked() -> None:
    key = SigningKey.generate("r1").verify_key
    assert VerifyKey.from_text(key.to_text() + "\n") == key
    for bad in ("", "rsa AAAA", "ed25519 !!!", "ed25519 " + "A" * 8):
        with pytest.raises(ConfigError):
            VerifyKey.from_text(bad)


def test_trust_store_accepts_only_trusted_replicas_under_their_own_name(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "trusted.json")
    r1, r2 = SigningKey.generate("r1"), SigningKey.generate("r2")
    with pytest.raises(SignatureError, match="not trusted"):
        store.verify("r1", r1.sign(b"scores"), b"scores")
    store.add("r1", r1.verify_key)
    assert (tmp_path / "trusted.json").stat().st_mode & 0o777 == 0o600
    store.verify("r1", r1.sign(b"scores"), b"scores")
    # r2 is not trusted, and cannot borrow r1's name either.
    with pytest.raises(SignatureError):
        store.verify("r1", r2.sign(b"scores"), b"scores")
    # Another process (the CLI) trusts r2: the daemon's store sees it without a restart.
    TrustStore(tmp_path / "trusted.json").add("r2", r2.verify_key)
    store.verify("r2", r2.sign(b"scores"), b"scores")
    assert sorted(store.keys()) == ["r1", "r2"]
    assert store.remove("r1") and not store.remove("r1")
    with pytest.raises(SignatureError):
        store.verify("r1", r1.sign(b"scores"), b"scores")
