"""Sample messages shared by the wire, fuzz and trust tests."""

from __future__ import annotations

from typing import Any

from cipherface import wire

__all__ = ["EDGE_PROBE_LIMIT", "sample_event"]

#: Message cap of the tests that send edge-encrypted probes: at 128-d one is 16.8 MB
#: (128 public-key ciphertexts), over the 4 MiB default, and it does not travel in
#: chunks yet (issue 10). Their replicas and clients accept it; on-prem keeps the
#: default, so blocks still travel in chunks under 4 MiB.
EDGE_PROBE_LIMIT = 32 * 1024 * 1024


def sample_event(**changes: Any) -> wire.VerificationEvent:
    """A verified 1:1 event for "bob" (0.01 under Dlib's 0.07), with ``changes`` applied."""
    fields: dict[str, Any] = {
        "probe_id": "p",
        "mode": "1:1",
        "subject": "bob",
        "verified": True,
        "distance": 0.01,
        "threshold": 0.07,
        "model": "Dlib",
        "metric": "cosine",
    }
    return wire.VerificationEvent(**{**fields, **changes})
