"""The ``cipherface`` commands that look after a running deployment.

``list``, ``remove``, ``rotate-keys``, ``backup``, ``restore`` (on-prem's folder),
``dead list|replay|purge`` (the dead-letter queue, with the broker admin's URL)
and ``health`` (a daemon's ``/healthz`` or ``/readyz``, for container health checks).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cipherface.exceptions import ConfigError

__all__ = ["OPS_COMMANDS", "add_ops_parsers"]


def _helpers() -> tuple[Callable[[argparse.Namespace], Any], Callable[[object], None]]:
    from agents.cli import _print_json, _settings

    return _settings, _print_json


async def _list(args: argparse.Namespace) -> None:
    """Subjects, template counts, blocks and versions, and what each replica serves."""
    from agents.onprem.agent import KeySet, read_replica_status
    from agents.onprem.rotation import read_state
    from cipherface.gallery.lifecycle import block_summary

    settings_of, print_json = _helpers()
    settings = settings_of(args)
    keys = KeySet.load(settings.key_dir, settings)
    try:
        book = keys.book
        counts = collections.Counter(book.subject_of(t) for t in book.template_ids())
        replicas = read_replica_status(settings.replica_status_path)
        held = {
            name: dict(zip(status.blocks, status.versions, strict=True))
            for name, status in replicas.items()
            if status.fingerprint == keys.fingerprint
        }
        blocks = [
            {
                "block": block.block_id,
                "version": block.version,
                "templates": block.templates,
                "pending": block.pending,
                "shard": book.shards.home.get(block.block_id, 0),
                # replica -> the version it serves (null: not this block, or another key)
                "replicas": {name: versions.get(block.block_id) for name, versions in held.items()},
            }
            for block in block_summary(book)
        ]
        # A replica is up to date when it serves its shard's blocks at their versions.
        current = {
            shard: {b["block"]: b["version"] for b in blocks if b["shard"] == shard}
            for shard in range(book.shards.count)
        }
        subjects: dict[str, Any] = dict(sorted(counts.items()))
        if args.templates:
            subjects = {s: sorted(book.template_ids(s)) for s in sorted(counts)}
        print_json(
            {
                "fingerprint": keys.fingerprint,
                "templates": len(book),
                "subjects": subjects,
                "blocks": blocks,
                "replicas": {
                    name: {
                        "fingerprint": status.fingerprint,
                        "templates": status.templates,
                        "awaiting": status.awaiting,
                        "staged": status.staged,
                        "reported_at": status.reported_at,
                        "shard": status.shard,
                        "up_to_date": held.get(name) == current.get(status.shard),
                    }
                    for name, status in sorted(replicas.items())
                },
                "rotation": read_state(settings.onprem_dir).get("phase"),
            }
        )
    finally:
        keys.close()


async def _remove(args: argparse.Namespace) -> None:
    """Withdraw a subject or one template; re-encrypt and republish its blocks."""
    from agents.onprem.agent import OnPremAgent
    from cipherface.transport import Role, open_transport

    if (args.subject is None) == (args.template is None):
        raise ConfigError("remove takes a SUBJECT or --template ID (one of them)")
    settings_of, print_json = _helpers()
    settings = settings_of(args)
    async with open_transport(settings, role=Role.ONPREM) as transport:
        agent = OnPremAgent(settings, transport)
        try:
            report = await agent.remove(args.subject, template_id=args.template)
        finally:
            await agent.stop()
    print_json({"removed": report.removed, "blocks_published": report.blocks_published})


async def _rotate_keys(args: argparse.Namespace) -> None:
    """Ask the on-prem daemon to rotate its CKKS key; print each phase; wait for done."""
    from agents.onprem.rotation import IN_PROGRESS, REQUEST_FILE, read_state
    from cipherface.private import write_private

    settings_of, print_json = _helpers()
    settings = settings_of(args)
    onprem = settings.onprem_dir
    if read_state(onprem).get("phase") in IN_PROGRESS:
        raise ConfigError("a key rotation is already in progress")
    asked = time.time()
    write_private(onprem / REQUEST_FILE, b"")
    deadline = asked + args.timeout
    seen = None
    while time.time() < deadline:
        state = read_state(onprem)
        mine = state.get("started_at", 0) >= asked - 1
        if not mine and time.time() > asked + args.pickup:
            (onprem / REQUEST_FILE).unlink(missing_ok=True)
            raise ConfigError("the on-prem daemon did not take the request: is it running?")
        if mine and state.get("phase") != seen:
            seen = state.get("phase")
            print_json({k: state.get(k) for k in ("phase", "old", "new", "waiting_for", "error")})
            if seen == "done":
                return
            if seen == "failed":
                raise ConfigError(f"key rotation failed: {state.get('error')}")
        await asyncio.sleep(0.5)
    raise ConfigError(f"the key rotation is not done after {args.timeout:.0f}s (phase {seen})")


async def _backup(args: argparse.Namespace) -> None:
    from cipherface.backup import backup

    settings_of, print_json = _helpers()
    settings = settings_of(args)
    files = await asyncio.to_thread(backup, settings.onprem_dir, args.archive)
    print_json({"archive": str(args.archive), "files": files})


async def _restore(args: argparse.Namespace) -> None:
    from agents.onprem.agent import KeySet
    from cipherface.backup import restore

    settings_of, print_json = _helpers()
    settings = settings_of(args)
    files = await asyncio.to_thread(
        restore, args.archive, settings.onprem_dir, overwrite=args.overwrite
    )
    # The keys load and the book is theirs (its fingerprint is checked on opening).
    keys = KeySet.load(settings.key_dir, settings)
    templates = len(keys.book)
    keys.close()
    print_json({"restored": files, "fingerprint": keys.fingerprint, "templates": templates})


async def _dead(args: argparse.Namespace) -> None:
    from cipherface.deadletters import list_dead, purge_dead, replay_dead
    from cipherface.transport import open_transport

    settings_of, print_json = _helpers()
    settings = settings_of(args)
    async with open_transport(settings) as transport:
        if args.action == "list":
            letters = await list_dead(transport, args.limit)
        elif args.action == "replay":
            letters = await replay_dead(transport, args.id or (), args.limit)
        else:
            letters = await purge_dead(transport, args.id or (), args.limit)
    for letter in letters:
        print_json(letter.to_json())


async def _health(args: argparse.Namespace) -> None:
    settings_of, print_json = _helpers()
    settings = settings_of(args)
    if settings.metrics_port is None:
        raise ConfigError("health needs the daemon's --metrics-port (CIPHERFACE_METRICS_PORT)")
    host = "127.0.0.1" if settings.metrics_address in ("0.0.0.0", "") else settings.metrics_address
    url = f"http://{host}:{settings.metrics_port}/{'readyz' if args.ready else 'healthz'}"
    # The daemon's own endpoint: never through an HTTP proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as answer:
            print_json(json.loads(answer.read()))
    except urllib.error.HTTPError as exc:
        print_json(json.loads(exc.read() or b"{}"))
        raise ConfigError(f"{url} answered {exc.code}") from None
    except OSError as exc:
        raise ConfigError(f"{url} does not answer: {exc}") from None


def add_ops_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The operations sub-commands' arguments."""
    listing = sub.add_parser(
        "list", parents=[common], help="subjects, blocks, versions, and what each replica serves"
    )
    listing.add_argument("--templates", action="store_true", help="template ids per subject")
    remove = sub.add_parser(
        "remove", parents=[common], help="withdraw a subject or a template; republish its blocks"
    )
    remove.add_argument("subject", nargs="?", help="the subject to withdraw (or --template)")
    remove.add_argument("--template", help="one template id instead of a whole subject")
    rotate = sub.add_parser(
        "rotate-keys", parents=[common], help="re-encrypt the gallery under a new CKKS key"
    )
    rotate.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for done")
    rotate.add_argument(
        "--pickup", type=float, default=30.0, help="seconds for the daemon to take the request"
    )
    backup = sub.add_parser("backup", parents=[common], help="archive on-prem's folder (0600)")
    backup.add_argument("archive", type=Path, help="the .tar.gz to write (0600)")
    restore = sub.add_parser("restore", parents=[common], help="restore on-prem's folder")
    restore.add_argument("archive", type=Path, help="a .tar.gz written by backup")
    restore.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    dead = sub.add_parser(
        "dead", parents=[common], help="dead letters: list, replay or purge (broker admin URL)"
    )
    dead.add_argument("action", choices=["list", "replay", "purge"], help="what to do")
    dead.add_argument("--id", action="append", help="only this message id (repeatable)")
    dead.add_argument(
        "--limit", type=int, default=10_000, help="most dead letters to handle (default 10000)"
    )
    health = sub.add_parser(
        "health", parents=[common], help="ask a local daemon's /healthz (or /readyz)"
    )
    health.add_argument("--ready", action="store_true", help="readiness, not liveness")


OPS_COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[None]]] = {
    "list": _list,
    "remove": _remove,
    "rotate-keys": _rotate_keys,
    "backup": _backup,
    "restore": _restore,
    "dead": _dead,
    "health": _health,
}
