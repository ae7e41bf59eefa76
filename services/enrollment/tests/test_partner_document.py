"""docs/partners.md tells partners the truth: its worked examples and schema match the code."""

import json
import re
from pathlib import Path

import pytest

from enrollment.signatures import hmac_signature, signed_content
from microcred_events.partner import CompletionRejected

DOCS = Path(__file__).resolve().parents[3] / "docs" / "partners.md"
SECRET = "q5d1O0VJ0-4a1hYb0yYk3Yw9mYx0Z7o2m0Tq0kLh5zQ"


@pytest.mark.parametrize(
    ("message_id", "time", "expected"),
    [
        (
            "0b6b5c1e-3f5a-4f4e-9a49-8d2f4c6e7a10",
            "2025-05-02T16:45:01Z",
            "v1,kKRoVRIYb6qjQla8TeUFyWTQxm5v2SnRA/rXJFccJ5U=",
        ),
        ("msg_2vYkq8Jm3T", "1746204301", "v1,mRgedRuBRXu5tlnFeDHv9pxB7cED/ObeYfSQqv1PuXA="),
    ],
    ids=["kafka", "http"],
)
def test_the_worked_examples_are_right(message_id: str, time: str, expected: str) -> None:
    document = DOCS.read_text()
    body = (
        b'{"report_id":"6f4a2c8e-9b1d-4a53-8c7e-2d0b5f9a1c36","partner_id":"b3d5f7a9-2c4e-4e61-9a83-5f1b7d3c9e20",'
        b'"course_id":"3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15","learner_email":"ada@example.org",'
        b'"completed_at":"2025-05-02T16:45:00Z","score":87.5}'
    )

    signature = hmac_signature(SECRET, signed_content(message_id, time, body))

    assert signature == expected
    assert body.decode() in document, "docs/partners.md signs this body in its worked examples"
    assert SECRET in document
    assert f"{message_id}.{time}." in document
    assert signature in document


def test_the_rejection_schema_is_the_events() -> None:
    blocks = re.findall(r"```json\n(.*?)\n```", DOCS.read_text(), flags=re.DOTALL)
    schemas = [json.loads(block) for block in blocks if '"title": "CompletionRejected"' in block]

    assert schemas == [CompletionRejected.model_json_schema()], (
        "paste the current schema into docs/partners.md"
    )
