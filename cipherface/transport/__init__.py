"""Message transports: RabbitMQ for deployments, an in-process broker for one-process runs."""

from __future__ import annotations

from cipherface.config import Settings
from cipherface.exceptions import ConfigError
from cipherface.transport.base import (
    REASON_HEADER,
    SOURCE_HEADER,
    Consumer,
    Delivery,
    Fetched,
    Handler,
    Outcome,
    Role,
    Topology,
    Transport,
    settle,
)
from cipherface.transport.credentials import read_secret, tls_context, with_password
from cipherface.transport.memory import MemoryBroker, MemoryTransport
from cipherface.transport.rabbitmq import RabbitMQTransport

__all__ = [
    "REASON_HEADER",
    "SOURCE_HEADER",
    "Consumer",
    "Delivery",
    "Fetched",
    "Handler",
    "MemoryBroker",
    "MemoryTransport",
    "Outcome",
    "RabbitMQTransport",
    "Role",
    "Topology",
    "Transport",
    "open_transport",
    "settle",
    "tls_context",
]


def open_transport(
    settings: Settings, broker: MemoryBroker | None = None, *, role: Role | None = None
) -> Transport:
    """The transport the settings ask for: RabbitMQ given a URL, else ``broker`` (in-process).

    ``role`` says whom the connection acts for, so it declares only what that
    role's broker user may configure (`Role`); None declares everything, as a
    guest or the in-process broker can. Use the result as an async context manager.
    """
    expiry = int(settings.gallery_queue_expiry * 1000) or None
    topology = Topology(
        prefix=settings.prefix,
        gallery_queue_expiry_ms=expiry,
        delivery_limit=settings.delivery_limit or None,
    )
    if settings.amqp_urls:
        urls = settings.amqp_urls
        if settings.amqp_password_file is not None:
            password = read_secret(settings.amqp_password_file)
            urls = tuple(with_password(url, password) for url in urls)
        context = None
        if any(url.startswith("amqps://") for url in urls):
            context = tls_context(settings.tls_ca, settings.tls_cert, settings.tls_key)
        return RabbitMQTransport(
            urls,
            topology,
            role=role,
            ssl_context=context,
            max_message_size=settings.max_message_size,
        )
    if broker is None:
        raise ConfigError(
            "no broker URL (--amqp-url or CIPHERFACE_AMQP_URL): the in-process broker only "
            "connects agents running in the same process, as 'cipherface demo' does"
        )
    return MemoryTransport(broker, topology, role=role, max_message_size=settings.max_message_size)
