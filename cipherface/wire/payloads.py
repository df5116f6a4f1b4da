"""The gallery's payloads on the wire: encrypted blocks, block scores, encrypted probes.

Pure data with msgpack-native `to_dict` / `from_dict`: they travel inside
messages (`cipherface.wire.messages`) and rest in the cloud's store, so they live
here, TenSEAL-free, rather than beside the arithmetic that makes them
(`cipherface.gallery`). `from_dict` validates everything a peer from another trust
zone could get wrong and raises `WireFormatError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cipherface.exceptions import WireFormatError
from cipherface.fields import blobs, field, of_type, strings
from cipherface.metric import Metric

__all__ = [
    "BlockLayout",
    "BlockScores",
    "EncryptedBlock",
    "EncryptedProbe",
    "FaceProbe",
    "FaceResult",
    "FaceScores",
    "ProbeCheck",
    "ShardMap",
]


def _metric(data: Mapping[str, object]) -> str:
    value = field(data, "metric", str)
    try:
        return Metric(value).value
    except ValueError:
        raise WireFormatError(f"unknown metric {value!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedBlock:
    """One column-packed block: what on-prem ships and the cloud stores.

    ``columns[j]`` is a seeded ciphertext holding component ``j`` of every template
    of the block, two per slot (see `cipherface.gallery.packing`); ``norms`` holds each
    template's ``||g||^2`` the same way, for the euclidean metric.
    """

    block_id: int
    #: Bumps on every re-encryption; the cloud keeps the highest it has seen.
    version: int
    fingerprint: str
    metric: str
    dimensions: int
    #: One per allocated position, in position order; '' marks a freed one.
    template_ids: tuple[str, ...]
    subjects: tuple[str, ...]
    columns: tuple[bytes, ...]
    norms: bytes | None

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form (ints, strings, bytes, lists, None)."""
        return {
            "block_id": self.block_id,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "metric": self.metric,
            "dimensions": self.dimensions,
            "template_ids": list(self.template_ids),
            "subjects": list(self.subjects),
            "columns": list(self.columns),
            "norms": self.norms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> EncryptedBlock:
        """Inverse of `to_dict`; raises `WireFormatError` on any inconsistency."""
        metric = _metric(data)
        block = cls(
            block_id=field(data, "block_id", int),
            version=field(data, "version", int),
            fingerprint=field(data, "fingerprint", str),
            metric=metric,
            dimensions=field(data, "dimensions", int),
            template_ids=strings(data, "template_ids"),
            subjects=strings(data, "subjects"),
            columns=blobs(data, "columns"),
            norms=field(data, "norms", (bytes, type(None))),
        )
        if block.block_id < 0 or block.version < 1 or block.dimensions < 1:
            raise WireFormatError("block id, version and dimensions must be positive")
        if len(block.columns) != block.dimensions:
            raise WireFormatError("a block needs one column per dimension")
        if len(block.template_ids) != len(block.subjects):
            raise WireFormatError("a block needs one subject per template slot")
        if (block.norms is None) == (metric == Metric.EUCLIDEAN.value):
            raise WireFormatError("the euclidean metric, and only it, carries a norm column")
        return block


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockLayout:
    """What an `EncryptedBlock` holds besides its columns: which template is where.

    It travels once per block, in the first of the block's chunks
    (`cipherface.wire.chunks`); every chunk names it by digest.
    """

    metric: str
    template_ids: tuple[str, ...]
    subjects: tuple[str, ...]
    norms: bytes | None

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "metric": self.metric,
            "template_ids": list(self.template_ids),
            "subjects": list(self.subjects),
            "norms": self.norms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> BlockLayout:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        layout = cls(
            metric=_metric(data),
            template_ids=strings(data, "template_ids"),
            subjects=strings(data, "subjects"),
            norms=field(data, "norms", (bytes, type(None))),
        )
        if len(layout.template_ids) != len(layout.subjects):
            raise WireFormatError("a block needs one subject per template slot")
        return layout


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockScores:
    """Encrypted scores of one block, cloud -> on-prem.

    ``scores`` decrypts, at position ``k``, to the metric's value (squared for
    euclidean metrics) against the block's template ``k``. For batched 1:1
    (`verify_pairs`), ``pairs[k]`` is the index of the pair scored at position ``k``
    (-1: none, and that position's value is meaningless).
    """

    block_id: int
    version: int
    scores: bytes
    pairs: tuple[int, ...] = ()
    #: Empty: ``scores`` is a SEAL serialization. Else the bits kept of each
    #: coefficient of ``c0`` and ``c1`` (`cipherface.gallery.compact`).
    bits: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "block_id": self.block_id,
            "version": self.version,
            "scores": self.scores,
            "pairs": list(self.pairs),
            "bits": list(self.bits),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> BlockScores:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        lists = {
            name: field(data, name, (list, tuple)) if name in data else ()
            for name in ("pairs", "bits")
        }
        for name, values in lists.items():
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
                raise WireFormatError(f"field '{name}' must hold integers")
        return cls(
            block_id=field(data, "block_id", int),
            version=field(data, "version", int),
            scores=field(data, "scores", bytes),
            pairs=tuple(lists["pairs"]),
            bits=tuple(lists["bits"]),
        )


#: No face box reaches past this many pixels: the cloud refuses images over 40
#: Mpx (`cipherface.embedding.MAX_IMAGE_PIXELS`), so no side is longer. A larger
#: coordinate is a forgery, and would lose precision in JSON readers of events.
_MAX_BOX_EDGE = 40_000_000


def _box(data: Mapping[str, object]) -> tuple[int, ...] | None:
    """A face's ``(x, y, w, h)`` in the probe image's pixels, or None (an edge probe)."""
    box = field(data, "box", (list, tuple, type(None)))
    if box is None:
        return None
    values = tuple(of_type(v, int, "box[]") for v in box)
    if len(values) != 4 or min(values[2:]) < 1 or min(values[:2]) < 0:
        raise WireFormatError("field 'box' must be [x, y, w, h] with x, y >= 0 and w, h >= 1")
    if max(values[0] + values[2], values[1] + values[3]) > _MAX_BOX_EDGE:
        raise WireFormatError(f"field 'box' reaches past {_MAX_BOX_EDGE} pixels")
    return values


def _confidence(data: Mapping[str, object]) -> float:
    """A detector's confidence: DeepFace reports it in [0, 1] (an edge probe: 1)."""
    value = float(field(data, "confidence", (int, float)))
    if not 0.0 <= value <= 1.0:
        raise WireFormatError(f"field 'confidence' must lie in [0, 1], got {value}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class FaceScores:
    """One face of a probe and its encrypted scores, cloud -> on-prem.

    The cloud searches every face it finds in a probe image, so a photo of several
    people gets an answer for each. An edge-encrypted probe is one face without a
    box (the cloud never saw the image). ``scores`` covers blocks, so a probe's
    scores may later be split across several messages by block range.
    """

    #: ``(x, y, w, h)`` in the probe image's pixels; None for an edge probe.
    box: tuple[int, ...] | None
    #: The detector's confidence (1.0 for an edge probe).
    confidence: float
    scores: tuple[BlockScores, ...]

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "box": None if self.box is None else list(self.box),
            "confidence": self.confidence,
            "scores": [block.to_dict() for block in self.scores],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FaceScores:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        blocks = field(data, "scores", (list, tuple))
        return cls(
            box=_box(data),
            confidence=_confidence(data),
            scores=tuple(BlockScores.from_dict(of_type(b, dict, "scores[]")) for b in blocks),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FaceResult:
    """On-prem's answer for one face of a probe, inside a `VerificationEvent`.

    ``distance`` is noise-flooded and rounded like the event's; None when the face
    has no candidate (nothing of the claimed subject is enrolled).
    """

    box: tuple[int, ...] | None
    confidence: float
    #: The claimed subject (1:1) or this face's best match (1:N).
    subject: str | None
    verified: bool
    distance: float | None

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "box": None if self.box is None else list(self.box),
            "confidence": self.confidence,
            "subject": self.subject,
            "verified": self.verified,
            "distance": self.distance,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FaceResult:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        distance = field(data, "distance", (int, float, type(None)))
        return cls(
            box=_box(data),
            confidence=_confidence(data),
            subject=field(data, "subject", (str, type(None))),
            verified=field(data, "verified", bool),
            distance=None if distance is None else float(distance),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedProbe:
    """A probe encrypted at the edge with the public context, in one of two layouts.

    Columns: ``columns[j]`` encrypts the weighted component ``w * p_j`` in every slot
    (see `cipherface.gallery.packing`), so the cloud multiplies it straight into
    column ``j``. Packed: ``packed`` holds every weight in one ciphertext and
    ``columns`` is empty; the cloud expands it into the columns first
    (`cipherface.gallery.expansion`). ``norm`` encrypts ``||p||^2`` for the
    euclidean metric, in both.
    """

    fingerprint: str
    metric: str
    dimensions: int
    columns: tuple[bytes, ...]
    norm: bytes | None
    packed: bytes | None = None

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "fingerprint": self.fingerprint,
            "metric": self.metric,
            "dimensions": self.dimensions,
            "columns": list(self.columns),
            "norm": self.norm,
            "packed": self.packed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> EncryptedProbe:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        metric = _metric(data)
        probe = cls(
            fingerprint=field(data, "fingerprint", str),
            metric=metric,
            dimensions=field(data, "dimensions", int),
            columns=blobs(data, "columns"),
            norm=field(data, "norm", (bytes, type(None))),
            # Absent from probes made before the packed layout.
            packed=of_type(data.get("packed"), (bytes, type(None)), "packed"),
        )
        if probe.dimensions < 1:
            raise WireFormatError("a probe needs at least one dimension")
        if probe.packed is None and len(probe.columns) != probe.dimensions:
            raise WireFormatError("a probe needs one ciphertext per dimension")
        if probe.packed is not None and probe.columns:
            raise WireFormatError("a packed probe carries no columns")
        if (probe.norm is None) == (metric == Metric.EUCLIDEAN.value):
            raise WireFormatError("the euclidean metric, and only it, carries a probe norm")
        return probe


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeCheck:
    """An edge probe's encrypted norms, cloud -> on-prem, beside its scores.

    The cloud computes them from the probe's own ciphertexts ``c_j``: ``squares``
    encrypts ``sum_j c_j^2`` and ``norms`` ``sum_j c_j conj(c_j)`` in every slot;
    ``norm`` repeats the probe's encrypted ``||p||^2`` (euclidean only). On-prem
    decides nothing from a probe whose norms are not those of a real unit vector
    under its key (`cipherface.gallery.integrity`).
    """

    squares: bytes
    norms: bytes
    norm: bytes | None

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {"squares": self.squares, "norms": self.norms, "norm": self.norm}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ProbeCheck:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        return cls(
            squares=field(data, "squares", bytes),
            norms=field(data, "norms", bytes),
            norm=field(data, "norm", (bytes, type(None))),
        )


def _ints(data: Mapping[str, object], name: str) -> tuple[int, ...]:
    items = field(data, name, (list, tuple))
    return tuple(of_type(item, int, f"{name}[]") for item in items)


#: Most shards a deployment may have (a forged map cannot make a replica fan out more).
MAX_SHARDS = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardMap:
    """Which shard serves each block, and each subject's shard: on-prem's routing, signed.

    It travels inside every `ContextUpdate` (on-prem signs it), so a replica and
    on-prem agree on where a block lives; ``version`` grows with every change (a
    block moved, a shard added), and scores name the version they were made under.
    With more than one shard a replica sends a 1:1 claim to its subject's shard
    alone, so it needs every subject's shard: a context announces that list by
    ``subjects_digest`` and ``subject_parts`` and the list follows in
    `SubjectsPart` messages (`cipherface.wire.subjects`), since at about 16 B a
    subject it outgrows one message long before the gallery outgrows its shards.
    """

    version: int
    shards: int
    blocks: tuple[int, ...]
    #: The shard of each of ``blocks`` (same order).
    homes: tuple[int, ...]
    subjects: tuple[str, ...] = ()
    #: The shard of each of ``subjects`` (same order).
    subject_homes: tuple[int, ...] = ()
    #: SHA-256 (hex) of the subject list sent in parts ("": none is).
    subjects_digest: str = ""
    #: How many `SubjectsPart` messages carry it.
    subject_parts: int = 0

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "version": self.version,
            "shards": self.shards,
            "blocks": list(self.blocks),
            "homes": list(self.homes),
            "subjects": list(self.subjects),
            "subject_homes": list(self.subject_homes),
            "subjects_digest": self.subjects_digest,
            "subject_parts": self.subject_parts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ShardMap:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        shard_map = cls(
            version=field(data, "version", int),
            shards=field(data, "shards", int),
            blocks=_ints(data, "blocks"),
            homes=_ints(data, "homes"),
            subjects=strings(data, "subjects"),
            subject_homes=_ints(data, "subject_homes"),
            # Absent from maps of before the list went in parts: none is.
            subjects_digest=of_type(data.get("subjects_digest", ""), str, "subjects_digest"),
            subject_parts=of_type(data.get("subject_parts", 0), int, "subject_parts"),
        )
        if not 1 <= shard_map.shards <= MAX_SHARDS:
            raise WireFormatError(f"a shard map needs 1 to {MAX_SHARDS} shards")
        if len(shard_map.blocks) != len(shard_map.homes) or len(shard_map.subjects) != len(
            shard_map.subject_homes
        ):
            raise WireFormatError("a shard map needs one shard per block and per subject")
        if not all(0 <= h < shard_map.shards for h in shard_map.homes + shard_map.subject_homes):
            raise WireFormatError("a shard map names a shard it does not have")
        if (shard_map.subject_parts > 0) != bool(shard_map.subjects_digest):
            raise WireFormatError("a shard map's subject parts need their digest, and only they")
        return shard_map

    def blocks_of(self, shard: int) -> frozenset[int]:
        """The blocks ``shard`` serves."""
        return frozenset(b for b, h in zip(self.blocks, self.homes, strict=True) if h == shard)

    def subject_shards(self) -> dict[str, int]:
        """The shard holding each subject's templates (empty with one shard), to look
        up once per map rather than scan ``subjects`` per probe."""
        return dict(zip(self.subjects, self.subject_homes, strict=True))


@dataclass(frozen=True, slots=True, kw_only=True)
class FaceProbe:
    """One face a replica embedded, as it fans the probe out to every shard."""

    box: tuple[int, ...] | None
    confidence: float
    #: The embedding, float64 little-endian.
    embedding: bytes

    def to_dict(self) -> dict[str, object]:
        """msgpack-native form."""
        return {
            "box": None if self.box is None else list(self.box),
            "confidence": self.confidence,
            "embedding": self.embedding,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FaceProbe:
        """Inverse of `to_dict`; raises `WireFormatError`."""
        embedding = field(data, "embedding", bytes)
        if not embedding or len(embedding) % 8:
            raise WireFormatError("field 'embedding' must hold float64 values")
        return cls(box=_box(data), confidence=_confidence(data), embedding=embedding)
