"""Partner institutions end to end: the registry, signed reports by Kafka and by HTTP, refusals.

Each test registers two partners through the admin API (Northwind, signing with an HMAC secret
and an Ed25519 key, and Contoso), seeds enrollment's course read model the way catalog does
(courses Northwind delivers, one it is granted in the registry, one Contoso delivers), enrolls
learners through the API, and then plays the partner: a plain Kafka client publishing
CloudEvents with a hand-made signature, or plain HTTP requests signed Standard-Webhooks style.
The signatures are computed here from the documented recipe, not with enrollment's own code.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import enrollment.main
import enrollment.settings
from microcred_events import (
    CompletedBy,
    CompletionReported,
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    Event,
    Money,
    Topic,
    decode,
    encode,
    example_data,
)
from microcred_events.partner import CompletionRejected

FREE = Money(amount_minor=0, currency="EUR")
PRICE = Money(amount_minor=4900, currency="EUR")
COMPLETED = CourseCompleted.TYPE
DEAD_LETTERS = "enrollment-partners.dlq"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "partner_publish.py"


@dataclass(frozen=True)
class Partner:
    """A registered partner as the test knows it: what the admin API answered, and its keys."""

    partner_id: str
    secret: str
    rejection_topic: str
    private_key: Ed25519PrivateKey | None = None

    @property
    def source(self) -> str:
        return f"urn:microcred:partner:{self.partner_id}"


@dataclass(frozen=True)
class Courses:
    delivered: uuid.UUID  # free, Northwind delivers it (catalog)
    granted: uuid.UUID  # free, granted to Northwind in the registry
    paid: uuid.UUID  # paid, Northwind delivers it
    foreign: uuid.UUID  # free, Contoso delivers it


def sign(secret: str, message_id: str, at: str, body: bytes) -> str:
    """The documented recipe: `v1,` + base64 HMAC-SHA256 of `<id>.<time>.<body>`, keyed with the secret."""
    digest = hmac.new(secret.encode(), f"{message_id}.{at}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_ed25519(key: Ed25519PrivateKey, message_id: str, at: str, body: bytes) -> str:
    return "v1a," + base64.b64encode(key.sign(f"{message_id}.{at}.".encode() + body)).decode()


@dataclass(frozen=True)
class Harness:
    api: httpx.AsyncClient
    db: asyncpg.Connection
    producer: AIOKafkaProducer
    prefix: str
    northwind: Partner
    contoso: Partner
    courses: Courses
    bearer: Callable[..., dict[str, str]]
    topic_reader: Callable[..., Any]
    wait_for: Callable[..., Any]
    kafka_bootstrap: str

    def admin(self) -> dict[str, str]:
        return self.bearer("admin-1", "admin", email="admin@example.org")

    def staff(self) -> dict[str, str]:
        return self.bearer("staff-1", "staff", email="staff@example.org")

    def learner(self, name: str) -> dict[str, str]:
        return self.bearer(f"learner-{name}", email=f"{name}@example.org", name=name.title())

    async def enrolled(self, name: str, course_id: uuid.UUID) -> dict[str, Any]:
        response = await self.api.post(
            "/enrollments",
            json={"course_id": str(course_id)},
            headers={**self.learner(name), "Idempotency-Key": str(uuid.uuid4())},
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def report(self, partner: Partner, enrollment: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """A completion report for the enrollment's learner and course, as JSON."""
        return {
            "report_id": str(uuid.uuid4()),
            "partner_id": partner.partner_id,
            "course_id": enrollment["course_id"],
            "learner_id": enrollment["learner"]["learner_id"],
            "completed_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "score": 91.5,
            "evidence_url": "https://northwind.example.edu/portfolio/final-project",
            **changes,
        }

    async def publish_report(
        self,
        partner: Partner,
        report: dict[str, Any] | None = None,
        *,
        body: bytes | None = None,
        source: str | None = None,
        signature: str | None = None,
        message_id: str | None = None,
        ed25519: bool = False,
    ) -> str:
        """Publish to the partner topic with a plain client, signed as documented; returns the ce_id."""
        value = body if body is not None else json.dumps(report).encode()
        message_id = message_id or str(uuid.uuid4())
        at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        if signature is None:
            if ed25519:
                assert partner.private_key is not None
                signature = sign_ed25519(partner.private_key, message_id, at, value)
            else:
                signature = sign(partner.secret, message_id, at, value)
        key = (report or {}).get("report_id", message_id)
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", message_id.encode()),
            ("ce_type", CompletionReported.TYPE.encode()),
            ("ce_source", (source or partner.source).encode()),
            ("ce_time", at.encode()),
            ("ce_subject", key.encode()),
            ("content-type", b"application/json"),
            ("ce_signature", signature.encode()),
        ]
        await self.producer.send_and_wait(
            self.prefix + Topic.PARTNER_COMPLETION, value, key=key.encode(), headers=headers
        )
        return message_id

    async def post_reports(
        self,
        partner_id: str,
        payload: Any,
        *,
        secret: str,
        body: bytes | None = None,
        webhook_id: str | None = None,
        timestamp: int | None = None,
        signed_body: bytes | None = None,
    ) -> httpx.Response:
        """POST to the completions endpoint, signed Standard-Webhooks style (of `signed_body` if given)."""
        raw = body if body is not None else json.dumps(payload).encode()
        webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
        stamp = str(timestamp if timestamp is not None else int(time.time()))
        headers = {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": stamp,
            "webhook-signature": sign(
                secret, webhook_id, stamp, signed_body if signed_body is not None else raw
            ),
        }
        return await self.api.post(f"/partners/{partner_id}/completions", content=raw, headers=headers)

    async def consumed(self, message_id: str) -> bool:
        """Whether enrollment took the partner message (it recorded it in its inbox)."""
        return bool(
            await self.wait_for(
                lambda: self.db.fetchval(
                    "SELECT count(*) > 0 FROM inbox WHERE consumer = 'enrollment-partners' AND event_id = $1",
                    message_id,
                )
            )
        )

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

    async def completions_queued(self, enrollment_id: str | None = None) -> int:
        """CourseCompleted events committed (for one enrollment, or all)."""
        count: int = await self.db.fetchval(
            "SELECT count(*) FROM outbox WHERE event_type = $1 AND ($2::bytea IS NULL OR message_key = $2)",
            COMPLETED,
            enrollment_id.encode() if enrollment_id else None,
        )
        return count

    async def completed_events(self, enrollment_id: str) -> list[Event]:
        """The CourseCompleted events that reached the enrollment topic for the enrollment."""
        records = await self.topic_reader(
            self.prefix + Topic.ENROLLMENT, await self._queued_on_enrollment_topic()
        )
        envelopes = [decode(record.headers, record.value) for record in records]
        return [
            envelope.event
            for envelope in envelopes
            if envelope.subject == enrollment_id and envelope.type == COMPLETED
        ]

    async def _queued_on_enrollment_topic(self) -> int:
        count: int = await self.db.fetchval(
            "SELECT count(*) FROM outbox WHERE topic = $1", str(Topic.ENROLLMENT)
        )
        return count

    async def rejections_queued(self) -> int:
        count: int = await self.db.fetchval(
            "SELECT count(*) FROM outbox WHERE event_type = $1", CompletionRejected.TYPE
        )
        return count

    async def topic_exists(self, topic: str) -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.kafka_bootstrap)
        await admin.start()
        try:
            return topic in await admin.list_topics()
        finally:
            await admin.close()

    async def rejections(self, partner: Partner, count: int) -> dict[str, CompletionRejected]:
        """The rejections on the partner's own topic, by the id of the refused message."""
        records: list[ConsumerRecord[bytes, bytes]] = await self.topic_reader(partner.rejection_topic, count)
        rejections: dict[str, CompletionRejected] = {}
        for record in records:
            headers = dict(record.headers)
            assert headers["ce_type"] == CompletionRejected.TYPE.encode()
            assert headers["ce_source"] == b"urn:microcred:enrollment"
            assert record.value is not None
            rejected = CompletionRejected.model_validate_json(record.value)
            assert record.key == rejected.message_id.encode()
            rejections[rejected.message_id] = rejected
        return rejections

    async def dead_letters(self, count: int) -> dict[str, dict[str, bytes]]:
        """Dead-lettered partner messages' headers, by ce_id (or by offset when there is none)."""
        records: list[ConsumerRecord[bytes, bytes]] = await self.topic_reader(
            self.prefix + DEAD_LETTERS, count
        )
        letters: dict[str, dict[str, bytes]] = {}
        for record in records:
            headers = dict(record.headers)
            letters[(headers.get("ce_id") or headers["dlq_offset"]).decode()] = headers
        return letters


def _published(course_id: uuid.UUID, price: Money, delivered_by: str | None) -> CoursePublished:
    snapshot = {
        **example_data(CourseSnapshot),
        "course_id": str(course_id),
        "version": 1,
        "price": price.model_dump(),
        "delivery_partner_id": delivered_by,
    }
    return CoursePublished(course=CourseSnapshot.model_validate(snapshot), published_at=datetime.now(UTC))


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
    infrastructure: Any,
) -> AsyncIterator[Harness]:
    database = await new_database()
    app = enrollment.main.create_app(make_settings(enrollment.settings.Settings, database))
    courses = Courses(*(uuid.uuid4() for _ in range(4)))
    key = Ed25519PrivateKey.generate()
    public = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    db = await asyncpg.connect(database)
    try:
        async with serve(app) as api:
            admin = bearer("admin-1", "admin", email="admin@example.org")
            credentials = [{"kind": "hmac_sha256"}, {"kind": "ed25519", "public_key": public}]
            northwind = await _register(
                api, admin, "Northwind University", [courses.granted], credentials, key
            )
            contoso = await _register(api, admin, "Contoso College", [], [{"kind": "hmac_sha256"}], None)
            for course_id, price, delivered_by in (
                (courses.delivered, FREE, northwind.partner_id),
                (courses.granted, FREE, None),
                (courses.paid, PRICE, northwind.partner_id),
                (courses.foreign, FREE, contoso.partner_id),
            ):
                record = encode(_published(course_id, price, delivered_by), source="urn:microcred:catalog")
                await producer.send_and_wait(
                    topic_prefix + record.topic, record.value, key=record.key, headers=record.headers
                )
            seeded = await wait_for(
                lambda: db.fetchval(
                    "SELECT count(*) = 4 FROM courses WHERE course_id = ANY($1)", list(vars(courses).values())
                )
            )
            assert seeded, "the course read model was not seeded"
            yield Harness(
                api,
                db,
                producer,
                topic_prefix,
                northwind,
                contoso,
                courses,
                bearer,
                topic_reader,
                wait_for,
                infrastructure.kafka_bootstrap,
            )
    finally:
        await db.close()


async def _register(
    api: httpx.AsyncClient,
    admin: dict[str, str],
    name: str,
    course_ids: list[uuid.UUID],
    credentials: list[dict[str, str]],
    key: Ed25519PrivateKey | None,
) -> Partner:
    response = await api.post(
        "/partners",
        json={"display_name": name, "course_ids": [str(c) for c in course_ids], "credentials": credentials},
        headers=admin,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    (issued,) = body["secrets"]
    return Partner(body["partner_id"], issued["secret"], body["rejection_topic"], key)


# --- the registry ----------------------------------------------------------------------------


async def test_admins_manage_partners_and_staff_read_them_without_secrets(harness: Harness) -> None:
    h = harness
    admin, staff = h.admin(), h.staff()
    created = await h.api.post("/partners", json={"display_name": "  Fabrikam Institute "}, headers=admin)
    assert created.status_code == 201, created.text
    partner = created.json()
    partner_id = partner["partner_id"]
    (secret,) = partner["secrets"]
    assert partner["display_name"] == "Fabrikam Institute"
    assert partner["status"] == "active"
    assert partner["kafka_source"] == f"urn:microcred:partner:{partner_id}"
    assert partner["rejection_topic"] == f"{h.prefix}partner.{partner_id}.rejections.v1"
    assert [c["kind"] for c in partner["credentials"]] == ["hmac_sha256"]
    assert len(secret["secret"]) == 43

    by_learner = await h.api.post("/partners", json={"display_name": "X"}, headers=h.learner("ada"))
    by_staff = await h.api.post("/partners", json={"display_name": "X"}, headers=staff)
    bad_key = await h.api.post(
        "/partners",
        json={"display_name": "X", "credentials": [{"kind": "ed25519", "public_key": "bm90IGEga2V5"}]},
        headers=admin,
    )
    listed = await h.api.get("/partners", params={"limit": 2}, headers=staff)
    second_page = await h.api.get(
        "/partners", params={"limit": 2, "cursor": listed.json()["next_cursor"]}, headers=staff
    )
    one = await h.api.get(f"/partners/{partner_id}", headers=staff)
    learner_reading = await h.api.get(f"/partners/{partner_id}", headers=h.learner("ada"))
    missing = await h.api.get(f"/partners/{uuid.uuid4()}", headers=staff)

    assert (by_learner.status_code, by_staff.status_code) == (403, 403)
    assert bad_key.status_code == 422
    assert [p["display_name"] for p in listed.json()["items"] + second_page.json()["items"]] == [
        "Fabrikam Institute",
        "Contoso College",
        "Northwind University",
    ], "newest first"
    assert one.status_code == 200
    assert (learner_reading.status_code, missing.status_code) == (403, 404)
    assert missing.json()["type"] == "urn:microcred:problem:partner-not-found"
    for response in (listed, second_page, one):
        assert secret["secret"] not in response.text
        assert h.northwind.secret not in response.text
        assert h.contoso.secret not in response.text
    northwind = next(p for p in second_page.json()["items"] if p["partner_id"] == h.northwind.partner_id)
    assert sorted(c["kind"] for c in northwind["credentials"]) == ["ed25519", "hmac_sha256"]
    assert northwind["course_ids"] == [str(h.courses.granted)]
    assert await h.topic_exists(partner["rejection_topic"]), "created with the partner"

    course = str(uuid.uuid4())
    renamed = await h.api.patch(
        f"/partners/{partner_id}", json={"display_name": "Fabrikam", "course_ids": [course]}, headers=admin
    )
    empty_patch = await h.api.patch(f"/partners/{partner_id}", json={}, headers=admin)
    suspended = await h.api.post(
        f"/partners/{partner_id}/suspension", json={"reason": "audit"}, headers=admin
    )
    again = await h.api.post(f"/partners/{partner_id}/suspension", headers=admin)
    reactivated = await h.api.post(f"/partners/{partner_id}/reactivation", headers=admin)
    by_staff_suspension = await h.api.post(f"/partners/{partner_id}/suspension", headers=staff)

    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["display_name"], renamed.json()["course_ids"]) == ("Fabrikam", [course])
    assert empty_patch.status_code == 422
    assert suspended.json()["status"] == "suspended"
    assert suspended.json()["suspension_reason"] == "audit"
    assert again.json()["suspended_at"] == suspended.json()["suspended_at"], (
        "suspending twice changes nothing"
    )
    assert reactivated.json()["status"] == "active"
    assert reactivated.json()["suspended_at"] is None
    assert by_staff_suspension.status_code == 403


async def test_credentials_rotate_and_a_revoked_one_signs_nothing(harness: Harness) -> None:
    h = harness
    admin, partner = h.admin(), h.northwind
    ada = await h.enrolled("ada", h.courses.delivered)
    bob = await h.enrolled("bob", h.courses.delivered)
    first_credential = next(
        c
        for c in (await h.api.get(f"/partners/{partner.partner_id}", headers=h.staff())).json()["credentials"]
        if c["kind"] == "hmac_sha256"
    )

    added = await h.api.post(
        f"/partners/{partner.partner_id}/credentials", json={"kind": "hmac_sha256"}, headers=admin
    )
    assert added.status_code == 201, added.text
    new_secret = added.json()["secret"]
    revoked = await h.api.delete(
        f"/partners/{partner.partner_id}/credentials/{first_credential['credential_id']}", headers=admin
    )
    revoked_again = await h.api.delete(
        f"/partners/{partner.partner_id}/credentials/{first_credential['credential_id']}", headers=admin
    )
    unknown = await h.api.delete(f"/partners/{partner.partner_id}/credentials/{uuid.uuid4()}", headers=admin)
    with_old = await h.post_reports(partner.partner_id, h.report(partner, ada), secret=partner.secret)
    with_new = await h.post_reports(partner.partner_id, h.report(partner, bob), secret=new_secret)
    shown = (await h.api.get(f"/partners/{partner.partner_id}", headers=h.staff())).text

    assert revoked.status_code == 200
    assert revoked.json()["active"] is False
    assert revoked_again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert unknown.status_code == 404
    assert with_old.status_code == 401
    assert with_old.json()["type"] == "urn:microcred:problem:bad-signature"
    assert with_new.status_code == 200, with_new.text
    assert with_new.json()["results"][0]["status"] == "accepted"
    assert new_secret not in shown
    assert await h.status_of(ada["enrollment_id"]) == "active"
    assert await h.status_of(bob["enrollment_id"]) == "completed"


# --- by Kafka --------------------------------------------------------------------------------


async def test_a_signed_report_on_the_partner_topic_completes_the_enrollment_once(harness: Harness) -> None:
    h = harness
    partner = h.northwind
    ada = await h.enrolled("ada", h.courses.delivered)
    report = h.report(partner, ada)

    first = await h.publish_report(partner, report)
    assert await h.status_becomes(ada["enrollment_id"], "completed")
    # The same message redelivered, then the same report sent again as a new message; both go to
    # the report's partition, so once the last is taken, so are the others.
    await h.publish_report(partner, report, message_id=first)
    assert await h.consumed(await h.publish_report(partner, report))

    assert await h.completions_queued(ada["enrollment_id"]) == 1
    (completed,) = await h.completed_events(ada["enrollment_id"])
    assert isinstance(completed, CourseCompleted)
    assert completed.completed_by is CompletedBy.PARTNER
    assert str(completed.partner_id) == partner.partner_id
    assert str(completed.partner_report_id) == report["report_id"]
    assert completed.completed_at == datetime.fromisoformat(report["completed_at"])
    assert completed.score == 91.5
    assert str(completed.evidence_url) == report["evidence_url"]
    assert str(completed.learner.learner_id) == ada["learner"]["learner_id"]
    assert await h.rejections_queued() == 0, "a duplicate is not a refusal"


async def test_a_burst_of_reports_is_applied_together_each_once_and_a_forged_one_alone_is_dead_lettered(
    harness: Harness,
) -> None:
    h = harness
    partner = h.northwind
    ada, bob, cy_pending, dee = [
        await h.enrolled(name, course)
        for name, course in (
            ("ada", h.courses.delivered),
            ("bob", h.courses.granted),
            ("cy", h.courses.paid),
            ("dee", h.courses.delivered),
        )
    ]
    ada_report = h.report(partner, ada)
    bob_report = h.report(partner, bob, learner_id=None, learner_email="BOB@example.org")

    # Published back to back, so that the consumer takes them in few polls: a report and the same
    # report again under a new message id (on its partition, after it), a forged message before a
    # good one on the same partition, and a refusal among them.
    sent = [
        await h.publish_report(partner, ada_report),
        await h.publish_report(partner, ada_report),
        forged := await h.publish_report(partner, bob_report, signature=sign("not ours", "x", "y", b"z")),
        await h.publish_report(partner, bob_report, ed25519=True),
        refused := await h.publish_report(partner, h.report(partner, cy_pending)),
        await h.publish_report(partner, h.report(partner, dee)),
    ]
    for message_id in sent:
        if message_id != forged:
            assert await h.consumed(message_id)

    for learner in (ada, bob, dee):
        assert await h.status_of(learner["enrollment_id"]) == "completed"
        assert await h.completions_queued(learner["enrollment_id"]) == 1
    assert await h.status_of(cy_pending["enrollment_id"]) == "pending_payment"
    (rejection,) = (await h.rejections(partner, 1)).values()
    assert (rejection.message_id, rejection.reason.value) == (refused, "no_active_enrollment")
    assert await h.rejections_queued() == 1
    letters = await h.dead_letters(1)
    assert letters[forged]["dlq_reason"] == b"bad_signature"


async def test_a_report_signed_with_ed25519_for_a_granted_course_by_email(harness: Harness) -> None:
    h = harness
    partner = h.northwind
    bob = await h.enrolled("bob", h.courses.granted)
    report = h.report(partner, bob, learner_id=None, learner_email="BOB@example.org")

    assert await h.consumed(await h.publish_report(partner, report, ed25519=True))

    assert await h.status_of(bob["enrollment_id"]) == "completed"
    assert await h.completions_queued(bob["enrollment_id"]) == 1


async def test_refused_reports_are_told_on_the_partners_rejection_topic(harness: Harness) -> None:
    h = harness
    northwind, contoso = h.northwind, h.contoso
    ada = await h.enrolled("ada", h.courses.delivered)
    ada_foreign = await h.enrolled("ada", h.courses.foreign)
    cy_pending = await h.enrolled("cy", h.courses.paid)
    dee = await h.enrolled("dee", h.courses.delivered)
    malformed_id = str(uuid.uuid4())

    # Whoever may write to the partner topic can claim to be Northwind: what Northwind did not sign
    # is not told on its topic but dead-lettered, with the reason.
    unverified = {
        "bad_signature": await h.publish_report(
            northwind, h.report(northwind, ada), signature=sign("not our secret", "x", "y", b"z")
        ),
        "unsigned": await h.publish_report(northwind, h.report(northwind, ada), signature=""),
        # Northwind speaking as Contoso (its ce_source) cannot sign as Contoso.
        "impostor": await h.publish_report(northwind, h.report(contoso, ada_foreign), source=contoso.source),
    }
    sent = {
        "course_not_allowed": await h.publish_report(northwind, h.report(northwind, ada_foreign)),
        "no_active_enrollment": await h.publish_report(northwind, h.report(northwind, cy_pending)),
        "malformed_report": await h.publish_report(
            northwind,
            body=json.dumps({"report_id": malformed_id, "partner_id": northwind.partner_id}).encode(),
        ),
        # Northwind, signing as itself, claims the report is Contoso's.
        "partner_mismatch": await h.publish_report(
            northwind, h.report(northwind, ada, partner_id=contoso.partner_id)
        ),
        "learner_mismatch": await h.publish_report(
            northwind, h.report(northwind, ada, learner_email="dee@example.org")
        ),
    }

    told = await h.rejections(northwind, len(sent))
    letters = await h.dead_letters(len(unverified))

    assert {message_id: rejection.reason.value for message_id, rejection in told.items()} == {
        message_id: case for case, message_id in sent.items()
    }
    assert told[sent["malformed_report"]].report_id == uuid.UUID(malformed_id)
    assert "course_id" in told[sent["malformed_report"]].detail
    assert all(str(rejection.partner_id) == northwind.partner_id for rejection in told.values())
    assert {letters[message_id]["dlq_reason"] for message_id in unverified.values()} == {b"bad_signature"}
    assert b"not signed" in letters[unverified["unsigned"]]["dlq_detail"]
    assert contoso.partner_id.encode() in letters[unverified["impostor"]]["dlq_detail"]
    assert await h.rejections_queued() == len(sent), "nothing was queued for Contoso or the unverified"
    for untouched in (ada, ada_foreign, dee):
        assert await h.status_of(untouched["enrollment_id"]) == "active"
    assert await h.status_of(cy_pending["enrollment_id"]) == "pending_payment"
    assert await h.completions_queued() == 0


async def test_a_suspended_partner_is_refused_until_reactivated(harness: Harness) -> None:
    h = harness
    partner = h.northwind
    ada = await h.enrolled("ada", h.courses.delivered)
    report = h.report(partner, ada)
    suspended = await h.api.post(f"/partners/{partner.partner_id}/suspension", headers=h.admin())
    assert suspended.status_code == 200

    refused = await h.publish_report(partner, report)
    (rejection,) = (await h.rejections(partner, 1)).values()
    assert rejection.message_id == refused
    assert rejection.reason.value == "partner_suspended"
    assert await h.status_of(ada["enrollment_id"]) == "active"

    await h.api.post(f"/partners/{partner.partner_id}/reactivation", headers=h.admin())
    await h.publish_report(partner, report)
    assert await h.status_becomes(ada["enrollment_id"], "completed"), "a refused report may be sent again"


async def test_what_names_no_partner_is_dead_lettered_and_the_partition_moves_on(harness: Harness) -> None:
    h = harness
    partner = h.northwind
    ada = await h.enrolled("ada", h.courses.delivered)
    report = h.report(partner, ada)
    stranger = Partner(str(uuid.uuid4()), "a secret nobody registered", "nowhere")

    unknown = await h.publish_report(stranger, report)
    not_a_partner = await h.publish_report(partner, report, source="urn:microcred:billing")
    # No CloudEvents headers at all, on the report's partition.
    await h.producer.send_and_wait(
        h.prefix + Topic.PARTNER_COMPLETION, b"\xff\xfe garbage", key=report["report_id"].encode()
    )
    good = await h.publish_report(partner, report)

    assert await h.consumed(good)
    assert await h.status_of(ada["enrollment_id"]) == "completed"
    letters = await h.dead_letters(3)
    assert letters[unknown]["dlq_reason"] == b"unknown_partner"
    assert b"not registered" in letters[unknown]["dlq_detail"]
    assert letters[not_a_partner]["dlq_reason"] == b"unknown_partner"
    (garbage,) = (headers for key, headers in letters.items() if key not in (unknown, not_a_partner))
    assert garbage["dlq_reason"] == b"missing_header"
    assert await h.completions_queued() == 1


async def test_the_documented_example_publishes_a_signed_report(harness: Harness) -> None:
    h = harness
    partner = h.northwind
    ada = await h.enrolled("ada", h.courses.delivered)
    cy_pending = await h.enrolled("cy", h.courses.paid)

    async def example(*arguments: str) -> tuple[int | None, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            "--bootstrap",
            h.kafka_bootstrap,
            "--topic-prefix",
            h.prefix,
            "--partner-id",
            partner.partner_id,
            *arguments,
            env={**os.environ, "PARTNER_SECRET": partner.secret},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        return process.returncode, output.decode()

    accepted = await example(
        "--course-id",
        str(h.courses.delivered),
        "--learner-email",
        "ada@example.org",
        "--score",
        "88",
        "--wait",
        "0",
    )
    refused = await example(
        "--course-id",
        str(h.courses.paid),
        "--learner-id",
        cy_pending["learner"]["learner_id"],
        "--wait",
        "30",
    )

    assert accepted[0] == 0, accepted[1]
    assert await h.status_becomes(ada["enrollment_id"], "completed")
    assert refused[0] == 1, refused[1]
    assert "refused: no_active_enrollment" in refused[1]
    assert await h.status_of(cy_pending["enrollment_id"]) == "pending_payment"


# --- by HTTP ---------------------------------------------------------------------------------


async def test_a_signed_batch_is_answered_report_by_report(harness: Harness) -> None:
    h = harness
    partner = h.northwind
    ada = await h.enrolled("ada", h.courses.delivered)
    bob = await h.enrolled("bob", h.courses.granted)
    cy_pending = await h.enrolled("cy", h.courses.paid)
    first = h.report(partner, ada)
    earlier = await h.post_reports(partner.partner_id, first, secret=partner.secret)
    assert earlier.status_code == 200, earlier.text
    assert earlier.json()["results"][0]["status"] == "accepted"
    malformed_id = str(uuid.uuid4())
    batch = [
        h.report(partner, bob),
        first,
        h.report(partner, cy_pending),
        {"report_id": malformed_id, "course_id": "not a uuid"},
        h.report(partner, bob, partner_id=h.contoso.partner_id),
    ]

    response = await h.post_reports(partner.partner_id, batch, secret=partner.secret)

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["index"], r["status"], r["reason"]) for r in results] == [
        (0, "accepted", None),
        (1, "duplicate", None),
        (2, "refused", "no_active_enrollment"),
        (3, "refused", "malformed_report"),
        (4, "refused", "partner_mismatch"),
    ]
    assert [r["report_id"] for r in results] == [
        batch[0]["report_id"],
        first["report_id"],
        batch[2]["report_id"],
        malformed_id,
        batch[4]["report_id"],
    ]
    assert results[0]["enrollment_id"] == bob["enrollment_id"]
    assert results[1]["enrollment_id"] == ada["enrollment_id"]
    assert "waiting for payment" in results[2]["detail"]
    assert await h.completions_queued(ada["enrollment_id"]) == 1
    assert await h.completions_queued(bob["enrollment_id"]) == 1
    assert await h.status_of(cy_pending["enrollment_id"]) == "pending_payment"
    assert await h.completions_queued() == 2
    # The same report by Kafka afterwards is the same report: nothing more happens.
    assert await h.consumed(await h.publish_report(partner, first))
    assert await h.completions_queued() == 2
    (completed,) = await h.completed_events(bob["enrollment_id"])
    assert isinstance(completed, CourseCompleted)
    assert str(completed.partner_report_id) == batch[0]["report_id"]


async def test_http_requests_that_are_not_properly_signed_are_refused(harness: Harness) -> None:
    h = harness
    partner = h.northwind
    ada = await h.enrolled("ada", h.courses.delivered)
    report = h.report(partner, ada)
    body = json.dumps(report).encode()
    post = h.post_reports

    tampered = await post(partner.partner_id, None, secret=partner.secret, body=body, signed_body=b"{}")
    wrong_secret = await post(partner.partner_id, report, secret=h.contoso.secret)
    stale = await post(partner.partner_id, report, secret=partner.secret, timestamp=int(time.time()) - 360)
    ahead = await post(partner.partner_id, report, secret=partner.secret, timestamp=int(time.time()) + 360)
    far_ahead = await post(partner.partner_id, report, secret=partner.secret, timestamp=999_999_999_999)
    as_other = await post(h.contoso.partner_id, report, secret=partner.secret)
    unknown = await post(str(uuid.uuid4()), report, secret=partner.secret)
    unsigned = await h.api.post(f"/partners/{partner.partner_id}/completions", content=body)
    by_bearer = await h.api.post(
        f"/partners/{partner.partner_id}/completions", content=body, headers=h.admin()
    )

    for response, status, kind in (
        (tampered, 401, "bad-signature"),
        (wrong_secret, 401, "bad-signature"),
        (stale, 401, "stale-timestamp"),
        (ahead, 401, "stale-timestamp"),
        (far_ahead, 401, "stale-timestamp"),
        (as_other, 401, "bad-signature"),
        (unknown, 404, "unknown-partner"),
        (unsigned, 401, "bad-signature"),
        (by_bearer, 401, "bad-signature"),
    ):
        assert response.status_code == status, (kind, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == f"urn:microcred:problem:{kind}"
    assert await h.status_of(ada["enrollment_id"]) == "active"

    taken = await post(partner.partner_id, report, secret=partner.secret, webhook_id="msg_once")
    replayed = await post(partner.partner_id, report, secret=partner.secret, webhook_id="msg_once")

    assert taken.status_code == 200, taken.text
    assert replayed.status_code == 409
    assert replayed.json()["type"] == "urn:microcred:problem:replayed-request"
    assert await h.completions_queued() == 1


async def test_http_batches_are_bounded(harness: Harness) -> None:
    h = harness
    partner = h.northwind
    ada = await h.enrolled("ada", h.courses.delivered)
    report = h.report(partner, ada)
    post = h.post_reports

    too_many = await post(partner.partner_id, [report] * 1001, secret=partner.secret)
    too_big = await post(partner.partner_id, None, secret=partner.secret, body=b" " * (2 * 1024 * 1024 + 1))
    empty = await post(partner.partner_id, [], secret=partner.secret)
    not_json = await post(partner.partner_id, None, secret=partner.secret, body=b"{not json")
    suspended = await h.api.post(f"/partners/{partner.partner_id}/suspension", headers=h.admin())
    while_suspended = await post(partner.partner_id, report, secret=partner.secret)

    assert (too_many.status_code, too_many.json()["type"]) == (413, "urn:microcred:problem:batch-too-large")
    assert (too_big.status_code, too_big.json()["type"]) == (413, "urn:microcred:problem:body-too-large")
    assert (empty.status_code, empty.json()["type"]) == (422, "urn:microcred:problem:no-reports")
    assert (not_json.status_code, not_json.json()["type"]) == (400, "urn:microcred:problem:malformed-body")
    assert suspended.status_code == 200
    assert while_suspended.status_code == 403
    assert while_suspended.json()["type"] == "urn:microcred:problem:partner-suspended"
    assert await h.status_of(ada["enrollment_id"]) == "active"

    await h.api.post(f"/partners/{partner.partner_id}/reactivation", headers=h.admin())
    full = await post(partner.partner_id, [report] * 1000, secret=partner.secret)

    assert full.status_code == 200, full.text
    statuses = [result["status"] for result in full.json()["results"]]
    assert statuses == ["accepted"] + ["duplicate"] * 999
    assert await h.completions_queued() == 1
