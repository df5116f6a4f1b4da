"""Transports under test: the in-process broker, and RabbitMQ where it answers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from cipherface.transport import MemoryBroker, MemoryTransport, RabbitMQTransport, Topology
from cipherface.transport.base import Transport
from tests.environment import amqp_url_or_skip, unique_prefix


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def transport_pair(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[Transport, Transport]]:
    """Two connections to one broker under a fresh prefix: a producer and a consumer side."""
    topology = Topology(prefix=unique_prefix(), idle_queue_expiry_ms=60_000)
    if request.param == "memory":
        broker = MemoryBroker()
        async with MemoryTransport(broker, topology) as a, MemoryTransport(broker, topology) as b:
            yield a, b
    else:
        url = amqp_url_or_skip()
        async with RabbitMQTransport(url, topology) as a, RabbitMQTransport(url, topology) as b:
            yield a, b
