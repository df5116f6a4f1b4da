"""The wire contract: every message CipherFace agents exchange, encoded with msgpack.

==============  ===========================================================
module          owns
==============  ===========================================================
`payloads`      `EncryptedBlock`, `BlockScores`, `EncryptedProbe`, `FaceScores`,
                `FaceResult`: gallery data and per-face answers
`messages`      one frozen dataclass per message kind, and its validation
`envelope`      `encode` / `decode`, the `Envelope` metadata, size limits
==============  ===========================================================

The wire layer loads no TenSEAL (a test asserts it): decoding an event, or
dead-lettering a malformed block, never pays for the crypto library.
"""

from cipherface.wire.envelope import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Envelope,
    decode,
    encode,
)
from cipherface.wire.messages import (
    MAX_PROBE_ID_BYTES,
    BlockUpdate,
    ContextUpdate,
    EncryptedProbeRequest,
    Message,
    ProbeRejected,
    ProbeRequest,
    ReplicaStatus,
    ScoresReady,
    SyncRequest,
    VerificationEvent,
    message_id,
    new_id,
    refusal,
    request_digest,
)
from cipherface.wire.payloads import FaceResult, FaceScores

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_PROBE_ID_BYTES",
    "SCHEMA_VERSION",
    "BlockUpdate",
    "ContextUpdate",
    "EncryptedProbeRequest",
    "Envelope",
    "FaceResult",
    "FaceScores",
    "Message",
    "ProbeRejected",
    "ProbeRequest",
    "ReplicaStatus",
    "ScoresReady",
    "SyncRequest",
    "VerificationEvent",
    "decode",
    "encode",
    "message_id",
    "new_id",
    "refusal",
    "request_digest",
]
