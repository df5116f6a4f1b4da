"""Connecting: a broker too busy to answer one handshake does not stop a daemon."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

import pytest
from yarl import URL

from cipherface.exceptions import TransportError
from cipherface.transport import RabbitMQTransport, Topology
from cipherface.transport.rabbitmq import CONNECT_ROUNDS
from tests.environment import amqp_url_or_skip, unique_prefix

pytestmark = pytest.mark.rabbitmq


class _StallingFront:
    """A TCP front for the broker that takes its first ``stalls`` connections and
    never answers them (a broker too busy to send ``connection.start``), then
    relays the next ones to the broker."""

    def __init__(self, broker: URL, stalls: int) -> None:
        self._broker = broker
        self._stalls = stalls
        self._held: list[asyncio.StreamWriter] = []
        self._relays: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.url = broker

    async def __aenter__(self) -> _StallingFront:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = self._broker.with_host("127.0.0.1").with_port(port)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.close()
        for writer in self._held:
            writer.close()
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections <= self._stalls:
            self._held.append(writer)
            return
        assert self._broker.host is not None and self._broker.port is not None
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self._broker.host, self._broker.port
        )
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            relay = asyncio.create_task(self._relay(source, sink))
            self._relays.add(relay)

    @staticmethod
    async def _relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()


def _topology() -> Topology:
    return Topology(prefix=unique_prefix(), idle_queue_expiry_ms=60_000)


async def test_a_handshake_that_times_out_is_tried_again() -> None:
    async with _StallingFront(URL(amqp_url_or_skip()), stalls=1) as front:
        transport = RabbitMQTransport(str(front.url), _topology(), connect_timeout=1)
        async with transport:
            assert transport.connected
        assert front.connections == 2


async def test_a_broker_that_never_answers_is_named_with_the_timeout() -> None:
    async with _StallingFront(URL(amqp_url_or_skip()), stalls=CONNECT_ROUNDS) as front:
        transport = RabbitMQTransport(str(front.url), _topology(), connect_timeout=0.5)
        with pytest.raises(TransportError, match=r"no AMQP handshake within 0\.5 s"):
            await transport.open()
        assert front.connections == CONNECT_ROUNDS
