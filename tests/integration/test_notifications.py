"""The notifications service against real Kafka and PostgreSQL, a real SMTP sink and a real webhook
receiver, both on free loopback ports in this process.

Events are published with a plain Kafka client, as the other services' relays would; the learner
and staff talk to the HTTP API. Retry delays are a few milliseconds here, so the retry, dead and
replay paths run in a second or two.
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, Request, Response

import notifications.main
from microcred_events import (
    CoursePublished,
    CourseSnapshot,
    CredentialIssued,
    CredentialKind,
    EnrollmentActivated,
    EnrollmentCreated,
    Event,
    Learner,
    Money,
    PaymentSettled,
    encode,
    example_data,
)
from microcred_runtime.migrations import migrate
from microcred_runtime.outbox import event_source
from notifications.settings import Settings
from notifications.smtp_sink import CaughtMail, Handler, MailStore, smtp_server

from .conftest import EXAMPLE_ISSUER_ID

MAX_ATTEMPTS = 4
PROBLEM_JSON = "application/problem+json"


# --- a webhook receiver on a real port -------------------------------------------------------


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def payload(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


@dataclass
class Receiver:
    """A subscriber's endpoint: records every request; fails the next `failures` ones, or all while down."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    failures: int = 0
    down: bool = False

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            status = 204
            if self.down:
                status = 503
            elif self.failures > 0:
                self.failures -= 1
                status = 500
            self.requests.append(Received(dict(request.headers), await request.body(), status))
            return Response(status_code=status)

        return app

    def accepted(self) -> list[Received]:
        return [received for received in self.requests if received.answered < 300]

    def about(self, event_type: str) -> list[Received]:
        return [received for received in self.requests if received.payload["type"] == event_type]


@contextlib.asynccontextmanager
async def on_loopback(app: FastAPI) -> AsyncIterator[int]:
    """Serve an ASGI app with uvicorn on a free loopback port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # Listening before uvicorn starts: early connections wait in the backlog instead of failing.
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


def signature_is_valid(secret: str, received: Received) -> bool:
    """Standard Webhooks verification, written out here so it cannot share a mistake with the service."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    headers = received.headers
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + received.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    offered = headers["webhook-signature"].split(" ")
    return fresh and any(hmac.compare_digest(expected, candidate) for candidate in offered)


# --- the harness -----------------------------------------------------------------------------


@dataclass
class Notifications:
    api: httpx.AsyncClient
    db: asyncpg.Connection
    sink: MailStore
    smtp: Handler
    receiver: Receiver
    producer: AIOKafkaProducer
    prefix: str
    bearer: Callable[..., dict[str, str]]
    wait_for: Callable[..., Any]

    async def send(self, event: Event, event_id: str | None = None) -> str:
        event_id = event_id or str(uuid.uuid4())
        record = encode(event, source=event_source(event), event_id=event_id)
        await self.producer.send_and_wait(
            self.prefix + record.topic, record.value, key=record.key, headers=record.headers
        )
        return event_id

    async def consumed(self, *event_ids: str) -> None:
        done = await self.wait_for(
            lambda: self.db.fetchval(
                "SELECT count(*) = $2 FROM inbox WHERE event_id = ANY($1::text[])",
                list(event_ids),
                len(event_ids),
            )
        )
        assert done, f"notifications did not consume {event_ids}"

    def learner(self, learner_id: uuid.UUID) -> dict[str, str]:
        return self.bearer(str(learner_id), "learner")

    def staff(self) -> dict[str, str]:
        return self.bearer("staff-1", "staff")

    def admin(self) -> dict[str, str]:
        return self.bearer("admin-1", "admin")

    async def subscribe(self, *event_types: str) -> tuple[str, str]:
        """Register the receiver for every event (an admin's scope `all`); returns the subscription
        id and its secret."""
        response = await self.api.post(
            "/webhooks/subscriptions",
            json={
                "url": self.receiver.url,
                "scope": {"kind": "all"},
                "event_types": list(event_types),
                "description": "test receiver",
            },
            headers=self.admin(),
        )
        assert response.status_code == 201, response.text
        body = response.json()
        return body["subscription_id"], body["secret"]

    async def inbox(self, learner_id: uuid.UUID, **params: Any) -> list[dict[str, Any]]:
        response = await self.api.get("/me/notifications", params=params, headers=self.learner(learner_id))
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def emails(self, containing: str = "") -> list[CaughtMail]:
        return [mail for mail in self.sink.messages() if containing in mail.subject]

    async def deliveries(self, **params: Any) -> list[dict[str, Any]]:
        response = await self.api.get("/webhooks/deliveries", params=params, headers=self.admin())
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def email_rows(self, learner_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT event_type, state FROM deliveries WHERE channel = 'email' AND learner_id = $1", learner_id
        )


def settings_for(make_settings: Callable[..., Any], database: str, smtp_port: int) -> Settings:
    """Retries a few milliseconds apart, so the retry, dead and replay paths run in a second.

    The poll interval is long on purpose: deliveries go out because the database wakes the
    workers as they fall due (NOTIFY from a trigger), not because a worker happened to poll.
    """
    settings: Settings = make_settings(
        Settings,
        database,
        smtp_port=smtp_port,
        smtp_timeout_seconds=15,
        webhook_timeout_seconds=5,
        delivery_max_attempts=MAX_ATTEMPTS,
        delivery_retry_base_seconds=0.02,
        delivery_retry_cap_seconds=0.1,
        delivery_poll_interval_seconds=30,
        delivery_drain_seconds=1,
        # The receiver listens on this machine's loopback, which webhooks reach only when allowed.
        webhook_allowed_private_networks=["127.0.0.0/8"],
    )
    return settings


@pytest.fixture
async def system(
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    bearer: Callable[..., dict[str, str]],
    wait_for: Callable[..., Any],
) -> AsyncIterator[Notifications]:
    database = await new_database()
    store = MailStore()
    smtp = Handler(store)
    receiver = Receiver()
    async with smtp_server(smtp, port=0) as smtp_port, on_loopback(receiver.app()) as receiver_port:
        receiver.url = f"http://127.0.0.1:{receiver_port}/hook"
        settings = settings_for(make_settings, database, smtp_port)
        async with serve(notifications.main.create_app(settings)) as client:
            db = await asyncpg.connect(database)
            try:
                yield Notifications(
                    client, db, store, smtp, receiver, producer, topic_prefix, bearer, wait_for
                )
            finally:
                await db.close()


# --- events ----------------------------------------------------------------------------------


def enrollment_created(
    learner_id: uuid.UUID, *, email: str = "ada@example.org", course_id: uuid.UUID | None = None
) -> EnrollmentCreated:
    return EnrollmentCreated(
        enrollment_id=uuid.uuid4(),
        learner=Learner(learner_id=learner_id, email=email, display_name="Ada Lovelace"),
        course_id=course_id or uuid.uuid4(),
        course_version=1,
        price=Money(amount_minor=4900, currency="EUR"),
        requires_payment=True,
        created_at=datetime.now(UTC),
    )


def credential_issued(enrollment: EnrollmentCreated) -> CredentialIssued:
    credential_id = uuid.uuid4()
    return CredentialIssued(
        credential_id=credential_id,
        kind=CredentialKind.COURSE,
        learner_id=enrollment.learner.learner_id,
        enrollment_id=enrollment.enrollment_id,
        course_id=enrollment.course_id,
        achievement_id=uuid.uuid4(),
        achievement_name="Data Analysis Foundations",
        issued_at=datetime.now(UTC),
        credential_url=f"https://credentials.microcred.example/credentials/{credential_id}",
    )


def payment_settled(enrollment: EnrollmentCreated) -> PaymentSettled:
    return PaymentSettled(
        payment_id=uuid.uuid4(),
        enrollment_id=enrollment.enrollment_id,
        learner_id=enrollment.learner.learner_id,
        amount=enrollment.price,
        provider="simulator",
        provider_reference="ch_test",
        settled_at=datetime.now(UTC),
    )


def enrollment_activated(enrollment: EnrollmentCreated) -> EnrollmentActivated:
    return EnrollmentActivated(
        enrollment_id=enrollment.enrollment_id,
        learner_id=enrollment.learner.learner_id,
        course_id=enrollment.course_id,
        activated_at=datetime.now(UTC),
    )


# --- the tests -------------------------------------------------------------------------------


async def test_a_credential_reaches_the_learner_by_email_in_app_and_a_signed_webhook(
    system: Notifications,
) -> None:
    subscription_id, secret = await system.subscribe(CredentialIssued.TYPE)
    course = CourseSnapshot.model_validate({**example_data(CourseSnapshot), "course_id": str(uuid.uuid4())})
    await system.consumed(await system.send(CoursePublished(course=course, published_at=datetime.now(UTC))))
    learner = uuid.uuid4()
    enrollment = enrollment_created(learner, course_id=course.course_id)
    credential = credential_issued(enrollment)
    await system.consumed(await system.send(enrollment), await system.send(credential))

    # Email: from the SMTP sink, with the credential page's URL in both parts.
    (email,) = await system.wait_for(lambda: system.emails("Data Analysis Foundations"))
    url = str(credential.credential_url)
    assert email.to == ["ada@example.org"]
    assert email.from_ == "no-reply@microcred.example"
    assert email.text is not None
    assert url in email.text
    assert email.html is not None
    assert f'href="{url}"' in email.html
    # The enrollment's email names the course, from the catalog read model.
    (welcome,) = await system.wait_for(lambda: system.emails(course.title))
    assert "49.00 EUR" in (welcome.text or "")

    # In-app: both notifications, newest first, the credential's linking to its page.
    items = await system.inbox(learner)
    assert {item["kind"] for item in items} == {"enrollment.created", "credential.issued"}
    (issued,) = [item for item in items if item["kind"] == "credential.issued"]
    assert issued["link"] == url
    assert issued["read_at"] is None

    # Webhook: only the type subscribed to, signed Standard-Webhooks style over the exact body.
    (received,) = await system.wait_for(system.receiver.accepted)
    assert signature_is_valid(secret, received)
    assert received.payload["type"] == CredentialIssued.TYPE
    assert received.payload["data"]["credential_id"] == str(credential.credential_id)
    assert received.payload["data"]["credential_url"] == url
    assert received.headers["webhook-id"].startswith("msg_")
    (delivery,) = await system.wait_for(lambda: system.deliveries(state="delivered"))
    assert delivery["subscription_id"] == subscription_id
    assert delivery["webhook_id"] == received.headers["webhook-id"]
    assert await system.db.fetchval("SELECT count(*) FROM deliveries WHERE channel = 'webhook'") == 1


async def test_an_event_redelivered_or_published_twice_notifies_once_per_channel(
    system: Notifications,
) -> None:
    await system.subscribe()
    learner = uuid.uuid4()
    enrollment = enrollment_created(learner)
    await system.consumed(await system.send(enrollment))
    credential = credential_issued(enrollment)

    await system.send(credential, event_id="credential-1")
    await system.send(credential, event_id="credential-1")  # redelivered: same CloudEvents id
    await system.send(credential, event_id="credential-1-again")  # the same occurrence, published twice
    # Same key, so same partition, after the three: once it is consumed, they all were.
    await system.send(credential, event_id="marker")
    await system.consumed("credential-1", "credential-1-again", "marker")

    await system.wait_for(lambda: system.emails("Data Analysis Foundations"))
    await system.wait_for(lambda: system.receiver.about(CredentialIssued.TYPE))
    settled = await system.wait_for(
        lambda: system.db.fetchval(
            "SELECT count(*) = 0 FROM deliveries WHERE state NOT IN ('delivered', 'dead')"
        )
    )
    assert settled
    await asyncio.sleep(0.5)  # room for a wrong second delivery to show up

    assert len(system.emails("Data Analysis Foundations")) == 1
    assert len(system.receiver.about(CredentialIssued.TYPE)) == 1
    assert [item["kind"] for item in await system.inbox(learner)].count("credential.issued") == 1


async def test_a_receiver_that_fails_three_times_then_succeeds_gets_the_event_once(
    system: Notifications,
) -> None:
    _, secret = await system.subscribe(CredentialIssued.TYPE)
    system.receiver.failures = 3
    enrollment = enrollment_created(uuid.uuid4())
    await system.send(credential_issued(enrollment))

    (delivery,) = await system.wait_for(lambda: system.deliveries(state="delivered"))
    detail = (
        await system.api.get(f"/webhooks/deliveries/{delivery['delivery_id']}", headers=system.admin())
    ).json()
    assert [(attempt["outcome"], attempt["status_code"]) for attempt in detail["attempt_log"]] == [
        ("failed", 500),
        ("failed", 500),
        ("failed", 500),
        ("delivered", 204),
    ]
    assert [attempt["attempt"] for attempt in detail["attempt_log"]] == [1, 2, 3, 4]
    assert detail["attempts"] == 4
    assert detail["last_error"] == "HTTP 500"

    requests = system.receiver.requests
    assert len(requests) == 4
    assert len(system.receiver.accepted()) == 1
    # One delivery: the same id and body every time, each attempt freshly and validly signed.
    assert {received.headers["webhook-id"] for received in requests} == {delivery["webhook_id"]}
    assert {received.body for received in requests} == {requests[0].body}
    assert all(signature_is_valid(secret, received) for received in requests)


async def test_a_dead_receiver_parks_the_delivery_and_a_replay_delivers_it_once_back(
    system: Notifications,
) -> None:
    await system.subscribe()
    system.receiver.down = True
    await system.send(enrollment_created(uuid.uuid4()))

    (dead,) = await system.wait_for(lambda: system.deliveries(state="dead"))
    assert dead["attempts"] == MAX_ATTEMPTS
    assert dead["last_error"] == "HTTP 503"
    assert dead["next_attempt_at"] is None
    await asyncio.sleep(0.3)  # nothing is tried after the last attempt
    assert len(system.receiver.requests) == MAX_ATTEMPTS
    assert not system.receiver.accepted()

    system.receiver.down = False
    replayed = await system.api.post(
        f"/webhooks/deliveries/{dead['delivery_id']}/replay", headers=system.admin()
    )
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["state"] in ("pending", "sending", "delivered")

    (accepted,) = await system.wait_for(system.receiver.accepted)
    assert accepted.headers["webhook-id"] == dead["webhook_id"]
    (delivered,) = await system.wait_for(lambda: system.deliveries(state="delivered"))
    assert delivered["delivery_id"] == dead["delivery_id"]
    detail = (
        await system.api.get(f"/webhooks/deliveries/{dead['delivery_id']}", headers=system.admin())
    ).json()
    assert [attempt["outcome"] for attempt in detail["attempt_log"]] == ["failed"] * MAX_ATTEMPTS + [
        "delivered"
    ]

    again = await system.api.post(
        f"/webhooks/deliveries/{dead['delivery_id']}/replay", headers=system.admin()
    )
    assert again.status_code == 409
    assert again.json()["type"] == "urn:microcred:problem:delivery-not-dead"
    assert len(system.receiver.accepted()) == 1
    unknown = await system.api.post(f"/webhooks/deliveries/{uuid.uuid4()}/replay", headers=system.admin())
    assert unknown.status_code == 404


async def test_a_slow_mail_server_holds_up_neither_the_inbox_nor_webhooks(system: Notifications) -> None:
    await system.subscribe()
    system.smtp.delay_seconds = 4
    learner = uuid.uuid4()
    enrollment = enrollment_created(learner)
    await system.send(enrollment)
    await system.send(enrollment_activated(enrollment))

    # Both events reach the inbox and the subscriber while the first emails are still being accepted.
    assert await system.wait_for(lambda: len(system.receiver.accepted()) == 2, timeout=30)
    items = await system.inbox(learner)
    assert {item["kind"] for item in items} == {"enrollment.created", "enrollment.activated"}
    assert system.emails() == []
    assert "delivered" not in {row["state"] for row in await system.email_rows(learner)}

    # Slow is not lost: both arrive once the server answers.
    assert await system.wait_for(lambda: len(system.emails()) == 2, timeout=20)


async def test_a_learner_who_opted_out_of_email_gets_none(system: Notifications) -> None:
    quiet, picky = uuid.uuid4(), uuid.uuid4()
    response = await system.api.put(
        "/me/preferences", json={"email": {"enabled": False}}, headers=system.learner(quiet)
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "email": {"enabled": False, "muted": []},
        "in_app": {"enabled": True, "muted": []},
    }
    response = await system.api.put(
        "/me/preferences", json={"email": {"muted": ["enrollment.created"]}}, headers=system.learner(picky)
    )
    assert response.status_code == 200, response.text
    assert (await system.api.get("/me/preferences", headers=system.learner(picky))).json()["email"] == {
        "enabled": True,
        "muted": ["enrollment.created"],
    }

    quiet_enrollment = enrollment_created(quiet, email="quiet@example.org")
    picky_enrollment = enrollment_created(picky, email="picky@example.org")
    await system.consumed(
        await system.send(quiet_enrollment),
        await system.send(picky_enrollment),
        await system.send(payment_settled(quiet_enrollment)),
        await system.send(payment_settled(picky_enrollment)),
    )

    # The inbox still hears of everything; email only of what was not opted out of.
    assert len(await system.inbox(quiet)) == 2
    assert len(await system.inbox(picky)) == 2
    assert await system.email_rows(quiet) == []
    (picky_email,) = await system.wait_for(lambda: system.emails("Payment received"))
    assert picky_email.to == ["picky@example.org"]
    await asyncio.sleep(0.5)
    assert [mail.to for mail in system.emails()] == [["picky@example.org"]]


async def test_learners_read_and_mark_only_their_own_notifications(system: Notifications) -> None:
    ada, bob = uuid.uuid4(), uuid.uuid4()
    ada_enrollment, bob_enrollment = enrollment_created(ada), enrollment_created(bob, email="bob@example.org")
    await system.consumed(
        await system.send(ada_enrollment),
        await system.send(bob_enrollment),
        await system.send(enrollment_activated(ada_enrollment)),
    )

    ada_items = await system.inbox(ada)
    (bob_item,) = await system.inbox(bob)
    assert len(ada_items) == 2
    assert bob_item["notification_id"] not in {item["notification_id"] for item in ada_items}

    stolen = await system.api.post(
        f"/me/notifications/{bob_item['notification_id']}/read", headers=system.learner(ada)
    )
    assert stolen.status_code == 404
    assert stolen.headers["content-type"] == PROBLEM_JSON
    assert (await system.inbox(bob, unread=True))[0]["read_at"] is None

    first, second = ada_items
    marked = await system.api.post(
        f"/me/notifications/{first['notification_id']}/read", headers=system.learner(ada)
    )
    assert marked.status_code == 200
    assert marked.json()["read_at"] is not None
    assert [item["notification_id"] for item in await system.inbox(ada, unread=True)] == [
        second["notification_id"]
    ]
    count = await system.api.get("/me/notifications/unread-count", headers=system.learner(ada))
    assert count.json() == {"unread": 1}

    page = await system.api.get("/me/notifications", params={"limit": 1}, headers=system.learner(ada))
    assert [item["notification_id"] for item in page.json()["items"]] == [first["notification_id"]]
    rest = await system.api.get(
        "/me/notifications",
        params={"limit": 1, "cursor": page.json()["next_cursor"]},
        headers=system.learner(ada),
    )
    assert [item["notification_id"] for item in rest.json()["items"]] == [second["notification_id"]]
    assert rest.json()["next_cursor"] is None

    all_read = await system.api.post("/me/notifications/read-all", headers=system.learner(ada))
    assert all_read.json() == {"marked": 1}
    assert await system.inbox(ada, unread=True) == []
    assert len(await system.inbox(bob, unread=True)) == 1
    assert (await system.api.get("/me/notifications")).status_code == 401


async def test_an_email_waits_for_the_learners_address_then_goes(system: Notifications) -> None:
    """Payment events name only the learner id; the address comes with EnrollmentCreated, which,
    on another topic, may be read later."""
    learner = uuid.uuid4()
    enrollment = enrollment_created(learner)
    await system.consumed(await system.send(payment_settled(enrollment)))
    assert [row["state"] for row in await system.email_rows(learner)] == ["awaiting_address"]
    assert len(await system.inbox(learner)) == 1

    await system.send(enrollment)
    assert await system.wait_for(lambda: len(system.emails()) == 2)
    assert {mail.to[0] for mail in system.emails()} == {"ada@example.org"}
    assert await system.wait_for(
        lambda: system.db.fetchval(
            "SELECT bool_and(state = 'delivered') FROM deliveries WHERE learner_id = $1", learner
        )
    )


async def test_events_read_before_their_course_reach_its_partner_once_the_course_is_known(
    system: Notifications,
) -> None:
    """Topics are read independently: here the payment comes first, then the enrollment, then the
    course (as after an outage). The partner's subscription gets both once the course says whose
    it is; another partner's gets neither; the learner's own subscription has them at once."""
    partner, other = uuid.uuid4(), uuid.uuid4()
    learner = uuid.uuid4()
    subscriptions = {}
    for name, scope in (
        ("partner", {"kind": "partner", "id": str(partner)}),
        ("other", {"kind": "partner", "id": str(other)}),
        ("learner", {"kind": "learner", "id": str(learner)}),
    ):
        created = await system.api.post(
            "/webhooks/subscriptions",
            json={"url": system.receiver.url, "scope": scope},
            headers=system.admin(),
        )
        assert created.status_code == 201, created.text
        subscriptions[name] = uuid.UUID(created.json()["subscription_id"])

    async def delivered(name: str) -> list[str]:
        rows = await system.db.fetch(
            "SELECT event_type FROM deliveries WHERE subscription_id = $1 ORDER BY event_type",
            subscriptions[name],
        )
        return [row["event_type"] for row in rows]

    course = CourseSnapshot.model_validate(
        {**example_data(CourseSnapshot), "course_id": str(uuid.uuid4()), "delivery_partner_id": str(partner)}
    )
    enrollment = enrollment_created(learner, course_id=course.course_id)
    await system.consumed(await system.send(payment_settled(enrollment)))
    await system.consumed(await system.send(enrollment))
    assert await delivered("partner") == []
    assert await delivered("learner") == sorted([EnrollmentCreated.TYPE, PaymentSettled.TYPE])

    await system.consumed(await system.send(CoursePublished(course=course, published_at=datetime.now(UTC))))

    assert await delivered("partner") == sorted([EnrollmentCreated.TYPE, PaymentSettled.TYPE])
    assert await delivered("other") == []
    assert await system.db.fetchval("SELECT count(*) FROM webhooks_awaiting_course") == 0


async def test_staff_manage_subscriptions_and_unsafe_urls_are_refused(system: Notifications) -> None:
    async def create(body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        # The issuer the test's staff act for.
        scoped = {"scope": {"kind": "issuer", "id": EXAMPLE_ISSUER_ID}, **body}
        return await system.api.post(
            "/webhooks/subscriptions", json=scoped, headers=headers or system.staff()
        )

    learner = await create({"url": system.receiver.url}, system.learner(uuid.uuid4()))
    assert learner.status_code == 403
    for url in (
        "ftp://127.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://user:pw@127.0.0.1/",
    ):
        refused = await create({"url": url})
        assert refused.status_code == 422, url
        assert refused.json()["type"] == "urn:microcred:problem:webhook-url-refused"
    unknown = await create(
        {"url": system.receiver.url, "event_types": ["org.microcred.catalog.course.published.v1"]}
    )
    assert unknown.status_code == 422
    assert unknown.json()["type"] == "urn:microcred:problem:unknown-event-type"

    created = await create({"url": system.receiver.url, "event_types": [EnrollmentCreated.TYPE]})
    assert created.status_code == 201
    subscription = created.json()
    assert subscription["secret"].startswith("whsec_")
    listed = (await system.api.get("/webhooks/subscriptions", headers=system.staff())).json()["items"]
    assert [item["subscription_id"] for item in listed] == [subscription["subscription_id"]]
    assert "secret" not in listed[0]
    shown = await system.api.get(
        f"/webhooks/subscriptions/{subscription['subscription_id']}", headers=system.staff()
    )
    assert "secret" not in shown.json()

    disabled = await system.api.delete(
        f"/webhooks/subscriptions/{subscription['subscription_id']}", headers=system.staff()
    )
    assert disabled.status_code == 200
    assert disabled.json()["disabled_at"] is not None
    assert (await system.api.get("/webhooks/subscriptions", headers=system.staff())).json()["items"] == []
    with_disabled = await system.api.get(
        "/webhooks/subscriptions", params={"include_disabled": True}, headers=system.staff()
    )
    assert len(with_disabled.json()["items"]) == 1

    await system.consumed(await system.send(enrollment_created(uuid.uuid4())))
    assert await system.db.fetchval("SELECT count(*) FROM deliveries WHERE channel = 'webhook'") == 0
    assert system.receiver.requests == []


async def test_a_shutdown_hands_an_attempt_in_flight_back_and_a_restart_delivers_it(
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    wait_for: Callable[..., Any],
) -> None:
    database = await new_database()
    store = MailStore()
    smtp = Handler(store, delay_seconds=30)
    learner = uuid.uuid4()
    record = encode(enrollment_created(learner), source="urn:microcred:enrollment")
    db = await asyncpg.connect(database)
    email_state = "SELECT state FROM deliveries WHERE channel = 'email' AND learner_id = $1"

    async def email_is(state: str) -> bool:
        return bool(await db.fetchval(email_state, learner) == state)

    try:
        async with smtp_server(smtp, port=0) as smtp_port:
            settings = settings_for(make_settings, database, smtp_port)
            async with serve(notifications.main.create_app(settings)):
                await producer.send_and_wait(
                    topic_prefix + record.topic, record.value, key=record.key, headers=record.headers
                )
                assert await wait_for(lambda: email_is("sending"))
            # Stopped while the mail server still held the email: handed back, due again at once.
            row = await db.fetchrow(
                "SELECT state, claimed_by, next_attempt_at <= now() AS due FROM deliveries"
                " WHERE channel = 'email' AND learner_id = $1",
                learner,
            )
            assert row is not None
            assert dict(row) == {"state": "pending", "claimed_by": None, "due": True}
            outcomes = await db.fetch("SELECT outcome, error FROM delivery_attempts")
            assert [(item["outcome"], item["error"]) for item in outcomes] == [
                ("interrupted", "the service shut down mid-attempt")
            ]

            smtp.delay_seconds = 0
            async with serve(notifications.main.create_app(settings)):
                assert await wait_for(lambda: email_is("delivered"))
        assert [mail.to for mail in store.messages()] == [["ada@example.org"]]
    finally:
        await db.close()


async def test_subscriptions_of_before_scopes_are_disabled_and_their_pending_deliveries_cancelled(
    new_database: Callable[[], Any], tmp_path: Path
) -> None:
    """Migration 005: an unscoped subscription took every learner's events, so it takes none now."""
    migrations = Path(notifications.main.__file__).parent / "migrations"
    before = tmp_path / "before"
    before.mkdir()
    for migration in sorted(migrations.glob("00[1-4]_*.sql")):
        shutil.copy(migration, before / migration.name)
    db = await asyncpg.connect(await new_database())
    try:
        await migrate(db, "notifications", before)
        legacy = uuid.uuid4()
        await db.execute(
            "INSERT INTO webhook_subscriptions (subscription_id, url, event_types, secret, created_by,"
            " created_at) VALUES ($1, 'https://lms.partner.example/h', '{}', 'whsec_x', 'staff-1', now())",
            legacy,
        )
        for state in ("pending", "delivered"):
            await db.execute(
                "INSERT INTO deliveries (delivery_id, channel, event_key, event_type, subscription_id,"
                " payload, state, next_attempt_at) VALUES ($1, 'webhook', $2, 't', $3, '{}', $4, now())",
                uuid.uuid4(),
                f"key-{state}",
                legacy,
                state,
            )

        await migrate(db, "notifications", migrations)

        subscription = await db.fetchrow(
            "SELECT scope_kind, disabled_at FROM webhook_subscriptions WHERE subscription_id = $1", legacy
        )
        assert subscription is not None
        assert subscription["scope_kind"] is None
        assert subscription["disabled_at"] is not None
        states = await db.fetch("SELECT event_key, state FROM deliveries ORDER BY event_key")
        assert [tuple(row) for row in states] == [
            ("key-delivered", "delivered"),
            ("key-pending", "cancelled"),
        ]
    finally:
        await db.close()


async def test_the_sweep_releases_a_webhook_that_a_race_left_waiting_for_a_known_course(
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    bearer: Callable[..., dict[str, str]],
    wait_for: Callable[..., Any],
) -> None:
    """Two replicas: one parked an event as its course was unknown to it, while the other recorded
    the course and looked for waiting events before the first committed. The sweep finds it, and
    forgets one whose course never came."""
    database = await new_database()
    partner, course_id = uuid.uuid4(), uuid.uuid4()
    async with smtp_server(Handler(MailStore()), port=0) as smtp_port:
        settings = settings_for(make_settings, database, smtp_port).model_copy(
            update={"delivery_poll_interval_seconds": 0.2}
        )
        async with serve(notifications.main.create_app(settings)) as api:
            created = await api.post(
                "/webhooks/subscriptions",
                json={"url": "http://127.0.0.1:9/hook", "scope": {"kind": "partner", "id": str(partner)}},
                headers=bearer("admin-1", "admin"),
            )
            assert created.status_code == 201, created.text
            subscription_id = uuid.UUID(created.json()["subscription_id"])
            db = await asyncpg.connect(database)
            try:
                await db.execute(
                    "INSERT INTO courses (course_id, version, title, issuer_id, delivery_partner_id)"
                    " VALUES ($1, 1, 'Raced', $2, $3)",
                    course_id,
                    uuid.uuid4(),
                    partner,
                )
                await db.execute(
                    "INSERT INTO webhooks_awaiting_course"
                    " (event_key, event_type, body, learner_id, course_id)"
                    " VALUES ('raced-key', $1, '{}', $2, $3)",
                    EnrollmentCreated.TYPE,
                    uuid.uuid4(),
                    course_id,
                )

                async def released() -> bool:
                    return bool(
                        await db.fetchval(
                            "SELECT count(*) = 1 FROM deliveries"
                            " WHERE subscription_id = $1 AND event_key = 'raced-key'",
                            subscription_id,
                        )
                    )

                # One whose course never came is given up on after WAITING_WEBHOOK_RETENTION.
                await db.execute(
                    "INSERT INTO webhooks_awaiting_course"
                    " (event_key, event_type, body, learner_id, course_id, parked_at)"
                    " VALUES ('stale-key', $1, '{}', $2, $3, now() - interval '8 days')",
                    EnrollmentCreated.TYPE,
                    uuid.uuid4(),
                    uuid.uuid4(),
                )

                assert await wait_for(released, timeout=10)
                waiting = "SELECT count(*) = 0 FROM webhooks_awaiting_course"
                assert await wait_for(lambda: db.fetchval(waiting), timeout=10)
            finally:
                await db.close()
