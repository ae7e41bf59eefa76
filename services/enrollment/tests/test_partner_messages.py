"""Reading a message from the partner topic: what can be answered, and what only dead-letters."""

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from enrollment import service
from enrollment.signatures import signed_content
from enrollment.subscribers import SIGNATURE_HEADER, Undeliverable, read_partner_message
from microcred_events import CompletionReported, CourseRetired, encode, example_data
from microcred_events.partner import RejectionReason

PARTNER_ID = uuid.uuid4()
SOURCE = f"urn:microcred:partner:{PARTNER_ID}"
TIME = datetime(2025, 5, 2, 16, 45, 1, tzinfo=UTC)
Headers = list[tuple[str, bytes]]


def message(
    body: bytes | None = None, source: str = SOURCE, headers: dict[str, bytes] | None = None
) -> tuple[Headers, bytes]:
    """A partner message's headers and value, as a plain Kafka client would send it; `headers`
    replace or add to the CloudEvents ones."""
    report = CompletionReported.model_validate({**example_data(CompletionReported), "partner_id": PARTNER_ID})
    record = encode(report, source=source, event_id="msg-1", time=TIME)
    changed = headers or {}
    kept = [(name, value) for name, value in record.headers if name not in changed]
    return [*kept, *changed.items()], record.value if body is None else body


def test_a_signed_report_is_read_with_what_its_signature_covers() -> None:
    headers, value = message(headers={SIGNATURE_HEADER: b"v1,abc"})

    read = read_partner_message(headers, value)

    assert isinstance(read, service.PartnerMessage)
    assert read.partner_id == PARTNER_ID
    assert read.message_id == "msg-1"
    assert read.signed_content == signed_content("msg-1", "2025-05-02T16:45:01Z", value)
    assert read.signature == "v1,abc"
    assert isinstance(read.report, CompletionReported)
    assert read.report.partner_id == PARTNER_ID


def test_several_signature_headers_are_all_tried() -> None:
    headers, value = message()
    headers += [(SIGNATURE_HEADER, b"v1,first"), ("CE_SIGNATURE", b"v1a,second"), (SIGNATURE_HEADER, b"\xff")]

    read = read_partner_message(headers, value)

    assert isinstance(read, service.PartnerMessage)
    assert read.signature == "v1,first v1a,second"


def test_an_unsigned_message_is_read_without_a_signature() -> None:
    read = read_partner_message(*message())

    assert isinstance(read, service.PartnerMessage)
    assert read.signature is None


def test_a_body_that_is_no_valid_report_is_kept_to_be_told_back() -> None:
    report_id = str(uuid.uuid4())
    body: dict[str, Any] = {"report_id": report_id, "partner_id": str(PARTNER_ID), "course_id": "nope"}

    read = read_partner_message(*message(json.dumps(body).encode()))

    assert isinstance(read, service.PartnerMessage)
    assert isinstance(read.report, service.MalformedReport)
    assert read.report.report_id == uuid.UUID(report_id)
    assert "course_id" in read.report.detail
    not_json = read_partner_message(*message(b"\x00 not json"))
    assert isinstance(not_json, service.PartnerMessage)
    assert isinstance(not_json.report, service.MalformedReport)
    assert not_json.report.report_id is None


def test_another_event_type_on_the_partner_topic_is_a_malformed_report() -> None:
    retired = encode(
        CourseRetired.model_validate(example_data(CourseRetired)), source=SOURCE, event_id="msg-2"
    )

    read = read_partner_message(retired.headers, retired.value)

    assert isinstance(read, service.PartnerMessage)
    assert isinstance(read.report, service.MalformedReport)
    assert CourseRetired.TYPE in read.report.detail


def test_a_source_that_names_no_partner_is_dead_lettered() -> None:
    for source in ("urn:microcred:billing", "urn:microcred:partner:northwind"):
        read = read_partner_message(*message(source=source))

        assert isinstance(read, Undeliverable)
        assert read.reason == RejectionReason.UNKNOWN_PARTNER
        assert source in read.detail


def test_an_envelope_that_does_not_decode_is_dead_lettered() -> None:
    headers, value = message()
    without_id = [(name, raw) for name, raw in headers if name != "ce_id"]

    missing = read_partner_message(without_id, value)
    unknown = read_partner_message(*message(headers={"ce_type": b"org.example.nothing.v1"}))
    not_text = read_partner_message(*message(headers={"ce_source": b"\xff\xfe"}))

    assert isinstance(missing, Undeliverable)
    assert missing.reason == "missing_header"
    assert isinstance(unknown, Undeliverable)
    assert unknown.reason == "unknown_type"
    assert isinstance(not_text, Undeliverable)
    assert not_text.reason == "invalid_header"
