"""A partner's signed completion, all the way to the learner's inbox and a subscriber's webhook.

Enrollment, issuance and notifications run together on real Kafka and PostgreSQL, with a local
SMTP sink and a webhook receiver: a plain Kafka client publishes a signed completion report ->
enrollment completes the enrollment -> issuance mints and signs the credential -> notifications
emails the learner and calls the webhook with a valid signature. The same report sent twice gives
one credential, one email and one webhook.
"""

import asyncio
import base64
import hashlib
import hmac
import json
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
from aiokafka import AIOKafkaProducer

import enrollment.main
import enrollment.settings
import issuance.main
import issuance.settings
import notifications.main
import notifications.settings
from issuance import keys
from microcred_events import (
    CompletionReported,
    CoursePublished,
    CourseSnapshot,
    Money,
    Topic,
    encode,
    example_data,
)
from notifications.smtp_sink import Handler, MailStore, smtp_server

from .test_notifications import Receiver, on_loopback, signature_is_valid

BASE = "http://127.0.0.1:8004"


@dataclass
class World:
    enrollment: httpx.AsyncClient
    issuance_db: asyncpg.Connection
    mail: MailStore
    receiver: Receiver
    webhook_secret: str
    producer: AIOKafkaProducer
    prefix: str
    bearer: Callable[..., dict[str, str]]
    wait_for: Callable[..., Any]

    def admin(self) -> dict[str, str]:
        return self.bearer("admin-1", "admin", email="admin@example.org")

    async def publish_signed_report(self, partner_id: str, secret: str, report: dict[str, Any]) -> None:
        """What a partner does with a plain Kafka client: the CloudEvents envelope plus the signature."""
        body = json.dumps(report).encode()
        message_id = str(uuid.uuid4())
        at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        digest = hmac.new(secret.encode(), f"{message_id}.{at}.".encode() + body, hashlib.sha256).digest()
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", message_id.encode()),
            ("ce_type", CompletionReported.TYPE.encode()),
            ("ce_source", f"urn:microcred:partner:{partner_id}".encode()),
            ("ce_time", at.encode()),
            ("ce_subject", report["report_id"].encode()),
            ("content-type", b"application/json"),
            ("ce_signature", b"v1," + base64.b64encode(digest)),
        ]
        await self.producer.send_and_wait(
            self.prefix + Topic.PARTNER_COMPLETION, body, key=report["report_id"].encode(), headers=headers
        )


@pytest.fixture
async def world(
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    bearer: Callable[..., dict[str, str]],
    wait_for: Callable[..., Any],
    tmp_path: Path,
) -> AsyncIterator[World]:
    keys_dir = tmp_path / "issuer-keys"
    keys.generate_key(keys_dir)
    issuance_database = await new_database()
    mail = MailStore()
    receiver = Receiver()
    async with smtp_server(Handler(mail), port=0) as smtp_port, on_loopback(receiver.app()) as receiver_port:
        receiver.url = f"http://127.0.0.1:{receiver_port}/hook"
        apps = (
            enrollment.main.create_app(make_settings(enrollment.settings.Settings, await new_database())),
            issuance.main.create_app(
                make_settings(
                    issuance.settings.Settings,
                    issuance_database,
                    issuer_keys_dir=keys_dir,
                    public_base_url=BASE,
                )
            ),
            notifications.main.create_app(
                make_settings(
                    notifications.settings.Settings,
                    await new_database(),
                    smtp_port=smtp_port,
                    delivery_poll_interval_seconds=0.5,
                    # The receiver is on loopback, which webhooks reach only when allowed.
                    webhook_allowed_private_networks=["127.0.0.0/8"],
                )
            ),
        )
        async with serve(apps[0]) as enrollment_api, serve(apps[1]), serve(apps[2]) as notifications_api:
            subscribed = await notifications_api.post(
                "/webhooks/subscriptions",
                json={
                    "url": receiver.url,
                    "scope": {"kind": "all"},
                    "event_types": ["org.microcred.issuance.credential.issued.v1"],
                },
                headers=bearer("admin-1", "admin"),
            )
            assert subscribed.status_code == 201, subscribed.text
            db = await asyncpg.connect(issuance_database)
            try:
                yield World(
                    enrollment_api,
                    db,
                    mail,
                    receiver,
                    subscribed.json()["secret"],
                    producer,
                    topic_prefix,
                    bearer,
                    wait_for,
                )
            finally:
                await db.close()


async def test_a_signed_partner_report_becomes_one_credential_one_email_one_webhook(world: World) -> None:
    registered = await world.enrollment.post(
        "/partners",
        json={
            "display_name": "Northwind University",
            "course_ids": [],
            "credentials": [{"kind": "hmac_sha256"}],
        },
        headers=world.admin(),
    )
    assert registered.status_code == 201, registered.text
    partner_id = registered.json()["partner_id"]
    (issued_secret,) = registered.json()["secrets"]

    course = CourseSnapshot.model_validate(
        {
            **example_data(CourseSnapshot),
            "course_id": str(uuid.uuid4()),
            "version": 2,
            "price": Money(amount_minor=0, currency="USD").model_dump(),
            "delivery_partner_id": partner_id,
        }
    )
    record = encode(
        CoursePublished(course=course, published_at=datetime.now(UTC)), source="urn:microcred:catalog"
    )
    await world.producer.send_and_wait(
        world.prefix + record.topic, record.value, key=record.key, headers=record.headers
    )

    async def enroll() -> httpx.Response | None:
        response = await world.enrollment.post(
            "/enrollments",
            json={"course_id": str(course.course_id)},
            headers={
                **world.bearer("ada", "learner", email="ada@example.org", name="Ada Lovelace"),
                "Idempotency-Key": "ada-northwind",
            },
        )
        return response if response.status_code == 201 else None

    enrolled = await world.wait_for(enroll)
    assert enrolled is not None, "enrollment never learned of the course"
    assert enrolled.json()["status"] == "active"

    report = {
        "report_id": str(uuid.uuid4()),
        "partner_id": partner_id,
        "course_id": str(course.course_id),
        "learner_id": enrolled.json()["learner"]["learner_id"],
        "completed_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "score": 93,
    }
    await world.publish_signed_report(partner_id, issued_secret["secret"], report)
    await world.publish_signed_report(partner_id, issued_secret["secret"], report)  # sent twice

    def credential_emails() -> list[Any]:
        return [mail for mail in world.mail.messages() if "credential" in mail.subject.lower()]

    assert await world.wait_for(credential_emails), "no credential email reached the SMTP sink"
    webhooks = await world.wait_for(lambda: world.receiver.accepted())
    assert webhooks, "no webhook reached the receiver"

    # Give a duplicate time to show itself, were there one.
    await asyncio.sleep(3)
    credentials = await world.issuance_db.fetch("SELECT credential_id FROM credentials")
    assert len(credentials) == 1
    credential_id = str(credentials[0]["credential_id"])
    emails = credential_emails()
    assert len(emails) == 1
    assert emails[0].to == ["ada@example.org"]
    assert f"{BASE}/credentials/{credential_id}" in emails[0].text
    (webhook,) = world.receiver.accepted()
    assert signature_is_valid(world.webhook_secret, webhook)
    assert webhook.payload["type"] == "org.microcred.issuance.credential.issued.v1"
    assert webhook.payload["data"]["credential_id"] == credential_id
    assert time.time() - int(webhook.headers["webhook-timestamp"]) < 300
