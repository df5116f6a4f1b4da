"""An edge probe as pieces by dimension range under the message size limit.

An edge-encrypted probe in columns is one public-key ciphertext of about 131 KB
per dimension (n8192): 16.8 MB at 128-d, 67 MB at 512-d, 537 MB at 4096-d (a
packed one, `cipherface.gallery.expansion`, is one message). The edge sends it
as `EncryptedProbePart` messages, each holding a run of consecutive dimensions;
every piece is a probe of its own on the probe queue, so any replica scores any
piece. A score is a sum over dimensions (`cipherface.gallery.packing`), so a
piece's scores are partial sums, and so are the norm proofs on-prem checks
(`cipherface.gallery.integrity`): on-prem adds the pieces' ciphertexts up
(`cipherface.gallery.pieces`) and decrypts only the total, exactly what the
whole probe would have given (`cipherface.wire.parts.PieceGatherer` checks the
pieces form one probe first).
"""

from __future__ import annotations

import msgpack

from cipherface.exceptions import WireFormatError
from cipherface.wire.chunks import ENVELOPE_ALLOWANCE, pack, packed_size
from cipherface.wire.messages import EncryptedProbePart, EncryptedProbeRequest, request_digest
from cipherface.wire.payloads import EncryptedProbe

__all__ = ["check_piece", "piece_probe", "probe_digest", "probe_pieces", "split_probe"]

#: msgpack's header of one ``bin`` item (bin 32).
_BIN_HEADER = 5
#: The most a probe id, a subject (255 bytes each) or a fingerprint take in msgpack.
_MAX_TEXT = 260


def probe_digest(request: EncryptedProbeRequest) -> str:
    """The `request_digest` naming a whole edge probe, which each of its pieces carries."""
    return request_digest(msgpack.packb(request.body(), use_bin_type=True))


def _pack_dimensions(
    columns: list[int], norm: int | None, fixed: int, limit: int, what: str
) -> list[range]:
    """Runs of consecutive dimensions whose piece messages each stay within ``limit``.

    ``fixed``: the piece's texts (probe id, subject, fingerprint); the first piece
    also carries the norm. A piece fanned out to a sharded gallery's shards as a
    `ShardSearch` carries the same columns and fields, so it fits too.
    """
    costs = [size + _BIN_HEADER for size in columns]
    used = 0 if norm is None else norm + _BIN_HEADER
    return pack(costs, limit - ENVELOPE_ALLOWANCE - fixed, what, used=used)


def _runs(request: EncryptedProbeRequest, limit: int) -> list[range]:
    probe = request.probe
    fixed = (
        packed_size(request.probe_id)
        + packed_size(request.subject)
        + packed_size(probe.fingerprint)
    )
    return _pack_dimensions(
        [len(column) for column in probe.columns],
        None if probe.norm is None else len(probe.norm),
        fixed,
        limit,
        f"a dimension of probe {request.probe_id}",
    )


def split_probe(request: EncryptedProbeRequest, limit: int) -> list[EncryptedProbePart]:
    """``request`` as pieces whose messages each stay within ``limit`` bytes.

    Dimensions are packed greedily in order; the first piece carries the norm
    (euclidean). `MessageTooLargeError` if one dimension cannot fit.
    """
    probe = request.probe
    runs = _runs(request, limit)
    digest = probe_digest(request)
    return [
        EncryptedProbePart(
            probe_id=request.probe_id,
            request=digest,
            piece=index,
            pieces=len(runs),
            fingerprint=probe.fingerprint,
            metric=probe.metric,
            dimensions=probe.dimensions,
            start=run.start,
            columns=probe.columns[run.start : run.stop],
            norm=probe.norm if index == 0 else None,
            subject=request.subject,
            submitted_at=request.submitted_at,
        )
        for index, run in enumerate(runs)
    ]


def probe_pieces(dimensions: int, column_bytes: int, limit: int, norm_bytes: int = 0) -> int:
    """The most pieces `split_probe` cuts a probe of ``dimensions`` columns of
    ``column_bytes`` into (probe id and subject as long as allowed)."""
    return len(
        _pack_dimensions(
            [column_bytes] * dimensions,
            norm_bytes or None,
            3 * _MAX_TEXT,
            limit,
            "a dimension of an edge probe",
        )
    )


def piece_probe(part: EncryptedProbePart) -> EncryptedProbe:
    """The piece's ciphertexts as the (partial) probe a replica scores from ``part.start``;
    `WireFormatError` for a piece no edge makes (`check_piece`)."""
    check_piece(
        f"piece {part.piece} of probe {part.probe_id}",
        piece=part.piece,
        pieces=part.pieces,
        start=part.start,
        columns=len(part.columns),
        dimensions=part.dimensions,
        norm=part.norm is not None,
    )
    return EncryptedProbe(
        fingerprint=part.fingerprint,
        metric=part.metric,
        dimensions=part.dimensions,
        columns=part.columns,
        norm=part.norm,
    )


def check_piece(
    name: str, *, piece: int, pieces: int, start: int, columns: int, dimensions: int, norm: bool
) -> None:
    """`WireFormatError` for a piece no edge makes: out of its own count, dimensions
    out of range, no dimension, a lone piece short of the whole (answered as a whole
    probe, its scores would miss the terms of the dimensions it lacks), or the norm
    outside the piece starting at 0. For a piece from the queue and one a replica
    fans out to a shard (`ShardSearch`) alike."""
    if not 0 <= piece < pieces:
        raise WireFormatError(f"{name}: piece {piece} of {pieces}, not within its count")
    end = start + columns
    if pieces == 1 and (start, end) != (0, dimensions):
        raise WireFormatError(
            f"{name}: a probe in one piece starts at dimension 0 and covers every dimension"
        )
    if not columns or start < 0 or end > dimensions:
        raise WireFormatError(f"{name}: dimensions {start}..{end - 1} of {dimensions}")
    if norm and start != 0:
        raise WireFormatError(f"{name}: only the piece starting at dimension 0 carries the norm")
