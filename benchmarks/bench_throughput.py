"""End-to-end probes per second with distinct images: a burst through the daemons.

Every labelled portrait is enrolled (subject = identity group) beside a synthetic
gallery (default 100,000 templates in all), then all portraits are published at
once, 1:N, and the burst's throughput is measured from the first publish to the
last event, embedding, encrypted search, decryption and every integrity check
included. Run once per pool size asked for (``embed_workers`` 0: the replica
embeds in its own process) and per number of dlib's doublings before its scan
(``detect_upsample``), on the in-process broker (the broker is not the
bottleneck: see bench_agents.py for RabbitMQ latency). The replica's cache of
recent images is off, so every round pays for detection and embedding.

    python benchmarks/bench_throughput.py [--templates 100000] [--pools 0 2] [--upsample 1 0]
        [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_messages import links

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface.client import Client
from cipherface.config import Settings
from cipherface.embedding import install_weights
from cipherface.photos import default_faces_dir, identities
from cipherface.signing import TrustStore

#: Issue 12's target: end-to-end probes/s, distinct images, 100K gallery.
TARGET = 6.0


async def burst(settings: Settings, faces: Path, templates: int, rounds: int) -> dict[str, Any]:
    """Throughput of ``rounds`` bursts of every portrait against one replica."""
    labels = identities(faces)
    generate_keys(settings)
    photos = settings.data_dir.parent / "photos"
    photos.mkdir(exist_ok=True)
    for name in labels:
        if not (photos / name).exists():
            (photos / name).symlink_to(faces / name)
    async with links(settings) as (a, b, c):
        onprem = OnPremAgent(settings, a)
        rng = np.random.default_rng(0)
        synthetic = max(0, templates - len(labels))
        onprem.book.add_many((f"synthetic-{i}", rng.standard_normal(128)) for i in range(synthetic))
        await onprem.start()
        report = await onprem.enroll(photos, labels=labels, progress=False)
        cloud = CloudAgent(settings, b)
        # Rounds after the first would otherwise be answered from memory.
        cloud.embedder.size = 0
        TrustStore(settings.trust_store_path).add(cloud.replica, cloud.signer.verify_key)
        client = Client(c, onprem.signer.verify_key)
        await cloud.start()
        await asyncio.wait_for(cloud.ready.wait(), 900)
        rates, right = [], 0
        async with client.events() as events:
            # A first probe loads the models (in every worker, with a pool) before timing.
            warm = [await client.publish_probe(faces / n) for n in list(labels)[:4]]
            for probe_id in warm:
                await events.wait_for(probe_id, 600)
            for _ in range(rounds):
                started = time.perf_counter()
                sent = {await client.publish_probe(faces / n): g for n, g in labels.items()}
                for probe_id, truth in sent.items():
                    event = await events.wait_for(probe_id, 900)
                    right += event.subject == truth
                rates.append(len(sent) / (time.perf_counter() - started))
        await cloud.stop()
        await onprem.stop()
    return {
        "templates": synthetic + report.enrolled,
        "probes": len(labels) * rounds,
        "right": right,
        "rate": max(rates),
        "rates": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, default=default_faces_dir())
    parser.add_argument("--templates", type=int, default=100_000)
    parser.add_argument("--pools", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--upsample", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    install_weights()
    rows = []
    for upsample in args.upsample:
        for pool in args.pools:
            with tempfile.TemporaryDirectory() as tmp:
                # Enough deliveries in flight to keep every embedding worker busy.
                settings = Settings(
                    data_dir=Path(tmp) / "data",
                    replica="bench",
                    embed_workers=pool,
                    prefetch=max(2, 2 * pool),
                    detect_upsample=upsample,
                )
                row = asyncio.run(burst(settings, args.faces, args.templates, args.rounds))
            row.update(pool=pool, upsample=upsample, load=os.getloadavg())
            rows.append(row)
    print(f"\nEnd-to-end throughput, distinct images, {os.cpu_count()} cores (publish -> event):")
    print(
        f"{'upsample':>8}{'embed workers':>14}{'templates':>11}{'probes':>8}{'right':>7}"
        f"{'probes/s':>10}  rounds' probes/s  load"
    )
    for r in rows:
        print(
            f"{r['upsample']:>8}{r['pool']:>14}{r['templates']:>11,}{r['probes']:>8}"
            f"{r['right']:>7}{r['rate']:>10.2f}  {' '.join(f'{x:.2f}' for x in r['rates']):16}"
            f"  {' '.join(f'{x:.1f}' for x in r['load'])}"
        )
    best = max(rows, key=lambda r: r["rate"])
    verdict = "PASS" if best["rate"] >= TARGET else "FAIL"
    print(
        f"verdict end-to-end probes/s >= {TARGET:g} at {best['templates']:,} templates: "
        f"{verdict} ({best['rate']:.2f} with {best['pool']} embedding worker(s), "
        f"CIPHERFACE_DETECT_UPSAMPLE={best['upsample']})"
    )
    if verdict == "FAIL":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
