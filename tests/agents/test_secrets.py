"""The secret key never leaves on-prem: every byte on-prem publishes, accounted for.

An end-to-end run (enrollment, a cloud sync, plain, edge-encrypted and bad probes)
with on-prem's transport wrapped so every body it sends or publishes is recorded.
The proof has two halves:

- structure: every recorded body decodes as one of the kinds on-prem may emit
  (public context, encrypted block, verification event), every context in them
  parses as a TenSEAL context without a secret key, and every event's distance is
  rounded to `VerificationEvent.DISTANCE_DECIMALS`;
- bytes: no recorded body contains any of the 1,024-byte-spaced 64-byte windows
  of SEAL's serialization of the secret key, so no run of 1,088 or more
  contiguous bytes of it went out, whatever the framing.

(Key files are 0600 and refused when readable by others: tests/test_crypto.py.)
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
import tenseal as ts

from cipherface import wire
from cipherface.client import EdgeEncryptor
from cipherface.crypto import Keyring
from cipherface.embedding import Embedder
from cipherface.signing import PinnedKey
from tests.agents.conftest import Deployment

pytestmark = pytest.mark.slow

#: The kinds on-prem may publish, and nothing else.
ALLOWED = (wire.ContextUpdate, wire.BlockChunk, wire.VerificationEvent)
WINDOW, STRIDE = 64, 1024


def _secret_key_windows(keyring: Keyring) -> list[bytes]:
    """64-byte windows of the SEAL serialization of the secret key (header skipped)."""
    fd, path = tempfile.mkstemp(
        prefix="cipherface-sk-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    os.close(fd)
    try:
        keyring.context.secret_key().data.save(path)
        serialized = Path(path).read_bytes()
    finally:
        os.unlink(path)
    assert len(serialized) > 100_000  # N=8192, three primes: the whole key, not a stub
    # The first bytes are SEAL's header (magic, version, sizes): shared with public objects.
    return [serialized[i : i + WINDOW] for i in range(64, len(serialized) - WINDOW, STRIDE)]


async def test_onprem_publishes_no_secret_key_and_only_rounded_distances(
    deployment: Deployment,
    tmp_path: Path,
    faces_dir: Path,
    identity_groups: dict[str, list[str]],
) -> None:
    onprem = await deployment.onprem()
    recorded: list[tuple[str, bytes]] = []
    send, publish = onprem.transport.send, onprem.transport.publish

    async def recording_send(queue: str, body: bytes, **kwargs: object) -> None:
        recorded.append((queue, body))
        await send(queue, body, **kwargs)  # type: ignore[arg-type]

    async def recording_publish(exchange: str, key: str, body: bytes, **kwargs: object) -> None:
        recorded.append((exchange, body))
        await publish(exchange, key, body, **kwargs)  # type: ignore[arg-type]

    onprem.transport.send = recording_send  # type: ignore[method-assign]
    onprem.transport.publish = recording_publish  # type: ignore[method-assign]

    root = tmp_path / "enroll" / "G01"
    root.mkdir(parents=True)
    for name in identity_groups["G01"][:2]:
        (root / name).symlink_to(faces_dir / name)
    report = await onprem.enroll(root.parent, progress=False)
    assert report.enrolled == 2
    cloud = await deployment.cloud()  # asks for a sync: on-prem publishes everything again
    await asyncio.wait_for(cloud.ready.wait(), 60)

    settings = deployment.settings
    public = Keyring.load(settings.public_key_path, expect="public")
    edge = EdgeEncryptor(public, Embedder(settings.model), settings.metric)
    probe_photo = faces_dir / identity_groups["G01"][2]
    encrypted = await asyncio.to_thread(edge.encrypt, probe_photo)
    client = await deployment.client()
    async with client.events() as stream:
        ids = [
            await client.publish_probe(probe_photo, "G01"),
            await client.publish_probe(probe_photo),
            await client.publish_probe(faces_dir / identity_groups["G05"][0], "G01"),
            await client.publish_probe(b"not an image"),
            await client.publish_encrypted_probe(encrypted, "G01"),
        ]
        events = [await stream.wait_for(pid, timeout=180) for pid in ids]
    assert events[0].verified and events[4].verified and events[3].error

    secret = Keyring.load(settings.secret_key_path, expect="secret")
    windows = _secret_key_windows(secret)
    kinds: dict[str, int] = {}
    signed_by_onprem = PinnedKey(onprem.signer.verify_key)
    for target, body in recorded:
        message = wire.decode(body, verifier=signed_by_onprem).message
        assert isinstance(message, ALLOWED), (target, message.kind)
        kinds[message.kind] = kinds.get(message.kind, 0) + 1
        if isinstance(message, wire.ContextUpdate):
            context = ts.context_from(message.context)
            assert not context.has_secret_key()
            assert not context.has_galois_keys()
            assert (
                Keyring.from_bytes(message.context, expect="public").fingerprint
                == secret.fingerprint
            )
        if isinstance(message, wire.VerificationEvent) and message.distance is not None:
            assert message.distance == round(
                message.distance, wire.VerificationEvent.DISTANCE_DECIMALS
            )
        leaked = [i for i, window in enumerate(windows) if window in body]
        assert not leaked, (
            f"{message.kind} to {target} holds secret-key bytes (windows {leaked[:5]})"
        )
    # Enrollment and the sync each shipped the context and the block (in chunks);
    # every probe got its event.
    assert kinds.get("context", 0) >= 2 and kinds.get("chunk", 0) >= 2, kinds
    assert kinds.get("event") == len(ids), kinds
    # The check would have caught a leak: the windows are in the secret key file's context.
    assert all(window in secret.secret_bytes() for window in windows[:8])
