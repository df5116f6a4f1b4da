"""On-prem, cloud and a client in one process, on the in-process broker (or RabbitMQ).

The photo folder's ``identities.csv`` (``file,identity_group``), when present,
labels the photos: each group's first photos are enrolled and one held-out photo
per group is probed 1:N; one true and one false 1:1 claim follow. Without it,
every photo is its own subject and each is probed 1:N against the rest.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import wire
from cipherface.client import Client
from cipherface.config import Settings
from cipherface.photos import identity_groups
from cipherface.signing import TrustStore
from cipherface.transport import MemoryBroker, open_transport

__all__ = ["plan", "run_demo"]

log = logging.getLogger(__name__)

#: Photos enrolled per identity group: enough to show 1:N, quick on two cores.
ENROLL_PER_GROUP = 3


def plan(folder: Path) -> tuple[dict[str, str], list[tuple[Path, str]]]:
    """Which photos to enroll ({file: subject}) and which to probe ([(photo, true subject)])."""
    labels_file = folder / "identities.csv"
    if not labels_file.exists():
        photos = sorted(p for p in folder.glob("*.jpg"))
        return {p.name: p.stem for p in photos}, [(p, p.stem) for p in photos[:5]]
    groups = identity_groups(folder)
    enroll: dict[str, str] = {}
    probes: list[tuple[Path, str]] = []
    for group, files in sorted(groups.items()):
        *enrolled, held_out = files[: ENROLL_PER_GROUP + 1]
        enroll.update({name: group for name in enrolled})
        probes.append((folder / held_out, group))
    return enroll, probes


def _row(*cells: str) -> str:
    widths = (4, 14, 6, 6, 8, 5, 8, 6)
    return " ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True)).rstrip()


def _wrong(event: wire.VerificationEvent, truth: str, claim: str | None) -> str:
    """Why the event is not the right answer ('' when it is)."""
    if event.error:
        return event.error
    distance, limit = event.distance, event.threshold
    if claim is not None and event.verified != (claim == truth):
        if event.verified:
            return f"{claim} accepted for {truth}'s photo: distance {distance} <= {limit}"
        return f"{truth} not recognised: distance {distance} > threshold {limit}"
    if claim is None and event.subject != truth:
        return f"named {event.subject} (distance {distance}), not {truth}"
    if claim is None and not event.verified:
        return f"{truth} is the nearest, but at {distance} > threshold {limit}"
    return ""


async def run_demo(settings: Settings, folder: Path) -> dict[str, Any]:
    """Run the whole pipeline once and return a summary (also printed as events go)."""
    broker = MemoryBroker()
    generate_keys(settings)
    to_enroll, probes = plan(folder)
    staging = settings.data_dir / "enroll"
    staging.mkdir(parents=True, exist_ok=True)
    for name in to_enroll:
        (staging / name).symlink_to((folder / name).resolve())

    async with (
        open_transport(settings, broker) as onprem_link,
        open_transport(settings, broker) as cloud_link,
        open_transport(settings, broker) as client_link,
    ):
        onprem = OnPremAgent(settings, onprem_link)
        cloud = CloudAgent(settings, cloud_link)
        # What an operator does once per replica: trust its signing key on-prem.
        TrustStore(settings.trust_store_path).add(cloud.replica, cloud.signer.verify_key)
        await onprem.start()
        started = time.perf_counter()
        report = await onprem.enroll(staging, labels=to_enroll, progress=False)
        enroll_seconds = time.perf_counter() - started
        await cloud.start()
        await asyncio.wait_for(cloud.ready.wait(), timeout=300)

        client = Client(client_link, onprem.signer.verify_key)
        results = []
        latencies = []
        claims = [(photo, truth, None) for photo, truth in probes]
        if len(probes) >= 2:
            claims += [(probes[0][0], probes[0][1], probes[0][1])]  # a true claim
            claims += [(probes[0][0], probes[0][1], probes[1][1])]  # a false claim
        print(_row("mode", "photo", "claim", "truth", "subject", "faces", "distance", "result"))
        async with client.events() as events:
            for photo, truth, claim in claims:
                sent = time.perf_counter()
                probe_id = await client.publish_probe(photo, claim)
                event = await events.wait_for(probe_id, timeout=300)
                latencies.append(time.perf_counter() - sent)
                why = _wrong(event, truth, claim)
                results.append({**event.to_json(), "photo": photo.name, "truth": truth, "why": why})
                print(
                    _row(
                        event.mode,
                        photo.name,
                        claim or "-",
                        truth,
                        event.subject or "-",
                        str(len(event.faces)),
                        "-" if event.distance is None else f"{event.distance:.4f}",
                        "WRONG" if why else "OK",
                    ),
                    flush=True,
                )
        await cloud.stop()
        await onprem.stop()

    return {
        "enrolled": report.enrolled,
        "skipped": len(report.skipped),
        "enroll_seconds": round(enroll_seconds, 2),
        "probes": len(results),
        "correct": sum(not r["why"] for r in results),
        "wrong": [f"{r['photo']}: {r['why']}" for r in results if r["why"]],
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(max(latencies), 3),
        "model": settings.model,
        "metric": settings.metric.value,
        "preset": settings.preset,
    }
