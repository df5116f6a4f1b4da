"""``amqps://`` with a CA and client certificates, against a private RabbitMQ TLS listener.

The test makes its own CA, a server certificate for 127.0.0.1 and a client
certificate (with `cryptography`), and a second, unrelated CA with a client
certificate of its own. The node demands a client certificate signed by the
first CA (``verify_peer``, ``fail_if_no_peer_cert``).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cipherface.config import Settings
from cipherface.exceptions import ConfigError, TransportError
from cipherface.transport import Delivery, open_transport
from tests.environment import unique_prefix
from tests.rabbitnode import RabbitNode, free_port

pytestmark = pytest.mark.rabbitmq


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Issued(cert_path, key_path)


class TestCA:
    """A throw-away certificate authority that issues server and client certificates."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = folder / f"{name}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, *, server: bool) -> Issued:
        """A leaf certificate: for 127.0.0.1/localhost (server) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return _write(self.folder, stem, builder.sign(self.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class TLSNode:
    node: RabbitNode
    port: int
    ca: TestCA
    client: Issued
    stranger: Issued  # a client certificate from another CA
    stranger_ca: TestCA

    def settings(self, **tls: Path | None) -> Settings:
        return Settings(amqp_url=f"amqps://guest:guest@127.0.0.1:{self.port}/", **tls)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSNode]:
    """A private node with a TLS listener that requires a client certificate of its CA."""
    pki = tmp_path_factory.mktemp("pki")
    ca = TestCA(pki, "cipherface-test-ca")
    server = ca.issue("server", server=True)
    client = ca.issue("client", server=False)
    stranger_ca = TestCA(pki, "stranger-ca")
    stranger = stranger_ca.issue("stranger", server=False)
    port = free_port()
    config = [
        f"listeners.ssl.default = 127.0.0.1:{port}",
        f"ssl_options.cacertfile = {ca.pem}",
        f"ssl_options.certfile = {server.cert}",
        f"ssl_options.keyfile = {server.key}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
    ]
    with RabbitNode(tmp_path_factory.mktemp("rabbit-tls"), config=config) as node:
        yield TLSNode(node, port, ca, client, stranger, stranger_ca)


async def test_client_certificate_of_the_ca_connects_publishes_and_consumes(
    tls_node: TLSNode,
) -> None:
    settings = tls_node.settings(
        tls_ca=tls_node.ca.pem, tls_cert=tls_node.client.cert, tls_key=tls_node.client.key
    ).override(prefix=unique_prefix())
    got: asyncio.Queue[Delivery] = asyncio.Queue()

    async def keep(delivery: Delivery) -> None:
        got.put_nowait(delivery)

    async with open_transport(settings) as transport:
        await transport.consume(transport.topology.probes, keep)
        await transport.send(transport.topology.probes, b"over tls", message_id="t1")
        delivery = await asyncio.wait_for(got.get(), 10)
    assert (delivery.body, delivery.message_id) == (b"over tls", "t1")


async def test_no_client_certificate_is_refused(tls_node: TLSNode) -> None:
    with pytest.raises(TransportError, match="cannot connect to RabbitMQ at amqps://") as caught:
        async with open_transport(tls_node.settings(tls_ca=tls_node.ca.pem)):
            pass
    assert "guest:guest" not in str(caught.value)


async def test_a_client_certificate_from_another_ca_is_refused(tls_node: TLSNode) -> None:
    settings = tls_node.settings(
        tls_ca=tls_node.ca.pem, tls_cert=tls_node.stranger.cert, tls_key=tls_node.stranger.key
    )
    with pytest.raises(TransportError, match="TLS"):
        async with open_transport(settings):
            pass


async def test_a_broker_the_ca_did_not_sign_is_refused(tls_node: TLSNode) -> None:
    # The client trusts only the stranger CA: the broker's certificate does not verify.
    settings = tls_node.settings(
        tls_ca=tls_node.stranger_ca.pem, tls_cert=tls_node.client.cert, tls_key=tls_node.client.key
    )
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        async with open_transport(settings):
            pass


def test_tls_settings_come_from_the_environment(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "CIPHERFACE_TLS_CA": str(tmp_path / "ca.pem"),
            "CIPHERFACE_TLS_CERT": str(tmp_path / "c.pem"),
            "CIPHERFACE_TLS_KEY": str(tmp_path / "c.key"),
        }
    )
    assert settings.tls_ca == tmp_path / "ca.pem" and settings.tls_key == tmp_path / "c.key"
    with pytest.raises(ConfigError, match="together"):
        Settings(tls_cert=tmp_path / "c.pem")
    unreadable = Settings(amqp_url="amqps://u:p@127.0.0.1:1/", tls_ca=tmp_path / "absent.pem")
    with pytest.raises(ConfigError, match="TLS material"):
        open_transport(unreadable)
