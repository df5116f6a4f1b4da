"""On-prem's data at rest: a private folder, private files, removed embeddings overwritten."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface.config import Settings
from cipherface.exceptions import ConfigError
from cipherface.transport import MemoryBroker, MemoryTransport, Topology


def _agent(settings: Settings) -> OnPremAgent:
    return OnPremAgent(settings, MemoryTransport(MemoryBroker(), Topology(prefix="rest")))


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=tmp_path / "data")
    generate_keys(settings)
    return settings


def test_every_file_onprem_keeps_is_private(settings: Settings) -> None:
    agent = _agent(settings)
    agent.book.add("alice", np.ones(128), template_id="a1")
    agent.ledger.record("p1", 1.0)
    agent.trusted.add("r1", agent.signer.verify_key)
    modes = _modes(settings.onprem_dir)
    agent.ledger.close()
    agent.book.close()
    assert stat.S_IMODE(settings.onprem_dir.stat().st_mode) == 0o700
    expected = {
        "private.key",
        "public.key",
        "signing.key",
        "signing.pub",
        "book.sqlite",
        "book.sqlite-wal",
        "book.sqlite-shm",
        "ledger.sqlite",
        "ledger.sqlite-wal",
        "ledger.sqlite-shm",
        "trusted-replicas.json",
    }
    assert expected <= set(modes), sorted(modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o600} == {}


@pytest.mark.parametrize(
    ("target", "mode"),
    [("", 0o755), ("book.sqlite", 0o644), ("signing.key", 0o640), ("public.key", 0o604)],
)
def test_a_loosened_folder_or_file_is_refused_at_start(
    settings: Settings, target: str, mode: int
) -> None:
    _agent(settings).book.close()  # creates the book
    os.chmod(settings.onprem_dir / target if target else settings.onprem_dir, mode)
    with pytest.raises(ConfigError, match="chmod"):
        _agent(settings)


def test_a_removed_embedding_is_gone_from_the_files(settings: Settings) -> None:
    agent = _agent(settings)
    rng = np.random.default_rng(1)
    secret = rng.normal(size=128)
    agent.book.add("alice", secret, template_id="a1")
    agent.book.add("bob", rng.normal(size=128), template_id="b1")
    needle = (secret / np.linalg.norm(secret)).tobytes()  # stored prepared for cosine
    files = [settings.onprem_dir / n for n in ("book.sqlite", "book.sqlite-wal")]
    assert any(needle in f.read_bytes() for f in files if f.exists())
    agent.book.remove("a1")
    assert not any(needle[:64] in f.read_bytes() for f in files if f.exists())
    agent.book.close()
    agent.ledger.close()
