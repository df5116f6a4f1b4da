"""The committed AsyncAPI document is the generator's output and describes the whole topology."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from cipherface import asyncapi
from cipherface.transport.base import Topology
from cipherface.wire.messages import _KINDS

ROOT = Path(__file__).parents[1]
COMMITTED = ROOT / "docs" / "asyncapi.yaml"


def test_committed_document_is_in_step_with_the_code() -> None:
    assert COMMITTED.read_text() == asyncapi.render(), (
        "docs/asyncapi.yaml is stale: run `python -m cipherface.asyncapi > docs/asyncapi.yaml`"
    )


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_every_reference_resolves() -> None:
    document = yaml.safe_load(COMMITTED.read_text())
    refs = _refs(document)
    assert refs
    for ref in refs:
        assert _resolve(document, ref) is not None


def test_every_queue_exchange_and_message_is_described() -> None:
    document = asyncapi.document()
    t = Topology()
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {
        t.probes,
        t.results,
        t.sync,
        t.gallery,
        t.gallery_queue("{replica}"),
        t.shards,
        t.shard_queue(0)[:-1] + "{shard}",
        t.events,
        t.dead_letter_exchange,
        t.dead_letters,
    }
    carried = {name for ch in document["channels"].values() for name in ch["messages"]}
    assert carried == {cls.__name__ for cls in _KINDS.values()}
    assert set(document["components"]["messages"]) == carried
    for cls in _KINDS.values():
        message = document["components"]["messages"][cls.__name__]
        signed = message["payload"]["properties"]["signed"]
        body = signed["contentSchema"]["properties"]["body"]
        assert message["name"] == cls.kind
        assert list(body["properties"]) == [f.name for f in dataclasses.fields(cls)]
    ends = {(op["action"], op["channel"]["$ref"]) for op in document["operations"].values()}
    # Each flow has a sender and a receiver; the gallery fanout arrives through a
    # replica's own queue (a search through its shard's), and dead letters are read
    # by operators, not agents.
    assert ends == {
        *(
            (action, f"#/channels/{c}")
            for c in ("probes", "results", "sync", "events")
            for action in ("send", "receive")
        ),
        ("send", "#/channels/gallery"),
        ("receive", "#/channels/galleryReplica"),
        ("send", "#/channels/shards"),
        ("receive", "#/channels/shardQueue"),
    }


def test_a_prefix_moves_every_address() -> None:
    document = asyncapi.document(Topology(prefix="acme"))
    assert all(ch["address"].startswith("acme.") for ch in document["channels"].values())


def test_readme_links_the_document() -> None:
    assert "docs/asyncapi.yaml" in (ROOT / "README.md").read_text()
