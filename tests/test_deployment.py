"""What can be checked of the Docker deployment without a Docker engine."""

from __future__ import annotations

from pathlib import Path

import yaml

from agents.cli import build_parser

ROOT = Path(__file__).parents[1]


def test_compose_services_run_real_cli_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"rabbitmq", "onprem", "cloud"} <= set(services)
    parser = build_parser()
    for name in ("onprem", "cloud"):
        service = services[name]
        args = parser.parse_args(service["command"])
        assert args.command == name
        assert service["environment"]["CIPHERFACE_AMQP_URL"].startswith("amqp://")
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        [volume] = service["volumes"]
        assert volume.split(":")[0] in compose["volumes"]
    # on-prem and cloud never share a volume: the secret key stays on-prem.
    assert services["onprem"]["volumes"] != services["cloud"]["volumes"]


def test_dockerfile_installs_the_package_and_its_weights() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "cipherface weights" in dockerfile
    assert 'ENTRYPOINT ["cipherface"]' in dockerfile
