"""Hostile Kafka messages: what a consumer cannot apply is dead-lettered with a reason, and the
partition keeps moving; a partner cannot speak for another partner.

On every topic a service consumes, a plain Kafka client sends, all with one key (so all land on
one partition, in this order): a poison message (headers that are not UTF-8, a body that is not
text), a body that is not JSON, a known event type whose body breaks its schema, an event type the
contract does not know, and a large (512 KiB) body. Then a good event of the same key. Every
service reading the topic must park the five on its dead-letter topic (`<group>.dlq`), each with a
`dlq_reason` header, in order, and still apply the good event (its inbox records it).

The message at the broker's own size limit is `test_event_size_limit.py`'s.
"""

import base64
import functools
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from billing import subscribers as billing_subscribers
from enrollment import subscribers as enrollment_subscribers
from enrollment.subscribers import PARTNER_REPORTS_GROUP
from issuance import subscribers as issuance_subscribers
from microcred_events import (
    CompletionReported,
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    CredentialIssued,
    EnrollmentCreated,
    Event,
    PathwayPublished,
    PathwaySnapshot,
    PaymentSettled,
    Topic,
    dead_letter_topic,
    encode,
    example_data,
)
from microcred_events.partner import CompletionRejected
from microcred_events.topics import partner_rejection_topic
from microcred_runtime import Subscriptions
from notifications import subscribers as notifications_subscribers

from .conftest import Platform, ce_headers, header, records_where, wait_for

SOURCE = "urn:microcred:abuse"
LARGE = 512 * 1024
UNKNOWN_TYPE = "org.microcred.abuse.thing.exploded.v1"
# What every consumer of a topic must say about each bad message, in the order they are sent.
EXPECTED_REASONS = [
    "invalid_header",
    "malformed_body",
    "schema_violation",
    "unknown_type",
    "schema_violation",
]

# Which services read which topic: checked against the services' own subscriptions below.
CONSUMERS: dict[Topic, tuple[str, ...]] = {
    Topic.CATALOG_COURSE: ("enrollment", "issuance", "notifications"),
    Topic.CATALOG_PATHWAY: ("issuance",),
    Topic.ENROLLMENT: ("billing", "issuance", "notifications"),
    Topic.BILLING_PAYMENT: ("enrollment", "notifications"),
    Topic.ISSUANCE_CREDENTIAL: ("enrollment", "notifications"),
}


def subscriptions_of(platform: Platform, service: str) -> Subscriptions:
    if service == "issuance":
        return issuance_subscribers.subscriptions(platform.apps["issuance"].state.platform)
    modules = {
        "enrollment": enrollment_subscribers,
        "billing": billing_subscribers,
        "notifications": notifications_subscribers,
    }
    subscriptions: Subscriptions = modules[service].subscriptions
    return subscriptions


def good_events(topic: Topic, key: str) -> list[Event]:
    """Valid events of the topic's aggregate `key`, at least one that each of its readers applies."""
    now = datetime.now(UTC)
    events: dict[Topic, list[Event]] = {
        Topic.CATALOG_COURSE: [
            CoursePublished(
                course=CourseSnapshot.model_validate({**example_data(CourseSnapshot), "course_id": key}),
                published_at=now,
            )
        ],
        Topic.CATALOG_PATHWAY: [
            PathwayPublished(
                pathway=PathwaySnapshot.model_validate({**example_data(PathwaySnapshot), "pathway_id": key}),
                published_at=now,
            )
        ],
        Topic.ENROLLMENT: [
            EnrollmentCreated.model_validate({**example_data(EnrollmentCreated), "enrollment_id": key}),
            CourseCompleted.model_validate({**example_data(CourseCompleted), "enrollment_id": key}),
        ],
        Topic.BILLING_PAYMENT: [
            PaymentSettled.model_validate({**example_data(PaymentSettled), "payment_id": key})
        ],
        Topic.ISSUANCE_CREDENTIAL: [
            CredentialIssued.model_validate({**example_data(CredentialIssued), "credential_id": key})
        ],
    }
    chosen = events[topic]
    assert all(event.aggregate_id() == key for event in chosen)
    return chosen


def bad_messages(event_type: str, key: str) -> list[tuple[list[tuple[str, bytes]], bytes]]:
    """(headers, value) of the five bad messages, in the order of `EXPECTED_REASONS`."""
    poison_headers = [("ce_specversion", b"\xff\xfe1.0"), ("ce_type", b"\xc3\x28"), ("ce_id", b"\x80\x81")]
    return [
        (poison_headers, b"\x00\xff\xfe poison \x80\x81"),
        (ce_headers(event_type, key=key, source=SOURCE), b'{"broken": '),
        (ce_headers(event_type, key=key, source=SOURCE), json.dumps({"unexpected": [1, 2, 3]}).encode()),
        (ce_headers(UNKNOWN_TYPE, key=key, source=SOURCE), b"{}"),
        (ce_headers(event_type, key=key, source=SOURCE), json.dumps({"padding": "x" * LARGE}).encode()),
    ]


async def in_inbox(platform: Platform, service: str, consumer: str, event_ids: list[str]) -> bool:
    count = await platform.fetchval(
        service,
        "SELECT count(*) FROM inbox WHERE consumer = $1 AND event_id = ANY($2::text[])",
        consumer,
        event_ids,
    )
    return bool(count == len(event_ids))


def dead_letter_of(platform: Platform, topic: str, key: str) -> Any:
    """Whether a record on a dead-letter topic is the one of `key` that came from `topic`."""

    def wanted(record: ConsumerRecord[bytes, bytes]) -> bool:
        return record.key == key.encode() and header(record, "dlq_topic") == platform.prefix + topic

    return wanted


def test_every_consumed_topic_is_attacked(platform: Platform) -> None:
    consumed = {
        (service, topic)
        for service in ("enrollment", "billing", "issuance", "notifications")
        for topic in subscriptions_of(platform, service).topics
    }
    attacked = {(service, str(topic)) for topic, services in CONSUMERS.items() for service in services}
    assert consumed == attacked


@pytest.mark.parametrize("topic", list(CONSUMERS))
async def test_bad_messages_are_dead_lettered_with_a_reason_and_the_partition_keeps_moving(
    platform: Platform, topic: Topic
) -> None:
    key = str(uuid.uuid4())
    good = good_events(topic, key)
    partitions = set()
    for headers, value in bad_messages(good[0].TYPE, key):
        sent = await platform.producer.send_and_wait(
            platform.prefix + topic, value, key=key.encode(), headers=headers
        )
        partitions.add(sent.partition)
    good_ids: dict[str, str] = {}
    for event in good:
        record = encode(event, source=SOURCE)
        sent = await platform.producer.send_and_wait(
            platform.prefix + record.topic, record.value, key=record.key, headers=record.headers
        )
        partitions.add(sent.partition)
        good_ids[event.TYPE] = dict(record.headers)["ce_id"].decode()
    assert len(partitions) == 1, "one key, one partition: the good events come after the bad ones"

    for service in CONSUMERS[topic]:
        letters = await records_where(
            platform.kafka_bootstrap,
            platform.prefix + dead_letter_topic(service),
            dead_letter_of(platform, topic, key),
            count=len(EXPECTED_REASONS),
        )
        assert [header(letter, "dlq_reason") for letter in letters] == EXPECTED_REASONS, service
        assert all(header(letter, "dlq_consumer_group") == service for letter in letters)
        assert all(header(letter, "dlq_detail") for letter in letters), "a reason says what was wrong"
        assert len(letters[-1].value or b"") > LARGE, "the message is kept as it came"
        subscriptions = subscriptions_of(platform, service)
        applied = [event_id for type_, event_id in good_ids.items() if subscriptions.handler_for(type_)]
        assert applied, f"{service} applies none of the good events of {topic}"
        assert await wait_for(functools.partial(in_inbox, platform, service, service, applied)), (
            f"{service} did not apply the good event after the bad ones on {topic}"
        )


# --- the partner topic -----------------------------------------------------------------------


@dataclass(frozen=True)
class Partner:
    partner_id: str
    secret: str

    @property
    def source(self) -> str:
        return f"urn:microcred:partner:{self.partner_id}"


@dataclass(frozen=True)
class Partners:
    northwind: Partner
    contoso: Partner
    course_id: str  # free; Northwind delivers it


def sign(secret: str, message_id: str, at: str, body: bytes) -> str:
    """The documented recipe: `v1,` + base64 HMAC-SHA256 of `<id>.<time>.<body>`, keyed with the secret."""
    digest = hmac.new(secret.encode(), f"{message_id}.{at}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed(
    report_id: str,
    body: bytes,
    *,
    secret: str,
    source: str,
    event_type: str = CompletionReported.TYPE,
    at: datetime | None = None,
) -> tuple[str, list[tuple[str, bytes]]]:
    """A partner's message id and CloudEvents headers, `ce_signature` included; `ce_time` `at`, or now."""
    message_id = str(uuid.uuid4())
    headers = ce_headers(event_type, key=report_id, source=source, event_id=message_id, at=at)
    time_text = dict(headers)["ce_time"].decode()
    return message_id, [*headers, ("ce_signature", sign(secret, message_id, time_text, body).encode())]


@pytest.fixture(scope="module")
async def partners(platform: Platform) -> Partners:
    registered = []
    for name in ("Northwind University", "Contoso College"):
        response = await platform.enrollment.post(
            "/partners", json={"display_name": name}, headers=platform.admin()
        )
        assert response.status_code == 201, response.text
        body = response.json()
        registered.append(Partner(body["partner_id"], body["secrets"][0]["secret"]))
    northwind, contoso = registered
    course_id = await platform.published_course(
        "Partner-delivered course", 0, delivery_partner_id=northwind.partner_id
    )
    return Partners(northwind, contoso, course_id)


def report(partner: Partner, enrollment: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {
        "report_id": str(uuid.uuid4()),
        "partner_id": partner.partner_id,
        "course_id": enrollment["course_id"],
        "learner_id": enrollment["learner"]["learner_id"],
        "completed_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "score": 88,
        **changes,
    }


async def enrollment_status(platform: Platform, enrollment_id: str) -> str:
    status: str = await platform.fetchval(
        "enrollment", "SELECT status FROM enrollments WHERE enrollment_id = $1", uuid.UUID(enrollment_id)
    )
    return status


async def queued(platform: Platform, event_type: str, key: str) -> int:
    """Events of `event_type` and `key` in enrollment's outbox."""
    count: int = await platform.fetchval(
        "enrollment",
        "SELECT count(*) FROM outbox WHERE event_type = $1 AND message_key = $2",
        event_type,
        key.encode(),
    )
    return count


async def completions_queued(platform: Platform, enrollment_id: str) -> int:
    return await queued(platform, CourseCompleted.TYPE, enrollment_id)


async def rejections(platform: Platform, partner: Partner, message_ids: set[str]) -> dict[str, str]:
    """The reasons told on the partner's own rejection topic, by the id of the refused message."""
    records = await records_where(
        platform.kafka_bootstrap,
        platform.prefix + partner_rejection_topic(uuid.UUID(partner.partner_id)),
        lambda record: record.key is not None and record.key.decode() in message_ids,
        count=len(message_ids),
    )
    told = [CompletionRejected.model_validate_json(record.value or b"") for record in records]
    return {rejection.message_id: rejection.reason.value for rejection in told}


async def test_bad_partner_messages_are_dead_lettered_and_the_partition_keeps_moving(
    platform: Platform, partners: Partners
) -> None:
    northwind = partners.northwind
    enrollment = await platform.enroll("ada", partners.course_id)
    good = report(northwind, enrollment)
    key, body = good["report_id"], json.dumps(good).encode()
    stranger = Partner(str(uuid.uuid4()), "a secret nobody registered")
    malformed = json.dumps({"report_id": key, "partner_id": northwind.partner_id}).encode()
    malformed_id, malformed_headers = signed(key, malformed, secret=northwind.secret, source=northwind.source)
    sends = [
        ([("ce_specversion", b"\xff\xfe"), ("ce_id", b"\x80")], b"\x00\xff poison \x80"),
        (
            signed(key, b"{}", secret=northwind.secret, source=northwind.source, event_type=UNKNOWN_TYPE)[1],
            b"{}",
        ),
        (signed(key, body, secret=stranger.secret, source=stranger.source)[1], body),
        (signed(key, body, secret=northwind.secret, source="urn:microcred:billing")[1], body),
        (
            ce_headers(CompletionReported.TYPE, key=key, source=SOURCE),
            json.dumps({"x": "x" * LARGE}).encode(),
        ),
        # Signed by a registered partner: not dead-lettered but told back (it can be fixed and resent).
        (malformed_headers, malformed),
    ]
    good_id, good_headers = signed(key, body, secret=northwind.secret, source=northwind.source)
    sends.append((good_headers, body))
    topic = platform.prefix + Topic.PARTNER_COMPLETION
    partitions = set()
    for headers, value in sends:
        sent = await platform.producer.send_and_wait(topic, value, key=key.encode(), headers=headers)
        partitions.add(sent.partition)
    assert len(partitions) == 1

    letters = await records_where(
        platform.kafka_bootstrap,
        platform.prefix + dead_letter_topic(PARTNER_REPORTS_GROUP),
        dead_letter_of(platform, Topic.PARTNER_COMPLETION, key),
        count=5,
    )
    assert [header(letter, "dlq_reason") for letter in letters] == [
        "invalid_header",
        "unknown_type",
        "unknown_partner",  # a partner URN nobody registered
        "unknown_partner",  # a source that is no partner's
        "unknown_partner",  # 512 KiB of nothing, from no partner
    ]
    assert await rejections(platform, northwind, {malformed_id}) == {malformed_id: "malformed_report"}
    assert await wait_for(lambda: in_inbox(platform, "enrollment", PARTNER_REPORTS_GROUP, [good_id]))
    assert await enrollment_status(platform, enrollment["enrollment_id"]) == "completed"


async def test_a_partner_cannot_speak_for_another_partner(platform: Platform, partners: Partners) -> None:
    northwind, contoso = partners.northwind, partners.contoso
    enrollment = await platform.enroll("grace", partners.course_id)
    topic = platform.prefix + Topic.PARTNER_COMPLETION

    # Northwind, signing as itself, claims the report is Contoso's.
    claimed = report(northwind, enrollment, partner_id=contoso.partner_id)
    claimed_body = json.dumps(claimed).encode()
    mismatch_id, headers = signed(
        claimed["report_id"], claimed_body, secret=northwind.secret, source=northwind.source
    )
    await platform.producer.send_and_wait(
        topic, claimed_body, key=claimed["report_id"].encode(), headers=headers
    )
    # Northwind sends as Contoso (its ce_source) but can only sign with its own secret.
    impostor = report(contoso, enrollment)
    impostor_body = json.dumps(impostor).encode()
    impostor_id, headers = signed(
        impostor["report_id"], impostor_body, secret=northwind.secret, source=contoso.source
    )
    await platform.producer.send_and_wait(
        topic, impostor_body, key=impostor["report_id"].encode(), headers=headers
    )
    # The same two over HTTP.
    over_http_as_contoso = await post_reports(
        platform, contoso.partner_id, report(contoso, enrollment), northwind.secret
    )
    over_http_for_contoso = await post_reports(
        platform,
        northwind.partner_id,
        report(northwind, enrollment, partner_id=contoso.partner_id),
        northwind.secret,
    )

    assert await rejections(platform, northwind, {mismatch_id}) == {mismatch_id: "partner_mismatch"}
    # Not told on Contoso's topic (whoever can write to the partner topic could fill it in
    # Contoso's name): dead-lettered, for microcred's operators.
    (letter,) = await records_where(
        platform.kafka_bootstrap,
        platform.prefix + dead_letter_topic(PARTNER_REPORTS_GROUP),
        lambda record: header(record, "ce_id") == impostor_id,
        count=1,
    )
    assert header(letter, "dlq_reason") == "bad_signature"
    assert contoso.partner_id in (header(letter, "dlq_detail") or "")
    assert await queued(platform, CompletionRejected.TYPE, impostor_id) == 0, "nothing queued for Contoso"
    # Nor was its ce_id taken from Contoso, which may still send under it.
    assert not await in_inbox(platform, "enrollment", PARTNER_REPORTS_GROUP, [impostor_id])
    assert over_http_as_contoso.status_code == 401, over_http_as_contoso.text
    assert over_http_as_contoso.headers["content-type"] == "application/problem+json"
    assert over_http_for_contoso.status_code == 200, over_http_for_contoso.text
    (result,) = over_http_for_contoso.json()["results"]
    assert (result["status"], result["reason"]) == ("refused", "partner_mismatch")
    assert await enrollment_status(platform, enrollment["enrollment_id"]) == "active"
    assert await completions_queued(platform, enrollment["enrollment_id"]) == 0


async def test_a_partner_message_outside_the_time_window_is_refused_and_changes_nothing(
    platform: Platform, partners: Partners
) -> None:
    """`ce_time` is judged against the broker's time for the record (the partner topic is
    LogAppendTime), like the HTTP path's webhook-timestamp: a message captured and replayed once
    the inbox may have forgotten it is refused, and so is one dated ahead."""
    northwind = partners.northwind
    topic = platform.prefix + Topic.PARTNER_COMPLETION

    async def send(enrollment: dict[str, Any], off_by: timedelta, **changes: Any) -> str:
        body = json.dumps(report(northwind, enrollment, **changes)).encode()
        message_id, headers = signed(
            str(uuid.uuid4()),
            body,
            secret=northwind.secret,
            source=northwind.source,
            at=datetime.now(UTC) + off_by,
        )
        await platform.producer.send_and_wait(topic, body, key=message_id.encode(), headers=headers)
        return message_id

    refused = {}
    for case, off_by in (("old", -timedelta(minutes=10)), ("ahead", timedelta(minutes=10))):
        enrollment = await platform.enroll(f"time-{case}", partners.course_id)
        refused[await send(enrollment, off_by)] = enrollment
    # Inside the window: taken; and that report sent again late is a duplicate, not told.
    fresh = await platform.enroll("time-fresh", partners.course_id)
    report_id = str(uuid.uuid4())
    taken = await send(fresh, -timedelta(minutes=2), report_id=report_id)
    assert await wait_for(lambda: in_inbox(platform, "enrollment", PARTNER_REPORTS_GROUP, [taken]))
    late_again = await send(fresh, -timedelta(minutes=10), report_id=report_id)

    told = await rejections(platform, northwind, set(refused))

    assert told == dict.fromkeys(refused, "stale_message")
    for enrollment in refused.values():
        assert await enrollment_status(platform, enrollment["enrollment_id"]) == "active"
        assert await completions_queued(platform, enrollment["enrollment_id"]) == 0
    assert await enrollment_status(platform, fresh["enrollment_id"]) == "completed"
    assert await wait_for(lambda: in_inbox(platform, "enrollment", PARTNER_REPORTS_GROUP, [late_again]))
    assert await queued(platform, CompletionRejected.TYPE, late_again) == 0
    assert await completions_queued(platform, fresh["enrollment_id"]) == 1


async def post_reports(platform: Platform, partner_id: str, payload: Any, secret: str) -> Any:
    """POST completions signed Standard-Webhooks style with `secret`."""
    raw = json.dumps(payload).encode()
    webhook_id = f"msg_{uuid.uuid4().hex}"
    stamp = str(int(time.time()))
    return await platform.enrollment.post(
        f"/partners/{partner_id}/completions",
        content=raw,
        headers={
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": stamp,
            "webhook-signature": sign(secret, webhook_id, stamp, raw),
        },
    )
