"""Labelled photo folders: where they are, and their ``identities.csv`` / ``pairs.csv``.

The demo, the benchmarks and the tests read the same labelled folder
(``../shared/data/faces`` beside the project, or ``$CIPHERFACE_FACES_DIR``):

- ``identities.csv``: ``file,identity_group``, one labelled portrait per row;
- ``pairs.csv``: ``image_a,image_b,same_person`` (``yes``/``no``).

Reading them here, once, keeps every caller's notion of a label the same.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from cipherface.exceptions import CipherFaceError

__all__ = [
    "default_faces_dir",
    "find_faces_dir",
    "identities",
    "identity_groups",
    "pairs",
]

#: The photos live beside the project, never inside it (see the folder's README).
_BESIDE_PROJECT = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def default_faces_dir() -> Path:
    """``$CIPHERFACE_FACES_DIR``, else ``<project>/../shared/data/faces`` (it may not exist)."""
    return Path(os.environ.get("CIPHERFACE_FACES_DIR") or _BESIDE_PROJECT)


def find_faces_dir(explicit: Path | None = None) -> Path:
    """Photos for the demo: the argument, ``$CIPHERFACE_FACES_DIR``, or ``../shared/data/faces``."""
    candidates = [explicit] if explicit else []
    if os.environ.get("CIPHERFACE_FACES_DIR"):
        candidates.append(Path(os.environ["CIPHERFACE_FACES_DIR"]))
    candidates += [Path("../shared/data/faces"), _BESIDE_PROJECT]
    for candidate in candidates:
        if candidate is not None and candidate.is_dir():
            return candidate
    raise CipherFaceError(
        "no photo folder found: pass one (cipherface demo DIR) or set CIPHERFACE_FACES_DIR"
    )


def identities(folder: Path) -> dict[str, str]:
    """{file: identity group} from ``folder/identities.csv``, in the file's order."""
    with (folder / "identities.csv").open(newline="") as handle:
        return {row["file"]: row["identity_group"] for row in csv.DictReader(handle)}


def identity_groups(folder: Path) -> dict[str, list[str]]:
    """{identity group: its files, in the CSV's order}, from ``folder/identities.csv``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for file, group in identities(folder).items():
        groups[group].append(file)
    return dict(groups)


def pairs(folder: Path) -> list[tuple[str, str, bool]]:
    """(image_a, image_b, same person) rows of ``folder/pairs.csv``, in the file's order."""
    with (folder / "pairs.csv").open(newline="") as handle:
        return [
            (row["image_a"], row["image_b"], row["same_person"] == "yes")
            for row in csv.DictReader(handle)
        ]
