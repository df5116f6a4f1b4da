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
