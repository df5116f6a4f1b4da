"""Transports under test: the in-process broker, and RabbitMQ where it answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest

from cipherface.transport import (
    MemoryBroker,
    MemoryTransport,
    RabbitMQTransport,
    Role,
    Topology,
)
from cipherface.transport.base import Transport
from tests.environment import amqp_url_or_skip, unique_prefix


class Links:
    """Connections to one broker under one fresh prefix, all closed at the end."""

    def __init__(self, kind: str, stack: AsyncExitStack) -> None:
        self.kind = kind
        self.stack = stack
        self.topology = Topology(prefix=unique_prefix(), idle_queue_expiry_ms=60_000)
        self.broker = MemoryBroker()
        self.url = amqp_url_or_skip() if kind == "rabbitmq" else ""

    def transport(self, role: Role | None = None) -> Transport:
        """A new, unopened transport."""
        if self.kind == "memory":
            return MemoryTransport(self.broker, self.topology, role=role)
        return RabbitMQTransport(self.url, self.topology, role=role)

    async def open(self, role: Role | None = None) -> Transport:
        """A new transport, opened (closed with the fixture)."""
        return await self.stack.enter_async_context(self.transport(role))


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def links(request: pytest.FixtureRequest) -> AsyncIterator[Links]:
    """A factory of connections to one broker (in-process or RabbitMQ) under a fresh prefix."""
    async with AsyncExitStack() as stack:
        yield Links(request.param, stack)


@pytest.fixture
async def transport_pair(links: Links) -> tuple[Transport, Transport]:
    """Two connections to one broker under a fresh prefix: a producer and a consumer side."""
    return await links.open(), await links.open()
