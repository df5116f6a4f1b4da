"""What an enrollment reads and reports: photo files, their subjects, a labels CSV."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from cipherface.embedding import Embedder
from cipherface.exceptions import ConfigError, EmbeddingError
from cipherface.gallery import EnrollmentBook

__all__ = ["IMAGE_SUFFIXES", "EnrollReport", "add_photos", "read_labels", "subject_of"]

log = logging.getLogger(__name__)

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


async def add_photos(
    book: EnrollmentBook,
    embedder: Embedder,
    folder: Path,
    labels: Mapping[str, str] | None,
    progress: bool,
) -> EnrollReport:
    """Embed every photo under ``folder`` not enrolled yet and add it to ``book``
    (`agents.onprem.agent.OnPremAgent.enroll` says which are skipped and why)."""
    report = EnrollReport()
    held = {tid.rpartition("@")[2] for tid in book.template_ids()}
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in tqdm(files, desc="enrolling", unit="img", disable=not progress):
        subject = (labels or {}).get(path.name) or subject_of(path, folder)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        if digest in held:
            report.unchanged += 1
            continue
        try:
            faces = await asyncio.to_thread(embedder.embed, path)
        except EmbeddingError as exc:
            report.skipped.append((str(path), str(exc)))
            log.warning("skipped %s: %s", path, exc)
            continue
        if len(faces) > 1:
            reason = f"{len(faces)} faces: an enrollment photo must show one person"
            report.skipped.append((str(path), reason))
            log.warning("skipped %s: %s", path, reason)
            continue
        template_id = f"{path.relative_to(folder)}@{digest}"
        book.add(subject, faces[0].embedding, template_id=template_id)
        held.add(digest)
        report.enrolled += 1
    return report
