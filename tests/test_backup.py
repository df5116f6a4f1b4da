"""Backup and restore of on-prem's folder: keys, book, ledger, trust store, modes kept."""

from __future__ import annotations

import io
import stat
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from agents.cli import main
from agents.onprem.keys import KeySet, generate_keys
from cipherface.backup import backup, restore
from cipherface.config import Settings
from cipherface.exceptions import ConfigError
from cipherface.ledger import ProbeLedger
from cipherface.signing import SigningKey, TrustStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def onprem(tmp_path: Path) -> Settings:
    """On-prem's folder with keys, two templates, a ledger entry and a trusted replica."""
    settings = Settings(data_dir=tmp_path / "data")
    generate_keys(settings)
    keys = KeySet.load(settings.key_dir, settings)
    rng = np.random.default_rng(1)
    keys.book.add("alice", rng.normal(size=128), template_id="a1")
    keys.book.add("bob", rng.normal(size=128), template_id="b1")
    keys.book.close()
    ledger = ProbeLedger(settings.ledger_path)
    ledger.record("p1", time.time())
    ledger.close()
    TrustStore(settings.trust_store_path).add("r1", SigningKey.generate("r1").verify_key)
    return settings


def test_backup_and_restore_keep_keys_book_ledger_trust_and_modes(
    onprem: Settings, tmp_path: Path
) -> None:
    archive = tmp_path / "onprem.tar.gz"
    saved = backup(onprem.onprem_dir, archive)
    assert _mode(archive) == 0o600
    assert {"private.key", "signing.key", "book.sqlite", "ledger.sqlite"} <= set(saved)
    assert "trusted-replicas.json" in saved
    assert not any(name.endswith(("-wal", "-shm")) for name in saved)

    restored = Settings(data_dir=tmp_path / "elsewhere")
    restore(archive, restored.onprem_dir)
    assert _mode(restored.onprem_dir) == 0o700
    for path in restored.onprem_dir.rglob("*"):
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path
    keys = KeySet.load(restored.key_dir, restored)
    original = KeySet.load(onprem.key_dir, onprem)
    assert keys.fingerprint == original.fingerprint
    assert keys.book.template_ids() == original.book.template_ids()
    assert keys.book._decoy_seed == original.book._decoy_seed  # the secret seed came too
    ledger = ProbeLedger(restored.ledger_path)
    assert ledger.seen("p1")
    ledger.close()
    keys.book.close()
    original.book.close()
    assert set(TrustStore(restored.trust_store_path).keys()) == {"r1"}
    assert (restored.signing_key_path.read_bytes()) == onprem.signing_key_path.read_bytes()


def test_restore_refuses_a_folder_with_keys_and_a_foreign_archive(
    onprem: Settings, tmp_path: Path
) -> None:
    archive = tmp_path / "onprem.tar.gz"
    backup(onprem.onprem_dir, archive)
    with pytest.raises(ConfigError, match="not empty"):
        restore(archive, onprem.onprem_dir)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        backup(onprem.onprem_dir, archive)
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        data = b"x"
        member = tarfile.TarInfo("onprem/../../escaped")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ConfigError):
        restore(evil, tmp_path / "target" / "onprem")
    assert not (tmp_path / "escaped").exists()


def test_cli_backup_restore_round_trip(
    onprem: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "cli.tar.gz"
    assert main(["backup", str(archive), "--data-dir", str(onprem.data_dir)]) == 0
    target = tmp_path / "new"
    assert main(["restore", str(archive), "--data-dir", str(target)]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"templates": 2' in out
    assert main(["restore", str(archive), "--data-dir", str(target)]) == 2
    assert main(["restore", str(archive), "--data-dir", str(target), "--overwrite"]) == 0
