import asyncio
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaTimeoutError
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.subscriber.usecase import BatchSubscriber, LogicSubscriber
from faststream.middlewares import AckPolicy
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from microcred_events import KafkaRecord, decode, encode
from microcred_runtime import ServiceSettings, kafka

from .conftest import consumer_record, course_updated

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


@dataclass(frozen=True)
class Sent:
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]


class FakeProducer:
    """aiokafka's `send`: refuses some records outright, and fails the delivery of others."""

    def __init__(self, *, refuse: Sequence[int] = (), fail: Sequence[int] = ()) -> None:
        self.refuse, self.fail = refuse, fail
        self.calls = 0
        self.sent: list[Sent] = []

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        index, self.calls = self.calls, self.calls + 1
        if index in self.refuse:
            raise ValueError(f"record {index} is too large")
        self.sent.append(Sent(topic, value, key, headers))
        delivery: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if index in self.fail:
            delivery.set_exception(ConnectionError(f"record {index} not acknowledged"))
        else:
            delivery.set_result(None)
        return delivery


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Publish spans go to a provider of this test's own, not the process-wide one."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(kafka, "tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def records(count: int, **encode_options: Any) -> list[KafkaRecord]:
    return [
        encode(course_updated(), source="urn:microcred:catalog", event_id=f"evt-{i}", **encode_options)
        for i in range(count)
    ]


def header(headers: Sequence[tuple[str, bytes]], name: str) -> list[bytes]:
    return [value for key, value in headers if key == name]


async def test_publish_sends_in_order_to_prefixed_topics_and_waits_for_every_ack() -> None:
    producer, batch = FakeProducer(), records(3)

    results = await kafka.publish(producer, batch, prefix="staging.")

    assert results == [None, None, None]
    assert [sent.topic for sent in producer.sent] == ["staging.catalog.course.v1"] * 3
    assert [decode(sent.headers, sent.value).id for sent in producer.sent] == ["evt-0", "evt-1", "evt-2"]
    assert [(sent.key, sent.value) for sent in producer.sent] == [(r.key, r.value) for r in batch]


async def test_publish_returns_the_error_of_each_record_that_was_not_acknowledged() -> None:
    producer = FakeProducer(fail=[2])

    results = await kafka.publish(producer, records(4))

    assert results[0] is None
    assert results[1] is None
    assert isinstance(results[2], ConnectionError)
    assert results[3] is None


async def test_publish_stops_at_a_refused_record_so_later_ones_cannot_overtake_it() -> None:
    producer = FakeProducer(refuse=[1])

    results = await kafka.publish(producer, records(4))

    assert results[0] is None
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "record 1 is too large"
    assert all(isinstance(error, RuntimeError) and "not sent" in str(error) for error in results[2:])
    assert len(producer.sent) == 1


async def test_publish_continues_the_stored_trace_in_a_producer_span(spans: InMemorySpanExporter) -> None:
    (record,) = records(1, traceparent=TRACEPARENT, tracestate="vendor=value")
    producer = FakeProducer()

    await kafka.publish(producer, [record], prefix="staging.")

    (span,) = spans.get_finished_spans()
    assert isinstance(span, ReadableSpan)
    assert span.name == "staging.catalog.course.v1 publish"
    assert span.kind is SpanKind.PRODUCER
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT_SPAN_ID
    assert span.attributes is not None
    assert span.attributes["messaging.destination.name"] == "staging.catalog.course.v1"
    (sent,) = producer.sent
    (traceparent,) = header(sent.headers, "traceparent")
    _, trace_id, span_id, _ = traceparent.decode().split("-")
    assert trace_id == TRACE_ID
    assert span_id != PARENT_SPAN_ID
    assert span_id == format(span.context.span_id, "016x")
    assert header(sent.headers, "tracestate") == [b"vendor=value"]
    untouched = [(n, v) for n, v in record.headers if n not in ("traceparent", "tracestate")]
    assert [(n, v) for n, v in sent.headers if n not in ("traceparent", "tracestate")] == untouched


async def test_publish_one_raises_the_records_error() -> None:
    (record,) = records(1)

    await kafka.publish_one(FakeProducer(), record)
    with pytest.raises(ConnectionError, match="not acknowledged"):
        await kafka.publish_one(FakeProducer(fail=[0]), record)


class FakeAdmin:
    instances: ClassVar[list["FakeAdmin"]] = []
    existing: ClassVar[list[str]] = []
    errors: ClassVar[dict[str, int] | None] = None

    def __init__(self, *, bootstrap_servers: str, request_timeout_ms: int) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.request_timeout_ms = request_timeout_ms
        self.created: list[NewTopic] = []
        self.events: list[str] = []
        FakeAdmin.instances.append(self)

    async def start(self) -> None:
        self.events.append("start")

    async def list_topics(self) -> list[str]:
        return self.existing

    async def create_topics(self, new_topics: list[NewTopic]) -> SimpleNamespace:
        self.created += new_topics
        errors = self.errors or {}
        # Like aiokafka, per-topic errors come back in the response rather than raised.
        return SimpleNamespace(
            topic_errors=[(topic.name, errors.get(topic.name, 0), None) for topic in new_topics]
        )

    async def close(self) -> None:
        self.events.append("close")


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> type[FakeAdmin]:
    monkeypatch.setattr(FakeAdmin, "instances", [])
    monkeypatch.setattr(kafka, "AIOKafkaAdminClient", FakeAdmin)
    return FakeAdmin


async def test_ensure_topics_creates_only_the_missing_ones(
    admin: type[FakeAdmin], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "existing", ["a", "__consumer_offsets"])

    await kafka.ensure_topics("kafka:9092", ["a", "b", "c"], partitions=6, replication=3)

    (client,) = admin.instances
    assert client.bootstrap_servers == "kafka:9092"
    assert client.request_timeout_ms == 30_000  # no request outlives the whole call's deadline
    assert [(t.name, t.num_partitions, t.replication_factor) for t in client.created] == [
        ("b", 6, 3),
        ("c", 6, 3),
    ]
    assert client.events == ["start", "close"]


async def test_ensure_topics_creates_a_topic_with_the_settings_given_for_it(admin: type[FakeAdmin]) -> None:
    await kafka.ensure_topics(
        "kafka:9092",
        ["a", "a.dlq"],
        partitions=1,
        replication=1,
        configs={"a.dlq": {"max.message.bytes": "9"}},
    )

    (client,) = admin.instances
    assert [(t.name, t.topic_configs) for t in client.created] == [
        ("a", {}),
        ("a.dlq", {"max.message.bytes": "9"}),
    ]


async def test_dead_letters_have_a_producer_that_a_refused_letter_cannot_break() -> None:
    producer = kafka.dead_letter_producer("kafka:9092", "enrollment")

    # Idempotence would leave the sequence number of a refused letter used, and every later
    # letter to its partition refused as out of order.
    assert producer._txn_manager is None
    assert producer.client._client_id == "enrollment-dead-letters"


async def test_ensure_topics_raises_the_brokers_refusal_but_not_already_exists(
    admin: type[FakeAdmin], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "errors", {"b": 36, "c": 38})  # TopicAlreadyExists, InvalidReplicationFactor

    with pytest.raises(RuntimeError, match="c: InvalidReplicationFactorError"):
        await kafka.ensure_topics("kafka:9092", ["b", "c"], partitions=1, replication=5)


async def test_ensure_topics_gives_up_within_its_deadline_on_a_broker_that_does_not_answer(
    admin: type[FakeAdmin], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(self: FakeAdmin) -> None:
        self.events.append("start")
        await asyncio.Event().wait()

    monkeypatch.setattr(admin, "start", never)

    with pytest.raises(TimeoutError):
        await kafka.ensure_topics("kafka:9092", ["a"], partitions=1, replication=1, within=0.05)

    (client,) = admin.instances
    assert client.request_timeout_ms == 50
    assert client.events == ["start", "close"]


async def test_ensure_topics_with_every_topic_present_creates_nothing(
    admin: type[FakeAdmin], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "existing", ["a", "b"])

    await kafka.ensure_topics("kafka:9092", ["a", "b"], partitions=1, replication=1)

    (client,) = admin.instances
    assert client.created == []
    assert client.events == ["start", "close"]


MEMBERSHIP = kafka.Membership(
    session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=300_000
)


class RecordingConsumer:
    """An `EventConsumer` that settles the first `settles` records of each batch (all: None)."""

    group = "enrollment"
    topics = ("catalog.course.v1",)

    def __init__(self, settles: int | None = None) -> None:
        self.settles = settles
        self.records: list[ConsumerRecord[bytes, bytes]] = []
        self.assigned: Callable[[], set[TopicPartition]] | None = None

    async def process_batch(
        self,
        records: Sequence[ConsumerRecord[bytes, bytes]],
        *,
        assigned: Callable[[], set[TopicPartition]] | None = None,
    ) -> int:
        self.records += records
        self.assigned = assigned
        return len(records) if self.settles is None else self.settles


async def test_subscribe_leaves_offsets_to_the_runtime_on_prefixed_topics_and_group() -> None:
    broker, consumer = KafkaBroker("kafka:9092"), RecordingConsumer()

    kafka.subscribe(
        broker,
        consumer,  # type: ignore[arg-type]  # a fake consumer
        membership=MEMBERSHIP,
        prefix="staging.",
        fetch_max_wait_ms=80,
        fetch_min_bytes=4096,
    )

    (subscriber,) = broker.subscribers
    assert isinstance(subscriber, LogicSubscriber)
    assert subscriber.topic_names == ["staging.catalog.course.v1"]
    assert subscriber.group_id == "staging.enrollment"
    assert subscriber.ack_policy is AckPolicy.MANUAL
    assert isinstance(subscriber, BatchSubscriber)
    assert subscriber.max_records == 100
    # What FastStream will hand aiokafka's consumer (no public way to read it back).
    options = subscriber._connection_args
    assert options["enable_auto_commit"] is False
    # Not Kafka's 500 ms: a fetch of idle partitions would hold up the busy ones' next records.
    assert options["fetch_max_wait_ms"] == 80
    assert options["fetch_min_bytes"] == 4096
    assert (
        options["session_timeout_ms"],
        options["heartbeat_interval_ms"],
        options["max_poll_interval_ms"],
    ) == (
        6000,
        1000,
        300_000,
    )


def test_membership_comes_from_the_settings() -> None:
    settings = ServiceSettings(
        database_url="postgresql://u@db/x",
        kafka_bootstrap_servers="kafka:9092",
        auth_issuer="https://issuer.test",
        auth_jwks_url="https://issuer.test/jwks.json",
        consumer_session_timeout_seconds=9,
        consumer_heartbeat_interval_seconds=1.5,
        consumer_max_poll_interval_seconds=120,
    )

    assert kafka.Membership.of(settings) == kafka.Membership(9000, 1500, 120_000)


async def test_a_subscribed_consumer_receives_the_raw_kafka_record() -> None:
    broker, consumer = KafkaBroker("kafka:9092"), RecordingConsumer()
    kafka.subscribe(broker, consumer, membership=MEMBERSHIP, prefix="staging.", fetch_max_wait_ms=80)  # type: ignore[arg-type]  # a fake consumer
    (record,) = records(1)

    async with TestKafkaBroker(broker, connect_only=False) as test_broker:
        await test_broker.publish(
            record.value,
            "staging.catalog.course.v1",
            key=record.key,
            headers={name: value.decode() for name, value in record.headers},
        )
        await test_broker.publish(record.value, "catalog.course.v1", key=record.key)

    (received,) = consumer.records
    assert received.value == record.value
    assert decode(received.headers, received.value).id == "evt-0"


P0, P1 = TopicPartition("catalog.course.v1", 0), TopicPartition("catalog.course.v1", 1)


class FakeClient:
    """aiokafka's consumer as the runtime uses it: its assignment, seeks and explicit commits."""

    def __init__(self, assigned: set[TopicPartition], commit_error: Exception | None = None) -> None:
        self.assigned = assigned
        self.commit_error = commit_error
        self.events: list[tuple[str, dict[TopicPartition, int]]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.events.append(("seek", {partition: offset}))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:  # never without offsets
        self.events.append(("commit", offsets))
        if self.commit_error is not None:
            raise self.commit_error


def polled() -> list[ConsumerRecord[bytes, bytes]]:
    """As a poll returns them: partition 0's offsets 10-12, then partition 1's 20-22."""
    (record,) = records(1)
    return [consumer_record(record, partition=0, offset=offset) for offset in (10, 11, 12)] + [
        consumer_record(record, partition=1, offset=offset) for offset in (20, 21, 22)
    ]


@pytest.mark.parametrize(
    ("settled", "events"),
    [
        (6, [("commit", {P0: 13, P1: 23})]),
        (4, [("seek", {P1: 21}), ("commit", {P0: 13, P1: 21})]),
        (1, [("seek", {P0: 11}), ("seek", {P1: 20}), ("commit", {P0: 11})]),
        (0, [("seek", {P0: 10}), ("seek", {P1: 20})]),
    ],
)
async def test_each_partition_is_left_at_its_first_unsettled_record_and_only_settled_ones_are_committed(
    settled: int, events: list[tuple[str, dict[TopicPartition, int]]]
) -> None:
    client = FakeClient({P0, P1})

    await kafka.commit_settled(client, polled(), settled)

    assert client.events == events


async def test_a_partition_lost_in_a_rebalance_is_neither_rewound_nor_committed() -> None:
    client = FakeClient({P1})

    await kafka.commit_settled(client, polled(), 4)

    assert client.events == [("seek", {P1: 21}), ("commit", {P1: 21})]


@pytest.mark.parametrize(
    "error", [CommitFailedError("rebalanced"), IllegalStateError("not assigned"), KafkaTimeoutError()]
)
async def test_a_commit_that_fails_is_logged_and_the_partitions_stay_rewound(error: Exception) -> None:
    client = FakeClient({P0, P1}, commit_error=error)

    await kafka.commit_settled(client, polled(), 1)

    assert client.events == [("seek", {P0: 11}), ("seek", {P1: 20}), ("commit", {P0: 11})]


class NeverAnswering(FakeClient):
    """Commits as aiokafka's consumer does while no group coordinator is available: never."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.events.append(("commit", offsets))
        await asyncio.Event().wait()


async def test_a_commit_no_coordinator_answers_is_given_up_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(kafka, "_COMMIT_TIMEOUT", 0.05)
    client = NeverAnswering({P0, P1})

    async with asyncio.timeout(5):  # not waited on for ever
        await kafka.commit_settled(client, polled(), 1)

    assert client.events == [("seek", {P0: 11}), ("seek", {P1: 20}), ("commit", {P0: 11})]
    assert "offsets not committed: no group coordinator answered within 0.05 s" in caplog.messages


class FakeSubscriber:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.consumer: FakeClient | None = None
        self.handler: Callable[[Any], Coroutine[Any, Any, None]] | None = None

    def __call__(self, handler: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
        self.handler = handler


class FakeBroker:
    def __init__(self) -> None:
        self.subscribers: list[FakeSubscriber] = []

    def subscriber(self, *topics: str, **options: Any) -> FakeSubscriber:
        subscriber = FakeSubscriber({"topics": topics, **options})
        self.subscribers.append(subscriber)
        return subscriber


async def test_a_consumed_batch_commits_what_the_consumer_settled_and_rewinds_the_rest() -> None:
    broker, consumer = FakeBroker(), RecordingConsumer(settles=4)
    kafka.subscribe(broker, consumer, membership=MEMBERSHIP)  # type: ignore[arg-type]  # fakes
    (subscriber,) = broker.subscribers
    subscriber.consumer = client = FakeClient({P0, P1})
    batch = tuple(polled())

    assert subscriber.handler is not None
    await subscriber.handler(SimpleNamespace(raw_message=batch))

    assert consumer.records == list(batch)
    assert consumer.assigned == client.assignment  # asked at each step of the batch
    assert client.events == [("seek", {P1: 21}), ("commit", {P0: 13, P1: 21})]


class AnsweringLate(FakeClient):
    """Commits once `answer` is set, as a commit waits for the group coordinator's answer."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        super().__init__(assigned)
        self.asked, self.answer, self.committed = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.asked.set()
        await self.answer.wait()
        await super().commit(offsets)
        self.committed.set()


async def test_a_batch_cancelled_during_its_commit_still_commits_what_it_settled() -> None:
    broker, consumer = FakeBroker(), RecordingConsumer(settles=4)
    kafka.subscribe(broker, consumer, membership=MEMBERSHIP)  # type: ignore[arg-type]  # fakes
    (subscriber,) = broker.subscribers
    subscriber.consumer = client = AnsweringLate({P0, P1})
    assert subscriber.handler is not None
    handling = asyncio.create_task(subscriber.handler(SimpleNamespace(raw_message=tuple(polled()))))
    await client.asked.wait()

    handling.cancel()  # FastStream stopping the subscriber, its shutdown grace spent
    with pytest.raises(asyncio.CancelledError):
        await handling
    client.answer.set()

    await asyncio.wait_for(client.committed.wait(), timeout=5)
    assert client.events == [("seek", {P1: 21}), ("commit", {P0: 13, P1: 21})]


class Escaping(RecordingConsumer):
    """A consumer out of which something escapes (a bug), as FastStream would swallow it."""

    async def process_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]], **options: Any) -> int:
        await super().process_batch(records, **options)
        raise RuntimeError("a bug")


async def test_a_batch_out_of_which_an_error_escapes_comes_again_from_its_first_record() -> None:
    broker, consumer = FakeBroker(), Escaping()
    kafka.subscribe(broker, consumer, membership=MEMBERSHIP)  # type: ignore[arg-type]  # fakes
    (subscriber,) = broker.subscribers
    subscriber.consumer = client = FakeClient({P1})  # partition 0 went to another member
    assert subscriber.handler is not None

    with pytest.raises(RuntimeError, match="a bug"):
        await subscriber.handler(SimpleNamespace(raw_message=tuple(polled())))

    assert client.events == [("seek", {P1: 20})]


async def test_faststream_gets_the_batch_without_reading_a_header() -> None:
    (record,) = records(1)
    # Headers FastStream's own parser fails on: not UTF-8, and without a value (Kafka allows it).
    poison: list[tuple[str, bytes | None]] = [("ce_id", b"\xff\xfe"), ("x-note", None)]
    batch = (
        consumer_record(record, offset=7),
        replace(consumer_record(record, offset=8), headers=poison),
    )

    message = await kafka._batch_of_records(batch)

    assert message.raw_message is batch
    assert message.body == [record.value, record.value]
    assert (message.headers, message.batch_headers) == ({}, [])
    assert batch[1].headers == poison
