"""What can be checked of the Docker deployment without a Docker engine."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from agents.cli import build_parser

ROOT = Path(__file__).parents[1]


def test_compose_services_run_real_cli_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"rabbitmq", "broker-setup", "onprem", "cloud", "client"} <= set(services)
    parser = build_parser()
    for name in ("onprem", "cloud", "client", "broker-setup"):
        args = parser.parse_args(services[name]["command"])
        assert args.command == name.replace("client", "watch")
    for name in ("onprem", "cloud"):
        service = services[name]
        assert service["depends_on"]["broker-setup"]["condition"] == (
            "service_completed_successfully"
        )
        data, _ = service["volumes"]
        assert data.split(":")[0] in compose["volumes"]
    # on-prem and cloud never share a volume: the secret key stays on-prem.
    assert not set(services["onprem"]["volumes"]) & set(services["cloud"]["volumes"])


def test_compose_gives_each_service_its_own_broker_user_not_guest() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "RABBITMQ_DEFAULT_USER" in services["rabbitmq"]["environment"]
    setup = services["broker-setup"]
    mounted = dict(volume.split(":")[:2] for volume in setup["volumes"])
    for role in ("onprem", "cloud", "client"):
        env = services[role]["environment"]
        url = urlsplit(env["CIPHERFACE_AMQP_URL"])
        # Its role's user, no password in the URL: that comes from the role's own volume.
        assert (url.scheme, url.username, url.password) == ("amqp", role, None)
        assert url.path == "/cipherface"
        password_dir = str(Path(env["CIPHERFACE_AMQP_PASSWORD_FILE"]).parent)
        [volume] = [
            v.split(":")[0] for v in services[role]["volumes"] if v.split(":")[1] == password_dir
        ]
        assert mounted[volume] == f"/credentials/{role}"
        # No other service mounts this role's credentials.
        for other in ("onprem", "cloud", "client"):
            if other != role:
                assert volume not in str(services[other].get("volumes", []))
    assert "guest" not in str(compose)


def test_dockerfile_installs_the_package_and_its_weights() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "cipherface weights" in dockerfile
    assert 'ENTRYPOINT ["cipherface"]' in dockerfile


def test_dockerfile_runs_as_a_user_that_owns_what_it_writes() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    [user] = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user not in ("root", "0")
    text = "\n".join(lines)
    # The folders compose mounts volumes on exist in the image, owned by that user,
    # so new volumes are created writable for it.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = {
        volume.split(":")[1]
        for service in compose["services"].values()
        if "build" in service
        for volume in service.get("volumes", [])
    }
    for mount in mounts:
        assert mount in text or mount.startswith("/credentials/"), mount
    assert "/credentials/*" in text and "chown cipherface" in text


def test_compose_scales_cloud_replicas_on_identities_not_names() -> None:
    """`--scale cloud=3` copies the service: nothing in it may be one replica's own."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cloud = compose["services"]["cloud"]
    args = build_parser().parse_args(cloud["command"])
    assert args.replica is None  # each replica takes an identity of its own
    assert "CIPHERFACE_REPLICA" not in cloud.get("environment", {})
    assert "container_name" not in cloud and "ports" not in cloud and "hostname" not in cloud
    for name in ("onprem", "cloud"):
        check = compose["services"][name]["healthcheck"]["test"]
        health = build_parser().parse_args(check[1:][1:])
        assert check[:2] == ["CMD", "cipherface"] and health.command == "health" and health.ready
        assert (
            health.metrics_port
            == build_parser().parse_args(compose["services"][name]["command"]).metrics_port
        )
