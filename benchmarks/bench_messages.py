"""The size of every message kind the agents send, against the 4 MiB cap.

Runs on-prem, one cloud replica and a client in one process (in-process broker),
for galleries of 128, 512 and 4096 dimensions (synthetic embeddings: only Dlib's
weights exist offline, and the gallery does not care where embeddings come from),
records every message each party sends (``context``, ``chunk``, ``sync``,
``status``, ``probe``, ``scores``, ``event``), and measures an edge-encrypted
probe, which is not chunked yet. Prints one table and a PASS/FAIL verdict per kind.

    python benchmarks/bench_messages.py [--dimensions 128 512 4096] [--templates 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import wire
from cipherface.client import Client
from cipherface.config import Settings
from cipherface.crypto import Keyring
from cipherface.embedding import Face
from cipherface.gallery import encrypt_probe
from cipherface.signing import TrustStore
from cipherface.transport import MemoryBroker, open_transport
from cipherface.transport.base import Transport

MODELS = {128: "Dlib", 512: "Facenet512", 4096: "VGG-Face"}
_AREA = {"x": 0, "y": 0, "w": 100, "h": 100, "left_eye": None, "right_eye": None}


def kind_of(body: bytes) -> str:
    """The message type in an envelope (without checking its signature)."""
    outer = msgpack.unpackb(body, raw=False)
    return str(msgpack.unpackb(outer["signed"], raw=False)["type"])


class Recording:
    """Delegates to a transport and records the size of every message it sends, by kind."""

    def __init__(self, inner: Transport, sizes: dict[str, list[int]]) -> None:
        self.inner = inner
        self.topology = inner.topology
        self.max_message_size = inner.max_message_size
        self.sizes = sizes

    async def send(self, queue: str, body: bytes, **kw: Any) -> None:
        self.sizes[kind_of(body)].append(len(body))
        await self.inner.send(queue, body, **kw)

    async def publish(self, exchange: str, key: str, body: bytes, **kw: Any) -> None:
        self.sizes[kind_of(body)].append(len(body))
        await self.inner.publish(exchange, key, body, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # consume, queue_depth, ...: as the inner one


class Synthetic:
    """The replica's embedder: an "image" names a subject, its face is that subject's vector."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def embed(self, image: bytes, *, name: str | None = None) -> list[Face]:
        return [Face(embedding=self.vectors[image.decode()], facial_area=_AREA, confidence=1.0)]


async def measure(dimensions: int, templates: int) -> dict[str, list[int]]:
    """Every message of an enrollment, a replica's sync, three probes (1:N, 1:1 true and
    false), and an edge-encrypted probe's size."""
    sizes: dict[str, list[int]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), model=MODELS[dimensions], replica="m1")
        generate_keys(settings)
        rng = np.random.default_rng(dimensions)
        vectors = {f"s{i}": rng.normal(size=dimensions) for i in range(templates)}
        memory = MemoryBroker()
        async with (
            open_transport(settings, memory) as a,
            open_transport(settings, memory) as b,
            open_transport(settings, memory) as c,
        ):
            onprem = OnPremAgent(settings, Recording(a, sizes))  # type: ignore[arg-type]
            onprem.book.add_many(list(vectors.items()))
            await onprem.start()
            await onprem.publish_gallery(onprem.book.pending_blocks())
            cloud = CloudAgent(settings, Recording(b, sizes))  # type: ignore[arg-type]
            TrustStore(settings.trust_store_path).add(cloud.replica, cloud.signer.verify_key)
            cloud.embedder = Synthetic(vectors)  # type: ignore[assignment]
            await cloud.start()
            await asyncio.wait_for(cloud.ready.wait(), 600)
            client = Client(Recording(c, sizes), onprem.signer.verify_key)  # type: ignore[arg-type]
            async with client.events() as events:
                for image, claim in ((b"s0", None), (b"s1", "s1"), (b"s2", "s0")):
                    await events.wait_for(await client.publish_probe(image, claim), 600)
            public = Keyring.load(settings.public_key_path, expect="public")
            edge = encrypt_probe(public, vectors["s0"], settings.metric)
            request = wire.EncryptedProbeRequest(probe_id=wire.new_id(), probe=edge)
            body = wire.encode(request, fingerprint=edge.fingerprint, limit=1 << 31)
            sizes["encrypted_probe"].append(len(body))
            await cloud.stop()
            await onprem.stop()
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimensions", type=int, nargs="+", default=list(MODELS))
    parser.add_argument("--templates", type=int, default=1000)
    args = parser.parse_args()
    cap = wire.MAX_MESSAGE_BYTES
    print(f"# message sizes, cap {cap:,} B; {args.templates} synthetic templates (one block)")
    print(f"{'dims':>5} {'kind':<16}{'messages':>9}{'max B':>13}{'total B':>14}  verdict")
    failed: set[str] = set()
    for dimensions in args.dimensions:
        sizes = asyncio.run(measure(dimensions, args.templates))
        for kind in sorted(sizes):
            values = sizes[kind]
            verdict = "PASS" if max(values) <= cap else "FAIL (over the cap)"
            if max(values) > cap:
                failed.add(kind)
            print(
                f"{dimensions:>5} {kind:<16}{len(values):>9}{max(values):>13,}"
                f"{sum(values):>14,}  {verdict}"
            )
        per_block = max(sizes["scores"])  # one block's scores: the gallery is one block
        print(
            f"{dimensions:>5} scores grow with the gallery ({per_block:,} B per block): one "
            f"scores message holds {cap // per_block} blocks "
            f"({cap // per_block * 8192:,} templates) under the cap"
        )
    print(f"verdict: {'FAIL: ' + ', '.join(sorted(failed)) if failed else 'PASS'}")


if __name__ == "__main__":
    main()
