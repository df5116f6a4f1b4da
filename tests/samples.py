"""Sample messages shared by the wire, fuzz and trust tests."""

from __future__ import annotations

from typing import Any

from cipherface import wire

__all__ = ["sample_event"]


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
