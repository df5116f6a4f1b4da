"""The size of every message kind the agents send, against the 4 MiB cap.

Runs on-prem, one cloud replica and a client in one process (in-process broker),
for galleries of 128, 512 and 4096 dimensions (synthetic embeddings: only Dlib's
weights exist offline, and the gallery does not care where embeddings come from),
records every message each party sends (``context``, ``chunk``, ``sync``,
``status``, ``probe``, ``probe_piece``, ``scores``, ``event``), including an
edge-encrypted probe sent end to end in pieces by dimension range
(`wire.split_probe`). Prints one table and a PASS/FAIL verdict per kind; then the
edge probe's pieces against the whole probe as one message, and whether its event
named the right subject; then, from the real scores of one block, the parts one 1:N
probe's scores take over larger galleries (`wire.split_scores`), before (one
message) and after.

    python benchmarks/bench_messages.py [--dimensions 128 512 4096] [--templates 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import tempfile
from collections import defaultdict
from collections.abc import AsyncIterator
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
from cipherface.signing import SigningKey, TrustStore
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
        #: The last body of each kind sent.
        self.last: dict[str, bytes] = {}

    async def send(self, queue: str, body: bytes, **kw: Any) -> None:
        self.sizes[kind_of(body)].append(len(body))
        self.last[kind_of(body)] = body
        await self.inner.send(queue, body, **kw)

    async def publish(self, exchange: str, key: str, body: bytes, **kw: Any) -> None:
        self.sizes[kind_of(body)].append(len(body))
        await self.inner.publish(exchange, key, body, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # consume, queue_depth, ...: as the inner one


@contextlib.asynccontextmanager
async def links(settings: Settings, count: int = 3) -> AsyncIterator[list[Transport]]:
    """``count`` connections to one broker: RabbitMQ when ``settings`` name it, else a
    new in-process one (each agent and the client on its own, as deployed)."""
    memory = MemoryBroker()
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_transport(settings, memory)) for _ in range(count)
        ]


class Synthetic:
    """The replica's embedder: an "image" names a subject, its face is that subject's vector."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def embed(self, image: bytes, *, name: str | None = None) -> list[Face]:
        return [Face(embedding=self.vectors[image.decode()], facial_area=_AREA, confidence=1.0)]

    def close(self) -> None:
        """Nothing to release (the replica closes its embedder when it stops)."""


@dataclasses.dataclass(frozen=True)
class Edge:
    """One edge-encrypted probe: as one message, and as the pieces that went through."""

    whole: int
    pieces: list[int]
    #: The event's subject and decision ("s0", True: right).
    answer: tuple[str | None, bool, str | None]


async def measure(
    dimensions: int, templates: int
) -> tuple[dict[str, list[int]], wire.ScoresReady, Edge]:
    """Every message of an enrollment, a replica's sync, three probes (1:N, 1:1 true and
    false) and an edge-encrypted 1:N probe; the last image probe's scores."""
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
            replica = Recording(b, sizes)
            cloud = CloudAgent(settings, replica)  # type: ignore[arg-type]
            TrustStore(settings.trust_store_path).add(cloud.replica, cloud.signer.verify_key)
            cloud.embedder = Synthetic(vectors)  # type: ignore[assignment]
            await cloud.start()
            await asyncio.wait_for(cloud.ready.wait(), 600)
            client = Client(Recording(c, sizes), onprem.signer.verify_key)  # type: ignore[arg-type]
            async with client.events() as events:
                for image, claim in ((b"s0", None), (b"s1", "s1"), (b"s2", "s0")):
                    await events.wait_for(await client.publish_probe(image, claim), 600)
            scores = wire.decode(replica.last["scores"], verifier=onprem.trusted).message
            public = Keyring.load(settings.public_key_path, expect="public")
            edge = encrypt_probe(public, vectors["s0"], settings.metric)
            request = wire.EncryptedProbeRequest(probe_id=wire.new_id(), probe=edge)
            whole = len(wire.encode(request, fingerprint=edge.fingerprint, limit=1 << 31))
            async with client.events() as events:
                event = await events.wait_for(await client.publish_encrypted_probe(edge), 1800)
            await cloud.stop()
            await onprem.stop()
    assert isinstance(scores, wire.ScoresReady)
    answer = (event.subject, event.verified, event.error)
    return sizes, scores, Edge(whole=whole, pieces=sizes["probe_piece"], answer=answer)


#: Gallery sizes of the scores table (templates), at 8192 templates per block.
GALLERIES = (253_952, 1_000_000, 10_000_000)


def scores_parts(scores: wire.ScoresReady, cap: int) -> list[str]:
    """Rows: one face's 1:N scores over larger galleries, as one message and as parts.

    The block's real score ciphertext stands for every block (all are the same size).
    On-prem holds a probe's parts unacked within its results prefetch (4 x PREFETCH),
    so the row says the smallest PREFETCH that gathers them.
    """
    signer = SigningKey.generate("bench")
    [block] = scores.faces[0].scores
    rows = []
    for templates in GALLERIES:
        blocks = math.ceil(templates / 8192)
        many = tuple(dataclasses.replace(block, block_id=i) for i in range(blocks))
        face = dataclasses.replace(scores.faces[0], scores=many)
        whole = dataclasses.replace(scores, faces=(face,))
        before = len(wire.encode(whole, fingerprint="f" * 64, signer=signer, limit=1 << 40))
        parts = [
            len(wire.encode(p, fingerprint="f" * 64, signer=signer, limit=cap))
            for p in wire.split_scores(whole, cap)
        ]
        verdict = "PASS" if max(parts) <= cap else "FAIL (over the cap)"
        rows.append(
            f"{templates:>11,}{blocks:>7}{before:>14,}{len(parts):>6}{max(parts):>13,}"
            f"{math.ceil((len(parts) + 1) / 4):>9}  {verdict}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimensions", type=int, nargs="+", default=list(MODELS))
    parser.add_argument("--templates", type=int, default=1000)
    args = parser.parse_args()
    cap = wire.MAX_MESSAGE_BYTES
    print(f"# message sizes, cap {cap:,} B; {args.templates} synthetic templates (one block)")
    print(f"{'dims':>5} {'kind':<16}{'messages':>9}{'max B':>13}{'total B':>14}  verdict")
    failed: set[str] = set()
    tables: dict[int, list[str]] = {}
    edges: dict[int, Edge] = {}
    for dimensions in args.dimensions:
        sizes, scores, edges[dimensions] = asyncio.run(measure(dimensions, args.templates))
        tables[dimensions] = scores_parts(scores, cap)
        for kind in sorted(sizes):
            values = sizes[kind]
            verdict = "PASS" if max(values) <= cap else "FAIL (over the cap)"
            if max(values) > cap:
                failed.add(kind)
            print(
                f"{dimensions:>5} {kind:<16}{len(values):>9}{max(values):>13,}"
                f"{sum(values):>14,}  {verdict}"
            )
    print(
        f"# an edge-encrypted probe in pieces by dimension range (wire.split_probe), cap {cap:,} B"
    )
    print(
        f"{'dims':>5}{'one message B':>15}{'pieces':>7}{'max piece B':>13}{'total B':>14}", end=""
    )
    print("  event (subject, verified, error)  verdict")
    for dimensions, edge in edges.items():
        right = edge.answer == ("s0", True, None) and max(edge.pieces) <= cap
        failed.update([] if right else ["edge probe"])
        print(
            f"{dimensions:>5}{edge.whole:>15,}{len(edge.pieces):>7}{max(edge.pieces):>13,}"
            f"{sum(edge.pieces):>14,}  {edge.answer!s:<33} {'PASS' if right else 'FAIL'}"
        )
    print(f"# one face's 1:N scores in parts (wire.split_scores), cap {cap:,} B")
    print(f"{'dims':>5}{'templates':>11}{'blocks':>7}{'one message B':>14}{'parts':>6}", end="")
    print(f"{'max part B':>13}{'PREFETCH':>9}  verdict")
    for dimensions, rows in tables.items():
        for row in rows:
            failed.update(["scores parts"] if "FAIL" in row else [])
            print(f"{dimensions:>5}{row}")
    print(f"verdict: {'FAIL: ' + ', '.join(sorted(failed)) if failed else 'PASS'}")


if __name__ == "__main__":
    main()
