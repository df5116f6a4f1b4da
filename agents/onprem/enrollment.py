"""What an enrollment reads and reports: photo files, their subjects, a labels CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from cipherface.exceptions import ConfigError

__all__ = ["IMAGE_SUFFIXES", "EnrollReport", "read_labels", "subject_of"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def subject_of(path: Path, root: Path) -> str:
    """``root/<subject>/photo.jpg`` -> subject; ``root/photo.jpg`` -> file stem."""
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else path.stem


def read_labels(path: Path) -> dict[str, str]:
    """``file,subject`` CSV -> {file name: subject}.

    A first row whose file column is not an image name (``file,subject``) is a
    header and skipped; any other row is a label, the first one included.
    """
    try:
        with path.open(newline="") as handle:
            rows = [row for row in csv.reader(handle) if len(row) >= 2]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the labels: {exc.strerror}") from None
    if rows and Path(rows[0][0].strip()).suffix.lower() not in IMAGE_SUFFIXES:
        rows = rows[1:]
    return {file.strip(): subject.strip() for file, subject, *_ in rows}


@dataclass(slots=True)
class EnrollReport:
    """What an enrollment did."""

    enrolled: int = 0
    #: Photos whose content was enrolled already (`OnPremAgent.enroll` is incremental).
    unchanged: int = 0
    blocks_published: int = 0
    #: (photo, reason) of each photo not enrolled: no image, no face, several faces.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Templates withdrawn (`OnPremAgent.remove`).
    removed: int = 0
