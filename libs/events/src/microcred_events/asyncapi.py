"""The AsyncAPI 3.0 document of the contract, generated from the models.

`python -m microcred_events.asyncapi` writes `libs/events/asyncapi.json`: a channel per topic, a
message per event type with its payload schema, CloudEvents headers and Kafka key, and one
operation per topic saying who sends it. A test keeps the committed file up to date.

We generate it ourselves rather than with FastStream, which documents one service's subscribers;
our events are published by each service's outbox relay and by partners.
"""

import argparse
import inspect
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic.json_schema import models_json_schema

from microcred_events.base import Event, example_data
from microcred_events.codec import CONTENT_TYPE, SPECVERSION, encode
from microcred_events.registry import REGISTRY, key_field
from microcred_events.topics import DESCRIPTIONS, Topic

ASYNCAPI_PATH = Path(__file__).resolve().parents[2] / "asyncapi.json"

_KAFKA_BINDING_VERSION = "0.5.0"
_DESCRIPTION = """\
Every event travels in the CloudEvents 1.0 Kafka binding, binary content mode: the attributes are \
`ce_*` headers, the body is the event's JSON (`content-type: application/json`), the key is the \
aggregate id (also `ce_subject`), and W3C trace context is in `traceparent`/`tracestate`. \
Consumers deduplicate on (`ce_source`, `ce_id`) and ignore fields they do not know.

Topics are named `<context>.<aggregate>.v<major>`; all event types of one aggregate share its topic, \
so they stay in order. Event types are `org.microcred.<context>.<subject>.<action>.v<major>`: \
additive changes keep the major, a breaking change is a new type published alongside the old one. \
A consumer group sends messages it cannot process to its dead-letter topic, `<consumer-group>.dlq`.
"""


def build_document() -> dict[str, Any]:
    """The AsyncAPI document as a JSON-ready dict."""
    by_topic: dict[Topic, list[type[Event]]] = {topic: [] for topic in Topic}
    for cls in REGISTRY.values():
        by_topic[cls.TOPIC].append(cls)
    refs, top = models_json_schema(
        [(cls, "validation") for cls in REGISTRY.values()], ref_template="#/components/schemas/{model}"
    )
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic, classes in by_topic.items():
        channel_id = topic.replace(".", "_")
        channels[channel_id] = {
            "address": str(topic),
            "description": DESCRIPTIONS[topic],
            "messages": {cls.__name__: {"$ref": f"#/components/messages/{cls.__name__}"} for cls in classes},
        }
        # Partners send to their topic and the platform receives; every other topic is ours to send.
        action = "receive" if topic is Topic.PARTNER_COMPLETION else "send"
        operations[f"{action}_{channel_id}"] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{cls.__name__}"} for cls in classes],
        }
        for cls in classes:
            messages[cls.__name__] = _message(cls, refs[(cls, "validation")])
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "microcred events",
            "version": version("microcred-events"),
            "description": _DESCRIPTION,
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": top["$defs"]},
    }


def _message(cls: type[Event], payload: Any) -> dict[str, Any]:
    description = inspect.cleandoc(cls.__doc__ or "")
    key = key_field(cls)
    key_schema = {"type": "string", "format": "uuid"} if key.annotation is UUID else {"type": "string"}
    return {
        "name": cls.TYPE,
        "title": cls.__name__,
        "summary": description.splitlines()[0],
        "description": description,
        "contentType": CONTENT_TYPE,
        "headers": _headers(cls),
        "payload": payload,
        "bindings": {
            "kafka": {
                "key": {**key_schema, "description": f"`{cls.KEY}`: {key.description}"},
                "bindingVersion": _KAFKA_BINDING_VERSION,
            }
        },
        "examples": [_example(cls)],
    }


def _headers(cls: type[Event]) -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "type": "object",
        "required": [
            "ce_specversion",
            "ce_id",
            "ce_type",
            "ce_source",
            "ce_time",
            "ce_subject",
            "content-type",
        ],
        "properties": {
            "ce_specversion": {**text, "const": SPECVERSION, "description": "CloudEvents version."},
            "ce_id": {
                **text,
                "minLength": 1,
                "description": "Id of the event, unique per source; kept on redelivery.",
            },
            "ce_type": {**text, "const": cls.TYPE, "description": "Event type."},
            "ce_source": {
                **text,
                "format": "uri-reference",
                "description": "Who produced it: `urn:microcred:<context>`, or a partner's own URI.",
            },
            "ce_time": {**text, "format": "date-time", "description": "When it happened, RFC 3339 in UTC."},
            "ce_subject": {**text, "description": f"The aggregate id, `{cls.KEY}`; same as the message key."},
            "content-type": {**text, "const": CONTENT_TYPE, "description": "Media type of the body."},
            "traceparent": {
                **text,
                "description": "W3C trace context of the producing operation, if traced.",
            },
            "tracestate": {**text, "description": "W3C trace state, with `traceparent`."},
        },
    }


def _example(cls: type[Event]) -> dict[str, Any]:
    event = cls.model_validate(example_data(cls))
    record = encode(
        event,
        source=f"urn:microcred:{cls.TOPIC.split('.')[0]}",
        event_id="0b6b5c1e-3f5a-4f4e-9a49-8d2f4c6e7a10",
        time=datetime(2025, 5, 2, 16, 45, 1, tzinfo=UTC),
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    return {
        "name": f"{cls.__name__}Example",
        "headers": {name: value.decode() for name, value in record.headers},
        "payload": json.loads(record.value),
    }


def render() -> str:
    return json.dumps(build_document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microcred_events.asyncapi", description=__doc__)
    parser.add_argument("--output", type=Path, default=ASYNCAPI_PATH, help="where to write the document")
    args = parser.parse_args(argv)
    args.output.write_text(render())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
