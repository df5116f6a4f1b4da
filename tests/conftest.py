"""Fixtures shared by every test: the photo folder and an isolated DeepFace home."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import cipherface
from cipherface import photos
from cipherface.crypto import Keyring
from cipherface.embedding import Embedder, largest_face
from tests.environment import amqp_url_or_skip, missing


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The labelled photos: ``$CIPHERFACE_FACES_DIR``, else ``<repo>/../shared/data/faces``."""
    folder = photos.default_faces_dir()
    if not folder.is_dir():
        missing(f"face photos not found at {folder}; set CIPHERFACE_FACES_DIR to their folder")
    return folder


@pytest.fixture(scope="session")
def small_portrait(faces_dir: Path) -> bytes:
    """img1.jpg as a 160 px high PNG: a 62 px face, which dlib's HOG finds only in
    the image doubled (`cipherface.embedding.Embedder.upsample`)."""
    import cv2

    portrait = cv2.imread(str(faces_dir / "img1.jpg"))
    ratio = 160 / max(portrait.shape[:2])
    size = (round(portrait.shape[1] * ratio), round(portrait.shape[0] * ratio))
    ok, encoded = cv2.imencode(".png", cv2.resize(portrait, size, interpolation=cv2.INTER_AREA))
    assert ok
    return encoded.tobytes()


@pytest.fixture(scope="session", autouse=True)
def deepface_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private ``DEEPFACE_HOME`` holding the Dlib weights, so no test reads the user's home.

    Autouse: DeepFace reads the variable at call time, so every test must see it.
    """
    home = tmp_path_factory.mktemp("deepface-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPFACE_HOME", str(home))
        cipherface.install_weights()
        yield home


@pytest.fixture(scope="session")
def portrait_embeddings(faces_dir: Path) -> dict[str, np.ndarray]:
    """Dlib embedding (largest face, opencv detector) of every labelled portrait, once."""
    names = sorted(
        set(photos.identities(faces_dir))
        | {name for a, b, _ in photos.pairs(faces_dir) for name in (a, b)}
    )
    embedder = Embedder("Dlib", "opencv")
    return {name: largest_face(embedder.embed(faces_dir / name)).embedding for name in names}


@pytest.fixture(scope="session")
def keys() -> Keyring:
    """On-prem's keys for gallery tests (n8192, no relinearisation keys)."""
    return Keyring.generate("n8192", relin_keys=False)


@pytest.fixture(scope="session")
def public(keys: Keyring) -> Keyring:
    """The public context of `keys`, as the cloud holds it."""
    return Keyring.from_bytes(keys.public_bytes(galois_keys=False), expect="public")


@pytest.fixture(scope="session")
def conjugation(keys: Keyring) -> bytes:
    """The Galois key for complex conjugation that replicas get with the context."""
    from cipherface.gallery.integrity import conjugation_key

    return conjugation_key(keys)


@pytest.fixture(scope="session", autouse=True)
def broker_cap() -> None:
    """With ``CIPHERFACE_TEST_BROKER_CAP`` set (`.ci/run`), the shared broker must refuse more.

    Otherwise a message kind growing past the cap would pass on a broker that
    allows 128 MiB and break on one configured as deployments are.
    """
    raw = os.environ.get("CIPHERFACE_TEST_BROKER_CAP", "")
    if not raw:
        return
    cap = int(raw)
    refused = asyncio.run(_refuses(amqp_url_or_skip(), cap))
    if not refused:
        pytest.fail(f"the test broker accepts a message of {cap + 1} bytes (cap {cap})")


async def _refuses(url: str, cap: int) -> bool:
    """Whether the broker at ``url`` refuses a message one byte over ``cap``."""
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"x" * 1024), queue.name)
        try:
            await channel.default_exchange.publish(aio_pika.Message(b"x" * (cap + 1)), queue.name)
        except aio_pika.exceptions.AMQPError:
            return True
        return False
    finally:
        await connection.close()
