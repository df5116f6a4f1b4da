"""Bursts of probes against the real RabbitMQ, with faults: how many events, how many duplicates.

For each scenario (no fault; the cloud agent SIGKILLed mid-burst and restarted;
on-prem likewise; the broker restarted with ``rabbitmqctl stop_app``/``start_app``)
it prints probes sent, events received (raw, no deduplication), distinct probes
answered, duplicate events, duplicates on-prem suppressed, and the time.

The agents run as ``cipherface onprem`` / ``cipherface cloud`` processes, exactly as
in ``tests/agents/test_faults.py`` (whose harness this reuses).

    python benchmarks/bench_faults.py [--probes 10000] [--scenarios baseline,kill-cloud,...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cipherface import photos  # noqa: E402
from cipherface.config import DEFAULT_AMQP_URL  # noqa: E402
from cipherface.embedding import install_weights  # noqa: E402
from tests.agents.test_faults import (  # noqa: E402
    SCENARIOS,
    FaultCluster,
    broker_always_running,
    broker_restart,
    kill_and_restart,
    probe_set,
    run_burst,
)


async def _run(args: argparse.Namespace, cluster: FaultCluster) -> int:
    probes = probe_set(args.faces, photos.identity_groups(args.faces))
    faults = {
        "baseline": None,
        "kill-cloud": kill_and_restart(cluster, "cloud"),
        "kill-onprem": kill_and_restart(cluster, "onprem"),
        "broker-restart": broker_restart(),
    }
    failures = 0
    print(
        f"{'scenario':<16} {'sent':>6} {'events':>7} {'distinct':>8} {'dup events':>10} "
        f"{'suppressed':>10} {'time s':>7} {'probes/s':>8}",
        flush=True,
    )
    for scenario in args.scenarios:
        result = await run_burst(
            cluster, scenario, probes, args.probes, fault=faults[scenario], timeout=args.timeout
        )
        missing = result.sent - len(result.counts)
        failures += missing > 0
        print(
            f"{scenario:<16} {result.sent:>6} {result.received:>7} {len(result.counts):>8} "
            f"{result.duplicate_events:>10} {result.suppressed:>10} {result.seconds:>7.1f} "
            f"{result.sent / result.seconds:>8.0f}",
            flush=True,
        )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=10_000, help="probes per burst")
    parser.add_argument(
        "--scenarios",
        type=lambda text: text.split(","),
        default=list(SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)}",
    )
    parser.add_argument("--faces", type=Path, default=photos.default_faces_dir())
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per burst")
    parser.add_argument("--keep", action="store_true", help="keep the data and log folder")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    url = os.environ.get("CIPHERFACE_AMQP_URL") or DEFAULT_AMQP_URL
    work = Path(tempfile.mkdtemp(prefix="cipherface-bench-faults-"))
    home = work / "deepface-home"
    home.mkdir()
    os.environ["DEEPFACE_HOME"] = str(home)
    install_weights()
    cluster = FaultCluster(url, work, home)
    failures = 1
    try:
        with broker_always_running():
            cluster.enroll(args.faces, photos.identity_groups(args.faces))
            cluster.start("onprem")
            cluster.start("cloud")
            failures = asyncio.run(_run(args, cluster))
    finally:
        with broker_always_running():
            codes = cluster.stop()
            queues = tuple(f"{cluster.prefix}.watch-{s}" for s in SCENARIOS)
            asyncio.run(cluster.delete_broker_objects(queues))
        print(f"daemon exit codes after SIGTERM: {codes}; logs in {cluster.logs}", flush=True)
        if not args.keep and failures == 0:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
