"""What tests need from the machine: skip outside CI when it is absent, fail in CI."""

from __future__ import annotations

import os
import socket
import uuid
from typing import NoReturn
from urllib.parse import urlparse

import pytest

from cipherface.config import DEFAULT_AMQP_URL

__all__ = ["amqp_url_or_skip", "missing", "unique_prefix"]


def amqp_url_or_skip() -> str:
    """The broker URL (``CIPHERFACE_AMQP_URL`` or the local default) if it answers.

    Outside CI a missing broker skips the test with the reason; in CI (``CI=true``)
    it fails, since CI must start RabbitMQ.
    """
    url = os.environ.get("CIPHERFACE_AMQP_URL") or DEFAULT_AMQP_URL
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), 2):
            return url
    except OSError as exc:
        missing(f"RabbitMQ does not answer at {parsed.hostname}:{parsed.port}: {exc}")


def missing(reason: str) -> NoReturn:
    """Skip a test whose requirement is absent; in CI (``CI=true``) fail instead.

    CI can always provide the broker and the photos, so a skip there would hide a
    broken set-up behind a green run.
    """
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def unique_prefix() -> str:
    """A queue/exchange prefix no other test run uses, so runs never see each other's messages."""
    return f"cftest-{uuid.uuid4().hex[:10]}"
