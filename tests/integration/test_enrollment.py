"""The enrollment service end to end, against a real Kafka broker and PostgreSQL server.

Each test seeds enrollment's course read model the way catalog does (CoursePublished and
CourseRetired on the catalog topic: one paid course, one free, one retired), talks to the HTTP
API as learners and staff, plays billing by publishing its events, and reads what enrollment
published from the enrollment topic.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

import enrollment.main
import enrollment.settings
from microcred_events import (
    CancellationReason,
    CompletedBy,
    CourseCompleted,
    CoursePublished,
    CourseRetired,
    CourseSnapshot,
    CredentialIssued,
    CredentialRevoked,
    EnrollmentActivated,
    EnrollmentCancelled,
    EnrollmentCreated,
    Envelope,
    Event,
    Learner,
    Money,
    PaymentDeclined,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
    StatusPurpose,
    Topic,
    decode,
    encode,
    example_data,
)
from microcred_runtime import encode_cursor

PRICE = Money(amount_minor=4900, currency="EUR")
FREE = Money(amount_minor=0, currency="EUR")
COURSE = example_data(CourseSnapshot)
INBOX_HAS = "SELECT count(*) > 0 FROM inbox WHERE event_id = $1"
CREATED = EnrollmentCreated.TYPE
ACTIVATED = EnrollmentActivated.TYPE
CANCELLED = EnrollmentCancelled.TYPE
COMPLETED = CourseCompleted.TYPE


@dataclass(frozen=True)
class Courses:
    paid: uuid.UUID
    free: uuid.UUID
    retired: uuid.UUID


@dataclass(frozen=True)
class Harness:
    """What a test drives: the API, the service's database, Kafka, and the test's callers."""

    api: httpx.AsyncClient
    db: asyncpg.Connection
    producer: AIOKafkaProducer
    prefix: str
    courses: Courses
    bearer: Callable[..., dict[str, str]]
    topic_reader: Callable[..., Any]
    wait_for: Callable[..., Any]

    def learner(self, name: str) -> dict[str, str]:
        return self.bearer(f"learner-{name}", email=f"{name}@example.org", name=name.title())

    def staff(self) -> dict[str, str]:
        return self.bearer("staff-1", "staff", email="staff@example.org")

    async def enroll(
        self, who: dict[str, str], course_id: uuid.UUID, key: str | None = None
    ) -> httpx.Response:
        return await self.api.post(
            "/enrollments",
            json={"course_id": str(course_id)},
            headers={**who, "Idempotency-Key": key or str(uuid.uuid4())},
        )

    async def enrolled(self, who: dict[str, str], course_id: uuid.UUID) -> dict[str, Any]:
        response = await self.enroll(who, course_id)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def send(self, event: Event, source: str, event_id: str | None = None) -> str:
        """Publish as another service would; returns the CloudEvents id."""
        event_id = event_id or str(uuid.uuid4())
        record = encode(event, source=source, event_id=event_id)
        await self.producer.send_and_wait(
            self.prefix + record.topic, record.value, key=record.key, headers=record.headers
        )
        return event_id

    async def from_billing(self, event: Event, event_id: str | None = None) -> str:
        return await self.send(event, "urn:microcred:billing", event_id)

    async def consumed(self, event_id: str) -> bool:
        """Whether enrollment has applied the event (it recorded it in its inbox)."""
        return bool(await self.wait_for(lambda: self.db.fetchval(INBOX_HAS, event_id)))

    async def status_becomes(self, enrollment_id: str, status: str) -> bool:
        return bool(
            await self.wait_for(
                lambda: self.db.fetchval(
                    "SELECT status = $2 FROM enrollments WHERE enrollment_id = $1",
                    uuid.UUID(enrollment_id),
                    status,
                )
            )
        )

    async def status_of(self, enrollment_id: str) -> str:
        status: str = await self.db.fetchval(
            "SELECT status FROM enrollments WHERE enrollment_id = $1", uuid.UUID(enrollment_id)
        )
        return status

    async def queued(self, enrollment_id: str) -> list[str]:
        """The types of the events enrollment committed for an enrollment, in order."""
        rows = await self.db.fetch(
            "SELECT event_type FROM outbox WHERE message_key = $1 ORDER BY id", enrollment_id.encode()
        )
        return [row["event_type"] for row in rows]

    async def published(self, enrollment_id: str) -> list[Event]:
        """What reached the enrollment topic for an enrollment, in order (one key, one partition)."""
        total = await self.db.fetchval("SELECT count(*) FROM outbox")
        records = await self.topic_reader(self.prefix + Topic.ENROLLMENT, total)
        envelopes: list[Envelope] = [decode(record.headers, record.value) for record in records]
        assert all(envelope.source == "urn:microcred:enrollment" for envelope in envelopes)
        return [envelope.event for envelope in envelopes if envelope.subject == enrollment_id]


def _published(course_id: uuid.UUID, price: Money, version: int = 1) -> CoursePublished:
    snapshot = {**COURSE, "course_id": str(course_id), "version": version, "price": price.model_dump()}
    return CoursePublished(course=CourseSnapshot.model_validate(snapshot), published_at=datetime.now(UTC))


def _settled(
    enrollment: dict[str, Any], payment_id: uuid.UUID | None = None, amount: Money = PRICE
) -> PaymentSettled:
    return PaymentSettled(
        payment_id=payment_id or uuid.uuid4(),
        enrollment_id=enrollment["enrollment_id"],
        learner_id=enrollment["learner"]["learner_id"],
        amount=amount,
        provider="stripe",
        provider_reference="pi_test",
        settled_at=datetime.now(UTC),
    )


def _refund(enrollment: dict[str, Any], payment_id: uuid.UUID) -> RefundIssued:
    return RefundIssued(
        refund_id=uuid.uuid4(),
        payment_id=payment_id,
        enrollment_id=enrollment["enrollment_id"],
        learner_id=enrollment["learner"]["learner_id"],
        amount=PRICE,
        reason="Cancelled by the learner before the start.",
        issued_at=datetime.now(UTC),
    )


@pytest.fixture
async def harness(
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    bearer: Callable[..., dict[str, str]],
    topic_reader: Callable[..., Any],
    wait_for: Callable[..., Any],
) -> AsyncIterator[Harness]:
    database = await new_database()
    app = enrollment.main.create_app(make_settings(enrollment.settings.Settings, database))
    courses = Courses(paid=uuid.uuid4(), free=uuid.uuid4(), retired=uuid.uuid4())
    db = await asyncpg.connect(database)
    try:
        async with serve(app) as api:
            h = Harness(api, db, producer, topic_prefix, courses, bearer, topic_reader, wait_for)
            catalog = "urn:microcred:catalog"
            await h.send(_published(courses.paid, PRICE), catalog)
            await h.send(_published(courses.free, FREE), catalog)
            await h.send(_published(courses.retired, PRICE), catalog)
            retired = CourseRetired(course_id=courses.retired, version=2, retired_at=datetime.now(UTC))
            await h.send(retired, catalog)
            seeded = await wait_for(
                lambda: db.fetchval(
                    "SELECT count(*) = 3 FROM courses WHERE (status = 'published' AND course_id = ANY($1))"
                    " OR (status = 'retired' AND course_id = $2)",
                    [courses.paid, courses.free],
                    courses.retired,
                )
            )
            assert seeded, "the course read model was not seeded"
            yield h
    finally:
        await db.close()


# --- enrolling -------------------------------------------------------------------------------


async def test_enrolling_in_a_paid_course_waits_for_payment(harness: Harness) -> None:
    h = harness
    response = await h.enroll(h.learner("ada"), h.courses.paid)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "pending_payment"
    assert body["requires_payment"] is True
    assert body["price"] == PRICE.model_dump()
    assert body["course_version"] == 1
    assert body["learner"]["email"] == "ada@example.org"
    assert body["learner"]["display_name"] == "Ada"
    (created,) = await h.published(body["enrollment_id"])
    assert isinstance(created, EnrollmentCreated)
    assert str(created.enrollment_id) == body["enrollment_id"]
    assert created.course_id == h.courses.paid
    assert created.requires_payment is True
    assert created.price == PRICE
    assert created.learner == Learner.model_validate(body["learner"])


async def test_enrolling_in_a_free_course_is_active_at_once(harness: Harness) -> None:
    h = harness
    response = await h.enroll(h.learner("ada"), h.courses.free)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "active"
    assert body["activated_at"] is not None
    created, activated = await h.published(body["enrollment_id"])
    assert isinstance(created, EnrollmentCreated)
    assert created.requires_payment is False
    assert isinstance(activated, EnrollmentActivated)
    assert activated.payment_id is None
    assert str(activated.enrollment_id) == body["enrollment_id"]


async def test_a_retry_with_the_same_idempotency_key_replays_the_first_response(harness: Harness) -> None:
    h = harness
    ada, bob = h.learner("ada"), h.learner("bob")
    first = await h.enroll(ada, h.courses.paid, key="key-1")
    assert first.status_code == 201, first.text
    enrollment_id = first.json()["enrollment_id"]
    # The enrollment moves on; the replay still answers what the first request was answered.
    cancelled = await h.api.post(f"/enrollments/{enrollment_id}/cancellation", headers=ada)
    assert cancelled.json()["status"] == "cancelled"

    again = await h.enroll(ada, h.courses.paid, key="key-1")
    other_body = await h.enroll(ada, h.courses.free, key="key-1")
    other_caller = await h.enroll(bob, h.courses.paid, key="key-1")
    missing = await h.api.post("/enrollments", json={"course_id": str(h.courses.paid)}, headers=ada)

    assert (again.status_code, again.json()) == (201, first.json())
    assert other_body.status_code == 422
    assert other_body.json()["type"] == "urn:microcred:problem:idempotency-key-reused"
    assert other_caller.status_code == 201, "keys are scoped per caller"
    assert other_caller.json()["enrollment_id"] != enrollment_id
    assert missing.status_code == 400
    assert missing.headers["content-type"] == "application/problem+json"
    ada_id = uuid.UUID(first.json()["learner"]["learner_id"])
    assert await h.db.fetchval("SELECT count(*) FROM enrollments WHERE learner_id = $1", ada_id) == 1
    assert await h.queued(enrollment_id) == [CREATED, CANCELLED]


async def test_concurrent_attempts_make_one_enrollment(harness: Harness) -> None:
    h = harness
    ada = h.learner("ada")
    # The same key at once: the second waits for the first and replays its response.
    same_key = await asyncio.gather(*(h.enroll(ada, h.courses.paid, key="key-1") for _ in range(3)))
    # Different keys at once: the partial unique index lets one in.
    other_keys = await asyncio.gather(*(h.enroll(ada, h.courses.free) for _ in range(3)))

    assert [response.status_code for response in same_key] == [201] * 3
    assert len({response.json()["enrollment_id"] for response in same_key}) == 1
    assert sorted(response.status_code for response in other_keys) == [201, 409, 409]
    winner = next(response.json() for response in other_keys if response.status_code == 201)
    assert all(
        response.json()["enrollment_id"] == winner["enrollment_id"]
        for response in other_keys
        if response.status_code == 409
    ), "the refusals name the enrollment that got in"
    assert await h.db.fetchval("SELECT count(*) FROM enrollments") == 2
    assert await h.db.fetchval("SELECT count(*) FROM outbox WHERE event_type = $1", CREATED) == 2


async def test_enrollments_the_rules_refuse(harness: Harness) -> None:
    h = harness
    ada = h.learner("ada")
    first = await h.enrolled(ada, h.courses.paid)

    unknown = await h.enroll(ada, uuid.uuid4(), key="key-1")
    retired = await h.enroll(ada, h.courses.retired)
    second = await h.enroll(ada, h.courses.paid)
    no_email = await h.enroll(h.bearer("learner-anon"), h.courses.paid)
    # A refused request leaves nothing behind: its key is free for the next attempt.
    reused = await h.enroll(ada, h.courses.free, key="key-1")

    assert unknown.status_code == 422
    assert unknown.json()["type"] == "urn:microcred:problem:course-not-found"
    assert retired.status_code == 409
    assert retired.json()["type"] == "urn:microcred:problem:course-not-open"
    assert second.status_code == 409
    assert second.json()["type"] == "urn:microcred:problem:already-enrolled"
    assert second.json()["enrollment_id"] == first["enrollment_id"]
    assert no_email.status_code == 403
    assert no_email.json()["type"] == "urn:microcred:problem:email-required"
    assert reused.status_code == 201, reused.text
    assert await h.db.fetchval("SELECT count(*) FROM enrollments") == 2
    assert await h.db.fetchval("SELECT count(*) FROM outbox WHERE event_type = $1", CREATED) == 2


async def test_learners_see_only_their_own_enrollments(harness: Harness) -> None:
    h = harness
    ada, bob = h.learner("ada"), h.learner("bob")
    ada_paid = await h.enrolled(ada, h.courses.paid)
    ada_free = await h.enrolled(ada, h.courses.free)
    bob_paid = await h.enrolled(bob, h.courses.paid)

    first_page = (await h.api.get("/enrollments", params={"limit": 1}, headers=ada)).json()
    second_page = (
        await h.api.get("/enrollments", params={"limit": 1, "cursor": first_page["next_cursor"]}, headers=ada)
    ).json()
    active_only = (await h.api.get("/enrollments", params={"status": "active"}, headers=ada)).json()
    bobs = (await h.api.get("/enrollments", headers=bob)).json()

    assert [item["enrollment_id"] for item in first_page["items"] + second_page["items"]] == [
        ada_free["enrollment_id"],
        ada_paid["enrollment_id"],
    ], "newest first, each once"
    assert first_page["next_cursor"]
    assert second_page["next_cursor"] is None
    assert [item["enrollment_id"] for item in active_only["items"]] == [ada_free["enrollment_id"]]
    assert [item["enrollment_id"] for item in bobs["items"]] == [bob_paid["enrollment_id"]]

    ada_url = f"/enrollments/{ada_paid['enrollment_id']}"
    assert (await h.api.get(ada_url, headers=ada)).json() == ada_paid
    bob_reading = await h.api.get(ada_url, headers=bob)
    assert bob_reading.status_code == 404
    assert bob_reading.json()["type"] == "urn:microcred:problem:enrollment-not-found"
    # Someone else's enrollment answers exactly like one that does not exist.
    nowhere = (await h.api.get(f"/enrollments/{uuid.uuid4()}", headers=bob)).json()
    assert {key: nowhere[key] for key in ("type", "title", "status")} == {
        key: bob_reading.json()[key] for key in ("type", "title", "status")
    }
    assert (await h.api.post(f"{ada_url}/cancellation", headers=bob)).status_code == 404
    staff_reading = await h.api.get(ada_url, headers=h.staff())
    assert staff_reading.status_code == 200
    assert staff_reading.json()["enrollment_id"] == ada_paid["enrollment_id"]
    for forged in ("bm90IG91cnM", encode_cursor(["yesterday", ada_paid["enrollment_id"]])):
        bad_cursor = await h.api.get("/enrollments", params={"cursor": forged}, headers=ada)
        assert bad_cursor.status_code == 400, forged
        assert bad_cursor.json()["type"] == "urn:microcred:problem:invalid-cursor"
    assert (await h.api.get(ada_url)).status_code == 401


# --- billing's events ------------------------------------------------------------------------


async def test_a_settled_payment_activates_the_enrollment_once(harness: Harness) -> None:
    h = harness
    ada = h.learner("ada")
    pending = await h.enrolled(ada, h.courses.paid)
    enrollment_id = pending["enrollment_id"]
    payment_id = uuid.uuid4()
    settled = _settled(pending, payment_id)

    first = await h.from_billing(settled)
    assert await h.status_becomes(enrollment_id, "active")
    # The same message redelivered, then billing publishing the settlement again under a new id;
    # both are on the payment's partition, so once the second is consumed, so is the first.
    await h.from_billing(settled, event_id=first)
    assert await h.consumed(await h.from_billing(settled))

    body = (await h.api.get(f"/enrollments/{enrollment_id}", headers=ada)).json()
    assert body["status"] == "active"
    assert body["payment_id"] == str(payment_id)
    assert await h.queued(enrollment_id) == [CREATED, ACTIVATED]
    assert await h.db.fetchval("SELECT count(*) FROM inbox WHERE event_id = $1", first) == 1
    assert await h.db.fetchval("SELECT count(*) FROM unapplied_payments") == 0
    _, activated = await h.published(enrollment_id)
    assert isinstance(activated, EnrollmentActivated)
    assert activated.payment_id == payment_id


async def test_a_learner_holding_a_valid_credential_is_told_before_paying_again(harness: Harness) -> None:
    h = harness
    ada = h.learner("ada")
    first = await h.enrolled(ada, h.courses.paid)
    learner_id = uuid.UUID(first["learner"]["learner_id"])
    issued = CredentialIssued.model_validate(
        {
            **example_data(CredentialIssued),
            "credential_id": str(uuid.uuid4()),
            "learner_id": str(learner_id),
            "enrollment_id": first["enrollment_id"],
            "course_id": str(h.courses.paid),
            "valid_until": None,
        }
    )
    assert await h.consumed(await h.send(issued, "urn:microcred:issuance"))
    await h.api.post(
        f"/enrollments/{first['enrollment_id']}/cancellation", json={}, headers=ada
    )  # the first enrollment out of the way: only the credential stands in the way now

    told = await h.enroll(ada, h.courses.paid)
    again = await h.api.post(
        "/enrollments",
        json={"course_id": str(h.courses.paid), "again": True},
        headers={**ada, "Idempotency-Key": str(uuid.uuid4())},
    )
    revoked = CredentialRevoked(
        credential_id=issued.credential_id,
        learner_id=learner_id,
        status_purpose=StatusPurpose.REVOCATION,
        reason="Awarded by mistake.",
        revoked_at=datetime.now(UTC),
    )
    assert await h.consumed(await h.send(revoked, "urn:microcred:issuance"))
    await h.api.post(f"/enrollments/{again.json()['enrollment_id']}/cancellation", json={}, headers=ada)
    after_revocation = await h.enroll(ada, h.courses.paid)

    assert told.status_code == 409, told.text
    assert told.headers["content-type"] == "application/problem+json"
    assert told.json()["type"] == "urn:microcred:problem:credential-held"
    assert told.json()["credential_id"] == str(issued.credential_id)
    assert again.status_code == 201, again.text
    assert after_revocation.status_code == 201, after_revocation.text


async def test_a_failed_payment_cancels_the_pending_enrollment_a_declined_charge_does_not(
    harness: Harness,
) -> None:
    h = harness
    pending = await h.enrolled(h.learner("ada"), h.courses.paid)
    payment_id, now = uuid.uuid4(), datetime.now(UTC)
    charge = {
        "payment_id": payment_id,
        "enrollment_id": pending["enrollment_id"],
        "learner_id": pending["learner"]["learner_id"],
        "amount": PRICE,
        "provider": "stripe",
        "reason_code": "card_declined",
    }
    declined = PaymentDeclined(
        **charge, reason="The first card was declined.", attempt=1, attempts_left=2, declined_at=now
    )
    failed = PaymentFailed(**charge, reason="The card was declined.", failed_at=now)

    # One partition (keyed by payment): had the decline cancelled, the cancellation would give its reason.
    await h.from_billing(declined)
    await h.from_billing(failed)

    assert await h.status_becomes(pending["enrollment_id"], "cancelled")
    _, cancelled = await h.published(pending["enrollment_id"])
    assert isinstance(cancelled, EnrollmentCancelled)
    assert cancelled.reason is CancellationReason.PAYMENT_FAILED
    assert cancelled.detail == "The card was declined."


async def test_a_refund_cancels_an_active_enrollment_but_not_a_completed_one(harness: Harness) -> None:
    h = harness
    ada_pending = await h.enrolled(h.learner("ada"), h.courses.paid)
    bob_pending = await h.enrolled(h.learner("bob"), h.courses.paid)
    ada_payment, bob_payment = uuid.uuid4(), uuid.uuid4()
    await h.from_billing(_settled(ada_pending, ada_payment))
    await h.from_billing(_settled(bob_pending, bob_payment))
    assert await h.status_becomes(ada_pending["enrollment_id"], "active")
    assert await h.status_becomes(bob_pending["enrollment_id"], "active")
    completion = await h.api.post(
        f"/enrollments/{bob_pending['enrollment_id']}/completion", headers=h.staff()
    )
    assert completion.status_code == 201, completion.text

    await h.from_billing(_refund(ada_pending, ada_payment))
    assert await h.consumed(await h.from_billing(_refund(bob_pending, bob_payment)))

    assert await h.status_becomes(ada_pending["enrollment_id"], "cancelled")
    *_, cancelled = await h.published(ada_pending["enrollment_id"])
    assert isinstance(cancelled, EnrollmentCancelled)
    assert cancelled.reason is CancellationReason.REFUNDED
    assert await h.status_of(bob_pending["enrollment_id"]) == "completed"
    assert await h.queued(bob_pending["enrollment_id"]) == [CREATED, ACTIVATED, COMPLETED]


async def test_a_settlement_that_can_activate_nothing_is_recorded_for_reconciliation(
    harness: Harness,
) -> None:
    h = harness
    ada = h.learner("ada")
    pending = await h.enrolled(ada, h.courses.paid)
    cancelled = await h.api.post(f"/enrollments/{pending['enrollment_id']}/cancellation", headers=ada)
    assert cancelled.status_code == 200
    late = _settled(pending)
    unknown = _settled({**pending, "enrollment_id": str(uuid.uuid4())})

    assert await h.consumed(await h.from_billing(late))
    assert await h.consumed(await h.from_billing(unknown))

    rows = await h.db.fetch("SELECT payment_id, reason, amount_minor FROM unapplied_payments")
    assert {(row["payment_id"], row["reason"], row["amount_minor"]) for row in rows} == {
        (late.payment_id, "already_cancelled", PRICE.amount_minor),
        (unknown.payment_id, "enrollment_unknown", PRICE.amount_minor),
    }
    assert await h.status_of(pending["enrollment_id"]) == "cancelled"
    assert await h.queued(pending["enrollment_id"]) == [CREATED, CANCELLED]


# --- completion and cancellation -------------------------------------------------------------


async def test_staff_record_a_completion_once(harness: Harness) -> None:
    h = harness
    ada, staff = h.learner("ada"), h.staff()
    active = await h.enrolled(ada, h.courses.free)
    pending = await h.enrolled(ada, h.courses.paid)
    url = f"/enrollments/{active['enrollment_id']}/completion"
    attestation = {"score": 87.5, "evidence_url": "https://northwind.example.edu/portfolio/ada"}

    by_learner = await h.api.post(url, json=attestation, headers=ada)
    first = await h.api.post(url, json=attestation, headers=staff)
    second = await h.api.post(url, json={"score": 10}, headers=staff)
    of_pending = await h.api.post(f"/enrollments/{pending['enrollment_id']}/completion", headers=staff)
    of_nothing = await h.api.post(f"/enrollments/{uuid.uuid4()}/completion", headers=staff)
    cancel_completed = await h.api.post(f"/enrollments/{active['enrollment_id']}/cancellation", headers=ada)

    assert by_learner.status_code == 403
    assert first.status_code == 201, first.text
    assert first.json()["score"] == 87.5
    assert first.json()["completed_by"] == "staff"
    assert (second.status_code, second.json()) == (200, first.json())
    assert of_pending.status_code == 409
    assert of_pending.json()["enrollment_status"] == "pending_payment"
    assert of_nothing.status_code == 404
    assert cancel_completed.status_code == 409
    assert (await h.api.get(f"/enrollments/{active['enrollment_id']}", headers=ada)).json()["status"] == (
        "completed"
    )
    assert await h.queued(active["enrollment_id"]) == [CREATED, ACTIVATED, COMPLETED]
    *_, completed = await h.published(active["enrollment_id"])
    assert isinstance(completed, CourseCompleted)
    assert completed.learner == Learner.model_validate(active["learner"])
    assert (completed.course_id, completed.course_version) == (h.courses.free, 1)
    assert completed.completed_by is CompletedBy.STAFF
    assert completed.score == 87.5
    assert str(completed.evidence_url) == attestation["evidence_url"]


async def test_a_learner_cancels_their_enrollment(harness: Harness) -> None:
    h = harness
    ada = h.learner("ada")
    pending = await h.enrolled(ada, h.courses.paid)
    url = f"/enrollments/{pending['enrollment_id']}/cancellation"

    first = await h.api.post(url, json={"detail": "Schedule conflict."}, headers=ada)
    second = await h.api.post(url, headers=ada)
    again = await h.enroll(ada, h.courses.paid)

    assert first.status_code == 200, first.text
    assert first.json()["status"] == "cancelled"
    assert first.json()["cancellation_reason"] == "learner_request"
    assert (second.status_code, second.json()) == (200, first.json())
    assert again.status_code == 201, "a cancelled enrollment no longer blocks a new one"
    assert await h.queued(pending["enrollment_id"]) == [CREATED, CANCELLED]
    _, cancelled = await h.published(pending["enrollment_id"])
    assert isinstance(cancelled, EnrollmentCancelled)
    assert cancelled.reason is CancellationReason.LEARNER_REQUEST
    assert cancelled.detail == "Schedule conflict."


# --- catalog's events ------------------------------------------------------------------------


async def test_retiring_a_course_cancels_the_enrollments_still_waiting_for_payment(harness: Harness) -> None:
    h = harness
    waiting = await h.enrolled(h.learner("ada"), h.courses.paid)
    paid = await h.enrolled(h.learner("bob"), h.courses.paid)
    await h.from_billing(_settled(paid))
    assert await h.status_becomes(paid["enrollment_id"], "active")

    retired = CourseRetired(course_id=h.courses.paid, version=2, retired_at=datetime.now(UTC))
    assert await h.consumed(await h.send(retired, "urn:microcred:catalog"))

    assert await h.status_becomes(waiting["enrollment_id"], "cancelled")
    _, cancelled = await h.published(waiting["enrollment_id"])
    assert isinstance(cancelled, EnrollmentCancelled)
    assert cancelled.reason is CancellationReason.COURSE_RETIRED
    assert await h.status_of(paid["enrollment_id"]) == "active"
    late = await h.enroll(h.learner("cy"), h.courses.paid)
    assert late.status_code == 409
    assert late.json()["type"] == "urn:microcred:problem:course-not-open"
