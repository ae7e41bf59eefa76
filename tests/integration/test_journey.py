"""The first half of the learner journey, across three services that share nothing but Kafka.

Catalog, enrollment and billing (with the payment-provider simulator) run together on real Kafka
and PostgreSQL: a paid course is enrolled in, paid through the simulator's signed webhook,
activated, completed by staff (CourseCompleted on the topic); a free course is active at once;
a refund cancels; duplicates change nothing; learners see only their own; forged or replayed
webhooks are refused.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import billing.main
import billing.settings
import catalog.main
import catalog.settings
import enrollment.main
import enrollment.settings
from billing import api as billing_api
from billing import simulator
from billing.provider import SimulatorProvider
from billing.webhooks import SIGNATURE_HEADER, signature
from microcred_events import (
    CourseCompleted,
    CourseSnapshot,
    Event,
    PaymentSettled,
    Topic,
    decode,
    example_data,
)

SECRET = "whsec_journey_5c2e9a7b1d3f4e6a8b0c2d4e"
COURSE = {
    name: value
    for name, value in example_data(CourseSnapshot).items()
    if name not in ("course_id", "version")
}


@dataclass
class System:
    catalog: httpx.AsyncClient
    enrollment: httpx.AsyncClient
    billing: httpx.AsyncClient
    simulator: httpx.AsyncClient
    bearer: Callable[..., dict[str, str]]
    wait_for: Callable[..., Any]

    def staff(self) -> dict[str, str]:
        return self.bearer("staff-1", "staff")

    def learner(self, name: str) -> dict[str, str]:
        return self.bearer(name, "learner", email=f"{name}@example.org", name=name.title())

    async def published_course(self, title: str, amount_minor: int) -> str:
        details = {**COURSE, "title": title, "price": {"amount_minor": amount_minor, "currency": "USD"}}
        created = await self.catalog.post("/courses", json=details, headers=self.staff())
        assert created.status_code == 201, created.text
        course_id: str = created.json()["course_id"]
        published = await self.catalog.post(f"/courses/{course_id}/publish", headers=self.staff())
        assert published.status_code == 200, published.text
        return course_id

    async def enroll(self, learner: str, course_id: str, key: str) -> httpx.Response:
        """Enroll once enrollment has heard of the course (it learns of it from catalog's events)."""

        async def attempt() -> httpx.Response | None:
            response = await self.enrollment.post(
                "/enrollments",
                json={"course_id": course_id},
                headers={**self.learner(learner), "Idempotency-Key": key},
            )
            return None if response.status_code == 422 else response

        response: httpx.Response | None = await self.wait_for(attempt)
        assert response is not None, "enrollment never learned of the course"
        return response

    async def enrollment_status(self, learner: str, enrollment_id: str) -> str:
        response = await self.enrollment.get(f"/enrollments/{enrollment_id}", headers=self.learner(learner))
        status: str = response.json()["status"]
        return status

    async def payment_for(self, learner: str, enrollment_id: str) -> dict[str, Any]:
        async def find() -> dict[str, Any] | None:
            page = (await self.billing.get("/payments", headers=self.learner(learner))).json()
            return next((item for item in page["items"] if item["enrollment_id"] == enrollment_id), None)

        payment: dict[str, Any] | None = await self.wait_for(find)
        assert payment is not None, "billing never made the payment due"
        return payment


@pytest.fixture
async def system(
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    bearer: Callable[..., dict[str, str]],
    wait_for: Callable[..., Any],
) -> AsyncIterator[System]:
    catalog_app = catalog.main.create_app(make_settings(catalog.settings.Settings, await new_database()))
    enrollment_app = enrollment.main.create_app(
        make_settings(enrollment.settings.Settings, await new_database())
    )
    billing_app = billing.main.create_app(
        make_settings(
            billing.settings.Settings,
            await new_database(),
            payment_provider_url="http://simulator",
            payment_webhook_secret=SECRET,
        )
    )
    simulator_app = simulator.create_app(
        simulator.SimulatorSettings(webhook_url="http://billing/webhooks/provider", webhook_secret=SECRET),
        webhook_transport=httpx.ASGITransport(app=billing_app),
    )
    to_simulator = httpx.ASGITransport(app=simulator_app)
    billing_app.dependency_overrides[billing_api.payment_provider] = lambda: SimulatorProvider(
        "http://simulator", SECRET, transport=to_simulator
    )
    async with (
        serve(catalog_app) as catalog_client,
        serve(enrollment_app) as enrollment_client,
        serve(billing_app) as billing_client,
        httpx.AsyncClient(transport=to_simulator, base_url="http://simulator") as simulator_client,
    ):
        yield System(catalog_client, enrollment_client, billing_client, simulator_client, bearer, wait_for)


def _webhook(payment: dict[str, Any], *, created: int | None = None) -> bytes:
    """A settlement webhook body as the provider sends it."""
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "type": "payment.succeeded",
            "created": created or int(time.time()),
            "data": {
                "session_id": f"cs_{uuid.uuid4().hex[:16]}",
                "reference": payment["payment_id"],
                "amount": payment["amount"]["amount_minor"],
                "currency": payment["amount"]["currency"],
                "charge_id": f"ch_{uuid.uuid4().hex[:16]}",
            },
        }
    ).encode()


async def test_paid_course_enrolled_paid_activated_and_completed(
    system: System, topic_reader: Any, topic_prefix: str
) -> None:
    course_id = await system.published_course("Durable Skills: Communication", 10_000)
    enrolled = await system.enroll("ada", course_id, key="ada-1")
    assert enrolled.status_code == 201, enrolled.text
    enrollment_id = enrolled.json()["enrollment_id"]
    assert enrolled.json()["status"] == "pending_payment"

    again = await system.enroll("ada", course_id, key="ada-1")
    assert (again.status_code, again.json()) == (201, enrolled.json()), (
        "a repeated key must replay the answer"
    )
    listed = (await system.enrollment.get("/enrollments", headers=system.learner("ada"))).json()["items"]
    assert [item["enrollment_id"] for item in listed] == [enrollment_id]

    payment = await system.payment_for("ada", enrollment_id)
    assert payment["amount"] == {"amount_minor": 10_000, "currency": "USD"}
    checkout = await system.billing.post(
        f"/payments/{payment['payment_id']}/checkout", headers=system.learner("ada")
    )
    assert checkout.status_code == 200, checkout.text
    paid = await system.simulator.post(f"/sessions/{checkout.json()['session_id']}/pay")
    assert paid.status_code == 200, paid.text

    assert await system.wait_for(lambda: _is(system.enrollment_status("ada", enrollment_id), "active")), (
        "the settled payment did not activate the enrollment"
    )

    completion = await system.enrollment.post(
        f"/enrollments/{enrollment_id}/completion", json={"score": 92}, headers=system.staff()
    )
    assert completion.status_code == 201, completion.text
    # EnrollmentCreated, EnrollmentActivated, CourseCompleted.
    records = await topic_reader(topic_prefix + Topic.ENROLLMENT, 3)
    completed = [
        event
        for event in (decode(r.headers, r.value).event for r in records)
        if isinstance(event, CourseCompleted)
    ]
    assert len(completed) == 1
    assert str(completed[0].enrollment_id) == enrollment_id
    assert completed[0].score == 92
    assert completed[0].learner.email == "ada@example.org"


def _events(records: list[Any]) -> list[Event]:
    return [decode(record.headers, record.value).event for record in records]


async def _is(status: Any, expected: str) -> bool:
    return bool(await status == expected)


async def test_free_course_is_active_at_once_and_others_cannot_see_it(system: System) -> None:
    course_id = await system.published_course("Introduction to Generative AI", 0)
    enrolled = await system.enroll("grace", course_id, key="grace-1")
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["status"] == "active"
    enrollment_id = enrolled.json()["enrollment_id"]

    peek = await system.enrollment.get(f"/enrollments/{enrollment_id}", headers=system.learner("mallory"))
    assert peek.status_code == 404
    assert peek.headers["content-type"] == "application/problem+json"
    theirs = (await system.enrollment.get("/enrollments", headers=system.learner("mallory"))).json()
    assert theirs["items"] == []
    payments = (await system.billing.get("/payments", headers=system.learner("grace"))).json()
    assert payments["items"] == [], "a free course must not make a payment due"


async def test_forged_and_stale_webhooks_refused_duplicate_ignored_refund_cancels(
    system: System, topic_reader: Any, topic_prefix: str
) -> None:
    course_id = await system.published_course("Lockout/Tagout Safety Training", 9_900)
    enrollment_id = (await system.enroll("linus", course_id, key="linus-1")).json()["enrollment_id"]
    payment = await system.payment_for("linus", enrollment_id)

    body = _webhook(payment)
    tampered = body.replace(b'"amount": 9900', b'"amount": 1')
    assert tampered != body
    forged = await system.billing.post(
        "/webhooks/provider",
        content=tampered,
        headers={SIGNATURE_HEADER: signature(SECRET, body, int(time.time()))},
    )
    assert forged.status_code == 400, forged.text
    stale_time = int(time.time()) - 600
    stale = _webhook(payment, created=stale_time)
    replayed = await system.billing.post(
        "/webhooks/provider", content=stale, headers={SIGNATURE_HEADER: signature(SECRET, stale, stale_time)}
    )
    assert replayed.status_code == 400, replayed.text

    checkout = await system.billing.post(
        f"/payments/{payment['payment_id']}/checkout", headers=system.learner("linus")
    )
    paid = (await system.simulator.post(f"/sessions/{checkout.json()['session_id']}/pay")).json()
    assert paid["delivery"]["status_code"] == 200, paid
    duplicate = await system.simulator.post(f"/events/{paid['delivery']['event_id']}/resend")
    assert duplicate.json()["status_code"] == 200, duplicate.text
    assert await system.wait_for(lambda: _is(system.enrollment_status("linus", enrollment_id), "active"))

    refund = await system.billing.post(
        f"/payments/{payment['payment_id']}/refunds", json={"reason": "changed plans"}, headers=system.staff()
    )
    assert refund.status_code in (200, 201), refund.text
    assert await system.wait_for(
        lambda: _is(system.enrollment_status("linus", enrollment_id), "cancelled")
    ), "the refund did not cancel the enrollment"

    records = await topic_reader(topic_prefix + Topic.BILLING_PAYMENT, 3, timeout=5)
    settled = [
        event
        for event in (decode(r.headers, r.value).event for r in records)
        if isinstance(event, PaymentSettled)
    ]
    assert len(settled) == 1, "the duplicate webhook settled the payment twice"
