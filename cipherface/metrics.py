"""Prometheus metrics of the agents.

Metric objects are registered once per process in prometheus-client's default
registry (the library's own convention); every agent labels what it records with
its role, so an on-prem and a cloud agent can share a process (the demo).
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram, start_http_server

from cipherface.transport.base import Delivery, Handler

__all__ = [
    "ERRORS",
    "INTEGRITY_FAILURES",
    "LATENCY",
    "MESSAGES",
    "SYNCS",
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


def serve_metrics(port: int | None) -> None:
    """Expose ``/metrics`` on ``port`` (all interfaces), if one is configured."""
    if port is None:
        return
    start_http_server(port)
    log.info("metrics on :%d/metrics", port)


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
