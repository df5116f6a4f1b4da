"""A deployment of agents for end-to-end tests, on the in-process broker or on RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from agents.cloud.agent import CloudAgent
from agents.onprem.agent import OnPremAgent, generate_keys
from cipherface import photos
from cipherface.client import Client
from cipherface.config import Settings
from cipherface.signing import TrustStore, VerifyKey
from cipherface.transport import MemoryBroker, MemoryTransport, RabbitMQTransport, Topology
from cipherface.transport.base import Transport
from tests.environment import amqp_url_or_skip, unique_prefix


class Deployment:
    """Agents and clients, each on its own connection to one broker."""

    def __init__(self, settings: Settings, url: str | None) -> None:
        self.settings = settings
        self.url = url
        self.broker = MemoryBroker()
        self.topology = Topology(prefix=settings.prefix, idle_queue_expiry_ms=120_000)
        self.stack = AsyncExitStack()
        self.agents: list[OnPremAgent | CloudAgent] = []

    async def link(self, max_message_size: int | None = None) -> Transport:
        """A new connection, capped at the deployment's `Settings.max_message_size`."""
        max_message_size = max_message_size or self.settings.max_message_size
        transport: Transport = (
            RabbitMQTransport(self.url, self.topology, max_message_size=max_message_size)
            if self.url
            else MemoryTransport(self.broker, self.topology, max_message_size=max_message_size)
        )
        return await self.stack.enter_async_context(transport)

    async def onprem(self) -> OnPremAgent:
        """A started on-prem agent."""
        agent = OnPremAgent(self.settings, await self.link())
        await agent.start()
        self.agents.append(agent)
        return agent

    async def cloud(
        self, replica: str = "r1", *, shard: int = 0, embedder: object = None
    ) -> CloudAgent:
        """A started cloud replica of ``shard``, its key in on-prem's trust store (as an
        operator adds it); ``embedder`` stands in for DeepFace when given."""
        settings = replace(self.settings, replica=replica, shard=shard)
        agent = CloudAgent(settings, await self.link())
        TrustStore(self.settings.trust_store_path).add(replica, agent.signer.verify_key)
        if embedder is not None:
            agent.embedder = embedder  # type: ignore[assignment]
        await agent.start()
        self.agents.append(agent)
        return agent

    async def stop(self, agent: OnPremAgent | CloudAgent) -> None:
        """Stop one agent gracefully."""
        self.agents.remove(agent)
        await agent.stop()

    async def client(self) -> Client:
        """A user's client, on-prem's verify key pinned."""
        return Client(await self.link(), VerifyKey.load(self.settings.onprem_verify_key_path))

    async def close(self) -> None:
        for agent in list(self.agents):
            await self.stop(agent)
        await self.stack.aclose()


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def deployment(
    request: pytest.FixtureRequest, tmp_path: Path, deepface_home: Path
) -> AsyncIterator[Deployment]:
    """Keys generated, nothing enrolled, nothing started."""
    url = amqp_url_or_skip() if request.param == "rabbitmq" else None
    settings = Settings(
        data_dir=tmp_path / "data", prefix=unique_prefix(), amqp_url=url, sync_interval=2.0
    )
    generate_keys(settings)
    deployment = Deployment(settings, url)
    try:
        yield deployment
    finally:
        await deployment.close()


@pytest.fixture(scope="session")
def identity_groups(faces_dir: Path) -> dict[str, list[str]]:
    """identity group -> its photo files, from identities.csv."""
    return photos.identity_groups(faces_dir)


@pytest.fixture
async def rig(deployment: Deployment) -> tuple[Deployment, object]:
    """The trust tests' rig (`tests.agents.trust.gallery_rig`): synthetic gallery, one replica."""
    from tests.agents.trust import gallery_rig

    return await gallery_rig(deployment)
