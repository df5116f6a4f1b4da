"""The wire contract: every message CipherFace agents exchange, encoded with msgpack.

==============  ===========================================================
module          owns
==============  ===========================================================
`payloads`      `EncryptedBlock`, `BlockScores`, `EncryptedProbe`, `FaceScores`,
                `FaceResult`: gallery data and per-face answers
`messages`      one frozen dataclass per message kind, and its validation
`envelope`      `encode` / `decode`, the `Envelope` metadata, size limits
`chunks`        a block as chunks under the size limit, and their assembly
`parts`         a probe's scores as parts under the size limit, and their gathering
                (an edge probe's pieces too)
`pieces`        an edge probe as pieces by dimension range under the size limit
`subjects`      a sharded map's subject list as parts under the size limit, and
                their assembly
==============  ===========================================================

The wire layer loads no TenSEAL (a test asserts it): decoding an event, or
dead-lettering a malformed block, never pays for the crypto library.
"""

from cipherface.wire.chunks import BlockAssembler, split_block
from cipherface.wire.envelope import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Envelope,
    decode,
    encode,
)
from cipherface.wire.messages import (
    MAX_PROBE_ID_BYTES,
    BlockChunk,
    ContextUpdate,
    EncryptedProbePart,
    EncryptedProbeRequest,
    Message,
    ProbeRejected,
    ProbeRequest,
    ReplicaStatus,
    ScoresReady,
    ShardSearch,
    SubjectsPart,
    SyncRequest,
    VerificationEvent,
    message_id,
    new_id,
    refusal,
    request_digest,
)
from cipherface.wire.parts import PartGatherer, PieceGatherer, check_cover, split_scores
from cipherface.wire.payloads import FaceProbe, FaceResult, FaceScores, ShardMap
from cipherface.wire.pieces import piece_probe, probe_digest, probe_pieces, split_probe
from cipherface.wire.subjects import SubjectList, split_subjects

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_PROBE_ID_BYTES",
    "SCHEMA_VERSION",
    "BlockAssembler",
    "BlockChunk",
    "ContextUpdate",
    "EncryptedProbePart",
    "EncryptedProbeRequest",
    "Envelope",
    "FaceProbe",
    "FaceResult",
    "FaceScores",
    "Message",
    "PartGatherer",
    "PieceGatherer",
    "ProbeRejected",
    "ProbeRequest",
    "ReplicaStatus",
    "ScoresReady",
    "ShardMap",
    "ShardSearch",
    "SubjectList",
    "SubjectsPart",
    "SyncRequest",
    "VerificationEvent",
    "check_cover",
    "decode",
    "encode",
    "message_id",
    "new_id",
    "piece_probe",
    "probe_digest",
    "probe_pieces",
    "refusal",
    "request_digest",
    "split_block",
    "split_probe",
    "split_scores",
    "split_subjects",
]
