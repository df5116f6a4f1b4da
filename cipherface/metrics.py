"""Prometheus metrics of the agents.

Metric objects are registered once per process in prometheus-client's default
registry (the library's own convention); every agent labels what it records with
its role, so an on-prem and a cloud agent can share a process (the demo).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from cipherface.transport.base import Delivery, Handler

__all__ = [
    "BLOCKS_AWAITED",
    "DEAD_LETTERS",
    "ERRORS",
    "GALLERY_TEMPLATES",
    "INTEGRITY_FAILURES",
    "LATENCY",
    "LEDGER_SIZE",
    "MESSAGES",
    "PROBE_AGE",
    "SYNCS",
    "OpsServer",
    "instrumented",
    "serve_metrics",
]

log = logging.getLogger(__name__)

MESSAGES = Counter(
    "cipherface_messages_total",
    "Messages handled, by agent, message kind and outcome.",
    ["agent", "kind", "outcome"],
)
ERRORS = Counter(
    "cipherface_errors_total",
    "Messages that could not be processed, by agent and error type.",
    ["agent", "error"],
)
INTEGRITY_FAILURES = Counter(
    "cipherface_integrity_failures_total",
    "Well-formed inputs the protocol never makes (tampered scores, forged edge probes): "
    "answered with an error event that carries no number; by the replica that sent them.",
    ["agent", "replica"],
)
SYNCS = Counter(
    "cipherface_sync_requests_total",
    "Gallery sync requests on-prem received, by outcome (answered, coalesced).",
    ["outcome"],
)
LATENCY = Histogram(
    "cipherface_handle_seconds",
    "Time to handle one message, by agent and message kind.",
    ["agent", "kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


GALLERY_TEMPLATES = Gauge(
    "cipherface_gallery_templates",
    "Templates in the gallery: on-prem's book, or the gallery a replica serves.",
    ["agent"],
)
BLOCKS_AWAITED = Gauge(
    "cipherface_blocks_awaited",
    "Blocks on-prem announced that this replica does not hold yet.",
    ["agent"],
)
LEDGER_SIZE = Gauge(
    "cipherface_ledger_events", "Probe events on-prem's ledger remembers.", ["agent"]
)
DEAD_LETTERS = Gauge(
    "cipherface_dead_letters", "Messages in the dead-letter queue (on-prem polls it).", ["agent"]
)
PROBE_AGE = Histogram(
    "cipherface_probe_age_seconds",
    "Seconds from a probe's submission to its handling, by agent (cloud: taken from the "
    "queue; on-prem: event out).",
    ["agent"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)

#: A readiness check: (ready, details for the JSON answer).
Readiness = Callable[[], tuple[bool, Mapping[str, Any]]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Health checks every few seconds would drown the daemon's own log lines."""


class OpsServer:
    """``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` on one port.

    A WSGI server in a daemon thread, as prometheus-client serves ``/metrics``
    itself: it answers even while the event loop is busy, and `readiness` only
    reads flags the loop sets, so it needs no lock. ``/readyz`` is 200 when the
    daemon is ready, else 503; both answer JSON.
    """

    def __init__(self, address: str, port: int, readiness: Readiness) -> None:
        self._readiness = readiness
        self._metrics = make_wsgi_app()
        self._server = make_server(
            address, port, self._app, server_class=WSGIServer, handler_class=_QuietHandler
        )
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="cipherface-ops", daemon=True
        )
        self._thread.start()
        log.info("operations endpoint on %s:%d (/metrics, /healthz, /readyz)", address, self.port)

    def _app(self, environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return self._json(start, 200, {"alive": True})
        if path == "/readyz":
            ready, details = self._readiness()
            return self._json(start, 200 if ready else 503, {"ready": ready, **details})
        return self._metrics(environ, start)  # type: ignore[no-any-return]

    @staticmethod
    def _json(start: Callable[..., Any], code: int, data: Mapping[str, Any]) -> list[bytes]:
        body = json.dumps(data, sort_keys=True).encode()
        status = "200 OK" if code == 200 else "503 Service Unavailable"
        start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(address: str, port: int | None, readiness: Readiness) -> OpsServer | None:
    """Start the operations endpoint on ``address:port``, if a port is configured."""
    if port is None:
        return None
    return OpsServer(address, port, readiness)


def instrumented(agent: str, queue: str, handler: Handler) -> Handler:
    """Wrap a transport handler to count, time and classify what it handles."""

    async def wrapper(delivery: Delivery) -> None:
        started = time.perf_counter()
        try:
            await handler(delivery)
        except Exception as exc:
            MESSAGES.labels(agent, queue, "error").inc()
            ERRORS.labels(agent, type(exc).__name__).inc()
            raise
        else:
            MESSAGES.labels(agent, queue, "ok").inc()
        finally:
            LATENCY.labels(agent, queue).observe(time.perf_counter() - started)

    return wrapper
