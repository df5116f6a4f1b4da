"""The ``cipherface`` command, run as a user would: real processes, real broker."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.cli import build_parser
from agents.onprem.enrollment import read_labels
from cipherface.transport import RabbitMQTransport, Topology
from tests.environment import amqp_url_or_skip, unique_prefix

CLI = [sys.executable, "-m", "agents.cli"]


def _env(tmp_path: Path, deepface_home: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "CIPHERFACE_DATA_DIR": str(tmp_path / "data"),
        "DEEPFACE_HOME": str(deepface_home),
        # No downloads: a run that tried one would fail instead of quietly succeeding.
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "CIPHERFACE_LOG_LEVEL": "INFO",
    }
    env.pop("CIPHERFACE_AMQP_URL", None)
    return {**env, **extra}


def _run(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_keygen_writes_private_0600_and_refuses_to_overwrite(
    tmp_path: Path, deepface_home: Path
) -> None:
    env = _env(tmp_path, deepface_home)
    first = _run(["keygen"], env)
    assert first.returncode == 0, first.stderr
    info = json.loads(first.stdout)
    assert stat.S_IMODE(Path(info["secret_key"]).stat().st_mode) == 0o600
    again = _run(["keygen"], env)
    assert again.returncode == 2
    assert "refusing to replace keys" in again.stderr


@pytest.mark.slow
def test_demo_runs_offline_and_prints_results(
    tmp_path: Path, deepface_home: Path, faces_dir: Path
) -> None:
    result = _run(["demo", str(faces_dir)], _env(tmp_path, deepface_home), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["probes"] == 15 and summary["enrolled"] > 30
    assert summary["correct"] >= 12, result.stdout
    assert sum(" OK" in line for line in lines) == summary["correct"]
    # Each wrong answer is listed with why (the event's error, or the distance).
    assert len(summary["wrong"]) == summary["probes"] - summary["correct"]


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    """Until the daemon's ``/readyz`` answers 200 (its ``/healthz`` answers before)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the daemon exited"
        assert time.monotonic() < deadline, "the daemon did not get ready"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            exc.close()
        except OSError:
            pass
        time.sleep(0.2)


@pytest.fixture
def daemons(tmp_path: Path, deepface_home: Path, faces_dir: Path) -> Iterator[dict[str, object]]:
    """keygen, on-prem and one cloud daemon on RabbitMQ, G01 and G02 enrolled via the CLI."""
    url = amqp_url_or_skip()
    env = _env(
        tmp_path,
        deepface_home,
        CIPHERFACE_AMQP_URL=url,
        CIPHERFACE_PREFIX=unique_prefix(),
        CIPHERFACE_LOG_FORMAT="json",
        CIPHERFACE_ROTATION_GRACE="1",
        CIPHERFACE_SYNC_INTERVAL="2",
    )
    assert _run(["keygen"], env).returncode == 0
    # The operator's step: trust the replica's signing key on-prem before it serves.
    replica = json.loads(_run(["replica-key", "--replica", "c1"], env).stdout)
    trusted = _run(["trust", "add", "c1", replica["verify_key"]], env)
    assert trusted.returncode == 0 and "c1" in json.loads(trusted.stdout), trusted.stderr
    port, onprem_port = _free_port(), _free_port()
    logs = {name: (tmp_path / f"{name}.log").open("w+") for name in ("onprem", "cloud")}
    procs = {
        "onprem": subprocess.Popen(
            [*CLI, "onprem", "--metrics-port", str(onprem_port)], env=env, stderr=logs["onprem"]
        ),
        "cloud": subprocess.Popen(
            [*CLI, "cloud", "--replica", "c1", "--metrics-port", str(port)],
            env=env,
            stderr=logs["cloud"],
        ),
    }
    for name, ops_port in (("onprem", onprem_port), ("cloud", port)):
        _wait_ready(ops_port, procs[name])
    enroll = tmp_path / "enroll"
    for group, names in {"G01": ["img1.jpg", "img2.jpg"], "G02": ["img3.jpg", "img12.jpg"]}.items():
        (enroll / group).mkdir(parents=True)
        for name in names:
            (enroll / group / name).symlink_to(faces_dir / name)
    try:
        enrolled = _run(["enroll", str(enroll)], env)
        assert enrolled.returncode == 0, enrolled.stderr
        assert json.loads(enrolled.stdout)["enrolled"] == 4
        yield {
            "env": env,
            "procs": procs,
            "logs": logs,
            "metrics_port": port,
            "onprem_port": onprem_port,
        }
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_probe_watch_metrics_and_graceful_shutdown(
    daemons: dict[str, object], faces_dir: Path
) -> None:
    env: dict[str, str] = daemons["env"]  # type: ignore[assignment]
    procs: dict[str, subprocess.Popen[bytes]] = daemons["procs"]  # type: ignore[assignment]
    watcher = subprocess.Popen(
        [*CLI, "watch", "--count", "2"], env=env, stdout=subprocess.PIPE, text=True
    )
    time.sleep(3)  # let the watcher bind its queue before the probes
    verified = _run(["probe", str(faces_dir / "img5.jpg"), "--subject", "G01"], env)
    assert verified.returncode == 0, verified.stderr
    event = json.loads(verified.stdout)
    assert event["verified"] is True, event
    assert event["subject"] == "G01" and event["mode"] == "1:1"
    searched = json.loads(_run(["probe", str(faces_dir / "img53.jpg")], env).stdout)
    assert searched["subject"] == "G02" and searched["mode"] == "1:N"
    out, _ = watcher.communicate(timeout=60)
    watched = [json.loads(line) for line in out.strip().splitlines()]
    assert {e["probe_id"] for e in watched} == {event["probe_id"], searched["probe_id"]}

    with urllib.request.urlopen(f"http://127.0.0.1:{daemons['metrics_port']}/metrics") as page:
        metrics = page.read().decode()
    assert 'cipherface_messages_total{agent="cloud",kind="probes",outcome="ok"} 2.0' in metrics
    assert "cipherface_handle_seconds_bucket" in metrics
    assert 'cipherface_gallery_templates{agent="cloud"} 4.0' in metrics
    for port in (daemons["metrics_port"], daemons["onprem_port"]):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as page:
            assert json.loads(page.read()) == {"alive": True}
    health = _run(["health", "--ready", "--metrics-port", str(daemons["onprem_port"])], env)
    assert health.returncode == 0 and json.loads(health.stdout)["ready"] is True, health.stderr

    for name, proc in procs.items():
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, name
        log = daemons["logs"][name]  # type: ignore[index]
        log.seek(0)
        lines = [json.loads(line) for line in log.read().splitlines() if line.startswith("{")]
        assert any("draining in-flight work" in line["msg"] for line in lines)
        # JSON logs: one line per probe on each agent, with the probe's id.
        per_probe = [line["probe_id"] for line in lines if "probe_id" in line]
        assert sorted(per_probe) == sorted([event["probe_id"], searched["probe_id"]]), name


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_rotate_keys_remove_and_list_through_the_cli(
    daemons: dict[str, object], faces_dir: Path
) -> None:
    env: dict[str, str] = daemons["env"]  # type: ignore[assignment]
    before = json.loads(_run(["list"], env).stdout)
    assert before["subjects"] == {"G01": 2, "G02": 2}
    rotated = _run(["rotate-keys", "--timeout", "600"], env, timeout=700)
    assert rotated.returncode == 0, rotated.stderr[-3000:]
    phases = [json.loads(line)["phase"] for line in rotated.stdout.strip().splitlines()]
    # The command prints the phases it sees while polling: a fast rotation may pass
    # one between two polls, so they must only come in order and end at "done".
    order = ["requested", "preparing", "publishing", "waiting", "switched", "done"]
    assert phases[-1] == "done" and set(phases) <= set(order), phases
    assert phases == sorted(phases, key=order.index), phases
    after = json.loads(_run(["list"], env).stdout)
    assert after["fingerprint"] != before["fingerprint"] and after["rotation"] == "done"
    assert after["replicas"]["c1"]["fingerprint"] == after["fingerprint"]
    assert after["replicas"]["c1"]["up_to_date"] is True
    verified = json.loads(
        _run(["probe", str(faces_dir / "img5.jpg"), "--subject", "G01"], env).stdout
    )
    assert verified["verified"] is True, verified
    removed = _run(["remove", "G01"], env)
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] == 2, removed.stderr
    gone = json.loads(_run(["probe", str(faces_dir / "img5.jpg"), "--subject", "G01"], env).stdout)
    assert gone["error"] and gone["error"].startswith("UnknownSubject"), gone
    assert json.loads(_run(["list"], env).stdout)["subjects"] == {"G02": 2}


def _arguments_without_help(parser: argparse.ArgumentParser, name: str) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _arguments_without_help(sub, sub_name)
        elif action.help is None:
            yield f"{name} {action.dest}"


def test_every_argument_has_help() -> None:
    assert list(_arguments_without_help(build_parser(), "cipherface")) == []


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["probe", "missing.jpg"], "cipherface probe: ConfigError: missing.jpg: no such file"),
        (["enroll", "nowhere"], "cipherface enroll: ConfigError: nowhere: no such folder"),
        (
            ["enroll", ".", "--labels", "none.csv"],
            "cipherface enroll: ConfigError: none.csv: cannot read the labels: "
            "No such file or directory",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, deepface_home: Path, args: list[str], line: str
) -> None:
    env = _env(tmp_path, deepface_home)
    done = subprocess.run(
        [*CLI, *args], env=env, cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, [line])


def test_labels_keep_the_first_row_unless_it_is_a_header(tmp_path: Path) -> None:
    plain, headed = tmp_path / "plain.csv", tmp_path / "headed.csv"
    plain.write_text("img1.jpg,alice\nimg3.jpg,bob\n")
    headed.write_text("file,subject\nimg1.jpg,alice\nimg3.jpg,bob\n")
    expected = {"img1.jpg": "alice", "img3.jpg": "bob"}
    assert read_labels(plain) == expected and read_labels(headed) == expected


@pytest.mark.rabbitmq
def test_a_probe_nobody_answers_times_out_in_one_line(
    tmp_path: Path, deepface_home: Path, faces_dir: Path
) -> None:
    url = amqp_url_or_skip()
    prefix = unique_prefix()
    env = _env(tmp_path, deepface_home, CIPHERFACE_AMQP_URL=url, CIPHERFACE_PREFIX=prefix)
    assert _run(["keygen"], env).returncode == 0

    async def declare() -> None:  # the topology, as the daemons would, but none runs
        async with RabbitMQTransport(url, Topology(prefix=prefix, idle_queue_expiry_ms=60_000)):
            pass

    asyncio.run(declare())
    image = faces_dir / "img5.jpg"
    done = _run(["probe", str(image), "--timeout", "2"], env)
    assert (done.returncode, done.stderr.strip().splitlines()[-1:]) == (
        2,
        [f"cipherface probe: ProbeTimeout: {image}: no event within 2s (are the daemons running?)"],
    )
