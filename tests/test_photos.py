"""One reader for a labelled photo folder's CSV files, used by the demo, benchmarks and tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from cipherface import photos
from cipherface.exceptions import CipherFaceError


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "identities.csv").write_text(
        "file,identity_group\nb.jpg,G02\na.jpg,G01\nc.jpg,G02\n"
    )
    (tmp_path / "pairs.csv").write_text(
        "image_a,image_b,same_person\nb.jpg,c.jpg,yes\na.jpg,b.jpg,no\n"
    )
    return tmp_path


def test_identities_and_groups_keep_the_file_order(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    assert photos.identities(folder) == {"b.jpg": "G02", "a.jpg": "G01", "c.jpg": "G02"}
    assert list(photos.identities(folder)) == ["b.jpg", "a.jpg", "c.jpg"]
    assert photos.identity_groups(folder) == {"G02": ["b.jpg", "c.jpg"], "G01": ["a.jpg"]}


def test_pairs_read_same_person_as_a_bool(tmp_path: Path) -> None:
    assert photos.pairs(_folder(tmp_path)) == [("b.jpg", "c.jpg", True), ("a.jpg", "b.jpg", False)]


def test_the_shared_folder_has_the_documented_counts(faces_dir: Path) -> None:
    groups = photos.identity_groups(faces_dir)
    assert (len(photos.identities(faces_dir)), len(groups)) == (61, 13)
    pairs = photos.pairs(faces_dir)
    assert (len(pairs), sum(same for *_, same in pairs)) == (520, 140)


def test_the_environment_variable_moves_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIPHERFACE_FACES_DIR", str(tmp_path))
    assert photos.default_faces_dir() == tmp_path
    assert photos.find_faces_dir() == tmp_path
    assert photos.find_faces_dir(tmp_path / "given") == tmp_path  # a missing folder is passed over


def test_no_folder_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIPHERFACE_FACES_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(photos, "_BESIDE_PROJECT", tmp_path / "absent")
    with pytest.raises(CipherFaceError, match="no photo folder found"):
        photos.find_faces_dir(tmp_path / "missing")
