"""On-prem's key sets: decryption workers live and end with their key."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agents.onprem.keys import KeySet, generate_keys
from cipherface.config import Settings


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0 until its parent reaps it.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_decryption_workers_start_with_the_key_set_and_stop_when_it_closes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, decrypt_workers=2)
    generate_keys(settings)
    keys = KeySet.load(settings.key_dir, settings)
    assert keys.decryptor is not None and keys.decryptor.fingerprint == keys.fingerprint
    pids = keys.decryptor.warm()
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    keys.close()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def test_without_decryption_workers_on_prem_decrypts_in_its_own_process(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    generate_keys(settings)
    keys = KeySet.load(settings.key_dir, settings)
    assert settings.decrypt_workers == 0 and keys.decryptor is None
    keys.close()
