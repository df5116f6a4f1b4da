"""Replica identities: created once in the data folder, one process each, kept across restarts.

The scaling logic runs with real processes: three started on one data folder (what
``docker compose up --scale cloud=3`` does with the shared ``cloud-data`` volume)
take three identities; started again, they take the same three back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cipherface.exceptions import ConfigError
from cipherface.replica import ID_FILE, claim, identities

#: A process that claims an identity, prints it, and holds it until stdin closes.
HOLDER = (
    "import sys; from cipherface.replica import claim; "
    "c = claim(sys.argv[1]); print(c.name, flush=True); sys.stdin.read()"
)


def _holders(data_dir: Path, count: int) -> tuple[list[subprocess.Popen[str]], list[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    names = [proc.stdout.readline().strip() for proc in procs]  # type: ignore[union-attr]
    return procs, names


def _end(procs: list[subprocess.Popen[str]], *, kill: bool = False) -> None:
    for proc in procs:
        if kill:
            proc.kill()
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]


def test_a_name_is_held_by_one_process_and_kept(tmp_path: Path) -> None:
    first = claim(tmp_path, "c1")
    with pytest.raises(ConfigError, match="already running"):
        claim(tmp_path, "c1")
    assert (first.folder / ID_FILE).read_text().strip() == "c1"
    first.release()
    with claim(tmp_path, "c1") as again:
        assert again.folder == tmp_path / "cloud-c1"


def test_unnamed_replicas_take_distinct_identities_and_keep_them(tmp_path: Path) -> None:
    a, b = claim(tmp_path), claim(tmp_path)
    assert a.name != b.name and a.folder != b.folder
    assert identities(tmp_path) == sorted([a.name, b.name])
    a.release()
    b.release()
    # Restarted one at a time: no new identity is made while one is free.
    with claim(tmp_path) as c:
        assert c.name in (a.name, b.name)
    assert len(identities(tmp_path)) == 2


def test_three_scaled_processes_take_three_identities_and_take_them_back(tmp_path: Path) -> None:
    procs, names = _holders(tmp_path, 3)
    try:
        assert len(set(names)) == 3 and all(names)
        assert identities(tmp_path) == sorted(names)
    finally:
        _end(procs, kill=True)  # SIGKILL: the kernel drops the locks
    procs, again = _holders(tmp_path, 3)
    try:
        assert sorted(again) == sorted(names)
    finally:
        _end(procs)
    # A fourth beside three running ones gets an identity of its own.
    procs, three = _holders(tmp_path, 3)
    try:
        with claim(tmp_path) as fourth:
            assert fourth.name not in three
    finally:
        _end(procs)
