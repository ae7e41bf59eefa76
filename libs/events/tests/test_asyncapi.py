import json
from pathlib import Path
from typing import Any

from microcred_events import REGISTRY, Topic, decode
from microcred_events.asyncapi import ASYNCAPI_PATH, build_document, main, render


def test_committed_document_is_up_to_date() -> None:
    assert ASYNCAPI_PATH.read_text() == render(), "refresh it with `python -m microcred_events.asyncapi`"


def test_a_channel_per_topic_and_a_message_per_event_type() -> None:
    document = build_document()

    assert document["asyncapi"] == "3.0.0"
    assert sorted(channel["address"] for channel in document["channels"].values()) == sorted(Topic)
    assert sorted(message["name"] for message in document["components"]["messages"].values()) == sorted(
        REGISTRY
    )
    for channel_id, channel in document["channels"].items():
        for message_ref in channel["messages"].values():
            message = resolve(document, message_ref["$ref"])
            assert channel["address"] == REGISTRY[message["name"]].TOPIC, channel_id


def test_messages_document_headers_key_and_payload() -> None:
    document = build_document()
    message = document["components"]["messages"]["CourseCompleted"]

    assert (
        message["headers"]["properties"]["ce_type"]["const"] == "org.microcred.enrollment.course.completed.v1"
    )
    assert "ce_subject" in message["headers"]["required"]
    assert message["bindings"]["kafka"]["key"]["format"] == "uuid"
    assert "enrollment_id" in message["bindings"]["kafka"]["key"]["description"]
    payload = resolve(document, message["payload"]["$ref"])
    assert "completed_by" in payload["required"]
    assert resolve(document, payload["properties"]["learner"]["$ref"])["title"] == "Learner"


def test_message_examples_are_valid_events() -> None:
    for message in build_document()["components"]["messages"].values():
        (example,) = message["examples"]
        headers = {name: value.encode() for name, value in example["headers"].items()}

        envelope = decode(headers, json.dumps(example["payload"]).encode())

        assert envelope.type == message["name"]


def test_command_writes_the_document(tmp_path: Path) -> None:
    output = tmp_path / "asyncapi.json"

    assert main(["--output", str(output)]) == 0
    assert output.read_text() == render()


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node
