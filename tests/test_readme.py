"""The README is a contract: its agent walkthrough runs as written, its wire table is the code's."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import types
import typing
from collections.abc import Mapping
from pathlib import Path

import pytest

from cipherface.wire import payloads
from cipherface.wire.messages import _KINDS
from tests.environment import amqp_url_or_skip, unique_prefix

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
_NONE = type(None)
_SCALARS = {str: "str", bytes: "bin", int: "int", float: "float", bool: "bool"}


def _type_name(annotation: object) -> str:
    """A field's msgpack type as the README writes it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]  # type: ignore[index]
    if origin in (typing.Union, types.UnionType):
        return _type_name(next(a for a in args if a is not _NONE)) + r" \| nil"
    if origin is tuple:
        return f"[{_type_name(args[0])}]"
    if origin in (Mapping, dict):
        return "{str: float}"
    return annotation.__name__  # type: ignore[attr-defined]


def _fields(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    return ", ".join(f"`{f.name}` {_type_name(hints[f.name])}" for f in dataclasses.fields(cls))


PAYLOADS = (
    payloads.FaceScores,
    payloads.FaceResult,
    payloads.BlockScores,
    payloads.ProbeCheck,
    payloads.EncryptedProbe,
    payloads.BlockLayout,
    payloads.ShardMap,
    payloads.FaceProbe,
)


@pytest.mark.parametrize(
    ("label", "cls"),
    [*((f"`{kind}`", cls) for kind, cls in _KINDS.items()), *((c.__name__, c) for c in PAYLOADS)],
)
def test_the_wire_contract_lists_every_field_with_its_type(label: str, cls: type) -> None:
    assert f"| {label} | {_fields(cls)} |" in README


def test_the_wire_contract_says_how_to_publish_a_probe() -> None:
    for needed in (
        "exchange **`cipherface.probes.in`** with routing key\n**`cipherface.probes`**",
        "`x-dead-letter-exchange: cipherface.dlx`",
    ):
        assert needed in README


def _walkthrough() -> str:
    section = README.split("## Running the agents on RabbitMQ", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_the_agents_walkthrough_runs_as_written(
    tmp_path: Path, deepface_home: Path, faces_dir: Path
) -> None:
    """The block, verbatim, in a fresh folder beside the clone's .venv, against the broker."""
    url = amqp_url_or_skip()
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "walkthrough.sh").write_text(_walkthrough())
    env = {
        **os.environ,
        "CIPHERFACE_FACES_DIR": str(faces_dir),
        "CIPHERFACE_PREFIX": unique_prefix(),
        "DEEPFACE_HOME": str(deepface_home),
        "CIPHERFACE_LOG_LEVEL": "WARNING",
    }
    env.pop("CIPHERFACE_DATA_DIR", None)
    logs = {name: (tmp_path / f"walkthrough.{name}").open("w+") for name in ("out", "err")}
    proc = subprocess.Popen(
        ["bash", "-e", "walkthrough.sh"],
        cwd=tmp_path,
        env=env,
        stdout=logs["out"],  # files, not pipes: a daemon left behind holds no pipe open
        stderr=logs["err"],
        text=True,
        start_new_session=True,  # its background daemons are one process group
    )
    try:
        proc.wait(timeout=900)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = _read(logs["out"]), _read(logs["err"])
    assert proc.returncode == 0, err[-4000:]
    assert url.startswith("amqp")
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    enrolled = next(line for line in lines if "enrolled" in line)
    assert enrolled["enrolled"] == 4 and enrolled["skipped"] == []
    events = [line for line in lines if "probe_id" in line]
    # Each probe printed by `probe`, then the three again from events.jsonl.
    assert len(events) == 6
    verified, searched, refused = events[:3]
    assert (verified["subject"], verified["verified"]) == ("alice", True)
    assert (searched["subject"], searched["verified"], searched["mode"]) == ("bob", True, "1:N")
    assert (refused["subject"], refused["verified"], refused["error"]) == ("bob", False, None)
    assert "exit 1: not bob" in out
    assert {e["probe_id"] for e in events[3:]} == {e["probe_id"] for e in events[:3]}


def _read(handle: typing.IO[str]) -> str:
    handle.seek(0)
    with handle:
        return handle.read()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
