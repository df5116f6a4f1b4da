"""Settings shared by the agents, the client and the CLI.

One frozen `Settings`, read from ``CIPHERFACE_*`` environment variables by
`Settings.from_env`; command-line flags override it with `Settings.override`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cipherface.crypto import DEFAULT_PRESET, PRESETS, Metric
from cipherface.detection import detector_upsample
from cipherface.embedding import (
    DEFAULT_DETECTOR,
    DEFAULT_MODEL,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    Embedder,
    model_spec,
)
from cipherface.exceptions import ConfigError
from cipherface.wire.envelope import MAX_MESSAGE_BYTES
from cipherface.wire.payloads import MAX_SHARDS

__all__ = ["CURRENT_KEY_FILE", "DEFAULT_AMQP_URL", "MESSAGE_SIZE_RANGE", "Settings"]

#: In on-prem's folder: the key folder in use after a key rotation (`Settings.key_dir`).
CURRENT_KEY_FILE = "current-key"

#: Bounds of `Settings.max_message_size`: a block chunk must hold its layout (up to
#: 16,384 template ids and subjects at n16384) beside at least one column; RabbitMQ
#: 3.x allows at most 512 MiB and refuses more than 128 MiB by default.
MESSAGE_SIZE_RANGE = (1024 * 1024, 128 * 1024 * 1024)

#: The broker the tests and `docker-compose.yml` use.
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything an agent needs to know that is not a key."""

    #: RabbitMQ URL, or several separated by commas (a cluster's nodes: a lost
    #: connection reconnects to the next); None means the in-process broker
    #: (single-process runs only).
    amqp_url: str | None = None
    #: Prefix of every queue and exchange, so several deployments share a broker.
    prefix: str = "cipherface"
    #: Where keys, the enrollment book and the cloud gallery live.
    data_dir: Path = Path("cipherface-data")
    model: str = DEFAULT_MODEL
    detector: str = DEFAULT_DETECTOR
    #: Images are downscaled to this longest side before detection (bounded cost).
    max_image_side: int = MAX_IMAGE_SIDE
    #: dlib: how often the image is doubled before the detector scans it. None: once,
    #: DeepFace's choice (faces down to about 40 px of the working image); 0 finds
    #: faces down to about 80 px at a quarter of the cost, the difference between
    #: 3.5 and 6.2 probes/s end to end on 2 cores (README, "Face detection").
    detect_upsample: int | None = None
    #: Cosine, because it decides better than euclidean for Dlib (96.2% vs 95.0%).
    metric: Metric = Metric.COSINE
    preset: str = DEFAULT_PRESET
    #: Names this cloud replica's gallery queue and data folder. None (the default):
    #: the replica takes an identity kept in the data folder, created once
    #: (`cipherface.replica.claim`), so a restart keeps it and scaled replicas
    #: sharing a volume each take their own.
    replica: str | None = None
    #: On-prem: how many shards the gallery's blocks are spread over (raising it
    #: moves blocks to the new shards with the daemon serving: `cipherface.sharding`).
    shards: int = 1
    #: A cloud replica: the shard it serves (0 .. shards - 1); replicas of one shard
    #: hold the same blocks and compete for its searches.
    shard: int = 0
    #: Largest message sent or accepted, envelope included (bytes). Keep it at or
    #: under the broker's ``max_message_size``; blocks are chunked to fit it.
    max_message_size: int = MAX_MESSAGE_BYTES
    #: Redeliveries of a message whose consumer died before the broker dead-letters
    #: it (``x-delivery-limit`` of the quorum queues; 0: none). The default is
    #: `cipherface.transport.base.DELIVERY_LIMIT` (not imported: the transports
    #: import this module).
    delivery_limit: int = 4
    #: Deliveries in flight per consumer: backpressure on slow embedding.
    prefetch: int = 2
    #: Port of the operations endpoint (``/metrics``, ``/healthz``, ``/readyz``);
    #: None disables it.
    metrics_port: int | None = None
    #: Address it binds: loopback unless a scraper elsewhere must reach it.
    metrics_address: str = "127.0.0.1"
    #: ``text`` (``key=value``) or ``json`` (one JSON object per line).
    log_format: str = "text"
    #: Seconds a probe may wait before it is answered: an older one gets an
    #: ``Expired`` error event instead of a decision (0: no limit).
    probe_ttl: float = 300.0
    #: Seconds on-prem waits for the rest of a probe's score parts after its first
    #: (`cipherface.wire.parts`) before answering it with an ``IncompleteScores`` event.
    gather_timeout: float = 60.0
    #: Seconds on-prem remembers a probe's event (its ledger); results of older
    #: probes are dropped unanswered. At least `probe_ttl`.
    ledger_window: float = 7 * 86400.0
    #: Most events the ledger remembers (the oldest go first).
    ledger_max: int = 1_000_000
    #: Seconds after which a replica's gallery queue that nobody consumes is deleted
    #: by the broker (``x-expires``; 0: never). A replica syncs when it starts.
    gallery_queue_expiry: float = 7 * 86400.0
    #: Seconds on-prem keeps a rotated-out key after every replica switched, for
    #: scores already on their way.
    rotation_grace: float = 30.0
    #: How many candidates on-prem ranks for a 1:N probe.
    top_k: int = 5
    #: Most faces one probe image may have: the cloud answers a probe with more
    #: with ``TooManyFacesError``, and on-prem refuses scores of more faces (a
    #: replica's forgery: each face costs a decryption and a fit) as an
    #: ``IntegrityError``. 32: a group photo, not a crowd.
    max_faces: int = 32
    #: Processes a cloud replica spreads its gallery over (TenSEAL holds the GIL).
    workers: int = 1
    #: Processes a cloud replica embeds probe images in (`EmbeddingPool`): DeepFace
    #: runs one image at a time per process, so 2 on a 2-core replica embeds two
    #: probes at once. 0: in the replica's own process (no extra memory, one core).
    embed_workers: int = 0
    #: Processes on-prem decrypts a probe's score blocks in, instead of its own
    #: (`cipherface.gallery.decryption`), for galleries of at least
    #: `decryption.MIN_BLOCKS` blocks. 0: in on-prem's process. Each costs about
    #: 180-220 MB and holds the secret context (sent over a local pipe); on 2 cores,
    #: 2 ranked about 1.2x faster and 1 slower (`benchmarks/bench_rank.py`).
    decrypt_workers: int = 0
    #: Whether a replica sends a plaintext probe's scores compressed (63 bits per
    #: coefficient pair: 7.9 MB per probe at a million templates, 16.1 MB without),
    #: `cipherface.gallery.compact`. On-prem then turns each block's scores to NTT
    #: form itself (about 0.3 ms a block); uncompressed, the replica's workers do.
    compress_scores: bool = True
    #: File holding the broker password, put into `amqp_url` at connect time, so the
    #: URL in the environment carries none (`cipherface broker-setup` writes these).
    amqp_password_file: Path | None = None
    #: ``amqps://``: CA that signed the broker's certificate (else the system CAs).
    tls_ca: Path | None = None
    #: ``amqps://``: this party's client certificate (PEM) and its private key, for
    #: brokers that demand one (``fail_if_no_peer_cert``).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Seconds between two gallery republishes on-prem sends one replica: syncs
    #: arriving meanwhile are served by the answer already in its queue.
    sync_interval: float = 10.0
    #: On-prem's Ed25519 verify key, pinned by cloud replicas and event readers: only
    #: gallery messages and events it signed are accepted. Default: on-prem's own
    #: ``onprem/signing.pub`` under `data_dir` (one machine, the demo, the tests).
    onprem_key: Path | None = None

    def __post_init__(self) -> None:
        model_spec(self.model)
        object.__setattr__(self, "metric", Metric.parse(self.metric))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose {', '.join(PRESETS)}")
        if min(self.prefetch, self.top_k, self.workers, self.max_faces) < 1:
            raise ConfigError("prefetch, top_k, workers and max_faces must be at least 1")
        if min(self.embed_workers, self.decrypt_workers) < 0:
            raise ConfigError("embed_workers and decrypt_workers must be 0 or more")
        for name in _PATHS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format is text or json, not {self.log_format!r}")
        if min(self.probe_ttl, self.ledger_window, self.gallery_queue_expiry) < 0:
            raise ConfigError("probe_ttl, ledger_window and gallery_queue_expiry are >= 0")
        if self.probe_ttl and self.ledger_window < self.probe_ttl:
            raise ConfigError("ledger_window must be at least probe_ttl")
        if self.delivery_limit < 0:
            raise ConfigError("delivery_limit must be >= 0")
        if not (1 <= self.shards <= MAX_SHARDS and 0 <= self.shard < MAX_SHARDS):
            raise ConfigError(f"shards must be 1 to {MAX_SHARDS}, shard 0 to {MAX_SHARDS - 1}")
        if self.gather_timeout <= 0:
            raise ConfigError("gather_timeout must be > 0")
        if self.ledger_max < 1:
            raise ConfigError("ledger_max must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: set both or neither")
        low, high = MESSAGE_SIZE_RANGE
        if not low <= self.max_message_size <= high:
            raise ConfigError(
                f"max_message_size must be between {low} and {high} bytes, "
                f"got {self.max_message_size}"
            )
        if self.max_image_side < MIN_IMAGE_SIDE:
            raise ConfigError(
                f"max_image_side must be at least {MIN_IMAGE_SIDE} px, got {self.max_image_side}"
            )
        detector_upsample(self.detector, self.detect_upsample)

    def embedder(self) -> Embedder:
        """The embedder these settings describe: probes and enrollment photos alike."""
        return Embedder(
            self.model,
            self.detector,
            max_side=self.max_image_side,
            upsample=self.detect_upsample,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``CIPHERFACE_<FIELD>`` variables (e.g. ``CIPHERFACE_AMQP_URL``)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"CIPHERFACE_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, raw)
        return cls(**values)  # type: ignore[arg-type]

    def override(self, **changes: object) -> Settings:
        """A copy with the given fields replaced; None means "keep", as for unset flags."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The broker URLs `amqp_url` lists, in the order they are tried."""
        return tuple(u.strip() for u in (self.amqp_url or "").split(",") if u.strip())

    @property
    def onprem_dir(self) -> Path:
        """On-prem's folder: secret key, enrollment book, emitted-event ledger."""
        return self.data_dir / "onprem"

    @property
    def cloud_dir(self) -> Path:
        """This replica's folder: its id, signing key, public context and encrypted gallery."""
        if self.replica is None:
            raise ConfigError("no replica name yet: claim one (cipherface.replica.claim)")
        return self.data_dir / f"cloud-{self.replica}"

    @property
    def key_dir(self) -> Path:
        """The folder of the CKKS keys in use and their enrollment book.

        On-prem's folder itself until a key rotation; then ``keys/<fingerprint>``,
        named by the ``current-key`` file, which `cipherface rotate-keys` replaces
        atomically when it switches (so no open database is ever moved).
        """
        pointer = self.onprem_dir / CURRENT_KEY_FILE
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            return self.onprem_dir
        return self.onprem_dir / name if name else self.onprem_dir

    @property
    def secret_key_path(self) -> Path:
        """The secret context, mode 0600."""
        return self.key_dir / "private.key"

    @property
    def public_key_path(self) -> Path:
        """The public context (no secret key, no Galois keys)."""
        return self.key_dir / "public.key"

    @property
    def conjugation_key_path(self) -> Path:
        """The one Galois key cloud replicas get (complex conjugation, edge-probe checks)."""
        return self.key_dir / "conjugation.key"

    @property
    def book_path(self) -> Path:
        """On-prem's enrollment book for the keys in use (plaintext embeddings, 0600)."""
        return self.key_dir / "book.sqlite"

    @property
    def ledger_path(self) -> Path:
        """On-prem's ledger of emitted events (it outlives key rotations)."""
        return self.onprem_dir / "ledger.sqlite"

    @property
    def replica_status_path(self) -> Path:
        """What each replica last reported it serves (``cipherface list``)."""
        return self.onprem_dir / "replica-status.json"

    @property
    def signing_key_path(self) -> Path:
        """On-prem's Ed25519 signing key, mode 0600 (its verify key beside it, ``.pub``)."""
        return self.onprem_dir / "signing.key"

    @property
    def onprem_verify_key_path(self) -> Path:
        """Where replicas and event readers find on-prem's verify key (`onprem_key`)."""
        return self.onprem_key or self.signing_key_path.with_suffix(".pub")

    @property
    def trust_store_path(self) -> Path:
        """On-prem's trusted cloud replicas: name -> verify key (``cipherface trust``)."""
        return self.onprem_dir / "trusted-replicas.json"

    @property
    def replica_key_path(self) -> Path:
        """This cloud replica's Ed25519 signing key, created on first start."""
        return self.cloud_dir / "signing.key"


#: Optional fields that name files.
_PATHS = ("amqp_password_file", "tls_ca", "tls_cert", "tls_key", "onprem_key")
#: Fields read as yes/no from the environment, and the words that say so.
_BOOLS = ("compress_scores",)
_TRUTH = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


#: Fields read as numbers from the environment.
_FLOATS = (
    "sync_interval",
    "probe_ttl",
    "gather_timeout",
    "ledger_window",
    "gallery_queue_expiry",
    "rotation_grace",
)
_INTS = (
    "prefetch",
    "top_k",
    "metrics_port",
    "workers",
    "embed_workers",
    "decrypt_workers",
    "ledger_max",
    "max_image_side",
    "detect_upsample",
    "max_faces",
    "max_message_size",
    "delivery_limit",
    "shards",
    "shard",
)


def _convert(name: str, raw: str) -> object:
    if name in _FLOATS:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"CIPHERFACE_{name.upper()} must be a number, got {raw!r}") from None
    if name in _BOOLS:
        if raw.strip().lower() not in _TRUTH:
            raise ConfigError(
                f"CIPHERFACE_{name.upper()} must be one of {', '.join(_TRUTH)}, got {raw!r}"
            )
        return _TRUTH[raw.strip().lower()]
    if name in _INTS:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(
                f"CIPHERFACE_{name.upper()} must be an integer, got {raw!r}"
            ) from None
    if name == "data_dir" or name in _PATHS:
        return Path(raw)
    return raw
