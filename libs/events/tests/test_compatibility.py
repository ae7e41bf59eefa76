import copy
from collections.abc import Callable
from typing import Any

import pytest

from microcred_events.compatibility import JsonSchema, breaking_changes

BASE: JsonSchema = {
    "$defs": {
        "Money": {
            "properties": {
                "amount_minor": {"type": "integer", "minimum": 0, "description": "Minor units."},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
            },
            "required": ["amount_minor", "currency"],
            "title": "Money",
            "type": "object",
        },
        "Reason": {"enum": ["learner_request", "payment_failed"], "title": "Reason", "type": "string"},
    },
    "properties": {
        "enrollment_id": {"type": "string", "format": "uuid", "title": "Enrollment Id"},
        "price": {"$ref": "#/$defs/Money", "description": "What it costs."},
        "reason": {"$ref": "#/$defs/Reason"},
        "detail": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "skills": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["enrollment_id", "price", "reason", "skills"],
    "title": "EnrollmentCancelled",
    "type": "object",
}


def changed(change: Callable[[JsonSchema], Any]) -> JsonSchema:
    schema = copy.deepcopy(BASE)
    change(schema)
    return schema


def props(schema: JsonSchema) -> JsonSchema:
    properties: JsonSchema = schema["properties"]
    return properties


COMPATIBLE: dict[str, Callable[[JsonSchema], Any]] = {
    "nothing": lambda s: None,
    "optional field added": lambda s: props(s).update(note={"type": "string", "default": ""}),
    "enum value added": lambda s: s["$defs"]["Reason"]["enum"].append("refunded"),
    "description changed": lambda s: props(s)["price"].update(description="Something else."),
    "nested description changed": lambda s: s["$defs"]["Money"]["properties"]["amount_minor"].pop(
        "description"
    ),
    "title and examples changed": lambda s: props(s)["enrollment_id"].update(title="Id", examples=["x"]),
    "shared model renamed": lambda s: (
        s["$defs"].update(Amount=s["$defs"].pop("Money")),
        props(s)["price"].update({"$ref": "#/$defs/Amount"}),
    ),
    "field order changed": lambda s: s.update(properties=dict(reversed(list(props(s).items())))),
}

BREAKING: dict[str, tuple[str, Callable[[JsonSchema], Any]]] = {
    "field removed": (
        "$.skills: field removed",
        lambda s: (props(s).pop("skills"), s["required"].remove("skills")),
    ),
    "optional field removed": ("$.detail: field removed", lambda s: props(s).pop("detail")),
    "required field added": (
        "$.note: required field added",
        lambda s: (props(s).update(note={"type": "string"}), s["required"].append("note")),
    ),
    "optional made required": ("$.detail: field made required", lambda s: s["required"].append("detail")),
    "required made optional": ("$.skills: field made optional", lambda s: s["required"].remove("skills")),
    "type changed": (
        "$.enrollment_id: type changed from 'string' to 'integer'",
        lambda s: props(s)["enrollment_id"].update(type="integer"),
    ),
    "format changed": ("$.enrollment_id: format changed", lambda s: props(s)["enrollment_id"].pop("format")),
    "made nullable": (
        "$.enrollment_id: anyOf changed",
        lambda s: props(s).update(enrollment_id={"anyOf": [{"type": "string"}, {"type": "null"}]}),
    ),
    "nullability dropped": ("$.detail: anyOf changed", lambda s: props(s).update(detail={"type": "string"})),
    "enum narrowed": (
        "$.reason: enum values removed: ['payment_failed']",
        lambda s: s["$defs"]["Reason"]["enum"].remove("payment_failed"),
    ),
    "enum replaced by string": ("$.reason: enum changed", lambda s: s["$defs"]["Reason"].pop("enum")),
    "nested type changed through a ref": (
        "$.price.amount_minor: type changed from 'integer' to 'number'",
        lambda s: s["$defs"]["Money"]["properties"]["amount_minor"].update(type="number"),
    ),
    "nested field removed": (
        "$.price.currency: field removed",
        lambda s: s["$defs"]["Money"]["properties"].pop("currency"),
    ),
    "bound changed": (
        "$.price.amount_minor: minimum changed from 0 to 1",
        lambda s: s["$defs"]["Money"]["properties"]["amount_minor"].update(minimum=1),
    ),
    "pattern changed": (
        "$.price.currency: pattern changed",
        lambda s: s["$defs"]["Money"]["properties"]["currency"].update(pattern="^[A-Z]{3,4}$"),
    ),
    "list item type changed": (
        "$.skills.items: type changed",
        lambda s: props(s)["skills"]["items"].update(type="integer"),
    ),
    "default changed": (
        "$.detail: default changed from None to ''",
        lambda s: props(s)["detail"].update(default=""),
    ),
    "ref swapped for another shape": (
        "$.price: type changed from 'object' to 'string'",
        lambda s: props(s)["price"].update({"$ref": "#/$defs/Reason"}),
    ),
}


@pytest.mark.parametrize("change", COMPATIBLE.values(), ids=COMPATIBLE.keys())
def test_compatible_changes_pass(change: Callable[[JsonSchema], Any]) -> None:
    assert breaking_changes(BASE, changed(change)) == []


@pytest.mark.parametrize(("expected", "change"), BREAKING.values(), ids=BREAKING.keys())
def test_breaking_changes_are_named(expected: str, change: Callable[[JsonSchema], Any]) -> None:
    problems = breaking_changes(BASE, changed(change))

    assert any(problem.startswith(expected) for problem in problems), problems


def test_every_breaking_change_is_reported() -> None:
    def two_changes(schema: JsonSchema) -> None:
        props(schema).pop("skills")
        schema["$defs"]["Reason"]["enum"].remove("learner_request")

    assert breaking_changes(BASE, changed(two_changes)) == [
        "$.reason: enum values removed: ['learner_request']",
        "$.skills: field removed",
    ]
