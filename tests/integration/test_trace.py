"""One trace per learner journey, across five services, Kafka and the outboxes.

The enrollment request starts the trace; the payment provider's webhook and staff's completion
arrive on requests of their own but continue it (`microcred_runtime.journeys`), and every event
the journey causes carries it through the outbox: EnrollmentCreated, PaymentSettled,
EnrollmentActivated, CourseCompleted, CredentialIssued, and the notification that follows.
"""

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import billing.main
import billing.settings
import enrollment.main
import enrollment.settings
import issuance.main
import issuance.settings
import notifications.main
import notifications.settings
from billing import api as billing_api
from billing import simulator
from billing.provider import SimulatorProvider
from issuance import keys
from microcred_events import CoursePublished, CourseSnapshot, Money, encode, example_data

SECRET = "whsec_trace_7d1f3b5a9c2e4f6a8b0d1e3f"


def _trace_of(traceparent: str) -> str:
    return traceparent.split("-")[1]


async def _outbox_traces(database: str) -> dict[str, set[str]]:
    """Event type -> the trace ids its outbox rows carry."""
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch("SELECT event_type, headers FROM outbox")
    finally:
        await conn.close()
    traces: dict[str, set[str]] = {}
    for row in rows:
        traces.setdefault(row["event_type"].split(".")[-2], set()).add(
            _trace_of(json.loads(row["headers"])["traceparent"])
        )
    return traces


async def test_the_whole_journey_shares_one_trace(
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    bearer: Callable[..., dict[str, str]],
    wait_for: Callable[..., Any],
    tmp_path: Path,
) -> None:
    keys_dir = tmp_path / "keys"
    keys.generate_key(keys_dir)
    databases = {
        name: await new_database() for name in ("enrollment", "billing", "issuance", "notifications")
    }
    enrollment_app = enrollment.main.create_app(
        make_settings(enrollment.settings.Settings, databases["enrollment"])
    )
    billing_app = billing.main.create_app(
        make_settings(
            billing.settings.Settings,
            databases["billing"],
            payment_provider_url="http://simulator",
            payment_webhook_secret=SECRET,
        )
    )
    issuance_app = issuance.main.create_app(
        make_settings(issuance.settings.Settings, databases["issuance"], issuer_keys_dir=keys_dir)
    )
    notifications_app = notifications.main.create_app(
        make_settings(notifications.settings.Settings, databases["notifications"], smtp_port=1)
    )
    simulator_app = simulator.create_app(
        simulator.SimulatorSettings(webhook_url="http://billing/webhooks/provider", webhook_secret=SECRET),
        webhook_transport=httpx.ASGITransport(app=billing_app),
    )
    to_simulator = httpx.ASGITransport(app=simulator_app)
    billing_app.dependency_overrides[billing_api.payment_provider] = lambda: SimulatorProvider(
        "http://simulator", SECRET, transport=to_simulator
    )
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    course = CourseSnapshot.model_validate(
        {
            **example_data(CourseSnapshot),
            "course_id": str(uuid.uuid4()),
            "version": 2,
            "price": Money(amount_minor=4_900, currency="EUR").model_dump(),
        }
    )
    record = encode(
        CoursePublished(course=course, published_at=datetime.now(UTC)), source="urn:microcred:catalog"
    )
    await producer.send_and_wait(
        topic_prefix + record.topic, record.value, key=record.key, headers=record.headers
    )
    ada = bearer("ada", "learner", email="ada@example.org", name="Ada Lovelace")

    async with (
        serve(enrollment_app) as enrollment_api,
        serve(billing_app) as billing_api_client,
        serve(issuance_app) as issuance_api,
        serve(notifications_app),
        httpx.AsyncClient(transport=to_simulator, base_url="http://simulator") as simulator_client,
    ):

        async def enroll() -> httpx.Response | None:
            response = await enrollment_api.post(
                "/enrollments",
                json={"course_id": str(course.course_id)},
                headers={**ada, "Idempotency-Key": "ada-trace"},
            )
            return response if response.status_code == 201 else None

        enrolled = await wait_for(enroll)
        assert enrolled is not None
        enrollment_id = enrolled.json()["enrollment_id"]

        async def payment() -> dict[str, Any] | None:
            items = (await billing_api_client.get("/payments", headers=ada)).json()["items"]
            return items[0] if items else None

        due = await wait_for(payment)
        assert due is not None
        checkout = await billing_api_client.post(f"/payments/{due['payment_id']}/checkout", headers=ada)
        await simulator_client.post(f"/sessions/{checkout.json()['session_id']}/pay")

        async def active() -> bool:
            response = await enrollment_api.get(f"/enrollments/{enrollment_id}", headers=ada)
            return bool(response.json()["status"] == "active")

        assert await wait_for(active)
        completed = await enrollment_api.post(
            f"/enrollments/{enrollment_id}/completion", json={"score": 88}, headers=bearer("sam", "staff")
        )
        assert completed.status_code == 201, completed.text

        async def credential() -> list[Any]:
            return list((await issuance_api.get("/me/credentials", headers=ada)).json()["items"])

        assert await wait_for(credential)
        notified = await wait_for(lambda: _consumed_credential_events(exporter))
        assert notified, "notifications never consumed CredentialIssued"

    server_spans = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]
    # A span per request, none per ASGI message it receives or sends.
    assert not [
        span.name for span in exporter.get_finished_spans() if span.name.endswith(("send", "receive"))
    ]
    enroll_request = next(span for span in server_spans if span.name.startswith("POST /enrollments"))
    journey = format(enroll_request.context.trace_id, "032x")

    outboxes = {name: await _outbox_traces(database) for name, database in databases.items()}
    assert outboxes["enrollment"]["created"] == {journey}
    assert outboxes["billing"]["settled"] == {journey}, "the provider's webhook did not continue the journey"
    assert outboxes["enrollment"]["activated"] == {journey}
    assert outboxes["enrollment"]["completed"] == {journey}, "staff's completion did not continue the journey"
    assert outboxes["issuance"]["issued"] == {journey}

    # In this process the webhook's span nests in the simulator's (so it is INTERNAL, not SERVER).
    webhook = next(span for span in exporter.get_finished_spans() if span.name == "POST /webhooks/provider")
    assert format(webhook.context.trace_id, "032x") != journey  # it came on a request of its own ...
    resumed = next(span for span in exporter.get_finished_spans() if span.name == "provider notice")
    assert format(resumed.context.trace_id, "032x") == journey  # ... and its work joined the journey,
    assert [link.context.trace_id for link in resumed.links] == [webhook.context.trace_id]  # linked back.
    assert {format(span.context.trace_id, "032x") for span in _consumed_credential_events(exporter)} == {
        journey
    }


def _consumed_credential_events(exporter: InMemorySpanExporter) -> list[Any]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.kind is SpanKind.CONSUMER and "issuance.credential" in span.name
    ]
