"""Least privilege on a real, private RabbitMQ node: what each role may and may not do.

``cipherface broker-setup`` runs (as a real command) against the node's management
API; then every forbidden action is tried with plain aio-pika as the role's user
and must be refused by the broker (``ACCESS_REFUSED``), and a whole probe round
runs through the real agents, each on its own role's user.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiormq
import pytest

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface.broker_setup import ManagementAPI, permissions
from cipherface.client import Client
from cipherface.config import Settings
from cipherface.exceptions import TransportError
from cipherface.signing import TrustStore
from cipherface.transport import RabbitMQTransport, Role, Topology, open_transport
from tests.rabbitnode import RabbitNode

pytestmark = pytest.mark.rabbitmq

CLI = Path(sys.executable).with_name("cipherface")
VHOST = "cf-test"
T = Topology()  # the default prefix, as a deployment has it


@dataclass(frozen=True)
class Setup:
    node: RabbitNode
    credentials: Path
    output: dict[str, object]

    def password(self, role: Role) -> str:
        return (self.credentials / role.value / "password").read_text().strip()

    def url(self, role: Role) -> str:
        return self.node.amqp_url(role.value, self.password(role), VHOST)


def _broker_setup(node: RabbitNode, credentials: Path) -> dict[str, object]:
    done = subprocess.run(
        [
            str(CLI),
            "broker-setup",
            "--management-url",
            node.management_url,
            "--vhost",
            VHOST,
            "--credentials",
            str(credentials),
            "--log-level",
            "WARNING",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("CIPHERFACE_")},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A private node with the management plugin, after ``cipherface broker-setup``."""
    with RabbitNode(tmp_path_factory.mktemp("rabbit-setup"), management=True) as node:
        credentials = tmp_path_factory.mktemp("credentials")
        yield Setup(node, credentials, _broker_setup(node, credentials))


# -- the command ------------------------------------------------------------------------
def test_setup_writes_private_password_files_and_is_idempotent(setup: Setup) -> None:
    before = {role: setup.password(role) for role in Role}
    assert len(set(before.values())) == 3 and all(len(p) >= 32 for p in before.values())
    for role in Role:
        folder = setup.credentials / role.value
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "password").stat().st_mode) == 0o600
    again = _broker_setup(setup.node, setup.credentials)
    assert again == setup.output
    assert {role: setup.password(role) for role in Role} == before
    assert not any(password in json.dumps(again) for password in before.values())


def test_users_have_no_management_tags_and_only_their_regexes(setup: Setup) -> None:
    api = ManagementAPI(setup.node.management_url)
    for role in Role:
        user = api.request("GET", f"users/{role.value}")
        assert user["tags"] in ([], "")
        [granted] = api.request("GET", f"users/{role.value}/permissions")
        expected = permissions(T, role)
        assert (granted["configure"], granted["write"], granted["read"]) == (
            expected.configure,
            expected.write,
            expected.read,
        )
    # Nobody but the admin is allowed anything on the default vhost.
    assert {p["user"] for p in api.request("GET", "vhosts/%2F/permissions")} == {"guest"}


# -- forbidden actions ------------------------------------------------------------------
Action = Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]


def publish(exchange: str, key: str = "x") -> Action:
    async def act(channel: aio_pika.abc.AbstractChannel) -> object:
        target = (
            await channel.get_exchange(exchange, ensure=False)
            if exchange
            else channel.default_exchange
        )
        return await target.publish(aio_pika.Message(b"forged"), routing_key=key)

    return act


def consume(queue: str) -> Action:
    async def act(channel: aio_pika.abc.AbstractChannel) -> object:
        declared = await channel.declare_queue(queue, passive=True)
        return await declared.get(no_ack=True, fail=False)

    return act


def delete_queue(queue: str) -> Action:
    return lambda channel: channel.queue_delete(queue)


def delete_exchange(exchange: str) -> Action:
    return lambda channel: channel.exchange_delete(exchange)


def declare_exchange(exchange: str) -> Action:
    return lambda channel: channel.declare_exchange(exchange, "fanout", durable=True)


def bind_private(exchange: str, key: str = "#") -> Action:
    """Bind a fresh subscriber queue (which a client may declare) to an exchange."""

    async def act(channel: aio_pika.abc.AbstractChannel) -> object:
        queue = await channel.declare_queue(T.subscriber_queue(), exclusive=True)
        return await queue.bind(exchange, routing_key=key)

    return act


FORBIDDEN: list[tuple[Role, str, Action]] = [
    # A client submits probes and reads events: nothing else.
    (Role.CLIENT, "write the gallery", publish(T.gallery, T.gallery_broadcast_key)),
    (Role.CLIENT, "write results", publish(T.work_exchange(T.results), T.results)),
    (Role.CLIENT, "write sync", publish(T.work_exchange(T.sync), T.sync)),
    (Role.CLIENT, "write events", publish(T.events, "event.1to1.verified")),
    (Role.CLIENT, "write results via the default exchange", publish("", T.results)),
    (Role.CLIENT, "read probes", consume(T.probes)),
    (Role.CLIENT, "read results", consume(T.results)),
    (Role.CLIENT, "read dead letters", consume(T.dead_letters)),
    (Role.CLIENT, "read a replica's gallery", consume(T.gallery_queue("r1"))),
    (Role.CLIENT, "bind to the gallery", bind_private(T.gallery, T.gallery_broadcast_key)),
    (Role.CLIENT, "delete the probe queue", delete_queue(T.probes)),
    (Role.CLIENT, "declare an exchange", declare_exchange(f"{T.prefix}.mine")),
    (Role.CLIENT, "declare a server-named queue", lambda ch: ch.declare_queue(None)),
    # A cloud replica computes: it cannot speak for on-prem.
    (Role.CLOUD, "write the gallery", publish(T.gallery, T.gallery_broadcast_key)),
    (Role.CLOUD, "write events", publish(T.events, "event.1to1.verified")),
    (Role.CLOUD, "write probes", publish(T.work_exchange(T.probes), T.probes)),
    (Role.CLOUD, "write sync via the default exchange", publish("", T.sync)),
    (Role.CLOUD, "read results", consume(T.results)),
    (Role.CLOUD, "read sync", consume(T.sync)),
    (Role.CLOUD, "read dead letters", consume(T.dead_letters)),
    (Role.CLOUD, "delete the gallery exchange", delete_exchange(T.gallery)),
    (Role.CLOUD, "delete the results queue", delete_queue(T.results)),
    (Role.CLOUD, "redeclare the events exchange", declare_exchange(T.events)),
    # On-prem decides, and never sees a probe image.
    (Role.ONPREM, "read probes", consume(T.probes)),
    (Role.ONPREM, "read a replica's gallery", consume(T.gallery_queue("r1"))),
    (Role.ONPREM, "read dead letters", consume(T.dead_letters)),
    (Role.ONPREM, "write probes", publish(T.work_exchange(T.probes), T.probes)),
    (Role.ONPREM, "write results", publish(T.work_exchange(T.results), T.results)),
    (Role.ONPREM, "delete the probe queue", delete_queue(T.probes)),
]


@pytest.mark.parametrize(
    ("role", "action"),
    [(role, act) for role, _, act in FORBIDDEN],
    ids=[f"{role.value} cannot {what}" for role, what, _ in FORBIDDEN],
)
async def test_forbidden_action_is_refused_by_the_broker(
    setup: Setup, role: Role, action: Action
) -> None:
    # The replica queue r1 exists, so "cannot read it" is about permission, not absence.
    async with RabbitMQTransport(setup.url(Role.CLOUD), T, role=Role.CLOUD) as cloud:
        await cloud.consume(T.gallery_queue("r1"), _ignore, bindings=T.gallery_bindings("r1"))
    connection = await aio_pika.connect(setup.url(role), timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await asyncio.wait_for(action(channel), 10)


async def _ignore(_: object) -> None:
    raise AssertionError("nothing should arrive here")


async def test_role_users_cannot_log_in_to_another_vhost(setup: Setup) -> None:
    url = setup.node.amqp_url("client", setup.password(Role.CLIENT), "/")
    with pytest.raises(TransportError, match="cannot connect"):
        async with RabbitMQTransport(url, T, role=Role.CLIENT):
            pass


async def test_a_wrong_password_is_a_clear_transport_error(setup: Setup) -> None:
    url = setup.node.amqp_url("cloud", "not-the-password", VHOST)
    with pytest.raises(TransportError, match="cannot connect"):
        async with RabbitMQTransport(url, T, role=Role.CLOUD):
            pass


async def test_a_forbidden_publish_through_the_transport_is_a_transport_error(
    setup: Setup,
) -> None:
    async with RabbitMQTransport(setup.url(Role.CLIENT), T, role=Role.CLIENT) as client:
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            await client.publish(T.gallery, T.gallery_broadcast_key, b"forged")


# -- allowed actions --------------------------------------------------------------------
async def test_a_probe_round_through_the_agents_on_their_role_users(
    setup: Setup, tmp_path: Path, faces_dir: Path, deepface_home: Path
) -> None:
    def settings(role: Role, **extra: object) -> Settings:
        return Settings(
            amqp_url=setup.node.amqp_url(role.value, vhost=VHOST),
            amqp_password_file=setup.credentials / role.value / "password",
            data_dir=tmp_path / "data",
            **extra,  # type: ignore[arg-type]
        )

    onprem_settings = settings(Role.ONPREM)
    generate_keys(onprem_settings)
    enroll = tmp_path / "enroll"
    for group, names in {"G01": ["img1.jpg", "img2.jpg"], "G02": ["img3.jpg"]}.items():
        (enroll / group).mkdir(parents=True)
        for name in names:
            (enroll / group / name).symlink_to(faces_dir / name)
    async with (
        open_transport(onprem_settings, role=Role.ONPREM) as onprem_link,
        open_transport(settings(Role.CLOUD, replica="r2"), role=Role.CLOUD) as cloud_link,
        open_transport(settings(Role.CLIENT), role=Role.CLIENT) as client_link,
    ):
        onprem = OnPremAgent(onprem_settings, onprem_link)
        cloud = CloudAgent(settings(Role.CLOUD, replica="r2"), cloud_link)
        TrustStore(onprem_settings.trust_store_path).add("r2", cloud.signer.verify_key)
        await onprem.start()
        try:
            report = await onprem.enroll(enroll, progress=False)
            assert report.enrolled == 3
            await cloud.start()
            try:
                await asyncio.wait_for(cloud.ready.wait(), 120)
                client = Client(client_link, onprem.signer.verify_key)
                event = await client.verify(faces_dir / "img5.jpg", "G01", timeout=120)
            finally:
                await cloud.stop()
        finally:
            await onprem.stop()
    assert event.error is None, event.error
    assert event.verified and event.subject == "G01" and event.mode == "1:1"
