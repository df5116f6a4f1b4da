"""The message cap and the queue arguments a transport takes from the settings."""

from __future__ import annotations

import asyncio

import pytest

from cipherface.config import Settings
from cipherface.exceptions import ConfigError, MessageTooLargeError
from cipherface.transport import (
    REASON_HEADER,
    Delivery,
    MemoryBroker,
    MemoryTransport,
    RabbitMQTransport,
    open_transport,
)


def test_the_cap_and_the_delivery_limit_are_settings() -> None:
    settings = Settings.from_env(
        {
            "CIPHERFACE_MAX_MESSAGE_SIZE": "8388608",
            "CIPHERFACE_DELIVERY_LIMIT": "2",
            "CIPHERFACE_AMQP_URL": "amqp://a:5672/, amqp://b:5673/",
        }
    )
    assert (settings.max_message_size, settings.delivery_limit) == (8 * 1024 * 1024, 2)
    assert settings.amqp_urls == ("amqp://a:5672/", "amqp://b:5673/")
    assert Settings().max_message_size == 4 * 1024 * 1024
    with pytest.raises(ConfigError, match="max_message_size"):
        Settings(max_message_size=1000)
    with pytest.raises(ConfigError, match="delivery_limit"):
        Settings(delivery_limit=-1)
    transport = open_transport(settings)
    assert isinstance(transport, RabbitMQTransport)
    assert transport.urls == settings.amqp_urls
    assert transport.max_message_size == settings.max_message_size
    arguments = transport.topology.queue_arguments(transport.topology.probes)
    assert arguments["x-queue-type"] == "quorum" and arguments["x-delivery-limit"] == 2
    dead = transport.topology.queue_arguments(transport.topology.dead_letters)
    assert dead == {"x-queue-type": "quorum"}  # nobody consumes it: no limit, no DLX
    unlimited = open_transport(settings.override(delivery_limit=0)).topology
    assert "x-delivery-limit" not in unlimited.queue_arguments(unlimited.sync)


async def test_a_transport_refuses_to_send_and_to_hand_over_more_than_its_cap() -> None:
    broker = MemoryBroker()
    small = MemoryTransport(broker, max_message_size=1024 * 1024)
    large = MemoryTransport(broker, max_message_size=2 * 1024 * 1024)
    topology = small.topology
    handled: list[Delivery] = []
    dead: list[Delivery] = []

    async def handle(delivery: Delivery) -> None:
        handled.append(delivery)

    async def keep(delivery: Delivery) -> None:
        dead.append(delivery)

    await small.consume(topology.sync, handle)
    await large.consume(topology.dead_letters, keep)  # a cap it fits: it is read, not looped
    with pytest.raises(MessageTooLargeError, match="exceeds the 1048576-byte"):
        await small.send(topology.sync, b"x" * (1024 * 1024 + 1))
    await large.send(topology.sync, b"x" * (1024 * 1024 + 1), message_id="big")
    await large.send(topology.sync, b"ok", message_id="small")
    for _ in range(100):
        if handled and dead:
            break
        await asyncio.sleep(0.01)
    assert [d.message_id for d in handled] == ["small"]
    [letter] = dead
    assert letter.message_id == "big"
    assert "MessageTooLargeError" in str(letter.headers[REASON_HEADER])
    await small.close()
    await large.close()
