"""The AsyncAPI 3.0 document of CipherFace's whole topology, generated from the code.

Message-driven services publish their contract as AsyncAPI; CipherFace's is
derived, never written by hand: channels come from `Topology` (the names every
transport declares), messages and their field types from the message dataclasses
(`cipherface.wire.schema`). ``docs/asyncapi.yaml`` is this module's output, and a
test regenerates it to keep the committed file in step::

    python -m cipherface.asyncapi > docs/asyncapi.yaml

It sits above both `cipherface.wire` and `cipherface.transport` because it
describes how they meet; nothing in the library imports it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cipherface
from cipherface import wire
from cipherface.exceptions import ConfigError
from cipherface.transport.base import REASON_HEADER, SOURCE_HEADER, Topology
from cipherface.wire.messages import _KINDS, Message
from cipherface.wire.payloads import (
    BlockLayout,
    BlockScores,
    EncryptedProbe,
    FaceProbe,
    FaceResult,
    FaceScores,
    ProbeCheck,
    ShardMap,
)
from cipherface.wire.schema import spec_of

__all__ = ["document", "main", "render"]

_QUEUE = "queue"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Channel:
    """One queue or exchange of the topology and the messages that flow through it."""

    key: str
    address: str
    #: "queue", or the exchange type ("direct", "fanout", "topic").
    kind: str
    messages: tuple[type[Message], ...]
    description: str
    parameters: tuple[str, ...] = ()
    #: (service, what it does) for the service that sends here, if one does.
    sender: tuple[str, str] | None = None
    #: (service, what it does) for the service that receives from here, if one does.
    receiver: tuple[str, str] | None = None


_GALLERY = (wire.ContextUpdate, wire.SubjectsPart, wire.BlockChunk)
_PROBES = (wire.ProbeRequest, wire.EncryptedProbeRequest, wire.EncryptedProbePart)
_RESULTS = (wire.ScoresReady, wire.ProbeRejected, wire.ReplicaStatus)


def _channels(topology: Topology) -> list[_Channel]:
    every = tuple(_KINDS.values())
    return [
        _Channel(
            key="probes",
            address=topology.probes,
            kind=_QUEUE,
            messages=_PROBES,
            description="Probe requests; cloud replicas compete for them.",
            sender=("client", "A client (or an edge encryptor) submits a probe."),
            receiver=("cloud", "A cloud replica embeds and searches a probe."),
        ),
        _Channel(
            key="results",
            address=topology.results,
            kind=_QUEUE,
            messages=_RESULTS,
            description="Encrypted scores (or a rejection) of each probe, for on-prem.",
            sender=("cloud", "A replica returns encrypted scores or a rejection."),
            receiver=("onprem", "On-prem decrypts, ranks and decides."),
        ),
        _Channel(
            key="sync",
            address=topology.sync,
            kind=_QUEUE,
            messages=(wire.SyncRequest,),
            description="A cloud replica asks on-prem for the whole gallery.",
            sender=("cloud", "A new or emptied replica asks for the gallery."),
            receiver=("onprem", "On-prem re-announces its context and re-ships every block."),
        ),
        _Channel(
            key="gallery",
            address=topology.gallery,
            kind="fanout",
            messages=_GALLERY,
            description=(
                "On-prem's public context and gallery blocks, to every replica "
                "(key `all`), or to one shard's replicas (`shard.<k>`)."
            ),
            sender=(
                "onprem",
                "On-prem announces its context, then sends the subject list its shard map "
                "announces (with more than one shard) and ships the blocks it lists.",
            ),
        ),
        _Channel(
            key="galleryReplica",
            address=topology.gallery_queue("{replica}"),
            kind=_QUEUE,
            messages=_GALLERY,
            description="One replica's durable copy of the gallery fanout.",
            receiver=(
                "cloud",
                "A replica installs the context and keeps the newest version of each block.",
            ),
            parameters=("replica",),
        ),
        _Channel(
            key="shards",
            address=topology.shards,
            kind="direct",
            messages=(wire.ShardSearch,),
            description=(
                "A probe embedded once, to each shard that holds part of the answer "
                "(routing key `shard.<k>`: 1:N every shard, 1:1 the subject's)."
            ),
            sender=("cloud", "The replica that took the probe fans it out to the shards."),
        ),
        _Channel(
            key="shardQueue",
            address=topology.shard_queue(0)[:-1] + "{shard}",
            kind=_QUEUE,
            messages=(wire.ShardSearch,),
            description="One shard's searches; the replicas of that shard compete for them.",
            receiver=("cloud", "A replica of the shard searches its blocks and sends scores."),
            parameters=("shard",),
        ),
        _Channel(
            key="events",
            address=topology.events,
            kind="topic",
            messages=(wire.VerificationEvent,),
            description="Decisions, routed by `event.<1to1|1toN>.<verified|rejected|error>`.",
            sender=("onprem", "On-prem publishes the decision (a rounded distance at most)."),
            receiver=(
                "client",
                "Subscribers (the client, `cipherface watch`) bind a routing-key pattern.",
            ),
        ),
        _Channel(
            key="deadLetterExchange",
            address=topology.dead_letter_exchange,
            kind="fanout",
            messages=every,
            description=(
                f"What could not be processed, with the reason in `{REASON_HEADER}` "
                f"and the source queue in `{SOURCE_HEADER}`."
            ),
        ),
        _Channel(
            key="deadLetters",
            address=topology.dead_letters,
            kind=_QUEUE,
            messages=every,
            description="The queue bound to the dead-letter exchange, kept for inspection.",
        ),
    ]


def _doc(obj: object) -> tuple[str, str]:
    """(first line, the rest with each paragraph on one line) of a docstring."""
    text = inspect.getdoc(obj) or ""
    summary, _, rest = text.partition("\n")
    return summary.strip(), re.sub(r"(?<!\n)\n(?!\n)", " ", rest.strip())


def _object(cls: type, *, all_required: bool) -> dict[str, Any]:
    """A dataclass as a JSON Schema object.

    A message body needs every field (`Message.from_body` says so); a payload's
    `from_dict` lets a field with a default be left out.
    """
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = [
        f.name
        for f in fields
        if all_required
        or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    ]
    return {
        "type": "object",
        "required": required,
        "properties": {f.name: dict(spec_of(hints[f.name]).schema) for f in fields},
    }


def _message(cls: type[Message]) -> dict[str, Any]:
    summary, description = _doc(cls)
    body = _object(cls, all_required=True)
    message: dict[str, Any] = {
        "name": cls.kind,
        "title": cls.__name__,
        "summary": summary,
        "contentType": "application/msgpack",
        "payload": {
            "type": "object",
            "required": ["v", "signed", "by", "sig"],
            "properties": {
                "v": {"const": wire.SCHEMA_VERSION},
                "signed": {
                    "type": "string",
                    "format": "binary",
                    "description": "msgpack of the inner message; the signature covers it",
                    "contentMediaType": "application/msgpack",
                    "contentSchema": {
                        "type": "object",
                        "required": ["type", "id", "fp", "model", "metric", "body"],
                        "properties": {
                            "type": {"const": cls.kind},
                            "id": {"type": "string", "description": "message id"},
                            "fp": {
                                "type": "string",
                                "description": "CKKS key fingerprint ('' if none)",
                            },
                            "model": {"type": "string"},
                            "metric": {"type": "string"},
                            "body": body,
                        },
                    },
                },
                "by": {
                    "type": "string",
                    "description": (
                        "signer: 'onprem' or a replica id"
                        if cls.signed
                        else "'' (user probes travel unsigned)"
                    ),
                },
                "sig": {
                    "type": "string",
                    "format": "binary",
                    "description": (
                        "Ed25519 signature over `signed` (required)" if cls.signed else "empty"
                    ),
                },
            },
        },
    }
    if description:
        message["description"] = description
    return message


def _bindings(channel: _Channel) -> dict[str, Any]:
    if channel.kind == _QUEUE:
        amqp: dict[str, Any] = {
            "is": "queue",
            "queue": {
                "name": channel.address,
                "durable": True,
                "exclusive": False,
                "autoDelete": False,
            },
        }
    else:
        amqp = {
            "is": "routingKey",
            "exchange": {
                "name": channel.address,
                "type": channel.kind,
                "durable": True,
                "autoDelete": False,
            },
        }
    return {"amqp": {**amqp, "bindingVersion": "0.3.0"}}


def _refs(messages: Sequence[type[Message]], prefix: str) -> dict[str, Any]:
    return {cls.__name__: {"$ref": f"{prefix}{cls.__name__}"} for cls in messages}


def document(topology: Topology | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document (plain data) for ``topology`` (default prefix ``cipherface``)."""
    topology = topology or Topology()
    channels = _channels(topology)
    summary, _ = _doc(cipherface)
    out_channels: dict[str, Any] = {}
    for channel in channels:
        entry: dict[str, Any] = {
            "address": channel.address,
            "description": channel.description,
            "messages": _refs(channel.messages, "#/components/messages/"),
            "bindings": _bindings(channel),
        }
        if channel.parameters:
            entry["parameters"] = {
                name: {"description": f"the {name} name"} for name in channel.parameters
            }
        out_channels[channel.key] = entry
    operations = {
        f"{service}{action.capitalize()}{channel.key[0].upper()}{channel.key[1:]}": {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel.key}"},
            "summary": summary,
            "messages": [
                {"$ref": f"#/channels/{channel.key}/messages/{cls.__name__}"}
                for cls in channel.messages
            ],
        }
        for channel in channels
        for action, end in (("send", channel.sender), ("receive", channel.receiver))
        if end is not None
        for service, summary in (end,)
    }
    payloads = (
        BlockLayout,
        BlockScores,
        EncryptedProbe,
        FaceScores,
        FaceResult,
        ProbeCheck,
        ShardMap,
        FaceProbe,
    )
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "CipherFace",
            "version": cipherface.__version__,
            "description": (
                f"{summary} Every message travels in one msgpack envelope "
                "(`cipherface.wire.envelope`); binary fields are msgpack bin. "
                "Generated by `python -m cipherface.asyncapi`: do not edit by hand."
            ),
        },
        "defaultContentType": "application/msgpack",
        "servers": {
            "rabbitmq": {
                "host": "127.0.0.1:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "Any RabbitMQ broker (CIPHERFACE_AMQP_URL).",
            }
        },
        "channels": out_channels,
        "operations": operations,
        "components": {
            "messages": {cls.__name__: _message(cls) for cls in _KINDS.values()},
            "schemas": {
                cls.__name__: {**_object(cls, all_required=False), "description": _doc(cls)[0]}
                for cls in payloads
            },
        },
    }


def render(topology: Topology | None = None) -> str:
    """The document as YAML text (what ``docs/asyncapi.yaml`` holds)."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "rendering AsyncAPI needs PyYAML: pip install 'cipherface[docs]'"
        ) from exc

    class _Plain(yaml.SafeDumper):
        # Shared schema fragments would otherwise become YAML anchors and aliases.
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(
        document(topology), Dumper=_Plain, sort_keys=False, width=100, allow_unicode=True
    )


def main() -> int:
    """Print the document (``python -m cipherface.asyncapi > docs/asyncapi.yaml``)."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
