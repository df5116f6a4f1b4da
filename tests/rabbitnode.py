"""A private RabbitMQ node for tests that must configure a broker: users, TLS, plugins.

The shared broker on 5672 is never touched: each `RabbitNode` has its own node
name, ports, data and log folders, config file, enabled-plugins file and Erlang
cookie (its own ``HOME``), all under one temporary folder, and is always stopped
(``rabbitmqctl stop``, then SIGKILL of its process group if that fails).

`RabbitCluster` joins several such nodes into one cluster (a shared cookie,
``rabbitmqctl join_cluster``). Starting a node costs seconds, so share one per
test module::

    @pytest.fixture(scope="module")
    def node(tmp_path_factory):
        with RabbitNode(tmp_path_factory.mktemp("rabbit"), plugins=("rabbitmq_management",)) as n:
            yield n
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar
from urllib.parse import quote

from tests.environment import missing

S = TypeVar("S", bound="_Started")

__all__ = ["RabbitCluster", "RabbitNode", "free_port"]

#: The real scripts: the /usr/sbin wrappers switch to the rabbitmq user, which
#: could not write to a test's temporary folder.
_BIN = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _script(name: str) -> str:
    path = _BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed: RabbitMQ is needed for a private test node")
    return found


class _Started:
    """``with`` starts it and always stops it."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: S) -> S:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RabbitNode(_Started):
    """One private RabbitMQ node under ``root``; a context manager that starts and stops it.

    ``config`` lines are appended to the node's ``rabbitmq.conf``; ``{port}``-style
    placeholders are not expanded: pass the ports you chose (see `free_port`).
    """

    def __init__(
        self,
        root: Path,
        *,
        config: Sequence[str] = (),
        plugins: Sequence[str] = (),
        management: bool = False,
        cookie: str | None = None,
    ) -> None:
        self.root = root
        self.name = f"cftest-{uuid.uuid4().hex[:8]}@localhost"
        #: The Erlang cookie (nodes of one cluster share it); None: Erlang makes one.
        self.cookie = cookie
        self.port = free_port()
        self.dist_port = free_port()
        self.management_port = free_port() if management else None
        all_plugins = [*plugins, *(["rabbitmq_management"] if management else [])]
        self._plugins = sorted(set(all_plugins))
        self._config = list(config)
        self._process: subprocess.Popen[bytes] | None = None
        self.home = root / "home"
        self.log_dir = root / "log"

    # -- environment ----------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The variables both the server and `ctl` run with."""
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            # The default (node port + 20000) could collide with another test's node.
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            # Without its extension: the new-style .conf format.
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.root / "plugins-expand"),
            # Not /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.cookie is not None:
            path = self.home / ".erlang.cookie"
            path.unlink(missing_ok=True)
            path.write_text(self.cookie)
            path.chmod(0o400)
        lines = [f"listeners.tcp.default = 127.0.0.1:{self.port}", "log.console = false"]
        if self.management_port is not None:
            lines += [
                f"management.tcp.port = {self.management_port}",
                "management.tcp.ip = 127.0.0.1",
            ]
        (self.root / "rabbitmq.conf").write_text("\n".join([*lines, *self._config]) + "\n")
        (self.root / "enabled_plugins").write_text(f"[{','.join(self._plugins)}].\n")
        (self.root / "rabbitmq-env.conf").write_text("")

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        """Start the node and wait until it accepts connections."""
        self._write_files()
        with (self.log_dir / "server.out").open("ab") as out:
            self._process = subprocess.Popen(
                [_script("rabbitmq-server")],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {self.name} exited: {self.log_tail()}")
            done = self.ctl("await_startup", "--timeout", "10", check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"RabbitMQ node {self.name} not up in {timeout}s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the node; kill its process group when a clean stop fails."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            self.ctl("stop", check=False, timeout=60)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)

    # -- use ------------------------------------------------------------------------------
    def ctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> ARGS``."""
        done = subprocess.run(
            [_script("rabbitmqctl"), "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done

    def amqp_url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        """An AMQP URL for this node (guest works: the client is on the loopback)."""
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"amqp://{credentials}@127.0.0.1:{self.port}/{quote(vhost, safe='')}"

    @property
    def management_url(self) -> str:
        """The management API's base URL, with guest's credentials."""
        if self.management_port is None:
            raise RuntimeError("this node was started without the management plugin")
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the node's logs, for failure messages."""
        files = sorted(p for p in self.log_dir.glob("*") if p.is_file())
        texts = [p.read_text(errors="replace") for p in files]
        return "\n".join(texts)[-chars:]


class RabbitCluster(_Started):
    """``size`` private nodes joined into one cluster; a context manager that starts and stops it.

    Each node has its own name, ports and folders under ``root/node<i>``; they share
    an Erlang cookie, and every node after the first joins the first
    (``stop_app``, ``join_cluster``, ``start_app``).
    """

    def __init__(self, root: Path, size: int = 3, *, config: Sequence[str] = ()) -> None:
        cookie = uuid.uuid4().hex.upper()
        self.nodes = [
            RabbitNode(root / f"node{i}", config=config, cookie=cookie) for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Every node's AMQP URL, in node order."""
        return [node.amqp_url() for node in self.nodes]

    def start(self) -> None:
        """Start every node, then join the others to the first."""
        try:
            for node in self.nodes:
                node.start()
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.name, timeout=120)
                node.ctl("start_app", timeout=120)
            first.ctl("await_online_nodes", str(len(self.nodes)), timeout=120)
        except BaseException:
            self.stop()
            raise

    def node_named(self, name: str) -> RabbitNode:
        """The node of that Erlang node name."""
        return next(node for node in self.nodes if node.name == name)

    def stop(self) -> None:
        """Stop every node still running."""
        for node in reversed(self.nodes):
            node.stop()
