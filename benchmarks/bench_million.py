"""1:N over a million templates through the daemons, every message under the 4 MiB cap.

On-prem enrolls N synthetic 128-d templates (default 1,000,000), each its own
subject, encrypts them and publishes the gallery in chunks; a cloud replica per
shard syncs it (``--shards``: with more than one, the million-subject list travels
in `subjects` parts and a 1:1 claim goes to one shard); a client sends 1:N probes
and 1:1 claims, each answered through the whole path (score parts gathered by
on-prem, every integrity check on). Runs on RabbitMQ when it answers, else on the
in-process broker. Every message each party sends is recorded: the script prints
the largest of each kind against the cap and exits 1 if one is over, or if an
answer is wrong.

    python benchmarks/bench_million.py [--templates 1000000] [--shards 1]
        [--broker rabbitmq|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from bench_messages import Recording, Synthetic, links

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import wire
from cipherface.client import Client
from cipherface.config import DEFAULT_AMQP_URL, Settings
from cipherface.signing import TrustStore


async def run(templates: int, broker: str, shards: int) -> int:
    sizes: dict[str, list[int]] = defaultdict(list)
    rng = np.random.default_rng(1)
    probed = [0, templates // 2, templates - 1]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            replica="m1",
            prefix=f"bench-million-{os.getpid()}",
            amqp_url=DEFAULT_AMQP_URL if broker == "rabbitmq" else None,
            workers=2,
            shards=shards,
        )
        generate_keys(settings)
        async with links(settings) as (a, b, c):
            onprem = OnPremAgent(settings, Recording(a, sizes))  # type: ignore[arg-type]
            vectors: dict[str, np.ndarray] = {}

            def templates_of() -> object:
                for i in range(templates):
                    vector = rng.standard_normal(128)
                    if i in probed:
                        vectors[f"s{i}"] = vector
                    yield f"s{i}", vector

            started = time.perf_counter()
            await onprem.start()  # spreads the book over the shards before it fills
            onprem.book.add_many(templates_of())  # type: ignore[arg-type]
            await onprem.publish_gallery(onprem.book.pending_blocks())
            publish_s = time.perf_counter() - started
            near = {k: v + 0.05 * rng.standard_normal(128) for k, v in vectors.items()}
            embedder = Synthetic(near)
            clouds = []
            for shard in range(shards):
                own = dataclasses.replace(settings, replica=f"m{shard}", shard=shard)
                cloud = CloudAgent(own, Recording(b, sizes))  # type: ignore[arg-type]
                TrustStore(settings.trust_store_path).add(cloud.replica, cloud.signer.verify_key)
                cloud.embedder = embedder  # type: ignore[assignment]
                clouds.append(cloud)
            started = time.perf_counter()
            for cloud in clouds:
                await cloud.start()
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in clouds)), 3600)
            sync_s = time.perf_counter() - started
            client = Client(Recording(c, sizes), onprem.signer.verify_key)  # type: ignore[arg-type]
            rows, wrong = [], 0
            async with client.events() as events:
                asks = [(f"s{i}", None, f"s{i}") for i in probed]
                asks += [(f"s{probed[0]}", f"s{probed[0]}", True)]
                asks += [(f"s{probed[0]}", f"s{probed[1]}", False)]
                for image, claim, expected in asks:
                    searches = [c.shards.searches for c in clouds]
                    sent = time.perf_counter()
                    probe_id = await client.publish_probe(image.encode(), claim)
                    event = await events.wait_for(probe_id, 1800)
                    seconds = time.perf_counter() - sent
                    right = (
                        event.subject == expected and event.verified
                        if claim is None
                        else event.verified is expected
                    )
                    wrong += not right
                    mode = "1:N" if claim is None else "1:1"
                    # Which shards searched it (all of them with one shard: no fan-out).
                    on = [k for k, c in enumerate(clouds) if c.shards.searches > searches[k]]
                    rows.append(
                        f"{mode:<5}{image:>10}{claim or '-':>10}{seconds:>9.2f}"
                        f"{','.join(map(str, on)) or '-':>8}"
                        f"  {event.subject} {event.verified} {event.error or ''}"
                    )
            for cloud in clouds:
                await cloud.stop()
            await onprem.stop()
    cap = settings.max_message_size
    print(
        f"\n{templates:,} templates x 128-d ({templates:,} subjects), {shards} shard(s), "
        f"over {broker}, cap {cap:,} B, load {os.getloadavg()}"
    )
    print(f"enroll + encrypt + publish {publish_s:.1f} s; replica sync {sync_s:.1f} s")
    print(f"{'mode':<5}{'probe':>10}{'claim':>10}{'e2e s':>9}{'shards':>8}  answer")
    print("\n".join(rows))
    print(f"{'kind':<14}{'messages':>9}{'max B':>12}  verdict")
    over = 0
    for kind, values in sorted(sizes.items()):
        verdict = "PASS" if max(values) <= cap else "FAIL (over the cap)"
        over += max(values) > cap
        print(f"{kind:<14}{len(values):>9}{max(values):>12,}  {verdict}")
    print(f"verdict every answer right: {'PASS' if not wrong else f'FAIL ({wrong} wrong)'}")
    print(f"verdict every message <= {cap:,} B: {'PASS' if not over else 'FAIL'}")
    return 1 if wrong or over else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=1, help="one replica per shard")
    parser.add_argument("--broker", choices=("rabbitmq", "memory"), default="rabbitmq")
    args = parser.parse_args()
    assert wire.MAX_MESSAGE_BYTES == 4 * 1024 * 1024
    raise SystemExit(asyncio.run(run(args.templates, args.broker, args.shards)))


if __name__ == "__main__":
    main()
