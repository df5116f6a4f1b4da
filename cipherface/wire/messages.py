"""Every message CipherFace agents exchange: one frozen dataclass per kind.

A message maps to the ``body`` of its envelope (`cipherface.wire.envelope`);
``from_body`` checks every field's type and raises `WireFormatError` naming what
is wrong, so a consumer can dead-letter the message with that reason. Binary
fields (images, ciphertexts, contexts) are raw msgpack ``bin``, never base64.
Public contexts are shipped without Galois keys (about 1 MB at N=8192, instead of
about 18 MB with them).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from cipherface.exceptions import WireFormatError
from cipherface.fields import of_type
from cipherface.wire.payloads import (
    BlockLayout,
    EncryptedProbe,
    FaceProbe,
    FaceResult,
    FaceScores,
    ProbeCheck,
    ShardMap,
)
from cipherface.wire.schema import field_specs

__all__ = [
    "MAX_PROBE_ID_BYTES",
    "BlockChunk",
    "ContextUpdate",
    "EncryptedProbePart",
    "EncryptedProbeRequest",
    "Message",
    "ProbeRejected",
    "ProbeRequest",
    "ReplicaStatus",
    "ScoresReady",
    "ShardSearch",
    "SubjectsPart",
    "SyncRequest",
    "VerificationEvent",
    "new_id",
    "refusal",
    "request_digest",
]

M = TypeVar("M", bound="Message")

#: AMQP's limit on a message id (a short string), which probes and events carry.
MAX_PROBE_ID_BYTES = 255


def new_id() -> str:
    """A fresh message or probe id."""
    return uuid.uuid4().hex


def message_id(probe_id: str, request: str) -> str:
    """The AMQP message id of a probe and of what answers it: the probe id, or, for one
    over AMQP's limit, ``sha256:<request digest>`` (the body still names the probe)."""
    return probe_id if len(probe_id.encode()) <= MAX_PROBE_ID_BYTES else f"sha256:{request}"


#: Hex characters of a `request_digest`.
_DIGEST_CHARS = 32
_HEX = frozenset("0123456789abcdef")


def request_digest(body: bytes) -> str:
    """What identifies one probe message (its encoded bytes): a broker's redelivery
    has the same digest, a new probe reusing a probe id another."""
    return hashlib.sha256(body).hexdigest()[:_DIGEST_CHARS]


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of all messages: a kind name; the body's schema comes from the field annotations.

    `cipherface.wire.schema` maps each annotation to what the msgpack body carries,
    so a message is defined once, by its dataclass.
    """

    kind: ClassVar[str]
    #: Whether the sender must sign it (on-prem or a trusted replica): everything
    #: but a user's probe. `cipherface.wire.envelope.decode` enforces it.
    signed: ClassVar[bool] = True
    #: Fields that must hold a `request_digest`: what a replica claims to answer
    #: ends up in ledgers and AMQP message ids (255 bytes at most), so it is checked.
    digests: ClassVar[tuple[str, ...]] = ()

    def body(self) -> dict[str, Any]:
        """The msgpack-native body."""
        return {
            name: spec.encode(getattr(self, name)) for name, spec in field_specs(type(self)).items()
        }

    @classmethod
    def from_body(cls: type[M], body: Mapping[str, Any]) -> M:
        """Validate a decoded body and build the message (unknown fields are ignored).

        Every field is checked at the top level before any is looked into, so the
        first wrong field is the one named.
        """
        specs = field_specs(cls)
        missing = [name for name in specs if name not in body]
        if missing:
            raise WireFormatError(f"{cls.kind}: missing field(s) {', '.join(missing)}")
        labels = {name: f"{cls.kind}.{name}" for name in specs}
        checked = {
            name: of_type(body[name], spec.accepts, labels[name]) for name, spec in specs.items()
        }
        for name in cls.digests:
            value = checked[name]
            if len(value) != _DIGEST_CHARS or not _HEX.issuperset(value):
                raise WireFormatError(
                    f"field {labels[name]!r} must be a request digest ({_DIGEST_CHARS} hex digits)"
                )
        return cls(
            **{name: spec.decode(checked[name], labels[name]) for name, spec in specs.items()}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ContextUpdate(Message):
    """on-prem -> every cloud replica: the public CKKS context (no secret key).

    It precedes the blocks it announces: a replica that has received every block
    listed in ``blocks`` holds the whole gallery and starts serving probes.
    """

    kind: ClassVar[str] = "context"
    context: bytes = field(repr=False)
    #: The Galois keys replicas get: complex conjugation, to check edge probes, and,
    #: when they fit the message cap, those that expand packed edge probes
    #: (`cipherface.gallery.expansion`). The name predates the second kind.
    conjugation_key: bytes = field(repr=False, default=b"")
    #: Ids of the blocks that follow this message.
    blocks: tuple[int, ...] = ()
    #: When on-prem issued it: a replica refuses a key change older than its context.
    issued_at: float = field(default_factory=time.time)
    #: The shard whose replicas this context is for (`blocks` are that shard's).
    shard: int = 0
    #: Where every block lives (nil: one shard, version 0).
    shard_map: ShardMap | None = field(repr=False, default=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockChunk(Message):
    """on-prem -> cloud replicas: columns ``start ..`` of one encrypted gallery block.

    A block (``dimensions`` ciphertext columns of about 64 KB each, 8.4 MB at 128-d,
    269 MB at 4096-d) travels as consecutive chunks under the message size limit;
    the replica installs it once every column and the layout are in, all from
    chunks that agree on ``layout`` (`cipherface.wire.chunks`).
    """

    kind: ClassVar[str] = "chunk"
    block_id: int
    #: Bumps on every re-encryption of the block; the cloud keeps the highest.
    version: int
    dimensions: int
    #: SHA-256 of the block's id, version, key fingerprint, dimensions and layout:
    #: the same in every chunk of one block.
    layout: bytes
    #: Index of the first column this chunk carries.
    start: int
    columns: tuple[bytes, ...] = field(repr=False)
    #: Which template is where: in the block's first chunk only.
    head: BlockLayout | None = field(repr=False, default=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class SubjectsPart(Message):
    """on-prem -> cloud replicas: a run of a sharded map's subjects and their shards.

    Follows the `ContextUpdate` whose map announces it (``digest``, the map's
    ``subjects_digest``); a replica routes 1:1 claims by the list once every part
    is in and the whole hashes to the digest (`cipherface.wire.subjects`).
    """

    kind: ClassVar[str] = "subjects"
    #: The list's `ShardMap.subjects_digest`: which list this is a part of.
    digest: str
    part: int
    parts: int
    subjects: tuple[str, ...] = field(repr=False)
    #: The shard of each of ``subjects`` (same order).
    subject_homes: tuple[int, ...] = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncRequest(Message):
    """cloud -> on-prem: a replica (new, or back with an empty store) asks for everything."""

    kind: ClassVar[str] = "sync"
    replica: str
    #: The key fingerprint the replica holds ('' for none).
    fingerprint: str = ""
    #: When the replica asked: on-prem answers each replica once for all earlier asks.
    requested_at: float = field(default_factory=time.time)
    #: The shard it serves: it gets that shard's blocks only.
    shard: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeRequest(Message):
    """user -> cloud: an image to verify (with a claimed subject) or identify (without)."""

    kind: ClassVar[str] = "probe"
    signed: ClassVar[bool] = False
    probe_id: str
    image: bytes = field(repr=False)
    subject: str | None = None
    submitted_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedProbeRequest(Message):
    """edge -> cloud: a probe embedded and encrypted at the edge; the cloud sees no image."""

    kind: ClassVar[str] = "encrypted_probe"
    signed: ClassVar[bool] = False
    probe_id: str
    probe: EncryptedProbe = field(repr=False)
    subject: str | None = None
    submitted_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedProbePart(Message):
    """edge -> cloud: dimensions ``start ..`` of an edge probe, one of its ``pieces``.

    An edge probe in columns is one ciphertext of about 131 KB per dimension (16.8
    MB at 128-d), over the message size limit (a packed one is a single message);
    the edge sends it as pieces by dimension
    range (`cipherface.wire.pieces`), each on the probe queue on its own, so any
    replica scores any piece. Every piece names the whole probe by ``request``
    (the `request_digest` of the whole probe), on which on-prem gathers them.
    """

    kind: ClassVar[str] = "probe_piece"
    signed: ClassVar[bool] = False
    digests: ClassVar[tuple[str, ...]] = ("request",)
    probe_id: str
    #: `request_digest` of the whole probe (the same in every piece).
    request: str
    piece: int
    pieces: int
    fingerprint: str
    metric: str
    #: The whole probe's dimensions; this piece holds ``start .. start + len(columns)``.
    dimensions: int
    start: int
    columns: tuple[bytes, ...] = field(repr=False)
    #: The probe's encrypted ``||p||^2`` (euclidean): in the piece starting at 0 only.
    norm: bytes | None = field(repr=False, default=None)
    subject: str | None = None
    submitted_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoresReady(Message):
    """cloud -> on-prem: encrypted distances of every face of one probe against the gallery."""

    kind: ClassVar[str] = "scores"
    digests: ClassVar[tuple[str, ...]] = ("request",)
    probe_id: str
    subject: str | None
    #: One entry per face the cloud found (an edge probe: one, without a box).
    faces: tuple[FaceScores, ...] = field(repr=False)
    #: `request_digest` of the probe message: tells a redelivery of the same probe
    #: (same digest) from a new probe reusing its id (`DuplicateProbeId`).
    request: str
    submitted_at: float
    #: Seconds spent per stage on the cloud ("embed", "check", "search").
    timings: Mapping[str, float]
    #: For an edge-encrypted probe: its encrypted norms, which on-prem checks.
    probe_check: ProbeCheck | None = field(repr=False, default=None)
    #: Which of the probe's ``parts`` messages this is (`cipherface.wire.parts`): a
    #: probe's scores over the message size limit travel as block ranges.
    part: int = 0
    parts: int = 1
    #: For a piece of an edge probe (`EncryptedProbePart`): which of ``pieces``, and
    #: the dimensions ``dims_start .. dims_stop`` of ``dimensions`` its scores sum
    #: over; on-prem adds the pieces' ciphertexts up before decrypting anything.
    piece: int = 0
    pieces: int = 1
    dims_start: int = 0
    dims_stop: int = 0
    dimensions: int = 0
    #: The shard that scored (its blocks only), and the `ShardMap` version it held.
    shard: int = 0
    map_version: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardSearch(Message):
    """cloud -> the replicas of one shard: a probe embedded once, to search on that shard.

    The replica that takes a probe from the probe queue embeds it (or takes an
    edge probe as it is) and sends this to every shard that holds part of the
    answer (1:N: all; 1:1: the subject's). Unsigned like a probe: only the cloud
    may publish to the shards' exchange. It carries no norm proof: a shard proves
    an edge probe itself from the ciphertexts it searches, so a search cannot pair
    a proof with another probe; and on-prem checks that the shards' answers agree.
    """

    kind: ClassVar[str] = "search"
    signed: ClassVar[bool] = False
    digests: ClassVar[tuple[str, ...]] = ("request",)
    probe_id: str
    subject: str | None
    #: The faces the first replica found (empty for an edge probe: see ``edge``).
    faces: tuple[FaceProbe, ...] = field(repr=False)
    edge: EncryptedProbe | None = field(repr=False)
    request: str
    submitted_at: float
    timings: Mapping[str, float]
    #: The shard this search is for, and the `ShardMap` version it was routed by.
    shard: int
    map_version: int
    #: For a piece of an edge probe (``edge`` holds its columns): as in `ScoresReady`.
    piece: int = 0
    pieces: int = 1
    dims_start: int = 0
    dims_stop: int = 0
    dimensions: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeRejected(Message):
    """cloud -> on-prem: a probe that cannot be matched (no face, not an image, ...)."""

    kind: ClassVar[str] = "rejected"
    digests: ClassVar[tuple[str, ...]] = ("request",)
    probe_id: str
    subject: str | None
    #: The error type, e.g. "NoFaceError".
    error: str
    reason: str
    #: `request_digest` of the probe message (as in `ScoresReady`).
    request: str
    submitted_at: float

    @classmethod
    def answering(
        cls,
        probe: ProbeRequest
        | EncryptedProbeRequest
        | EncryptedProbePart
        | ShardSearch
        | ScoresReady,
        error: str,
        reason: str,
        request: str,
    ) -> ProbeRejected:
        """The error answer to a probe, named as anything about it names it (its id,
        claim and submission time), under request digest ``request``."""
        return cls(
            probe_id=probe.probe_id,
            subject=probe.subject,
            error=error,
            reason=reason,
            request=request,
            submitted_at=probe.submitted_at,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaStatus(Message):
    """cloud -> on-prem: what a replica serves, after each change of its gallery.

    It travels on the results queue, behind every score the replica sent before:
    once a replica reports serving a new key, on-prem has every score it made under
    the old one queued ahead of the report (key rotation relies on that). On-prem
    keeps the last report of each replica for ``cipherface list``.
    """

    kind: ClassVar[str] = "status"
    replica: str
    #: The key of the gallery it serves ('' for none).
    fingerprint: str
    #: Block ids it serves, and the version of each (same order).
    blocks: tuple[int, ...]
    versions: tuple[int, ...]
    templates: int
    #: Announced blocks it does not hold yet.
    awaiting: int
    #: The key of a gallery it is receiving beside the one it serves ('' for none).
    staged: str = ""
    #: Its shard, and the `ShardMap` version it serves by.
    shard: int = 0
    map_version: int = 0
    reported_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationEvent(Message):
    """on-prem -> subscribers: the decision for one probe, with an answer per face.

    ``faces`` holds one `FaceResult` per face the cloud found; the top-level
    ``subject``, ``verified`` and ``distance`` are those of face ``face``: the best
    verified face, or the best face when none is verified (1:1: verified when any
    face matches the claim). Only decisions and noise-flooded distances rounded to
    `DISTANCE_DECIMALS` leave on-prem: exact CKKS decryptions would help an observer
    recover the secret key (`cipherface.gallery.integrity`).
    """

    kind: ClassVar[str] = "event"
    DISTANCE_DECIMALS: ClassVar[int] = 4
    probe_id: str
    #: "1:1" (a subject was claimed) or "1:N".
    mode: str
    #: The claimed subject (1:1) or the best match (1:N), None when nothing matched.
    subject: str | None
    verified: bool
    distance: float | None
    #: Every face's answer (empty on error), in the order the cloud found them.
    faces: tuple[FaceResult, ...] = ()
    #: Index in ``faces`` of the face the top-level decision is about (None on error).
    face: int | None = None
    threshold: float
    model: str
    metric: str
    #: Why there is no decision ("NoFaceError: ..."), None on success.
    error: str | None = None
    #: Seconds: "embed", "search", "decrypt", "total" (publish to event).
    timings: Mapping[str, float] = field(default_factory=dict)
    #: When on-prem issued it (signed): a reader refuses events replayed long after.
    issued_at: float = field(default_factory=time.time)
    #: `request_digest` of the probe message it answers ('' if unknown): a reader
    #: tells the answer to a reused probe id (`DuplicateProbeId`) from a duplicate.
    request: str = ""
    #: True when a shard did not answer in time: the decision covers only part of
    #: the gallery, ``searched`` of its templates (1.0: all of it).
    partial: bool = False
    searched: float = 1.0

    @property
    def routing_key(self) -> str:
        """Topic routing key: ``event.<1to1|1toN>.<verified|rejected|error>``."""
        outcome = "error" if self.error else ("verified" if self.verified else "rejected")
        return f"event.{self.mode.replace(':', 'to')}.{outcome}"

    def to_json(self) -> dict[str, Any]:
        """The event as JSON-ready data (what the CLI prints)."""
        return self.body()


def refusal(
    request: ProbeRequest | EncryptedProbeRequest | EncryptedProbePart | ShardSearch,
) -> tuple[str, str] | None:
    """(error, reason) for a well-formed probe no search can answer: an error event.

    An empty claimed subject is neither a claim nor 1:N (that is nil); a probe id
    longer than an AMQP message id (255 bytes) could not label its event.
    """
    size = len(request.probe_id.encode())
    if size > MAX_PROBE_ID_BYTES:
        return (
            "InvalidProbeId",
            f"probe id of {size} bytes exceeds AMQP's {MAX_PROBE_ID_BYTES}-byte message-id limit",
        )
    if not request.probe_id:
        return "InvalidProbeId", "the probe id is empty"
    if request.subject is not None and not request.subject.strip():
        return (
            "InvalidSubject",
            f"claimed subject {request.subject!r} is empty: send nil for 1:N identification",
        )
    return None


_KINDS: Mapping[str, type[Message]] = {
    cls.kind: cls
    for cls in (
        ContextUpdate,
        BlockChunk,
        SubjectsPart,
        SyncRequest,
        ProbeRequest,
        EncryptedProbeRequest,
        EncryptedProbePart,
        ScoresReady,
        ShardSearch,
        ProbeRejected,
        ReplicaStatus,
        VerificationEvent,
    )
}
