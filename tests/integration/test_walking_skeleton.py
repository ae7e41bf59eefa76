"""Catalog publishes through its outbox; enrollment keeps its course read model from the events.

Against a real Kafka broker and PostgreSQL server: the event arrives, a duplicate changes nothing,
a consumer stopped mid-stream and restarted loses nothing, and a poison message is dead-lettered
with its reason while the next good message is still applied.
"""

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import catalog.main
import catalog.settings
import enrollment.main
import enrollment.settings
from microcred_events import CourseSnapshot, CourseUpdated, Topic, encode, example_data

COURSE_DETAILS = {
    name: value
    for name, value in example_data(CourseSnapshot).items()
    if name not in ("course_id", "version")
}


@pytest.fixture
async def databases(new_database: Callable[[], Any]) -> dict[str, str]:
    return {"catalog": await new_database(), "enrollment": await new_database()}


@pytest.fixture
def catalog_app(databases: dict[str, str], make_settings: Callable[..., Any]) -> Any:
    settings = make_settings(catalog.settings.Settings, databases["catalog"])
    return catalog.main.create_app(settings)


@pytest.fixture
def enrollment_app(databases: dict[str, str], make_settings: Callable[..., Any]) -> Callable[[], Any]:
    settings = make_settings(enrollment.settings.Settings, databases["enrollment"])
    return lambda: enrollment.main.create_app(settings)


def _course_update(course_id: uuid.UUID, version: int) -> CourseUpdated:
    snapshot = CourseSnapshot.model_validate(
        {**COURSE_DETAILS, "course_id": str(course_id), "version": version, "title": f"v{version}"}
    )
    return CourseUpdated(course=snapshot, updated_at=datetime.now(UTC))


async def _send(
    producer: AIOKafkaProducer, prefix: str, event: CourseUpdated, event_id: str | None = None
) -> None:
    record = encode(event, source="urn:microcred:catalog", event_id=event_id)
    await producer.send_and_wait(prefix + record.topic, record.value, key=record.key, headers=record.headers)


async def test_published_course_reaches_enrollment_read_model(
    bearer: Any,
    catalog_app: Any,
    enrollment_app: Callable[[], Any],
    databases: dict[str, str],
    serve: Any,
    wait_for: Any,
) -> None:
    async with serve(catalog_app) as catalog_api, serve(enrollment_app()):
        created = await catalog_api.post("/courses", json=COURSE_DETAILS, headers=bearer("staff-1", "staff"))
        assert created.status_code == 201, created.text
        course_id = created.json()["course_id"]
        published = await catalog_api.post(
            f"/courses/{course_id}/publish", headers=bearer("staff-1", "staff")
        )
        assert published.status_code == 200, published.text
        assert published.json()["status"] == "published"

        reader = await asyncpg.connect(databases["enrollment"])
        try:
            row = await wait_for(
                lambda: reader.fetchrow("SELECT * FROM courses WHERE course_id = $1", uuid.UUID(course_id))
            )
        finally:
            await reader.close()
    assert row is not None, "CoursePublished never reached enrollment"
    assert row["status"] == "published"
    assert row["version"] == published.json()["version"]
    assert row["title"] == COURSE_DETAILS["title"]
    assert row["price_minor"] == COURSE_DETAILS["price"]["amount_minor"]

    writer = await asyncpg.connect(databases["catalog"])
    try:
        pending = await writer.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    finally:
        await writer.close()
    assert pending == 0


async def test_same_event_twice_changes_nothing(
    enrollment_app: Callable[[], Any],
    databases: dict[str, str],
    producer: AIOKafkaProducer,
    topic_prefix: str,
    serve: Any,
    wait_for: Any,
) -> None:
    course_id = uuid.uuid4()
    event_id = str(uuid.uuid4())
    reader = await asyncpg.connect(databases["enrollment"])
    try:
        async with serve(enrollment_app()):
            await _send(producer, topic_prefix, _course_update(course_id, 2), event_id)
            await _send(producer, topic_prefix, _course_update(course_id, 2), event_id)
            # A later event on the same partition proves both copies have been consumed.
            sentinel = str(uuid.uuid4())
            await _send(producer, topic_prefix, _course_update(course_id, 3), sentinel)
            assert await wait_for(
                lambda: reader.fetchval("SELECT count(*) FROM inbox WHERE event_id = $1", sentinel)
            )
            applied = await reader.fetch('SELECT "offset" FROM inbox WHERE event_id = $1', event_id)
            course = await reader.fetchrow(
                "SELECT version, title FROM courses WHERE course_id = $1", course_id
            )
    finally:
        await reader.close()
    assert len(applied) == 1, "the duplicate was applied a second time"
    assert course is not None
    assert (course["version"], course["title"]) == (3, "v3")


async def test_consumer_stopped_mid_stream_loses_nothing(
    enrollment_app: Callable[[], Any],
    databases: dict[str, str],
    producer: AIOKafkaProducer,
    topic_prefix: str,
    serve: Any,
    wait_for: Any,
) -> None:
    courses = [uuid.uuid4() for _ in range(10)]
    total = 300
    reader = await asyncpg.connect(databases["enrollment"])
    try:
        async with serve(enrollment_app()):
            for version in range(2, 2 + total // len(courses) // 2):
                for course_id in courses:
                    await _send(producer, topic_prefix, _course_update(course_id, version))
            # Stop while it is still working through the stream.
            assert await wait_for(lambda: reader.fetchval("SELECT count(*) > 0 FROM inbox"))
        consumed_before_restart = await reader.fetchval("SELECT count(*) FROM inbox")
        for version in range(2 + total // len(courses) // 2, 2 + total // len(courses)):
            for course_id in courses:
                await _send(producer, topic_prefix, _course_update(course_id, version))
        async with serve(enrollment_app()):
            consumed = await wait_for(
                lambda: reader.fetchval("SELECT count(*) = $1 FROM inbox", total), timeout=60
            )
            rows = await reader.fetch(
                "SELECT version FROM courses WHERE course_id = ANY($1::uuid[])", courses
            )
    finally:
        await reader.close()
    assert consumed_before_restart > 0, "nothing was consumed before the stop"
    assert consumed, "events were lost across the restart"
    assert [row["version"] for row in rows] == [1 + total // len(courses)] * len(courses)


async def test_poison_message_is_dead_lettered_and_the_partition_moves_on(
    enrollment_app: Callable[[], Any],
    databases: dict[str, str],
    producer: AIOKafkaProducer,
    topic_prefix: str,
    serve: Any,
    wait_for: Any,
    topic_reader: Any,
) -> None:
    course_id = uuid.uuid4()
    topic = topic_prefix + Topic.CATALOG_COURSE
    good = _course_update(course_id, 2)
    record = encode(good, source="urn:microcred:catalog")
    not_utf8 = [(name, b"\xff\xfe" if name == "ce_type" else value) for name, value in record.headers]
    reader = await asyncpg.connect(databases["enrollment"])
    try:
        async with serve(enrollment_app()):
            # Same key, so same partition, ahead of the good message: a body that is not JSON,
            # and headers that are not even UTF-8.
            await producer.send_and_wait(topic, b"{not json", key=record.key, headers=record.headers)
            await producer.send_and_wait(topic, record.value, key=record.key, headers=not_utf8)
            await producer.send_and_wait(topic, record.value, key=record.key, headers=record.headers)
            row = await wait_for(
                lambda: reader.fetchrow("SELECT version FROM courses WHERE course_id = $1", course_id)
            )
    finally:
        await reader.close()
    assert row is not None, "the good message after the poison was not applied"
    assert row["version"] == 2

    dead = await topic_reader(topic_prefix + "enrollment.dlq", 2)
    assert len(dead) == 2
    reasons = [dict(message.headers)["dlq_reason"].decode() for message in dead]
    assert reasons == ["malformed_body", "invalid_header"]
    first = dict(dead[0].headers)
    assert first["dlq_topic"].decode() == topic
    assert first["dlq_consumer_group"].decode() == "enrollment"
    assert dead[0].value == b"{not json"
    assert first["dlq_detail"]


async def test_one_trace_from_http_request_through_outbox_to_consumer(
    bearer: Any,
    catalog_app: Any,
    enrollment_app: Callable[[], Any],
    databases: dict[str, str],
    serve: Any,
    wait_for: Any,
) -> None:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "the runtime installs the SDK tracer provider"
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with serve(catalog_app) as catalog_api, serve(enrollment_app()):
        course_id = (
            await catalog_api.post("/courses", json=COURSE_DETAILS, headers=bearer("staff-1", "staff"))
        ).json()["course_id"]
        exporter.clear()
        await catalog_api.post(f"/courses/{course_id}/publish", headers=bearer("staff-1", "staff"))
        reader = await asyncpg.connect(databases["enrollment"])
        try:
            assert await wait_for(lambda: reader.fetchval("SELECT count(*) FROM courses"))
        finally:
            await reader.close()
        writer = await asyncpg.connect(databases["catalog"])
        try:
            headers = json.loads(await writer.fetchval("SELECT headers FROM outbox"))
        finally:
            await writer.close()

    spans = exporter.get_finished_spans()
    request = next(
        span
        for span in spans
        if span.kind is SpanKind.SERVER and span.attributes and "publish" in str(span.name)
    )
    trace_id = format(request.context.trace_id, "032x")
    assert headers["traceparent"].split("-")[1] == trace_id, "the outbox row did not keep the trace context"
    consumed = [span for span in spans if span.kind is SpanKind.CONSUMER]
    batches = [span for span in consumed if span.name.endswith(" process batch")]
    events = [span for span in consumed if span not in batches]
    assert events, "no consumer span was recorded"
    assert {format(span.context.trace_id, "032x") for span in events} == {trace_id}
    # The batch the event came in has its span, linked to the journey; SQL has none of its own.
    assert any(
        format(link.context.trace_id, "032x") == trace_id for batch in batches for link in batch.links
    ), "no batch span links to the journey"
    assert all((batch.attributes or {}).get("messaging.batch.message_count") for batch in batches)
    assert not [span for span in spans if span.attributes and "db.system" in span.attributes]
