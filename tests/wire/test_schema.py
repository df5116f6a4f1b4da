"""Each message's schema comes from its annotations, as strict as the old hand-written one."""

from __future__ import annotations

import re
from typing import Any

import msgpack
import pytest

from cipherface import wire
from cipherface.exceptions import WireFormatError
from cipherface.signing import PinnedKey, SigningKey
from cipherface.wire.messages import _KINDS
from cipherface.wire.schema import field_specs, spec_of

_NONE = type(None)

#: The hand-written ``schema`` dicts the annotations replaced, with the fields added
#: since (signing: conjugation key, issue and request times, the edge probe's
#: check): the derived top-level checks must accept exactly these types.
HAND_WRITTEN = {
    "context": {
        "context": bytes,
        "conjugation_key": bytes,
        "blocks": list,
        "issued_at": float,
        "shard": int,
        "shard_map": (dict, _NONE),
    },
    "chunk": {
        "block_id": int,
        "version": int,
        "dimensions": int,
        "layout": bytes,
        "start": int,
        "columns": list,
        "head": (dict, _NONE),
    },
    "sync": {"replica": str, "fingerprint": str, "requested_at": float, "shard": int},
    "probe": {"probe_id": str, "image": bytes, "subject": (str, _NONE), "submitted_at": float},
    "encrypted_probe": {
        "probe_id": str,
        "probe": dict,
        "subject": (str, _NONE),
        "submitted_at": float,
    },
    "scores": {
        "probe_id": str,
        "subject": (str, _NONE),
        "faces": list,
        "request": str,
        "submitted_at": float,
        "timings": dict,
        "probe_check": (dict, _NONE),
        "part": int,
        "parts": int,
        "piece": int,
        "pieces": int,
        "dims_start": int,
        "dims_stop": int,
        "dimensions": int,
        "shard": int,
        "map_version": int,
    },
    "probe_piece": {
        "probe_id": str,
        "request": str,
        "piece": int,
        "pieces": int,
        "fingerprint": str,
        "metric": str,
        "dimensions": int,
        "start": int,
        "columns": list,
        "norm": (bytes, _NONE),
        "subject": (str, _NONE),
        "submitted_at": float,
    },
    "search": {
        "probe_id": str,
        "subject": (str, _NONE),
        "faces": list,
        "edge": (dict, _NONE),
        "request": str,
        "submitted_at": float,
        "timings": dict,
        "shard": int,
        "map_version": int,
        "piece": int,
        "pieces": int,
        "dims_start": int,
        "dims_stop": int,
        "dimensions": int,
    },
    "rejected": {
        "probe_id": str,
        "subject": (str, _NONE),
        "error": str,
        "reason": str,
        "request": str,
        "submitted_at": float,
    },
    "subjects": {
        "digest": str,
        "part": int,
        "parts": int,
        "subjects": list,
        "subject_homes": list,
    },
    "status": {
        "replica": str,
        "fingerprint": str,
        "blocks": list,
        "versions": list,
        "templates": int,
        "awaiting": int,
        "staged": str,
        "reported_at": float,
        "shard": int,
        "map_version": int,
    },
    "event": {
        "probe_id": str,
        "mode": str,
        "subject": (str, _NONE),
        "verified": bool,
        "distance": (float, _NONE),
        "faces": list,
        "face": (int, _NONE),
        "threshold": float,
        "model": str,
        "metric": str,
        "error": (str, _NONE),
        "timings": dict,
        "issued_at": float,
        "request": str,
        "partial": bool,
        "searched": float,
    },
}


def test_every_kind_derives_the_old_top_level_schema() -> None:
    assert set(_KINDS) == set(HAND_WRITTEN)
    for kind, cls in _KINDS.items():
        derived = {name: spec.accepts for name, spec in field_specs(cls).items()}
        assert derived == HAND_WRITTEN[kind], kind
        assert not hasattr(cls, "schema")


SIGNER = SigningKey.generate("onprem")


def _raw(kind: str, body: dict[str, Any]) -> bytes:
    """A signed envelope around a hand-made body, bypassing `wire.encode`'s checks."""
    head = {"type": kind, "id": "i", "fp": "", "model": "", "metric": ""}
    inner = msgpack.packb({**head, "body": body}, use_bin_type=True)
    outer = {"v": wire.SCHEMA_VERSION, "signed": inner, "by": "onprem", "sig": SIGNER.sign(inner)}
    return msgpack.packb(outer, use_bin_type=True)


def _decode(data: bytes) -> wire.Envelope:
    return wire.decode(data, verifier=PinnedKey(SIGNER.verify_key))


SCORES = {
    "probe_id": "p",
    "subject": None,
    "faces": [],
    "request": "0" * 32,
    "submitted_at": 1.0,
    "probe_check": None,
    "part": 0,
    "parts": 1,
    **{"piece": 0, "pieces": 1, "dims_start": 0, "dims_stop": 0, "dimensions": 0},
    "shard": 0,
    "map_version": 0,
}
CONTEXT = {
    "context": b"c",
    "conjugation_key": b"g",
    "issued_at": 1.0,
    "shard": 0,
    "shard_map": None,
}
EVENT = {
    "probe_id": "p",
    "mode": "1:N",
    "subject": None,
    "verified": False,
    "distance": None,
    "threshold": 0.07,
    "model": "Dlib",
    "metric": "cosine",
    "error": None,
    "issued_at": 1.0,
    "faces": [],
    "face": None,
    "request": "",
    "partial": False,
    "searched": 1.0,
}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            _raw("context", {**CONTEXT, "blocks": [1, "2"]}),
            "'context.blocks[]' must be int",
        ),
        (
            _raw("context", {**CONTEXT, "blocks": [True]}),
            "'context.blocks[]' must be int",
        ),
        (_raw("sync", {"replica": "r"}), "sync: missing field(s) fingerprint, requested_at"),
        (
            _raw("probe", {"probe_id": "p", "image": b"", "subject": None, "submitted_at": 1}),
            "'probe.submitted_at' must be float, got int",
        ),
        (
            _raw("scores", {**SCORES, "faces": [5], "timings": {}}),
            "'scores.faces[]' must be dict",
        ),
        (
            _raw("scores", {**SCORES, "timings": {b"embed": 1.0}}),
            "'scores.timings key' must be str",
        ),
        (
            _raw("scores", {**SCORES, "timings": {"embed": "x"}}),
            "'scores.timings' must be int/float",
        ),
        (
            _raw("scores", {**SCORES, "timings": {"embed": False}}),
            "'scores.timings' must be int/float",
        ),
        (
            _raw(
                "chunk",
                {
                    **{"block_id": 0, "version": 1, "dimensions": 1, "layout": b"", "start": 0},
                    **{"columns": [], "head": {}},
                },
            ),
            "missing field 'metric'",
        ),
        (_raw("event", {**EVENT, "verified": 1, "timings": {}}), "'event.verified' must be bool"),
        # The one check the derivation adds: event timings are now checked like scores timings.
        (_raw("event", {**EVENT, "timings": {"total": "x"}}), "'event.timings' must be int/float"),
    ],
)
def test_derived_checks_name_the_field(data: bytes, fragment: str) -> None:
    with pytest.raises(WireFormatError, match=re.escape(fragment)):
        _decode(data)


def test_top_level_fields_are_checked_before_items() -> None:
    body = {**SCORES, "faces": [5], "request": 1, "timings": {}}
    with pytest.raises(WireFormatError, match=re.escape("'scores.request' must be str")):
        _decode(_raw("scores", body))


def test_whole_second_timings_arrive_as_floats() -> None:
    message = _decode(_raw("scores", {**SCORES, "timings": {"embed": 2}})).message
    assert isinstance(message, wire.ScoresReady)
    assert message.timings == {"embed": 2.0}
    assert isinstance(message.timings["embed"], float)


def test_an_annotation_without_a_wire_form_is_refused() -> None:
    with pytest.raises(TypeError, match="no wire form"):
        spec_of(set[int])
