"""A real cloud replica process whose "DeepFace" dies like a native crash on one input.

``python -m tests.agents.crashing_replica ARGS`` runs ``cipherface cloud ARGS``
with the embedder replaced by a test double: an image ``b"subject:<name>"`` is
the vector ``$CIPHERFACE_TEST_VECTORS`` (a JSON file) holds for ``<name>``, and
the image `POISON` aborts the process (SIGABRT) inside the handler, as a
segfault in TenSEAL, OpenCV or DeepFace would: no Python handler runs, the
delivery is never settled, and only the broker can stop the message.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from agents.cli import main
from cipherface.embedding import Face
from cipherface.embedding_cache import EmbeddingCache

__all__ = ["POISON", "synthetic_embed"]

#: The input that kills the process.
POISON = b"poison"
_AREA = {"x": 0, "y": 0, "w": 100, "h": 100, "left_eye": None, "right_eye": None}


def synthetic_embed(self: EmbeddingCache, image: bytes, *, name: str | None = None) -> list[Face]:
    """The test double of `EmbeddingCache.embed`."""
    if image == POISON:
        os.abort()
    vectors = json.loads(Path(os.environ["CIPHERFACE_TEST_VECTORS"]).read_text())
    subject = image.decode().removeprefix("subject:")
    return [Face(embedding=np.asarray(vectors[subject]), facial_area=_AREA, confidence=1.0)]


if __name__ == "__main__":
    EmbeddingCache.embed = synthetic_embed  # type: ignore[method-assign]
    sys.exit(main(["cloud", *sys.argv[1:]]))
