"""An edge probe as pieces by dimension range under the message size limit.

An edge-encrypted probe is one public-key ciphertext of about 131 KB per
dimension (n8192): 16.8 MB at 128-d, 67 MB at 512-d, 537 MB at 4096-d. The edge
sends it as `EncryptedProbePart` messages, each holding a run of consecutive
dimensions; every piece is a probe of its own on the probe queue, so any replica
scores any piece. A score is a sum over dimensions (`cipherface.gallery.packing`),
so a piece's scores are partial sums, and so are the norm proofs on-prem checks
(`cipherface.gallery.integrity`): on-prem adds the pieces' ciphertexts up
(`cipherface.gallery.pieces`) and decrypts only the total, exactly what the
whole probe would have given (`cipherface.wire.parts.PieceGatherer` checks the
pieces form one probe first).
"""

from __future__ import annotations

import msgpack

from cipherface.exceptions import WireFormatError
from cipherface.wire.chunks import ENVELOPE_ALLOWANCE, pack
from cipherface.wire.messages import EncryptedProbePart, EncryptedProbeRequest, request_digest
from cipherface.wire.payloads import EncryptedProbe

__all__ = ["SEARCH_RESERVE_COLUMNS", "piece_probe", "probe_digest", "probe_pieces", "split_probe"]

#: msgpack's header of one ``bin`` item (bin 32).
_BIN_HEADER = 5
#: Room a piece leaves, in columns, for what the cloud adds when it fans the piece out
#: to a sharded gallery's shards (`ShardSearch`): the norm proof (`ProbeCheck`: two
#: products of three components, and the euclidean norm), about four columns' bytes.
SEARCH_RESERVE_COLUMNS = 4


def _size(value: object) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


def probe_digest(request: EncryptedProbeRequest) -> str:
    """The `request_digest` naming a whole edge probe, which each of its pieces carries."""
    return request_digest(msgpack.packb(request.body(), use_bin_type=True))


def _runs(request: EncryptedProbeRequest, limit: int) -> list[range]:
    probe = request.probe
    fixed = _size(request.probe_id) + _size(request.subject) + _size(probe.fingerprint)
    costs = [len(column) + _BIN_HEADER for column in probe.columns]
    budget = limit - ENVELOPE_ALLOWANCE - fixed - SEARCH_RESERVE_COLUMNS * max(costs, default=0)
    used = 0 if probe.norm is None else len(probe.norm) + _BIN_HEADER
    return pack(costs, budget, f"a dimension of probe {request.probe_id}", used=used)


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
    """How many pieces `split_probe` cuts a probe of ``dimensions`` columns of
    ``column_bytes`` into (probe id and subject of at most 255 bytes each)."""
    reserve = SEARCH_RESERVE_COLUMNS * (column_bytes + _BIN_HEADER)
    budget = limit - ENVELOPE_ALLOWANCE - 3 * 260 - reserve
    used = norm_bytes + _BIN_HEADER if norm_bytes else 0
    costs = [column_bytes + _BIN_HEADER] * dimensions
    return len(pack(costs, budget, "a dimension of an edge probe", used=used))


def piece_probe(part: EncryptedProbePart) -> EncryptedProbe:
    """The piece's ciphertexts as the (partial) probe a replica scores from ``part.start``.

    `WireFormatError` for a piece no edge makes: out of its own count, dimensions
    out of range, no dimension, or the norm outside the piece starting at 0.
    """
    name = f"piece {part.piece} of probe {part.probe_id}"
    if not 0 <= part.piece < part.pieces:
        raise WireFormatError(f"{name}: not within its {part.pieces} piece(s)")
    end = part.start + len(part.columns)
    if not part.columns or part.start < 0 or end > part.dimensions:
        raise WireFormatError(f"{name}: dimensions {part.start}..{end - 1} of {part.dimensions}")
    if part.norm is not None and part.start != 0:
        raise WireFormatError(f"{name}: only the piece starting at dimension 0 carries the norm")
    return EncryptedProbe(
        fingerprint=part.fingerprint,
        metric=part.metric,
        dimensions=part.dimensions,
        columns=part.columns,
        norm=part.norm,
    )
