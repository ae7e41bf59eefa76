"""The shared runtime's guarantees, against a real Kafka broker and PostgreSQL server.

A small probe service (the runtime with test handlers) shows: bounded retries then the dead-letter
topic, `Rejected` dead-lettered at once, an outage redelivered rather than dead-lettered; the
outbox relay surviving a restart, keeping per-key order, electing one publisher among replicas
and flushing on shutdown; migrations applied once under concurrency; one trace from an HTTP
request through the outbox to the consumer.
"""

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from microcred_events import CourseSnapshot, CourseUpdated, Topic, decode, encode, example_data
from microcred_runtime import Connection, Rejected, Service, ServiceSettings, Subscriptions, outbox
from microcred_runtime.consumers import DEAD_LETTER_TOPIC_MAX_BYTES
from microcred_runtime.migrations import MigrationError, migrate

from .conftest import Infrastructure

COURSE = example_data(CourseSnapshot)


def course_update(title: str, course_id: uuid.UUID | None = None, version: int = 2) -> CourseUpdated:
    snapshot = {**COURSE, "course_id": str(course_id or uuid.uuid4()), "version": version, "title": title}
    return CourseUpdated(course=CourseSnapshot.model_validate(snapshot), updated_at=datetime.now(UTC))


class Probe:
    """Handlers whose behaviour the event's title chooses; counts every attempt."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.subscriptions = Subscriptions()
        self.subscriptions.on(CourseUpdated)(self.on_course_updated)

    async def on_course_updated(self, conn: Connection, event: CourseUpdated) -> None:
        title = event.course.title
        self.attempts[title] += 1
        if title.startswith("fail-always"):
            raise ValueError("this handler always fails")
        if title.startswith("fail-twice") and self.attempts[title] <= 2:
            raise ValueError("fails on the first two attempts")
        if title.startswith("reject"):
            raise Rejected("course_unknown", "no such course here")
        if title.startswith("outage") and self.attempts[title] == 1:
            raise ConnectionRefusedError("database unreachable (simulated)")
        await conn.execute("INSERT INTO applied (title) VALUES ($1)", title)


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    (tmp_path / "001_applied.sql").write_text(
        "CREATE TABLE applied (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text NOT NULL);"
    )
    return tmp_path


@pytest.fixture
async def probe_settings(
    new_database: Callable[[], Any], make_settings: Callable[..., Any]
) -> ServiceSettings:
    settings: ServiceSettings = make_settings(ServiceSettings, await new_database(), consumer_max_attempts=3)
    return settings


def probe_app(probe: Probe, migrations: Path, settings: ServiceSettings) -> FastAPI:
    service = Service(
        name="probe", settings_class=ServiceSettings, migrations=migrations, subscriptions=probe.subscriptions
    )
    return service.create_app(settings)


async def send(producer: AIOKafkaProducer, prefix: str, event: CourseUpdated) -> None:
    record = encode(event, source="urn:test:probe")
    await producer.send_and_wait(prefix + record.topic, record.value, key=record.key, headers=record.headers)


async def test_failure_policy(
    infrastructure: Infrastructure,
    migrations: Path,
    probe_settings: ServiceSettings,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    serve: Any,
    wait_for: Any,
    topic_reader: Any,
) -> None:
    probe = Probe()
    course_id = uuid.uuid4()  # one key: one partition, so the order below is the processing order
    titles = ["fail-always", "fail-twice", "reject", "outage", "ok"]
    async with serve(probe_app(probe, migrations, probe_settings)) as client:
        for title in titles:
            await send(producer, topic_prefix, course_update(title, course_id))
        reader = await asyncpg.connect(str(probe_settings.database_url))
        try:
            await wait_for(lambda: reader.fetchval("SELECT count(*) FROM applied WHERE title = 'ok'"))
            applied = Counter(row["title"] for row in await reader.fetch("SELECT title FROM applied"))
        finally:
            await reader.close()
        scraped = (await client.get("/metrics")).text

    topic = topic_prefix + Topic.CATALOG_COURSE
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
    }
    assert samples[("microcred_messages_consumed_total", (("outcome", "applied"), ("topic", topic)))] == 3
    assert (
        samples[("microcred_messages_consumed_total", (("outcome", "dead_lettered"), ("topic", topic)))] == 2
    )
    dead_lettered = "microcred_messages_dead_lettered_total"
    assert samples[(dead_lettered, (("reason", "handler_failed"), ("topic", topic)))] == 1
    assert samples[(dead_lettered, (("reason", "course_unknown"), ("topic", topic)))] == 1

    assert applied == Counter({"fail-twice": 1, "outage": 1, "ok": 1})
    assert probe.attempts == Counter({"fail-always": 3, "fail-twice": 3, "reject": 1, "outage": 2, "ok": 1})
    dead = await topic_reader(topic_prefix + "probe.dlq", 2)
    failures = [(_title(message.headers, message.value), dict(message.headers)) for message in dead]
    assert [(title, headers["dlq_reason"], headers["dlq_attempts"]) for title, headers in failures] == [
        ("fail-always", b"handler_failed", b"3"),
        ("reject", b"course_unknown", b"1"),
    ]
    assert b"always fails" in failures[0][1]["dlq_detail"]
    assert failures[0][1]["dlq_topic"] == (topic_prefix + Topic.CATALOG_COURSE).encode()
    # Created by the service to take a dead letter of the size the consumers allow one, whatever
    # the broker's own limit: set on the topic, not the broker's default.
    max_bytes = await topic_config(infrastructure, topic_prefix + "probe.dlq", "max.message.bytes")
    assert max_bytes == (str(DEAD_LETTER_TOPIC_MAX_BYTES), TOPIC_CONFIG)
    # The broker stamps the partners' records: their ce_time is judged against that.
    stamped = await topic_config(
        infrastructure, topic_prefix + Topic.PARTNER_COMPLETION, "message.timestamp.type"
    )
    assert stamped == ("LogAppendTime", TOPIC_CONFIG)


TOPIC_CONFIG = 1  # where a setting comes from: the topic's own (DescribeConfigs v1+)


async def topic_config(infrastructure: Infrastructure, topic: str, name: str) -> tuple[str, int]:
    """The topic's setting `name`: its value, and where it comes from."""
    admin = AIOKafkaAdminClient(bootstrap_servers=infrastructure.kafka_bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    ((*_, entries),) = response.resources
    # (name, value, read only, source, ...)
    values: dict[str, tuple[str, int]] = {entry[0]: (entry[1], entry[3]) for entry in entries}
    return values[name]


def _title(headers: list[tuple[str, bytes]], value: bytes) -> str:
    event = decode(headers, value).event
    assert isinstance(event, CourseUpdated)
    return event.course.title


async def _published(reader: asyncpg.Connection) -> int:
    return int(await reader.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"))


async def test_outbox_survives_restart_and_keeps_order_per_key(
    migrations: Path,
    probe_settings: ServiceSettings,
    topic_prefix: str,
    serve: Any,
    wait_for: Any,
    topic_reader: Any,
) -> None:
    probe = Probe()
    # Migrate and start once so the outbox exists, then queue events while nothing relays them.
    async with serve(probe_app(probe, migrations, probe_settings)):
        pass
    courses = [uuid.uuid4() for _ in range(5)]
    conn = await asyncpg.connect(str(probe_settings.database_url))
    try:
        for version in range(2, 22):
            async with conn.transaction():
                for course_id in courses:
                    await outbox.add(conn, course_update(f"v{version}", course_id, version))
        assert await _published(conn) == 0
        async with serve(probe_app(probe, migrations, probe_settings)):
            assert await wait_for(
                lambda: conn.fetchval("SELECT count(*) = 100 FROM outbox WHERE published_at IS NOT NULL")
            ), "the relay did not publish after restart"
    finally:
        await conn.close()

    messages = await topic_reader(topic_prefix + Topic.CATALOG_COURSE, 100)
    assert len(messages) == 100
    versions: dict[str, list[int]] = {}
    for message in messages:
        event = decode(message.headers, message.value).event
        assert isinstance(event, CourseUpdated)
        versions.setdefault(str(event.course.course_id), []).append(event.course.version)
    assert sorted(versions) == sorted(str(course_id) for course_id in courses)
    assert all(sequence == list(range(2, 22)) for sequence in versions.values()), versions


async def test_one_relay_publishes_among_replicas_and_shutdown_flushes(
    migrations: Path,
    probe_settings: ServiceSettings,
    topic_prefix: str,
    serve: Any,
    wait_for: Any,
    topic_reader: Any,
) -> None:
    first, second = (
        probe_app(Probe(), migrations, probe_settings),
        probe_app(Probe(), migrations, probe_settings),
    )
    async with serve(first), serve(second):
        relays = [first.state.runtime.relay, second.state.runtime.relay]
        assert await wait_for(lambda: any(relay.is_leader for relay in relays))
        assert sorted(relay.is_leader for relay in relays) == [False, True]
        async with first.state.runtime.pool.acquire() as conn, conn.transaction():
            for index in range(50):
                await outbox.add(conn, course_update(f"e{index}"))
    # Both replicas have stopped; whatever was committed before was flushed, and only once.
    messages = await topic_reader(topic_prefix + Topic.CATALOG_COURSE, 51, timeout=5)
    assert len(messages) == 50
    ids = {decode(message.headers, message.value).id for message in messages}
    assert len(ids) == 50


APPLIED_MINUTES_AGO = (
    'INSERT INTO inbox (consumer, source, event_id, event_type, topic, partition, "offset", processed_at)'
    " VALUES ('probe', 'urn:test', $1, 'type', 'topic', 0, 0, now() - make_interval(mins => $2))"
)


async def test_the_inbox_forgets_events_older_than_its_retention(
    migrations: Path, probe_settings: ServiceSettings, serve: Any, wait_for: Any
) -> None:
    settings = probe_settings.model_copy(update={"inbox_retention_hours": 2})
    probe = Probe()
    async with serve(probe_app(probe, migrations, settings)):
        pass
    conn = await asyncpg.connect(str(settings.database_url))
    try:
        await conn.executemany(
            APPLIED_MINUTES_AGO, [("old-1", 121), ("old-2", 60 * 24 * 30), ("recent", 119)]
        )
        async with serve(probe_app(probe, migrations, settings)):
            assert await wait_for(
                lambda: conn.fetchval("SELECT count(*) = 1 FROM inbox WHERE source = 'urn:test'")
            ), "the relay did not apply the inbox retention"
        assert await conn.fetchval("SELECT event_id FROM inbox WHERE source = 'urn:test'") == "recent"

        # A backlog is taken a slice a round, between drains: events go out meanwhile.
        await conn.executemany(APPLIED_MINUTES_AGO, [(f"backlog-{n}", 180) for n in range(5)])
        await outbox.add(conn, course_update("published while purging"))
        published: list[int] = []

        async def publish(records: Any) -> list[None]:
            published.append(len(records))
            return [None] * len(records)

        relay = outbox.OutboxRelay(
            str(settings.database_url),
            publish,
            outbox.RelaySettings(poll_interval=0.01, inbox_retention_hours=2, purge_slice=2),
        )
        relay.start()
        try:
            assert await wait_for(
                lambda: conn.fetchval("SELECT count(*) = 1 FROM inbox WHERE source = 'urn:test'")
            ), "the relay did not purge the backlog"
        finally:
            await relay.stop()
        assert published == [1]
    finally:
        await conn.close()


async def test_the_outbox_forgets_published_events_past_retention_a_slice_at_a_time(
    migrations: Path, probe_settings: ServiceSettings, serve: Any, wait_for: Any
) -> None:
    probe = Probe()
    async with serve(probe_app(probe, migrations, probe_settings)):
        pass
    conn = await asyncpg.connect(str(probe_settings.database_url))
    try:
        await conn.execute("DELETE FROM outbox")
        for name in [*(f"old-{index}" for index in range(7)), "unpublished", "recent"]:
            await outbox.add(conn, course_update(name))
        ids = [row["id"] for row in await conn.fetch("SELECT id FROM outbox ORDER BY id")]
        await conn.execute(
            "UPDATE outbox SET published_at = now() - interval '3 hours' WHERE id = ANY($1)", ids[:7]
        )
        await conn.execute("UPDATE outbox SET published_at = now() - interval '1 hour' WHERE id = $1", ids[8])

        async def refuse(records: Any) -> list[BaseException]:
            return [RuntimeError("no broker takes it")] * len(records)

        relay = outbox.OutboxRelay(
            str(probe_settings.database_url),
            refuse,
            outbox.RelaySettings(poll_interval=0.01, retention_hours=2, purge_slice=3),
        )
        relay.start()
        try:
            # Three rounds: two whole slices of the head, then what is left of it past retention.
            assert await wait_for(lambda: conn.fetchval("SELECT count(*) = 2 FROM outbox")), (
                "the relay did not purge the published events past retention"
            )
        finally:
            await relay.stop()
        assert [row["id"] for row in await conn.fetch("SELECT id FROM outbox ORDER BY id")] == ids[7:]
    finally:
        await conn.close()


async def test_migrations_apply_once_under_concurrency(
    new_database: Callable[[], Any], tmp_path: Path
) -> None:
    (tmp_path / "001_first.sql").write_text("CREATE TABLE first (id int);")
    (tmp_path / "002_second.sql").write_text("CREATE TABLE second (id int);")
    url = await new_database()
    connections = [await asyncpg.connect(url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(conn, "probe", tmp_path) for conn in connections))
        assert sorted(len(applied) for applied in results) == [0, 0, 2]
        recorded = await connections[0].fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(row["version"], row["name"]) for row in recorded] == [(1, "first"), (2, "second")]

        (tmp_path / "002_second.sql").write_text("CREATE TABLE second (id bigint);")
        with pytest.raises(MigrationError, match="was changed after it was applied"):
            await migrate(connections[0], "probe", tmp_path)
    finally:
        for conn in connections:
            await conn.close()
