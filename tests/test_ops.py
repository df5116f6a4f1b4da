"""Operations: bounded ledger and dedupe set, JSON logs, health endpoints, settings table."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cipherface import wire
from cipherface.client import EventStream
from cipherface.config import Settings
from cipherface.daemon import JsonFormatter
from cipherface.exceptions import ConfigError
from cipherface.ledger import PRUNE_EVERY, Claim, ProbeLedger
from cipherface.metrics import OpsServer
from cipherface.signing import SigningKey
from cipherface.transport import Delivery

ROOT = Path(__file__).parents[1]


def test_ledger_forgets_by_age_and_by_count(tmp_path: Path) -> None:
    ledger = ProbeLedger(tmp_path / "ledger.sqlite", window=100.0, max_events=PRUNE_EVERY)
    ledger.record("old", 1000.0)
    for i in range(PRUNE_EVERY):  # the last record prunes: "old" is out of the window
        ledger.record(f"p{i}", 1200.0 + i)
    assert not ledger.seen("old") and ledger.seen(f"p{PRUNE_EVERY - 1}")
    ledger.close()
    ledger = ProbeLedger(tmp_path / "count.sqlite", window=1e12, max_events=PRUNE_EVERY)
    for i in range(2 * PRUNE_EVERY):
        ledger.record(f"q{i}", 1000.0 + i)
    assert len(ledger) == PRUNE_EVERY  # the oldest went first
    assert ledger.seen(f"q{2 * PRUNE_EVERY - 1}") and not ledger.seen("q0")
    ledger.close()


def test_ledger_tells_a_redelivery_from_a_reused_probe_id(tmp_path: Path) -> None:
    ledger = ProbeLedger(tmp_path / "ledger.sqlite")
    assert ledger.claim("p", "first") is Claim.NEW
    assert ledger.claim("p", "first") is Claim.DUPLICATE  # in flight
    ledger.record("p", time.time(), "first")
    ledger.release("p", "first")
    assert ledger.claim("p", "first") is Claim.DUPLICATE  # a redelivery: suppressed
    assert ledger.claim("p", "second") is Claim.REUSED  # a new probe: answered as such
    ledger.record("p", time.time(), "second")
    ledger.release("p", "second")
    ledger.close()
    again = ProbeLedger(tmp_path / "ledger.sqlite")  # on disk: a restart remembers both
    assert again.claim("p", "second") is Claim.DUPLICATE
    assert again.claim("p", "third") is Claim.REUSED
    again.close()


def test_event_stream_dedupe_set_is_bounded() -> None:
    key = SigningKey.generate("onprem")
    stream = EventStream(key.verify_key, max_seen=3)

    def event(pid: str) -> Delivery:
        message = wire.VerificationEvent(
            probe_id=pid,
            mode="1:N",
            subject=None,
            verified=False,
            distance=None,
            threshold=0.07,
            model="Dlib",
            metric="cosine",
        )
        return Delivery(body=wire.encode(message, signer=key))

    import asyncio

    async def run() -> None:
        for pid in ("a", "b", "c", "a", "d", "e"):
            await stream.deliver(event(pid))

    asyncio.run(run())
    assert len(stream._seen) == 3
    assert stream._queue.qsize() == 5  # "a" twice in a row of three is a duplicate


def test_json_log_lines_carry_the_probe_fields() -> None:
    record = logging.LogRecord(
        "agents.x", logging.INFO, __file__, 1, "probe %s: %s", ("p1", "ok"), None
    )
    record.probe_id = "p1"
    record.age = 0.5
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "probe p1: ok" and line["probe_id"] == "p1" and line["age"] == 0.5
    assert line["level"] == "INFO" and line["logger"] == "agents.x"


def test_ops_server_answers_health_readiness_and_metrics() -> None:
    state = {"ready": False}
    server = OpsServer("127.0.0.1", 0, lambda: (state["ready"], {"awaiting": 2}))
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(f"{base}/healthz") as answer:
            assert json.loads(answer.read()) == {"alive": True}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/readyz")
        assert refused.value.code == 503
        assert json.loads(refused.value.read()) == {"ready": False, "awaiting": 2}
        refused.value.close()
        state["ready"] = True
        with urllib.request.urlopen(f"{base}/readyz") as answer:
            assert json.loads(answer.read())["ready"] is True
        with urllib.request.urlopen(f"{base}/metrics") as answer:
            assert b"cipherface_messages_total" in answer.read()
    finally:
        server.close()


def test_settings_are_checked_and_read_from_the_environment() -> None:
    env = {
        "CIPHERFACE_PROBE_TTL": "60",
        "CIPHERFACE_LEDGER_MAX": "10",
        "CIPHERFACE_LOG_FORMAT": "json",
        "CIPHERFACE_METRICS_ADDRESS": "0.0.0.0",
        "CIPHERFACE_MAX_FACES": "4",
        "CIPHERFACE_COMPRESS_SCORES": "No",
        "CIPHERFACE_DECRYPT_WORKERS": "2",
    }
    settings = Settings.from_env(env)
    assert settings.decrypt_workers == 2 and Settings().decrypt_workers == 0
    with pytest.raises(ConfigError, match="decrypt_workers must be 0 or more"):
        Settings(decrypt_workers=-1)
    assert settings.compress_scores is False and Settings().compress_scores is True
    with pytest.raises(ConfigError, match="COMPRESS_SCORES must be one of"):
        Settings.from_env({"CIPHERFACE_COMPRESS_SCORES": "maybe"})
    assert (settings.probe_ttl, settings.ledger_max, settings.log_format) == (60.0, 10, "json")
    assert settings.max_faces == 4
    with pytest.raises(ConfigError, match="max_faces must be at least 1"):
        Settings(max_faces=0)
    assert settings.metrics_address == "0.0.0.0" and settings.replica is None
    with pytest.raises(ConfigError):
        Settings(probe_ttl=100.0, ledger_window=10.0)
    with pytest.raises(ConfigError):
        Settings(log_format="xml")
    with pytest.raises(ConfigError, match="claim"):
        _ = Settings().cloud_dir


def test_readme_documents_every_setting_in_one_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| setting |") :]
    table = table[: table.index("\n\n")]
    documented = set(re.findall(r"`CIPHERFACE_([A-Z_]+)`", table))
    fields = {f.name.upper() for f in dataclasses.fields(Settings)}
    assert fields <= documented, sorted(fields - documented)
