"""The ``cipherface`` command: keys, enrollment, the two daemons, probes, events, demo.

Every command reads `Settings.from_env` (``CIPHERFACE_*``) and lets flags override it.
Exit codes a script can rely on: 0 done (``probe``: verified), 1 ``probe`` not
verified, 2 an error: one line on stderr naming the file, URL or probe, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.ops_cli import OPS_COMMANDS, add_ops_parsers
from cipherface.config import Settings
from cipherface.crypto import PRESETS, Metric
from cipherface.daemon import configure_logging, run_until_signalled
from cipherface.embedding import MODELS, install_weights, weights_dir
from cipherface.exceptions import CipherFaceError, ConfigError, ProbeTimeout
from cipherface.metrics import serve_metrics
from cipherface.photos import find_faces_dir

if TYPE_CHECKING:
    from cipherface.transport import Role, Transport

__all__ = ["ERROR", "add_broker_setup_parser", "build_parser", "main"]

#: Exit code of every command that fails (``probe``: 1 means "not verified").
ERROR = 2

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().override(
        amqp_url=args.amqp_url,
        prefix=args.prefix,
        data_dir=args.data_dir,
        model=args.model,
        metric=args.metric,
        preset=args.preset,
        replica=getattr(args, "replica", None),
        shards=getattr(args, "shards", None),
        shard=getattr(args, "shard", None),
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        log_format=args.log_format,
        onprem_key=args.onprem_key,
    )


def _print_json(data: object) -> None:
    # allow_nan=False: every line is valid JSON (the wire refuses non-finite numbers).
    print(json.dumps(data, sort_keys=True, allow_nan=False), flush=True)


# -- commands ---------------------------------------------------------------------------
async def _weights(args: argparse.Namespace) -> None:
    for path in install_weights():
        print(path)
    print(f"Dlib weights are in {weights_dir()}")


async def _keygen(args: argparse.Namespace) -> None:
    from agents.onprem.agent import generate_keys

    settings = _settings(args)
    keyring = generate_keys(settings, overwrite=args.overwrite)
    verify_key = settings.signing_key_path.with_suffix(".pub")
    _print_json(
        {
            "fingerprint": keyring.fingerprint,
            "secret_key": str(settings.secret_key_path),
            "public_key": str(settings.public_key_path),
            "signing_key": str(settings.signing_key_path),
            # Pinned by every cloud replica and event reader (CIPHERFACE_ONPREM_KEY).
            "verify_key": str(verify_key),
            "verify_key_text": verify_key.read_text().strip(),
            "preset": settings.preset,
        }
    )


async def _replica_key(args: argparse.Namespace) -> None:
    """With --replica: that replica's key (created if new). Without: every replica
    identity in the data folder, one JSON line each (one is created if there is none),
    for the operator to trust on-prem."""
    from cipherface.replica import claim, identities
    from cipherface.signing import SigningKey, VerifyKey

    settings = _settings(args)
    names = [settings.replica] if settings.replica else identities(settings.data_dir)
    if not names:
        with claim(settings.data_dir) as fresh:
            names = [fresh.name]
            SigningKey.load_or_create(fresh.folder / "signing.key", fresh.name)
    for name in names:
        path = settings.override(replica=name).replica_key_path
        if not path.with_suffix(".pub").exists():
            with claim(settings.data_dir, name):
                SigningKey.load_or_create(path, name)
        _print_json(
            {
                "replica": name,
                "verify_key": str(path.with_suffix(".pub")),
                "verify_key_text": VerifyKey.load(path.with_suffix(".pub")).to_text(),
            }
        )


async def _trust(args: argparse.Namespace) -> None:
    from cipherface.signing import TrustStore, VerifyKey

    settings = _settings(args)
    store = TrustStore(settings.trust_store_path)
    if args.action == "add":
        if not args.replica or args.key is None:
            raise ConfigError("trust add needs REPLICA and KEY (a replica's signing.pub)")
        key = VerifyKey.load(args.key) if args.key.exists() else VerifyKey.from_text(str(args.key))
        store.add(args.replica, key)
    elif args.action == "remove":
        if not args.replica or not store.remove(args.replica):
            raise ConfigError(f"replica {args.replica!r} is not trusted")
    _print_json({name: key.to_text() for name, key in store.keys().items()})


async def _enroll(args: argparse.Namespace) -> None:
    from agents.onprem.agent import OnPremAgent
    from agents.onprem.enrollment import read_labels
    from cipherface.transport import Role, open_transport

    settings = _settings(args)
    if not args.folder.is_dir():  # before connecting: a typo is not a broker problem
        raise ConfigError(f"{args.folder}: no such folder")
    labels = read_labels(args.labels) if args.labels else None
    async with open_transport(settings, role=Role.ONPREM) as transport:
        agent = OnPremAgent(settings, transport)
        try:
            report = await agent.enroll(args.folder, labels=labels)
        finally:
            await agent.stop()
    _print_json(
        {
            "enrolled": report.enrolled,
            "unchanged": report.unchanged,
            "blocks_published": report.blocks_published,
            "skipped": [{"photo": photo, "reason": reason} for photo, reason in report.skipped],
        }
    )


async def _daemon(args: argparse.Namespace) -> None:
    from agents.cloud.agent import CloudAgent
    from agents.onprem.agent import OnPremAgent
    from cipherface.transport import Role

    settings = _settings(args)
    role = Role.ONPREM if args.command == "onprem" else Role.CLOUD
    async with contextlib.AsyncExitStack() as stack:
        transport = await _open_when_declared(stack, settings, role)
        agent = (OnPremAgent if args.command == "onprem" else CloudAgent)(settings, transport)
        ops = serve_metrics(settings.metrics_address, settings.metrics_port, agent.readiness)
        if ops is not None:
            stack.callback(ops.close)
        await run_until_signalled(agent.start, agent.stop)


async def _open_when_declared(
    stack: contextlib.AsyncExitStack, settings: Settings, role: Role, timeout: float = 300.0
) -> Transport:
    """Open the role's transport; while what another role declares is missing (a cloud
    started beside on-prem, before it declared the gallery), wait for it."""
    from cipherface.exceptions import MissingResourceError
    from cipherface.transport import open_transport

    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            return await stack.enter_async_context(open_transport(settings, role=role))
        except MissingResourceError as exc:
            if time.monotonic() > deadline:
                raise
            if not waiting:
                log.info("waiting (up to %.0fs): %s", timeout, exc)
                waiting = True
            await asyncio.sleep(1.0)


async def _probe(args: argparse.Namespace) -> int:
    """Exit 0 verified, 1 not verified, 2 an error event (or no event in time)."""
    from cipherface.client import Client
    from cipherface.signing import VerifyKey
    from cipherface.transport import Role, open_transport

    settings = _settings(args)
    if not args.image.is_file():
        raise ConfigError(f"{args.image}: no such file")
    async with open_transport(settings, role=Role.CLIENT) as transport:
        client = Client(transport, VerifyKey.load(settings.onprem_verify_key_path))
        try:
            event = await client.verify(args.image, args.subject, timeout=args.timeout)
        except ProbeTimeout:  # exit 2, like an error event
            raise ProbeTimeout(
                f"{args.image}: no event within {args.timeout:g}s (are the daemons running?)"
            ) from None
    _print_json(event.to_json())
    return 2 if event.error else (0 if event.verified else 1)


async def _watch(args: argparse.Namespace) -> None:
    from cipherface.client import Client
    from cipherface.signing import VerifyKey
    from cipherface.transport import Role, open_transport

    settings = _settings(args)
    async with open_transport(settings, role=Role.CLIENT) as transport:
        client = Client(transport, VerifyKey.load(settings.onprem_verify_key_path))
        async with client.events(args.pattern) as events:
            count = 0
            async for event in events:
                _print_json(event.to_json())
                count += 1
                if args.count and count >= args.count:
                    return


async def _demo(args: argparse.Namespace) -> None:
    from agents.demo import run_demo

    folder = find_faces_dir(args.folder)
    base = _settings(args)
    with tempfile.TemporaryDirectory(prefix="cipherface-demo-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        summary = await run_demo(
            base.override(data_dir=data_dir, amqp_url=args.amqp_url or ""), folder
        )
    _print_json(summary)


async def _broker_setup(args: argparse.Namespace) -> None:
    """``cipherface broker-setup``: vhost, role users, permissions, shared topology."""
    from cipherface.broker_setup import ManagementAPI, setup_broker
    from cipherface.transport import Topology

    settings = _settings(args)
    api = ManagementAPI(args.management_url)
    await asyncio.to_thread(api.wait, args.wait)
    report = await asyncio.to_thread(
        setup_broker, api, Topology(prefix=settings.prefix), args.credentials, vhost=args.vhost
    )
    _print_json(report.to_json())


def add_broker_setup_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``broker-setup`` sub-command's arguments (self-contained, to move with the CLI)."""
    from cipherface.broker_setup import DEFAULT_MANAGEMENT_URL, DEFAULT_VHOST

    setup = sub.add_parser(
        "broker-setup",
        parents=[common],
        help="create a vhost and least-privilege users (onprem, cloud, client) on RabbitMQ",
    )
    setup.add_argument(
        "--management-url",
        default=os.environ.get("CIPHERFACE_MANAGEMENT_URL") or DEFAULT_MANAGEMENT_URL,
        help="management API with admin credentials (env CIPHERFACE_MANAGEMENT_URL)",
    )
    setup.add_argument(
        "--vhost", default=DEFAULT_VHOST, help="vhost to create (default cipherface)"
    )
    setup.add_argument(
        "--credentials",
        type=Path,
        default=Path(os.environ.get("CIPHERFACE_BROKER_CREDENTIALS") or "broker-credentials"),
        help="folder of <role>/password files (0600), kept across runs",
    )
    setup.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the management API"
    )


# -- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per task)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--amqp-url", help="RabbitMQ URL (env CIPHERFACE_AMQP_URL)")
    common.add_argument("--prefix", help="queue/exchange name prefix (default cipherface)")
    common.add_argument(
        "--data-dir", type=Path, help="keys and galleries (default ./cipherface-data)"
    )
    common.add_argument("--model", choices=sorted(MODELS), help="DeepFace model (default Dlib)")
    common.add_argument("--metric", choices=[m.value for m in Metric], help="default cosine")
    common.add_argument("--preset", choices=sorted(PRESETS), help="CKKS parameters (default n8192)")
    common.add_argument(
        "--metrics-port", type=int, help="serve /metrics, /healthz and /readyz on this port"
    )
    common.add_argument("--metrics-address", help="address of that port (default 127.0.0.1)")
    common.add_argument("--log-format", choices=["text", "json"], help="default text")
    common.add_argument(
        "--onprem-key",
        type=Path,
        help="on-prem's verify key to pin (env CIPHERFACE_ONPREM_KEY; "
        "default DATA_DIR/onprem/signing.pub)",
    )
    common.add_argument(
        "--log-level",
        help="DEBUG, INFO, WARNING or ERROR (env CIPHERFACE_LOG_LEVEL; default INFO, "
        "WARNING for demo)",
    )

    parser = argparse.ArgumentParser(
        prog="cipherface",
        description="Privacy-preserving face recognition on CKKS-encrypted embeddings.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("weights", parents=[common], help="place the offline Dlib weights")
    keygen = sub.add_parser(
        "keygen", parents=[common], help="create on-prem's CKKS and signing keys"
    )
    keygen.add_argument("--overwrite", action="store_true", help="replace existing keys")
    enroll = sub.add_parser("enroll", parents=[common], help="enroll a folder of face photos")
    enroll.add_argument(
        "folder",
        type=Path,
        help="photos, one face each: FOLDER/<subject>/*.jpg (or FOLDER/<subject>.jpg); "
        "photos enrolled before are skipped",
    )
    enroll.add_argument(
        "--labels",
        type=Path,
        help="CSV of file name,subject rows (an optional header row is recognised)",
    )
    onprem = sub.add_parser("onprem", parents=[common], help="run the on-prem daemon")
    onprem.add_argument(
        "--shards", type=int, help="shards the gallery is spread over (default 1; raise to add)"
    )
    cloud = sub.add_parser("cloud", parents=[common], help="run a cloud daemon")
    cloud.add_argument("--replica", help="replica name (default: an identity kept in DATA_DIR)")
    cloud.add_argument("--shard", type=int, help="the shard this replica serves (default 0)")
    replica_key = sub.add_parser(
        "replica-key", parents=[common], help="print cloud replicas' verify keys (to trust)"
    )
    replica_key.add_argument("--replica", help="this replica only (created if new)")
    trust = sub.add_parser(
        "trust", parents=[common], help="on-prem: the replicas whose scores and syncs it accepts"
    )
    trust.add_argument("action", choices=["add", "remove", "list"], help="what to do")
    trust.add_argument("replica", nargs="?", help="replica name (add, remove)")
    trust.add_argument(
        "key", nargs="?", type=Path, help="the replica's signing.pub, or its text (add)"
    )
    probe = sub.add_parser(
        "probe",
        parents=[common],
        help="verify/identify one image; exit 0 verified, 1 not verified, 2 error",
    )
    probe.add_argument("image", type=Path, help="a JPEG, PNG or WebP photo")
    probe.add_argument("--subject", help="claimed subject (1:1); omit for 1:N")
    probe.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the event (default 120)"
    )
    watch = sub.add_parser("watch", parents=[common], help="print events as JSON lines")
    watch.add_argument("--pattern", default="#", help="routing-key pattern, e.g. event.*.verified")
    watch.add_argument("--count", type=int, default=0, help="stop after this many events")
    demo = sub.add_parser("demo", parents=[common], help="everything in one process")
    demo.add_argument("folder", type=Path, nargs="?", help="photos (default: found)")
    add_broker_setup_parser(sub, common)
    add_ops_parsers(sub, common)
    return parser


_COMMANDS = {
    "weights": _weights,
    "keygen": _keygen,
    "enroll": _enroll,
    "onprem": _daemon,
    "cloud": _daemon,
    "replica-key": _replica_key,
    "trust": _trust,
    "probe": _probe,
    "watch": _watch,
    "demo": _demo,
    "broker-setup": _broker_setup,
    **OPS_COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cipherface`` command."""
    args = build_parser().parse_args(argv)
    # The demo's output is its table: the daemons' INFO lines would break it up.
    quiet = "WARNING" if args.command == "demo" else "INFO"
    configure_logging(
        args.log_level or os.environ.get("CIPHERFACE_LOG_LEVEL") or quiet,
        args.log_format or os.environ.get("CIPHERFACE_LOG_FORMAT") or "text",
    )
    started = time.perf_counter()
    try:
        code = asyncio.run(_COMMANDS[args.command](args))
    except (CipherFaceError, OSError) as exc:  # a user's error: one line, no traceback
        print(f"cipherface {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return ERROR
    except KeyboardInterrupt:
        return 130
    log.debug("%s took %.1fs", args.command, time.perf_counter() - started)
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
