"""Whatever fails in a consumed batch, each partition restarts at its first unsettled record:
against a real Kafka broker and PostgreSQL.

The runtime's consumer reads a two-partition topic through `kafka.subscribe`, as a service does.
An event on each partition can never be applied, so it is dead-lettered; publishing the dead
letter fails twice, as an outage (`KafkaTimeoutError`) or as a bug (`RuntimeError`). Every batch
must start each partition where the one before left it, at its first unsettled record; the
committed offsets must never pass an unsettled record; and once the dead letters go through,
every event is applied exactly once and each dead letter is published once. A dead letter that
its topic refuses for its size goes again without the original's content, and the letters after
it reach the same partition.

A batch out of which an error escapes (a bug: FastStream swallows it) comes again from its first
record. A record whose header has no value (Kafka allows a null one) must not take its batch down with
it: among good records on both partitions, it is dead-lettered with its reason when the header
is one the event needs, or applied when it is valid apart from that header.
"""

import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError
from faststream.kafka import KafkaBroker

from microcred_events import CourseSnapshot, CourseUpdated, KafkaRecord, Topic, decode, encode, example_data
from microcred_runtime import Connection, Service, ServiceSettings, Subscriptions, kafka
from microcred_runtime.consumers import EventConsumer, RetryPolicy

from .conftest import Infrastructure

GROUP = "probe"
TOPIC = Topic.CATALOG_COURSE
DEAD_LETTER_FAILURES = 2


def course_update(title: str) -> CourseUpdated:
    snapshot = {**example_data(CourseSnapshot), "course_id": str(uuid.uuid4()), "title": title}
    return CourseUpdated(course=CourseSnapshot.model_validate(snapshot), updated_at=datetime.now(UTC))


async def apply(conn: Connection, event: CourseUpdated) -> None:
    if event.course.title.startswith("poison"):
        raise ValueError("this event can never be applied")
    await conn.execute("INSERT INTO applied (title) VALUES ($1)", event.course.title)


class FlakyDeadLetters:
    """Publishes dead letters to Kafka once its first `failures` attempts have raised `error`."""

    def __init__(
        self, producer: AIOKafkaProducer, prefix: str, error: Exception | None, failures: int
    ) -> None:
        self.producer, self.prefix, self.error, self.failures = producer, prefix, error, failures
        self.attempts = self.published = 0

    async def publish(self, record: KafkaRecord) -> None:
        self.attempts += 1
        if self.error is not None and self.attempts <= self.failures:
            raise self.error
        await kafka.publish_one(self.producer, record, prefix=self.prefix)
        self.published += 1


@dataclass(frozen=True)
class Delivery:
    records: list[tuple[int, int]]  # (partition, offset), in the batch's order
    settled: int
    committed: dict[int, int]  # the group's committed offset per partition when the batch came


class Recorded(EventConsumer):
    """The runtime's consumer, remembering each batch it was given and what it settled."""

    def __init__(
        self,
        *args: Any,
        committed: Callable[[], Awaitable[dict[int, int]]],
        escapes: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(*args, **options)
        self.committed = committed
        self.escapes = escapes  # how many batches, from the first, an error escapes from (a bug)
        self.deliveries: list[Delivery] = []

    async def process_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]], **options: Any) -> int:
        committed = await self.committed()
        if self.escapes:
            self.escapes -= 1
            self.deliveries.append(Delivery([(r.partition, r.offset) for r in records], 0, committed))
            raise RuntimeError("a bug that escapes the batch")
        settled = await super().process_batch(records, **options)
        self.deliveries.append(Delivery([(r.partition, r.offset) for r in records], settled, committed))
        return settled


def assert_each_batch_starts_where_the_last_left_off(deliveries: list[Delivery]) -> None:
    """Each partition at its first unsettled record, and only settled records committed."""
    position: dict[int, int] = {}  # where the next batch must start, per partition
    committed: dict[int, int] = {}
    for number, delivery in enumerate(deliveries):
        assert delivery.committed == committed, f"batch {number}: {delivery}"
        first: dict[int, int] = {}
        for partition, offset in delivery.records:
            first.setdefault(partition, offset)
        assert all(offset == position.get(partition, 0) for partition, offset in first.items()), (
            f"batch {number} skipped or repeated records: {delivery}, expected {position}"
        )
        for partition, offset in delivery.records[: delivery.settled]:
            position[partition] = committed[partition] = offset + 1
        unsettled: dict[int, int] = {}
        for partition, offset in delivery.records[delivery.settled :]:
            unsettled.setdefault(partition, offset)
        position |= unsettled


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    (tmp_path / "001_applied.sql").write_text(
        "CREATE TABLE applied (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text NOT NULL);"
    )
    return tmp_path


@pytest.fixture
async def admin(infrastructure: Infrastructure) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=infrastructure.kafka_bootstrap)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@dataclass(frozen=True)
class Run:
    """What the runtime's consumer did, once every partition's committed offset reached the end."""

    deliveries: list[Delivery]
    applied: Counter[str]
    inbox: Counter[str]
    dead_letters: list[ConsumerRecord[bytes, bytes]]


RunConsumer = Callable[..., Awaitable[Run]]


@pytest.fixture
def run_consumer(
    infrastructure: Infrastructure,
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    migrations: Path,
    topic_prefix: str,
    producer: AIOKafkaProducer,
    admin: AIOKafkaAdminClient,
    topic_reader: Any,
    wait_for: Any,
) -> RunConsumer:
    """Sends each partition's records to a two-partition topic of the test's own, then runs the
    runtime's consumer on it, as a service does, until every record's offset is committed."""

    async def run(
        partitions: dict[int, list[KafkaRecord]],
        *,
        dead_letter_error: Exception | None = None,
        dead_letter_failures: int = 0,
        dead_letter_topic_bytes: int | None = None,
        escapes: int = 0,
    ) -> Run:
        settings: ServiceSettings = make_settings(ServiceSettings, await new_database())
        bootstrap, topic = infrastructure.kafka_bootstrap, topic_prefix + TOPIC
        dead_letter_topic = f"{topic_prefix}{GROUP}.dlq"
        if dead_letter_topic_bytes is not None:
            # One partition, which takes less than the runtime's dead letters may weigh.
            await kafka.ensure_topics(
                bootstrap,
                [dead_letter_topic],
                partitions=1,
                replication=1,
                configs={dead_letter_topic: {"max.message.bytes": str(dead_letter_topic_bytes)}},
            )
        await kafka.ensure_topics(bootstrap, [topic, dead_letter_topic], partitions=2, replication=1)
        for partition, records in partitions.items():
            for record in records:
                await producer.send_and_wait(
                    topic, record.value, key=record.key, headers=record.headers, partition=partition
                )

        async def committed() -> dict[int, int]:
            offsets = await admin.list_consumer_group_offsets(topic_prefix + GROUP)
            return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}

        subscriptions = Subscriptions()
        subscriptions.on(CourseUpdated)(apply)
        (route,) = subscriptions.routes(GROUP)
        pool = await asyncpg.create_pool(str(settings.database_url), min_size=1, max_size=2)
        dead_letter_producer = kafka.dead_letter_producer(bootstrap, client_id="probe")
        await dead_letter_producer.start()
        dead_letters = FlakyDeadLetters(
            dead_letter_producer, topic_prefix, dead_letter_error, dead_letter_failures
        )
        broker = KafkaBroker(bootstrap, logger=logging.getLogger("faststream"), log_level=logging.DEBUG)
        try:
            async with pool.acquire() as conn:
                await Service(name=GROUP, settings_class=ServiceSettings, migrations=migrations).migrate(conn)
            consumer = Recorded(
                route,
                committed=committed,
                escapes=escapes,
                pool=pool,
                publish_dead_letter=dead_letters.publish,
                retry=RetryPolicy(max_attempts=2, backoff_seconds=0.05),
                budget_seconds=settings.consumer_max_poll_interval_seconds / 2,
            )
            kafka.subscribe(broker, consumer, membership=kafka.Membership.of(settings), prefix=topic_prefix)
            await broker.start()
            everything = {partition: len(records) for partition, records in partitions.items()}
            assert await wait_for(lambda: _equal(committed(), everything), timeout=60), consumer.deliveries
            async with pool.acquire() as conn:
                applied = Counter(row["title"] for row in await conn.fetch("SELECT title FROM applied"))
                inbox = Counter(row["event_id"] for row in await conn.fetch("SELECT event_id FROM inbox"))
        finally:
            await broker.stop()
            await dead_letter_producer.stop()
            await pool.close()
        # Asking for one more than were published: the topic holds those letters and no other.
        letters = await topic_reader(dead_letter_topic, dead_letters.published + 1, timeout=5)
        assert len(letters) == dead_letters.published, letters
        return Run(consumer.deliveries, applied, inbox, letters)

    return run


def titled(*titles: str) -> list[KafkaRecord]:
    return [encode(course_update(title), source="urn:test:probe", event_id=title) for title in titles]


@pytest.mark.parametrize(
    "error", [KafkaTimeoutError(), RuntimeError("a bug in the dead-letter publisher")], ids=["outage", "bug"]
)
async def test_a_dead_letter_that_fails_leaves_both_partitions_at_their_first_unsettled_record(
    error: Exception, run_consumer: RunConsumer
) -> None:
    # As each partition receives them: one event that can never be applied between two that can.
    partitions = {0: titled("ok-0", "poison-0", "ok-1"), 1: titled("ok-2", "poison-1", "ok-3")}

    run = await run_consumer(partitions, dead_letter_error=error, dead_letter_failures=DEAD_LETTER_FAILURES)

    # The outage (or the bug) hit a batch of both partitions, and each failed dead letter ended one.
    assert {partition for partition, _ in run.deliveries[0].records} == {0, 1}, run.deliveries
    failed = [delivery for delivery in run.deliveries if delivery.settled < len(delivery.records)]
    assert len(failed) == DEAD_LETTER_FAILURES, run.deliveries
    assert_each_batch_starts_where_the_last_left_off(run.deliveries)
    assert run.applied == Counter(["ok-0", "ok-1", "ok-2", "ok-3"])
    assert run.inbox == run.applied
    assert sorted(_title(letter) for letter in run.dead_letters) == ["poison-0", "poison-1"]


async def test_a_batch_out_of_which_an_error_escapes_comes_again(run_consumer: RunConsumer) -> None:
    partitions = {0: titled("ok-0", "ok-1"), 1: titled("ok-2", "ok-3")}

    # FastStream logs and swallows what escapes its subscriber, its consumer already past the batch.
    run = await run_consumer(partitions, escapes=2)

    assert len(run.deliveries) > 2, run.deliveries
    assert_each_batch_starts_where_the_last_left_off(run.deliveries)
    assert run.applied == Counter(["ok-0", "ok-1", "ok-2", "ok-3"])


async def test_a_dead_letter_its_topic_refuses_for_its_size_costs_no_later_letter(
    run_consumer: RunConsumer,
) -> None:
    # Every letter goes to the dead-letter topic's one partition; the second is too large for it
    # (a producer's first batch to a partition would be taken at any sequence number).
    large_title = "poison-" + "x" * 10_000
    partitions = {0: titled("ok-0", "poison-before", large_title, "poison-after", "ok-1"), 1: titled("ok-2")}

    run = await run_consumer(partitions, dead_letter_topic_bytes=4000)

    assert_each_batch_starts_where_the_last_left_off(run.deliveries)
    assert run.applied == Counter(["ok-0", "ok-1", "ok-2"])
    before, large, after = run.dead_letters
    assert {before.partition, large.partition, after.partition} == {0}
    assert [dict(letter.headers)["dlq_offset"] for letter in run.dead_letters] == [b"1", b"2", b"3"]
    assert large.value == b""
    assert int(dict(large.headers)["dlq_value_dropped"]) > 10_000
    assert (_title(before), _title(after)) == ("poison-before", "poison-after")


async def test_a_header_without_a_value_costs_only_its_own_record(run_consumer: RunConsumer) -> None:
    no_id, noted = titled("no-id", "noted")
    partitions = {
        # ce_id, which the event needs, has no value: the record can never be applied.
        0: [*titled("ok-0"), with_header(no_id, "ce_id", None), *titled("ok-1")],
        # An extension header without a value: the event is valid.
        1: [*titled("ok-2"), with_header(noted, "x-note", None), *titled("ok-3")],
    }

    run = await run_consumer(partitions)

    assert {partition for partition, _ in run.deliveries[0].records} == {0, 1}, run.deliveries
    assert_each_batch_starts_where_the_last_left_off(run.deliveries)
    assert run.applied == Counter(["ok-0", "ok-1", "ok-2", "noted", "ok-3"])
    assert run.inbox == run.applied
    (letter,) = run.dead_letters
    headers = dict(letter.headers)
    assert (headers["dlq_reason"], headers["dlq_partition"], headers["dlq_offset"]) == (
        b"invalid_header",
        b"0",
        b"1",
    )
    assert b"ce_id" in headers["dlq_detail"]
    assert json.loads(letter.value)["course"]["title"] == "no-id"


def with_header(record: KafkaRecord, name: str, value: bytes | None) -> KafkaRecord:
    """The record with `name` set to `value` (None: a header without a value, as Kafka allows)."""
    headers = [(key, content) for key, content in record.headers if key != name]
    return KafkaRecord(record.topic, record.key, record.value, [*headers, (name, value)])  # type: ignore[list-item]  # null on purpose


async def _equal(value: Awaitable[dict[int, int]], expected: dict[int, int]) -> bool:
    return await value == expected


def _title(record: ConsumerRecord[bytes, bytes]) -> str:
    event = decode(record.headers, record.value).event
    assert isinstance(event, CourseUpdated)
    return event.course.title
