"""End-to-end latency of the agents and the size of each message type.

Enrolls every labelled portrait (subject = identity group), then probes each
portrait once, one at a time, 1:N, and measures the time from publishing the
probe to receiving its event, embedding included. Runs on the in-process broker
and, when it answers, on RabbitMQ.

    python benchmarks/bench_agents.py [--faces DIR] [--brokers memory rabbitmq]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench_messages import Recording

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface.client import Client, EdgeEncryptor
from cipherface.config import DEFAULT_AMQP_URL, Settings
from cipherface.crypto import Keyring
from cipherface.embedding import Embedder, install_weights
from cipherface.photos import default_faces_dir, identities
from cipherface.signing import TrustStore
from cipherface.transport import MemoryBroker, open_transport


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(broker: str, faces: Path, sizes: dict[str, list[int]]) -> dict[str, Any]:
    labels = identities(faces)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(
            data_dir=root / "data",
            prefix=f"bench-{int(time.time())}",
            amqp_url=DEFAULT_AMQP_URL if broker == "rabbitmq" else None,
            replica="bench",
        )
        generate_keys(settings)
        photos = root / "photos"
        photos.mkdir()
        for name in labels:
            (photos / name).symlink_to(faces / name)
        memory = MemoryBroker()
        async with (
            open_transport(settings, memory) as a,
            open_transport(settings, memory) as b,
            open_transport(settings, memory) as c,
        ):
            onprem = OnPremAgent(settings, Recording(a, sizes))  # type: ignore[arg-type]
            cloud = CloudAgent(settings, Recording(b, sizes))  # type: ignore[arg-type]
            TrustStore(settings.trust_store_path).add(cloud.replica, cloud.signer.verify_key)
            client = Client(Recording(c, sizes), onprem.signer.verify_key)  # type: ignore[arg-type]
            await onprem.start()
            started = time.perf_counter()
            report = await onprem.enroll(photos, labels=labels, progress=False)
            enroll_s = time.perf_counter() - started
            await cloud.start()
            await asyncio.wait_for(cloud.ready.wait(), 300)
            latencies = []
            async with client.events() as events:
                for name, truth in labels.items():
                    sent = time.perf_counter()
                    probe_id = await client.publish_probe(faces / name)
                    event = await events.wait_for(probe_id, 300)
                    latencies.append(time.perf_counter() - sent)
                    assert event.subject == truth, event  # each portrait is enrolled itself
                public = Keyring.load(settings.public_key_path, expect="public")
                edge = EdgeEncryptor(public, Embedder(settings.model), settings.metric)
                encrypt_started = time.perf_counter()
                encrypted = edge.encrypt(faces / "img1.jpg")
                encrypt_s = time.perf_counter() - encrypt_started
                sent = time.perf_counter()
                probe_id = await client.publish_encrypted_probe(encrypted)
                await events.wait_for(probe_id, 300)
                edge_latency = time.perf_counter() - sent
            await cloud.stop()
            await onprem.stop()
    return {
        "broker": broker,
        "templates": report.enrolled,
        "enroll_s": enroll_s,
        "probes": len(latencies),
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
        "max_s": max(latencies),
        "edge_encrypt_s": encrypt_s,
        "edge_latency_s": edge_latency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=default_faces_dir())
    parser.add_argument("--brokers", nargs="+", default=["memory", "rabbitmq"])
    args = parser.parse_args()
    install_weights()
    sizes: dict[str, list[int]] = defaultdict(list)
    rows = [asyncio.run(run(broker, args.faces, sizes)) for broker in args.brokers]
    print("\nEnd-to-end latency, publish -> event, embedding included (1:N, sequential):")
    print(
        f"{'broker':<10}{'templates':>10}{'probes':>8}{'p50 s':>8}{'p95 s':>8}{'max s':>8}"
        f"{'enroll s':>10}{'edge enc s':>11}{'edge e2e s':>11}"
    )
    for r in rows:
        print(
            f"{r['broker']:<10}{r['templates']:>10}{r['probes']:>8}{r['p50_s']:>8.3f}"
            f"{r['p95_s']:>8.3f}{r['max_s']:>8.3f}{r['enroll_s']:>10.1f}"
            f"{r['edge_encrypt_s']:>11.2f}{r['edge_latency_s']:>11.2f}"
        )
    print("\nMessage sizes (bytes, as encoded on the wire):")
    print(f"{'type':<18}{'count':>7}{'min':>12}{'median':>12}{'max':>12}")
    for kind, values in sorted(sizes.items()):
        print(
            f"{kind:<18}{len(values):>7}{min(values):>12,}{int(statistics.median(values)):>12,}"
            f"{max(values):>12,}"
        )


if __name__ == "__main__":
    main()
