"""Message transports: RabbitMQ for deployments, an in-process broker for one-process runs."""

from __future__ import annotations

from cipherface.config import Settings
from cipherface.exceptions import ConfigError
from cipherface.transport.base import (
    REASON_HEADER,
    SOURCE_HEADER,
    Consumer,
    Delivery,
    Handler,
    Outcome,
    Topology,
    Transport,
    settle,
)
from cipherface.transport.memory import MemoryBroker, MemoryTransport
from cipherface.transport.rabbitmq import RabbitMQTransport

__all__ = [
    "REASON_HEADER",
    "SOURCE_HEADER",
    "Consumer",
    "Delivery",
    "Handler",
    "MemoryBroker",
    "MemoryTransport",
    "Outcome",
    "RabbitMQTransport",
    "Topology",
    "Transport",
    "open_transport",
    "settle",
]


def open_transport(settings: Settings, broker: MemoryBroker | None = None) -> Transport:
    """The transport the settings ask for: RabbitMQ given a URL, else ``broker`` (in-process).

    Use the result as an async context manager.
    """
    topology = Topology(prefix=settings.prefix)
    if settings.amqp_url:
        return RabbitMQTransport(settings.amqp_url, topology)
    if broker is None:
        raise ConfigError(
            "no broker URL (--amqp-url or CIPHERFACE_AMQP_URL): the in-process broker only "
            "connects agents running in the same process, as 'cipherface demo' does"
        )
    return MemoryTransport(broker, topology)
