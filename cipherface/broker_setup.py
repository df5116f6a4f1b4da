"""Least privilege on RabbitMQ: a vhost, one user per role, permissions derived from the topology.

``cipherface broker-setup`` calls `setup_broker`. Each role's configure, write
and read regexes come from `Topology.exchanges` and `Topology.queues` (who
declares, who publishes, who binds, who consumes), so they cannot drift from
what the transports do:

- **configure** (declare, delete): what the role owns, plus its private queues;
- **write** (publish to an exchange; bind a queue, which needs write on the queue):
  what it publishes to, and the queues it owns;
- **read** (consume a queue; bind from an exchange): what it consumes, and the
  exchanges its queues are bound to.

The backend is RabbitMQ's management HTTP API, through the standard library:
it works over the network (a one-shot docker-compose service), answers in JSON,
and needs neither the Erlang cookie nor distribution access that ``rabbitmqctl``
needs. The same admin session declares the whole shared topology, so the
daemons may start in any order. Passwords are generated with `secrets`, or read
from the environment, or kept from an earlier run, and written 0600 to
``<folder>/<role>/password`` (folders 0700), one folder per role so each can
become that role's own docker volume.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from cipherface.exceptions import ConfigError, TransportError
from cipherface.transport.base import Role, Topology
from cipherface.transport.credentials import redact

__all__ = [
    "DEFAULT_MANAGEMENT_URL",
    "DEFAULT_VHOST",
    "PASSWORD_ENV",
    "ManagementAPI",
    "Permissions",
    "SetupReport",
    "permissions",
    "role_passwords",
    "setup_broker",
]

#: The management API of a local broker, as guest (which only works from localhost).
DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"
#: The vhost `setup_broker` creates unless told otherwise.
DEFAULT_VHOST = "cipherface"
#: ``CIPHERFACE_BROKER_PASSWORD_ONPREM`` (..._CLOUD, ..._CLIENT) give a role's password.
PASSWORD_ENV = "CIPHERFACE_BROKER_PASSWORD_{role}"


@dataclass(frozen=True, slots=True)
class Permissions:
    """RabbitMQ's three permission regexes of one user on one vhost."""

    configure: str
    write: str
    read: str


def _regex(names: Iterable[str], patterns: Iterable[str] = ()) -> str:
    """Anchored alternatives: exact names (escaped) and raw patterns; ``^$`` for none."""
    parts = sorted({re.escape(name) for name in names}) + list(patterns)
    return f"^(?:{'|'.join(parts)})$" if parts else "^$"


def _private_queues(topology: Topology, role: Role) -> list[str]:
    """Regexes of the queues a role names itself: replicas' gallery queues, a client's
    exclusive event queues."""
    if role is Role.CLOUD:
        return [
            re.escape(topology.gallery_queue("")) + ".+",
            re.escape(topology.shard_queue(0)[:-1]) + "[0-9]+",
        ]
    if role is Role.CLIENT:
        return [re.escape(topology.subscriber_queue("x")[:-1]) + ".+"]
    return []


def permissions(topology: Topology, role: Role) -> Permissions:
    """What ``role`` may configure, write and read under ``topology``'s prefix."""
    exchanges, queues = topology.exchanges, topology.queues
    private = _private_queues(topology, role)
    owned = [q.name for q in queues if q.owner is role]
    return Permissions(
        configure=_regex([e.name for e in exchanges if e.owner is role] + owned, private),
        write=_regex([e.name for e in exchanges if role in e.writers] + owned, private),
        read=_regex(
            [e.name for e in exchanges if role in e.readers]
            + [q.name for q in queues if q.consumer is role],
            private,
        ),
    )


@dataclass(frozen=True, slots=True)
class SetupReport:
    """What `setup_broker` did: where the passwords are, and the users' URLs (no password)."""

    vhost: str
    users: Mapping[str, Permissions]
    password_files: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (no password in it)."""
        return {
            "vhost": self.vhost,
            "users": {
                name: {"configure": p.configure, "write": p.write, "read": p.read}
                for name, p in self.users.items()
            },
            "password_files": dict(self.password_files),
        }


class ManagementAPI:
    """A minimal client of RabbitMQ's management HTTP API (``/api/...``).

    The URL carries the admin's credentials (``http://admin:secret@host:15672/``);
    they go into a Basic authorization header and never into an error message.
    """

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"not a management API URL: {redact(url)}")
        self.user = parts.username or "guest"
        password = parts.password or "guest"
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        token = base64.b64encode(f"{self.user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"
        self.timeout = timeout

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        """One API call; the decoded JSON answer (None when empty)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base}/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise TransportError(
                f"management API {method} /api/{path}: HTTP {exc.code}: {detail}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise TransportError(f"management API at {self.base} unreachable: {exc}") from exc
        return json.loads(raw) if raw else None

    def wait(self, timeout: float) -> None:
        """Wait until the API answers (a broker container may still be starting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.request("GET", "overview")
                return
            except TransportError as exc:
                if "HTTP 401" in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def role_passwords(
    folder: Path, roles: Iterable[Role], environ: Mapping[str, str] | None = None
) -> dict[Role, Path]:
    """Each role's password file under ``folder``: from ``CIPHERFACE_BROKER_PASSWORD_<ROLE>``
    when set, else kept from an earlier run, else generated. Folders 0700, files 0600."""
    env = os.environ if environ is None else environ
    files: dict[Role, Path] = {}
    for role in roles:
        directory = folder / role.value
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        path = directory / "password"
        given = env.get(PASSWORD_ENV.format(role=role.name))
        if given or not path.exists():
            _write_secret(path, given or secrets.token_urlsafe(32))
        elif path.stat().st_mode & 0o077:
            raise ConfigError(f"{path} is readable by group or others; chmod 600 it")
        files[role] = path
    return files


def _write_secret(path: Path, secret: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    path.chmod(0o600)


def setup_broker(
    api: ManagementAPI,
    topology: Topology,
    credentials: Path,
    *,
    vhost: str = DEFAULT_VHOST,
    environ: Mapping[str, str] | None = None,
) -> SetupReport:
    """Create ``vhost``, the role users and their permissions, and the shared topology.

    Idempotent: run it again and it sets the same permissions, keeps the stored
    passwords (or applies those given in the environment) and re-declares the
    same topology. The admin (the API's user) gets full permissions on the vhost:
    it declares the topology, and it is how an operator reads the dead letters.
    """
    v = quote(vhost, safe="")
    api.request("PUT", f"vhosts/{v}", {})
    api.request(
        "PUT",
        f"permissions/{v}/{quote(api.user, safe='')}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    files = role_passwords(credentials, list(Role), environ)
    granted: dict[str, Permissions] = {}
    for role, path in files.items():
        user = quote(role.value, safe="")
        password = path.read_text().splitlines()[0]
        api.request("PUT", f"users/{user}", {"password": password, "tags": ""})
        allowed = permissions(topology, role)
        api.request(
            "PUT",
            f"permissions/{v}/{user}",
            {"configure": allowed.configure, "write": allowed.write, "read": allowed.read},
        )
        granted[role.value] = allowed
    _declare_topology(api, topology, v)
    return SetupReport(
        vhost=vhost,
        users=granted,
        password_files={role.value: str(path) for role, path in files.items()},
    )


def _declare_topology(api: ManagementAPI, topology: Topology, vhost: str) -> None:
    """Exchanges, shared queues and their bindings, exactly as the transports declare them."""
    for spec in topology.exchanges:
        api.request(
            "PUT",
            f"exchanges/{vhost}/{quote(spec.name, safe='')}",
            {"type": spec.kind, "durable": True, "auto_delete": False},
        )
    for queue in topology.queues:
        name = quote(queue.name, safe="")
        api.request(
            "PUT",
            f"queues/{vhost}/{name}",
            {
                "durable": True,
                "auto_delete": False,
                "arguments": topology.queue_arguments(queue.name),
            },
        )
        api.request(
            "POST",
            f"bindings/{vhost}/e/{quote(queue.source, safe='')}/q/{name}",
            {"routing_key": queue.key},
        )
