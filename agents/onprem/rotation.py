"""Key rotation on-prem: a new CKKS key for the whole gallery, no probe lost on the way.

`cipherface rotate-keys` asks the running on-prem daemon (a request file in its
folder; the daemon looks every `OPS_INTERVAL` seconds) and follows its progress
in ``rotation.json``. The daemon then goes through these phases:

1. **preparing**: a new key in ``keys/<fingerprint>/`` (0700, files 0600) and a new
   book beside it with the same templates at the same positions and its own
   decoy seed (`cipherface.gallery.lifecycle.rekey`). The old gallery answers.
2. **publishing**: every block encrypted under the new key and broadcast after a
   context issued now. From here on, syncs are answered with the new gallery, and
   on-prem decrypts scores under either key (the envelope names the key).
   Replicas receive the new gallery *beside* the one they serve and switch, in one
   step, once they hold all of it: a probe is searched under one key, on a whole
   gallery. Each reports the switch (`wire.ReplicaStatus`) on the results queue,
   so every score it made under the old key is queued ahead of that report.
3. **waiting**: until every replica in the trust store reports serving the new
   gallery whole; one that reports without it is sent it again.
4. **switched**: ``current-key`` names the new folder (`Settings.key_dir`), so
   enrollments and every later command use it.
5. after `Settings.rotation_grace` seconds, and once no decryption under the old
   key runs, the old key and its book are deleted (the secret key overwritten
   first): **done**. Scores under the old key that arrive later are refused
   (dead-lettered with `KeyMismatchError`).

The signing key does not change. Enrollments and removals are refused while a
rotation runs. A daemon restarted mid-rotation resumes it: before the new key is
published it starts again from the old key; after, it carries on.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cipherface import wire
from cipherface.config import CURRENT_KEY_FILE
from cipherface.crypto import Keyring
from cipherface.daemon import cancel_and_wait, finish_in_thread
from cipherface.exceptions import ConfigError
from cipherface.gallery.lifecycle import rekey
from cipherface.private import private_dir, write_private

if TYPE_CHECKING:
    from agents.onprem.agent import KeySet, OnPremAgent

__all__ = ["IN_PROGRESS", "REQUEST_FILE", "STATE_FILE", "KeyRotation", "read_state"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: In on-prem's folder: the progress of the last rotation (JSON).
STATE_FILE = "rotation.json"
#: In on-prem's folder: written by ``cipherface rotate-keys``, taken by the daemon.
REQUEST_FILE = "rotate-request"
#: Phases during which the gallery must not change.
IN_PROGRESS = frozenset({"requested", "preparing", "publishing", "waiting", "switched"})
#: The key files of a key folder (the signing key, ledger and trust store are not).
_KEY_FILES = ("private.key", "public.key", "book.sqlite")


def read_state(onprem_dir: Path) -> dict[str, Any]:
    """The last rotation's progress ({} when there was none)."""
    try:
        return dict(json.loads((onprem_dir / STATE_FILE).read_text()))
    except (FileNotFoundError, ValueError):
        return {}


def holds(status: wire.ReplicaStatus | None, keys: KeySet) -> bool:
    """Whether a replica's report says it serves the whole gallery of ``keys`` (its
    shard's blocks: those at home there, or moving there)."""
    if status is None:
        return False
    index = keys.book.shards
    shard = {b for b in keys.book.all_blocks() if index.home.get(b, 0) == status.shard}
    return (
        status.fingerprint == keys.fingerprint
        and not status.awaiting
        and shard <= set(status.blocks)
    )


class KeyRotation:
    """Rotates on-prem's CKKS key while the daemon serves (see the module docstring)."""

    def __init__(self, agent: OnPremAgent) -> None:
        self.agent = agent
        self.settings = agent.settings
        self._task: asyncio.Task[None] | None = None
        #: Decryptions running per key fingerprint: retiring a key waits for them.
        self._in_use: collections.Counter[str] = collections.Counter()
        self._released = asyncio.Condition()

    # -- state --------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        """The progress of the last rotation."""
        return read_state(self.settings.onprem_dir)

    def _update(self, **changes: Any) -> None:
        state = {**self.state, **changes, "updated_at": time.time()}
        write_private(self.settings.onprem_dir / STATE_FILE, json.dumps(state).encode())
        if "phase" in changes:
            log.info("key rotation: %s", changes["phase"], extra={"fingerprint": state.get("new")})

    def _relative(self, folder: Path) -> str:
        return str(folder.relative_to(self.settings.onprem_dir))

    def refuse_changes(self) -> None:
        """Raise `ConfigError` while a rotation runs (the gallery must not change)."""
        phase = self.state.get("phase")
        if phase in IN_PROGRESS:
            raise ConfigError(f"a key rotation is in progress ({phase}): try again after it")

    # -- running ------------------------------------------------------------------------
    def poll_request(self) -> None:
        """Start a rotation if ``cipherface rotate-keys`` asked for one."""
        request = self.settings.onprem_dir / REQUEST_FILE
        if request.exists() and (self._task is None or self._task.done()):
            request.unlink()
            self.start()

    def start(self) -> asyncio.Task[None]:
        """Start a rotation (or return the one running)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run_logged(self._rotate()))
        return self._task

    async def _run_logged(self, work: Any) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._update(phase="failed", error=f"{type(exc).__name__}: {exc}")
            log.error("key rotation failed: %s: %s", type(exc).__name__, exc)
            raise

    async def resume(self) -> None:
        """At start: carry on with a rotation a restart interrupted."""
        from agents.onprem.agent import KeySet

        state = self.state
        phase = state.get("phase")
        onprem = self.settings.onprem_dir
        if phase in ("requested", "preparing"):
            # Nothing was published under the new key: start again from the old one.
            if state.get("folder"):
                shutil.rmtree(onprem / state["folder"], ignore_errors=True)
            self._update(phase="aborted")
        elif phase in ("publishing", "waiting"):
            new = self.agent._add_keys(KeySet.load(onprem / state["folder"], self.settings))
            work = self._finish(self.agent.current, new)
            self._task = asyncio.create_task(self._run_logged(work))
        elif phase == "switched" and (onprem / state["old_folder"] / "private.key").exists():
            old = self.agent._add_keys(KeySet.load(onprem / state["old_folder"], self.settings))
            self._task = asyncio.create_task(self._run_logged(self._retire(old)))

    async def stop(self) -> None:
        """Cancel a running rotation; `resume` carries on after a restart."""
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def wait(self) -> None:
        """Until the running rotation (if any) is over; raises what it raised."""
        if self._task is not None:
            await self._task

    async def using(self, keys: KeySet, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``func`` in a thread on ``keys``: their retirement waits until it returns."""
        self._in_use[keys.fingerprint] += 1
        try:
            return await finish_in_thread(functools.partial(func, *args, **kwargs))
        finally:
            self._in_use[keys.fingerprint] -= 1
            async with self._released:
                self._released.notify_all()

    # -- phases -------------------------------------------------------------------------
    async def _rotate(self) -> None:
        from agents.onprem.agent import KeySet, write_keys

        agent = self.agent
        old = agent.current
        self._update(
            phase="preparing",
            old=old.fingerprint,
            old_folder=self._relative(old.folder),
            new=None,
            folder=None,
            error=None,
            started_at=time.time(),
        )

        def prepare() -> Path:
            keyring = Keyring.generate(self.settings.preset)
            folder = self.settings.onprem_dir / "keys" / keyring.fingerprint[:16]
            self._update(new=keyring.fingerprint, folder=self._relative(folder))
            private_dir(folder.parent)
            write_keys(folder, keyring)
            old.book.refresh()
            rekey(old.book, keyring, folder / "book.sqlite").close()
            return folder

        folder = await finish_in_thread(prepare)
        new = agent._add_keys(KeySet.load(folder, self.settings))
        await self._finish(old, new)

    async def _finish(self, old: KeySet, new: KeySet) -> None:
        agent = self.agent
        self._update(phase="publishing")
        # Every block under the new key (encrypted now, cached for later syncs).
        await agent.publish_gallery(keys=new)
        agent.publishing = new
        self._update(phase="waiting", published_at=time.time())
        await self._wait_for_replicas(new)
        pointer = self.settings.onprem_dir / CURRENT_KEY_FILE
        write_private(pointer, (self._relative(new.folder) + "\n").encode())
        agent.current = new
        self._update(phase="switched", switched_at=time.time())
        await self._retire(old)

    async def _wait_for_replicas(self, new: KeySet) -> None:
        agent = self.agent
        sent: dict[str, float] = {}
        published = time.time()
        while True:
            lagging = [n for n in agent.trusted.keys() if not holds(agent.replicas.get(n), new)]
            self._update(waiting_for=lagging)
            if not lagging:
                return
            agent.status_changed.clear()
            try:
                await asyncio.wait_for(agent.status_changed.wait(), self.settings.sync_interval)
            except asyncio.TimeoutError:
                pass
            for name in lagging:
                status = agent.replicas.get(name)
                # Alive (it reported since it was last sent the gallery), yet without it.
                if (
                    status is not None
                    and status.reported_at > sent.get(name, published)
                    and status.staged != new.fingerprint
                    and not holds(status, new)
                ):
                    sent[name] = time.time()
                    log.info("key rotation: sending the new gallery to %s again", name)
                    await agent.publish_gallery(replica=name, keys=new)

    async def _retire(self, old: KeySet) -> None:
        await asyncio.sleep(self.settings.rotation_grace)
        async with self._released:
            await self._released.wait_for(lambda: not self._in_use[old.fingerprint])
            self.agent.keys.pop(old.fingerprint, None)
            old.close()
        await asyncio.to_thread(_delete_keys, old.folder, self.settings.onprem_dir)
        self._update(phase="done", retired_at=time.time())


def _delete_keys(folder: Path, onprem_dir: Path) -> None:
    """Delete a retired key folder; the secret key is overwritten before it is unlinked."""
    secret = folder / "private.key"
    if secret.exists():
        size = secret.stat().st_size
        with secret.open("r+b") as handle:
            handle.write(b"\0" * size)
            handle.flush()
            os.fsync(handle.fileno())
    if folder == onprem_dir:  # the first key lives beside the signing key and ledger
        for name in _KEY_FILES:
            for path in (folder / name, folder / f"{name}-wal", folder / f"{name}-shm"):
                path.unlink(missing_ok=True)
    else:
        shutil.rmtree(folder)
