import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
    RecordListTooLargeError,
    RequestTimedOutError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from microcred_events import (
    CoursePublished,
    CourseUpdated,
    EnrollmentCreated,
    Event,
    KafkaRecord,
    encode,
    example_data,
)
from microcred_runtime import Connection, Outcome, Rejected, Subscriptions, consumers
from microcred_runtime.consumers import (
    Delivery,
    EventConsumer,
    Inbound,
    RetryPolicy,
    dead_letter_record,
    is_outage,
)
from microcred_runtime.metrics import Metrics

from .conftest import FakeConnection, FakePool, consumer_record, course_updated

GROUP = "enrollment"
SOURCE = "urn:microcred:catalog"


class Handler:
    """Fails its first `failures` calls with `error`, then succeeds; remembers what it was given."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or RuntimeError("boom")
        self.events: list[Any] = []

    async def __call__(self, conn: Connection, event: Any) -> None:
        self.events.append(event)
        if len(self.events) <= self.failures:
            raise self.error


class DeadLetters:
    """Publishes dead letters, or fails the first `failures` with `error`."""

    def __init__(self, error: Exception | None = None, failures: int = 10**6) -> None:
        self.error = error
        self.failures = failures
        self.attempts = 0
        self.records: list[KafkaRecord] = []

    async def publish(self, record: KafkaRecord) -> None:
        self.attempts += 1
        if self.error is not None and self.attempts <= self.failures:
            raise self.error
        self.records.append(record)

    def only_headers(self) -> dict[str, bytes]:
        (record,) = self.records
        return dict(record.headers)


def consumer(
    handler: Handler,
    pool: FakePool,
    dead_letters: DeadLetters,
    *,
    handles: type[Event] = CourseUpdated,
    metrics: Metrics | None = None,
    budget_seconds: float = 60.0,
) -> EventConsumer:
    subscriptions = Subscriptions()
    subscriptions.on(handles)(handler)
    return consumer_of(subscriptions, pool, dead_letters, metrics=metrics, budget_seconds=budget_seconds)


def consumer_of(
    subscriptions: Subscriptions,
    pool: FakePool,
    dead_letters: DeadLetters,
    *,
    metrics: Metrics | None = None,
    budget_seconds: float = 60.0,
) -> EventConsumer:
    (route,) = subscriptions.routes(GROUP)
    return EventConsumer(
        route,
        pool=pool,  # type: ignore[arg-type]  # a fake pool lending a fake connection
        publish_dead_letter=dead_letters.publish,
        retry=RetryPolicy(max_attempts=3, backoff_seconds=0.001),
        budget_seconds=budget_seconds,
        metrics=metrics,
    )


def valid_record() -> KafkaRecord:
    return encode(course_updated(), source=SOURCE, event_id="evt-1")


def consumed(metrics: Metrics, outcome: Outcome, topic: str = "catalog.course.v1") -> float:
    value = metrics.registry.get_sample_value(
        "microcred_messages_consumed_total", {"topic": topic, "outcome": outcome}
    )
    return value or 0.0


async def noop(conn: Connection, event: Any) -> None:
    """A handler that is only registered, never run."""


def test_one_handler_can_take_several_event_types() -> None:
    subscriptions = Subscriptions()

    subscriptions.on(CoursePublished, CourseUpdated)(noop)

    assert subscriptions.handler_for(CoursePublished.TYPE) is noop
    assert subscriptions.handler_for(CourseUpdated.TYPE) is noop
    assert subscriptions.handler_for(EnrollmentCreated.TYPE) is None


def test_a_second_handler_for_an_event_type_is_refused() -> None:
    subscriptions = Subscriptions()
    subscriptions.on(CourseUpdated)(noop)

    with pytest.raises(ValueError, match=r"catalog\.course\.updated\.v1 already has a handler"):
        subscriptions.on(CourseUpdated)(Handler())


def test_topics_are_those_of_the_handled_events_once_each() -> None:
    subscriptions = Subscriptions()
    subscriptions.on(EnrollmentCreated)(Handler())
    subscriptions.on(CoursePublished, CourseUpdated)(noop)
    subscriptions.raw("partner.x.v1", group="enrollment-partners", read=read_raw)(noop)

    assert subscriptions.topics == ["catalog.course.v1", "enrollment.enrollment.v1"]
    assert Subscriptions().topics == []


def test_the_events_and_each_raw_subscription_are_consumer_groups_of_their_own() -> None:
    subscriptions = Subscriptions()
    subscriptions.on(CourseUpdated)(noop)
    subscriptions.raw("partner.x.v1", group="enrollment-partners", read=read_raw)(noop)

    events, raw = subscriptions.routes(GROUP)

    assert (events.group, events.topics) == (GROUP, ("catalog.course.v1",))
    assert (raw.group, raw.topics) == ("enrollment-partners", ("partner.x.v1",))
    only_raw = Subscriptions()
    only_raw.raw("partner.x.v1", group="enrollment-partners", read=read_raw)(noop)
    assert [route.group for route in only_raw.routes(GROUP)] == ["enrollment-partners"]
    assert Subscriptions().routes(GROUP) == []


def test_a_raw_subscription_needs_a_topic_and_a_group_of_its_own() -> None:
    subscriptions = Subscriptions()
    subscriptions.raw("partner.x.v1", group="enrollment-partners", read=read_raw)(noop)

    with pytest.raises(ValueError, match="already has a raw subscription"):
        subscriptions.raw("partner.x.v1", group="other", read=read_raw)(noop)
    with pytest.raises(ValueError, match="already has a raw subscription"):
        subscriptions.raw("partner.y.v1", group="enrollment-partners", read=read_raw)(noop)
    with pytest.raises(ValueError, match="cannot use the events' consumer group"):
        subscriptions.routes("enrollment-partners")


def test_retry_delay_doubles_from_the_first_backoff() -> None:
    policy = RetryPolicy(max_attempts=4, backoff_seconds=0.5)

    assert [policy.delay(attempt) for attempt in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert policy.pause == 4.0


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("refused"),
        TimeoutError(),
        asyncpg.CannotConnectNowError("starting up"),
        asyncpg.InternalClientError("connection died"),
        KafkaTimeoutError(),
        KafkaConnectionError("no broker"),
        NotEnoughReplicasError(),
        RequestTimedOutError(),
    ],
)
def test_an_unavailable_database_or_broker_is_an_outage(error: Exception) -> None:
    assert is_outage(error)


@pytest.mark.parametrize(
    "error", [RuntimeError("a bug"), ValueError("bad"), MessageSizeTooLargeError(), Rejected("r", "d")]
)
def test_anything_else_is_not_an_outage(error: Exception) -> None:
    assert not is_outage(error)


def test_dead_letter_record_keeps_the_message_and_says_why_it_failed() -> None:
    original = valid_record()
    earlier_failure = [("dlq_reason", b"handler_failed"), ("dlq_attempts", b"5")]
    received = consumer_record(
        KafkaRecord(original.topic, original.key, original.value, [*original.headers, *earlier_failure]),
        partition=2,
        offset=1234,
    )

    dead = dead_letter_record(received, GROUP, "schema_violation", "x" * 5000, attempts=3)

    assert dead.topic == "enrollment.dlq"
    assert (dead.key, dead.value) == (original.key, original.value)
    assert dead.headers[: len(original.headers)] == original.headers
    added = dead.headers[len(original.headers) :]
    assert [name for name, _ in added] == [
        "dlq_reason",
        "dlq_detail",
        "dlq_topic",
        "dlq_partition",
        "dlq_offset",
        "dlq_consumer_group",
        "dlq_attempts",
        "dlq_failed_at",
    ]
    headers = dict(added)
    assert headers["dlq_reason"] == b"schema_violation"
    assert headers["dlq_detail"] == b"x" * 2000
    assert headers["dlq_topic"] == b"catalog.course.v1"
    assert (headers["dlq_partition"], headers["dlq_offset"]) == (b"2", b"1234")
    assert headers["dlq_consumer_group"] == GROUP.encode()
    assert headers["dlq_attempts"] == b"3"
    failed_at = datetime.fromisoformat(headers["dlq_failed_at"].decode())
    assert failed_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - failed_at) < timedelta(minutes=1)


def test_the_dead_letter_of_a_keyless_record_is_keyless() -> None:
    original = valid_record()
    keyless = replace(consumer_record(original), key=None)

    dead = dead_letter_record(keyless, GROUP, "schema_violation", "bad", attempts=0)

    # Not b"": the letters of keyless records would all go to that key's one partition.
    assert dead.key is None
    assert dead.value == original.value


# What aiokafka's producer takes at most (its max_request_size, which kafka.reliable_producer keeps).
PRODUCER_MAX_REQUEST_SIZE = 1024 * 1024


def with_value_of(size: int) -> ConsumerRecord[bytes, bytes]:
    original = valid_record()
    return consumer_record(KafkaRecord(original.topic, original.key, b"x" * size, original.headers))


def estimated_size(record: KafkaRecord) -> int:
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, record.value, record.headers)
    return size


def test_a_dead_letter_keeps_a_value_that_fits_with_its_headers() -> None:
    received = with_value_of(1_000_000)

    dead = dead_letter_record(received, GROUP, "schema_violation", "x" * 5000, attempts=0)

    assert dead.value == received.value
    assert not any(name.startswith("dlq_value") for name, _ in dead.headers)
    assert estimated_size(dead) <= PRODUCER_MAX_REQUEST_SIZE


def test_a_message_too_large_to_dead_letter_with_its_headers_is_dead_lettered_without_its_value() -> None:
    # As large as the broker takes: with the dlq_* headers, it would be more than the producer takes.
    received = with_value_of(PRODUCER_MAX_REQUEST_SIZE - 500)

    dead = dead_letter_record(received, GROUP, "schema_violation", "x" * 5000, attempts=0)

    assert (dead.topic, dead.key, dead.value) == ("enrollment.dlq", received.key, b"")
    headers = dict(dead.headers)
    assert headers["dlq_reason"] == b"schema_violation"
    assert (headers["dlq_topic"], headers["dlq_offset"]) == (b"catalog.course.v1", b"42")
    assert headers["dlq_value_dropped"] == str(len(received.value)).encode()
    assert headers["dlq_value_sha256"] == hashlib.sha256(received.value).hexdigest().encode()
    assert dead.headers[: len(received.headers)] == received.headers
    assert estimated_size(dead) <= PRODUCER_MAX_REQUEST_SIZE
    with_value = KafkaRecord(dead.topic, dead.key, received.value, dead.headers)
    assert estimated_size(with_value) > PRODUCER_MAX_REQUEST_SIZE


def test_headers_then_a_key_too_large_to_dead_letter_are_dropped_too() -> None:
    original = valid_record()
    huge_header = consumer_record(
        KafkaRecord(original.topic, original.key, b"{}", [*original.headers, ("x-big", b"h" * 1_040_000)])
    )
    huge_key = consumer_record(KafkaRecord(original.topic, b"k" * 1_040_000, b"{}", original.headers))

    without_headers = dead_letter_record(huge_header, GROUP, "schema_violation", "bad", attempts=0)
    without_key = dead_letter_record(huge_key, GROUP, "schema_violation", "bad", attempts=0)

    headers = dict(without_headers.headers)
    assert not {"x-big", "ce_id"} & headers.keys()
    assert (headers["dlq_reason"], headers["dlq_value_dropped"]) == (b"schema_violation", b"2")
    assert int(headers["dlq_headers_dropped"]) > 1_040_000
    assert without_headers.key == original.key
    headers = dict(without_key.headers)
    assert without_key.key is None
    assert headers["dlq_key_dropped"] == b"1040000"
    assert headers["dlq_key_sha256"] == hashlib.sha256(b"k" * 1_040_000).hexdigest().encode()
    for dead in (without_headers, without_key):
        assert estimated_size(dead) <= PRODUCER_MAX_REQUEST_SIZE


class InboxConnection(FakeConnection):
    """A fake connection with an inbox that a rolled-back transaction leaves as it was."""

    def __init__(self, inbox: set[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.inbox: set[tuple[str, str]] = inbox or set()
        self._pending: set[tuple[str, str]] = set()

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        await super().fetch(query, *args)
        _, sources, ids, *_ = args
        return [
            {"source": source, "event_id": event_id}
            for source, event_id in zip(sources, ids, strict=True)
            if self._insert((source, event_id))
        ]

    async def fetchval(self, query: str, *args: Any) -> object:
        await super().fetchval(query, *args)
        _, source, event_id, *_ = args
        return True if self._insert((source, event_id)) else None

    async def execute(self, query: str, *args: Any) -> str:
        if query.startswith("DELETE FROM inbox"):
            _, sources, ids = args
            self._pending -= set(zip(sources, ids, strict=True))
        return await super().execute(query, *args)

    def _insert(self, key: tuple[str, str]) -> bool:
        if key in self.inbox or key in self._pending:
            return False
        self._pending.add(key)
        return True

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self._pending = set()
        try:
            async with super().transaction():
                yield
        finally:
            if self.transactions[-1] == "committed":
                self.inbox |= self._pending
            self._pending = set()


async def test_an_event_is_applied_in_one_transaction_with_its_inbox_row() -> None:
    handler, dead_letters, metrics = Handler(), DeadLetters(), Metrics()
    pool = FakePool(InboxConnection())

    settled = await consumer(handler, pool, dead_letters, metrics=metrics).process_batch(
        [consumer_record(valid_record())]
    )

    assert settled == 1
    assert consumed(metrics, Outcome.APPLIED) == 1
    assert handler.events == [course_updated()]
    assert pool.conn.transactions == ["committed"]
    ((query, args),) = pool.conn.fetched
    assert "INSERT INTO inbox" in query
    assert [list(column) for column in args[1:]] == [
        [SOURCE],
        ["evt-1"],
        [CourseUpdated.TYPE],
        ["catalog.course.v1"],
        [1],
        [42],
    ]
    assert dead_letters.records == []


async def test_a_message_that_is_not_an_event_is_dead_lettered_without_attempts() -> None:
    handler, dead_letters, metrics = Handler(), DeadLetters(), Metrics()
    pool = FakePool(InboxConnection())
    record = valid_record()
    not_json = KafkaRecord(record.topic, record.key, b"{not json", record.headers)

    settled = await consumer(handler, pool, dead_letters, metrics=metrics).process_batch(
        [consumer_record(not_json)]
    )

    assert settled == 1
    assert consumed(metrics, Outcome.DEAD_LETTERED) == 1
    headers = dead_letters.only_headers()
    assert headers["dlq_reason"] == b"malformed_body"
    assert headers["dlq_detail"].startswith(b"the body is not JSON")
    assert headers["dlq_attempts"] == b"0"
    assert dead_letters.records[0].value == b"{not json"
    assert handler.events == []
    assert pool.conn.fetched == []


async def test_a_valid_event_of_a_type_not_handled_here_is_ignored() -> None:
    handler, dead_letters, metrics = Handler(), DeadLetters(), Metrics()
    pool = FakePool(InboxConnection())

    settled = await consumer(
        handler, pool, dead_letters, handles=CoursePublished, metrics=metrics
    ).process_batch([consumer_record(valid_record())])

    assert settled == 1
    assert consumed(metrics, Outcome.IGNORED) == 1
    assert handler.events == []
    assert pool.conn.fetched == []
    assert dead_letters.records == []


async def test_a_handler_that_fails_twice_is_retried_and_applied_on_the_third_attempt() -> None:
    handler, dead_letters, metrics = Handler(failures=2), DeadLetters(), Metrics()
    pool = FakePool(InboxConnection())

    await consumer(handler, pool, dead_letters, metrics=metrics).process_batch(
        [consumer_record(valid_record())]
    )

    assert consumed(metrics, Outcome.APPLIED) == 1
    assert len(handler.events) == 3
    assert pool.conn.transactions == ["rolled back", "rolled back", "committed"]
    assert dead_letters.records == []


async def test_a_handler_that_keeps_failing_is_dead_lettered_after_max_attempts() -> None:
    handler, dead_letters, metrics = Handler(failures=99), DeadLetters(), Metrics()
    pool = FakePool(InboxConnection())

    settled = await consumer(handler, pool, dead_letters, metrics=metrics).process_batch(
        [consumer_record(valid_record())]
    )

    assert settled == 1
    assert consumed(metrics, Outcome.DEAD_LETTERED) == 1
    assert len(handler.events) == 3
    assert pool.conn.transactions == ["rolled back"] * 3
    headers = dead_letters.only_headers()
    assert headers["dlq_reason"] == b"handler_failed"
    assert headers["dlq_detail"] == b"RuntimeError: boom"
    assert headers["dlq_attempts"] == b"3"


async def test_a_rejected_event_is_dead_lettered_at_once() -> None:
    rejected = Rejected("unknown_course", "course 3f1c2a9e is not in the catalog")
    handler, dead_letters = Handler(failures=99, error=rejected), DeadLetters()
    pool = FakePool(InboxConnection())

    assert await consumer(handler, pool, dead_letters).process_batch([consumer_record(valid_record())]) == 1

    assert len(handler.events) == 1
    assert pool.conn.transactions == ["rolled back"]
    headers = dead_letters.only_headers()
    assert headers["dlq_reason"] == b"unknown_course"
    assert headers["dlq_detail"] == b"course 3f1c2a9e is not in the catalog"
    assert headers["dlq_attempts"] == b"1"


async def test_a_handler_hitting_an_outage_leaves_the_event_unsettled_without_retries_or_dead_letter() -> (
    None
):
    handler = Handler(failures=99, error=ConnectionRefusedError("connection refused"))
    dead_letters = DeadLetters()
    pool = FakePool(InboxConnection())

    assert await consumer(handler, pool, dead_letters).process_batch([consumer_record(valid_record())]) == 0

    assert len(handler.events) == 1
    assert pool.conn.transactions == ["rolled back"]
    assert dead_letters.records == []


async def test_an_unreachable_database_leaves_the_event_unsettled_without_dead_letter() -> None:
    handler, dead_letters = Handler(), DeadLetters()
    pool = FakePool(acquire_error=OSError("no route to host"))

    assert await consumer(handler, pool, dead_letters).process_batch([consumer_record(valid_record())]) == 0

    assert handler.events == []
    assert dead_letters.records == []


async def test_a_redelivered_event_is_a_duplicate_and_not_applied_again() -> None:
    handler, dead_letters, metrics = Handler(), DeadLetters(), Metrics()
    pool = FakePool(InboxConnection(inbox={(SOURCE, "evt-1")}))

    settled = await consumer(handler, pool, dead_letters, metrics=metrics).process_batch(
        [consumer_record(valid_record())]
    )

    assert settled == 1
    assert consumed(metrics, Outcome.DUPLICATE) == 1
    assert handler.events == []
    assert dead_letters.records == []


# --- batches -------------------------------------------------------------------------------------


class FailingOn(Handler):
    """Fails its first `failures` calls for the event of `course_id` with `error`."""

    def __init__(self, course_id: uuid.UUID, failures: int, error: Exception | None = None) -> None:
        super().__init__(failures, error)
        self.course_id = course_id
        self.failed = 0

    async def __call__(self, conn: Connection, event: Any) -> None:
        self.events.append(event)
        if event.course.course_id == self.course_id and self.failed < self.failures:
            self.failed += 1
            raise self.error


def batch(
    count: int, *, first_offset: int = 0, partition: int = 1, first: int = 0
) -> list[ConsumerRecord[bytes, bytes]]:
    """`count` events of courses `first + 1`, ..., ids `evt-<first>`, ..., consecutive in one partition."""
    records = []
    for number in range(first, first + count):
        event = course_updated()
        event = event.model_copy(
            update={"course": event.course.model_copy(update={"course_id": uuid.UUID(int=number + 1)})}
        )
        record = encode(event, source=SOURCE, event_id=f"evt-{number}")
        records.append(consumer_record(record, partition=partition, offset=first_offset + number - first))
    return records


def course_ids(handler: Handler) -> list[int]:
    return [event.course.course_id.int for event in handler.events if isinstance(event, CourseUpdated)]


def not_json(like: ConsumerRecord[bytes, bytes]) -> ConsumerRecord[bytes, bytes]:
    return consumer_record(
        KafkaRecord(like.topic, b"k", b"{not json", list(like.headers)),
        partition=like.partition,
        offset=like.offset,
    )


def with_header(
    like: ConsumerRecord[bytes, bytes], name: str, value: bytes | None
) -> ConsumerRecord[bytes, bytes]:
    """The record with `name` set to `value` (None: a header without a value, as aiokafka gives it)."""
    headers = [(key, content) for key, content in like.headers if key != name]
    return replace(like, headers=[*headers, (name, value)])


async def test_a_header_without_a_value_costs_only_its_own_record_and_the_batch_goes_on() -> None:
    handler, dead_letters = Handler(), DeadLetters()
    conn = InboxConnection()
    records = batch(4)
    records[1] = with_header(records[1], "ce_id", None)  # a header the event needs
    records[2] = with_header(records[2], "x-note", None)  # one it does not

    assert await consumer(handler, FakePool(conn), dead_letters).process_batch(records) == 4

    assert course_ids(handler) == [1, 3, 4]
    assert conn.inbox == {(SOURCE, "evt-0"), (SOURCE, "evt-2"), (SOURCE, "evt-3")}
    headers = dead_letters.only_headers()
    assert (headers["dlq_reason"], headers["dlq_detail"]) == (b"invalid_header", b"header ce_id is empty")
    assert headers["ce_id"] == b""
    assert dead_letters.records[0].value == records[1].value


async def test_a_batch_is_applied_in_one_transaction_with_one_inbox_statement() -> None:
    handler, dead_letters = Handler(), DeadLetters()
    conn = InboxConnection()
    pool = FakePool(conn)

    settled = await consumer(handler, pool, dead_letters).process_batch(batch(3))

    assert settled == 3
    assert course_ids(handler) == [1, 2, 3]
    assert pool.conn.transactions == ["committed"]
    ((query, args),) = pool.conn.fetched
    assert "unnest" in query
    assert args[0] == GROUP
    assert list(args[2]) == ["evt-0", "evt-1", "evt-2"]
    assert list(args[6]) == [0, 1, 2]  # the offsets


async def test_an_event_twice_in_a_batch_or_again_later_is_applied_once() -> None:
    handler, dead_letters = Handler(), DeadLetters()
    conn = InboxConnection()
    pool = FakePool(conn)
    records = batch(2)
    eventful = consumer(handler, pool, dead_letters)

    assert await eventful.process_batch([records[0], records[1], records[0]]) == 3
    assert await eventful.process_batch(records) == 2

    assert course_ids(handler) == [1, 2]


async def test_a_failing_handler_is_retried_alone_and_the_others_still_apply() -> None:
    handler, dead_letters = FailingOn(uuid.UUID(int=2), failures=1), DeadLetters()
    conn = InboxConnection()
    pool = FakePool(conn)

    settled = await consumer(handler, pool, dead_letters).process_batch(batch(4))

    assert settled == 4
    # The batch ran 1 and failed on 2; then 1 again, 2 alone (its second attempt), then 3 and 4.
    assert course_ids(handler) == [1, 2, 1, 2, 3, 4]
    assert pool.conn.transactions == ["rolled back", "committed", "committed", "committed"]
    assert conn.inbox == {(SOURCE, f"evt-{number}") for number in range(4)}
    assert dead_letters.records == []


async def test_a_handler_that_keeps_failing_in_a_batch_is_dead_lettered_after_max_attempts() -> None:
    handler, dead_letters = FailingOn(uuid.UUID(int=2), failures=99), DeadLetters()
    conn = InboxConnection()
    pool = FakePool(conn)

    settled = await consumer(handler, pool, dead_letters).process_batch(batch(3))

    assert settled == 3
    assert handler.failed == 3  # the batch's run counts as its first attempt
    headers = dead_letters.only_headers()
    assert (headers["dlq_reason"], headers["dlq_attempts"], headers["dlq_offset"]) == (
        b"handler_failed",
        b"3",
        b"1",
    )
    assert conn.inbox == {(SOURCE, "evt-0"), (SOURCE, "evt-2")}


async def test_a_rejected_event_in_a_batch_is_dead_lettered_after_its_one_attempt() -> None:
    rejected = Rejected("unknown_course", "not in the catalog")
    handler, dead_letters = FailingOn(uuid.UUID(int=1), failures=99, error=rejected), DeadLetters()
    conn = InboxConnection()
    pool = FakePool(conn)

    assert await consumer(handler, pool, dead_letters).process_batch(batch(2)) == 2

    assert handler.failed == 1
    assert dead_letters.only_headers()["dlq_attempts"] == b"1"
    assert conn.inbox == {(SOURCE, "evt-1")}


class Batched:
    """A batch handler that fails every call including the event of course `poison` (at most
    `failures` times, with `error`), and rejects (`Delivery.reject`) those of `rejects`;
    remembers the courses of each call, and of each applied."""

    def __init__(
        self, poison: int = 0, failures: int = 0, error: Exception | None = None, rejects: Sequence[int] = ()
    ) -> None:
        self.poison, self.failures, self.failed = poison, failures, 0
        self.rejects = set(rejects)
        self.error = error or RuntimeError("boom")
        self.calls: list[list[int]] = []
        self.spans: list[Any] = []

    async def __call__(self, conn: Connection, deliveries: Sequence[Delivery]) -> None:
        courses = [delivery.content.course.course_id.int for delivery in deliveries]
        self.calls.append(courses)
        self.spans.extend(delivery.span for delivery in deliveries)
        if self.poison in courses and self.failed < self.failures:
            self.failed += 1
            raise self.error
        for delivery, course in zip(deliveries, courses, strict=True):
            if course in self.rejects:
                delivery.reject("forged", f"course {course} is not signed")


def batched_consumer(
    handler: Batched, pool: FakePool, dead_letters: DeadLetters, *, each: Handler | None = None
) -> EventConsumer:
    """`handler` takes CourseUpdated together; `each`, if given, CoursePublished one at a time."""
    subscriptions = Subscriptions()
    subscriptions.on_batch(CourseUpdated)(handler)
    if each is not None:
        subscriptions.on(CoursePublished)(each)
    return consumer_of(subscriptions, pool, dead_letters)


async def test_a_batch_handler_gets_consecutive_events_together_in_one_transaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(consumers, "_tracer", provider.get_tracer("test"))
    handler, dead_letters = Batched(), DeadLetters()
    conn = InboxConnection()
    journeys = [f"00-{number + 1:032x}-{number + 1:016x}-01" for number in range(4)]
    records = [
        with_header(record, "traceparent", journey.encode())
        for record, journey in zip(batch(4), journeys, strict=True)
    ]

    assert await batched_consumer(handler, FakePool(conn), dead_letters).process_batch(records) == 4

    assert handler.calls == [[1, 2, 3, 4]]
    assert conn.transactions == ["committed"]
    assert conn.inbox == {(SOURCE, f"evt-{number}") for number in range(4)}
    # Each event has a span of its own in its journey's trace, ended once its batch is applied.
    assert [span.get_span_context().trace_id for span in handler.spans] == [1, 2, 3, 4]
    ended = [span for span in exporter.get_finished_spans() if span.name == "catalog.course.v1 process"]
    assert [span.parent.span_id for span in ended if span.parent] == [1, 2, 3, 4]
    provider.shutdown()


async def test_events_of_a_handler_of_one_event_split_a_batch_handlers_run_in_their_order() -> None:
    handler, each, dead_letters = Batched(), Handler(), DeadLetters()
    conn = InboxConnection()
    records = batch(4)
    published = encode(
        CoursePublished.model_validate(example_data(CoursePublished)), source=SOURCE, event_id="evt-p"
    )
    records.insert(2, consumer_record(published, offset=99))
    records.append(records[0])  # a duplicate is no event of the run: it does not split it

    assert (
        await batched_consumer(handler, FakePool(conn), dead_letters, each=each).process_batch(records) == 6
    )

    assert handler.calls == [[1, 2], [3, 4]]
    assert [type(event) for event in each.events] == [CoursePublished]
    assert conn.transactions == ["committed"]


async def test_a_batch_handler_failing_for_one_event_finds_it_by_halves_and_applies_the_rest() -> None:
    handler, dead_letters = Batched(poison=3, failures=99), DeadLetters()
    conn = InboxConnection()

    assert await batched_consumer(handler, FakePool(conn), dead_letters).process_batch(batch(8)) == 8

    # All 8, then halves: 1-4 fail again, 5-8 apply; 1-2 apply, 3-4 fail; 3 alone fails, its
    # retries too, and is dead-lettered; 4 applies.
    assert handler.calls == [
        [1, 2, 3, 4, 5, 6, 7, 8],
        [1, 2, 3, 4],
        [1, 2],
        [3, 4],
        [3],
        [3],
        [3],
        [4],
        [5, 6, 7, 8],
    ]
    headers = dead_letters.only_headers()
    assert (headers["dlq_reason"], headers["dlq_attempts"], headers["dlq_offset"]) == (
        b"handler_failed",
        b"3",
        b"2",
    )
    assert conn.inbox == {(SOURCE, f"evt-{number}") for number in range(8) if number != 2}


async def test_a_batch_handler_rejecting_an_event_alone_dead_letters_it_at_once() -> None:
    rejected = Rejected("unknown_course", "not in the catalog")
    handler, dead_letters = Batched(poison=2, failures=99, error=rejected), DeadLetters()
    conn = InboxConnection()

    assert await batched_consumer(handler, FakePool(conn), dead_letters).process_batch(batch(2)) == 2

    assert handler.calls == [[1, 2], [1], [2]]
    assert dead_letters.only_headers()["dlq_reason"] == b"unknown_course"
    assert conn.inbox == {(SOURCE, "evt-0")}


async def test_events_a_batch_handler_rejects_are_dead_lettered_after_the_rest_commit_without_halves() -> (
    None
):
    handler, dead_letters, metrics = Batched(rejects=[2, 4]), DeadLetters(), Metrics()
    conn = InboxConnection()
    subscriptions = Subscriptions()
    subscriptions.on_batch(CourseUpdated)(handler)
    eventful = consumer_of(subscriptions, FakePool(conn), dead_letters, metrics=metrics)

    assert await eventful.process_batch(batch(5)) == 5

    assert handler.calls == [[1, 2, 3, 4, 5]]
    assert conn.transactions == ["committed"]
    assert [dict(letter.headers)["dlq_offset"] for letter in dead_letters.records] == [b"1", b"3"]
    assert {dict(letter.headers)["dlq_reason"] for letter in dead_letters.records} == {b"forged"}
    # Not in the inbox: had a dead letter failed, the event would come again and be judged again.
    assert conn.inbox == {(SOURCE, f"evt-{number}") for number in (0, 2, 4)}
    assert (consumed(metrics, Outcome.APPLIED), consumed(metrics, Outcome.DEAD_LETTERED)) == (3, 2)


async def test_a_rejected_event_whose_dead_letter_cannot_be_published_comes_again_with_its_run() -> None:
    handler = Batched(rejects=[2])
    conn = InboxConnection()
    subscriptions = Subscriptions()
    subscriptions.on_batch(CourseUpdated)(handler)
    broker_down = DeadLetters(KafkaConnectionError(), failures=1)

    assert await consumer_of(subscriptions, FakePool(conn), broker_down).process_batch(batch(3)) == 0
    # Redelivered: the applied events are duplicates now, and the rejected one is judged again.
    assert await consumer_of(subscriptions, FakePool(conn), broker_down).process_batch(batch(3)) == 3

    assert handler.calls == [[1, 2, 3], [2]]
    assert [dict(letter.headers)["dlq_offset"] for letter in broker_down.records] == [b"1"]
    assert conn.inbox == {(SOURCE, "evt-0"), (SOURCE, "evt-2")}


async def test_an_event_a_batch_handler_rejects_when_retried_alone_is_dead_lettered() -> None:
    handler, dead_letters = Batched(poison=1, failures=1, rejects=[2]), DeadLetters()
    conn = InboxConnection()

    assert await batched_consumer(handler, FakePool(conn), dead_letters).process_batch(batch(2)) == 2

    # The pair failed once (for course 1), so each went alone: course 2's rejection is then its own.
    assert handler.calls == [[1, 2], [1], [2]]
    assert [dict(letter.headers)["dlq_reason"] for letter in dead_letters.records] == [b"forged"]
    assert conn.inbox == {(SOURCE, "evt-0")}


async def test_a_batch_handler_that_fails_once_for_no_event_in_particular_applies_them_all() -> None:
    handler, dead_letters = Batched(poison=1, failures=1), DeadLetters()
    conn = InboxConnection()

    assert await batched_consumer(handler, FakePool(conn), dead_letters).process_batch(batch(4)) == 4

    assert handler.calls == [[1, 2, 3, 4], [1, 2], [3, 4]]
    assert dead_letters.records == []
    assert conn.inbox == {(SOURCE, f"evt-{number}") for number in range(4)}


async def test_a_message_that_is_not_an_event_is_dead_lettered_in_its_place() -> None:
    handler, dead_letters = Handler(), DeadLetters()
    conn = InboxConnection()
    pool = FakePool(conn)
    records = batch(3)

    settled = await consumer(handler, pool, dead_letters).process_batch(
        [records[0], not_json(records[1]), records[2]]
    )

    assert settled == 3
    assert course_ids(handler) == [1, 3]
    assert dead_letters.only_headers()["dlq_reason"] == b"malformed_body"
    assert pool.conn.transactions == ["committed", "committed"]


async def test_an_outage_settles_what_came_before_it_and_leaves_the_rest_for_redelivery() -> None:
    outage = ConnectionRefusedError("connection refused")
    handler, dead_letters = FailingOn(uuid.UUID(int=3), failures=99, error=outage), DeadLetters()
    conn = InboxConnection()
    pool = FakePool(conn)
    records = batch(4)

    settled = await consumer(handler, pool, dead_letters).process_batch(
        [records[0], not_json(records[1]), records[2], records[3]]
    )

    # The first event and the dead letter are settled; the run of the third and fourth is not.
    assert settled == 2
    assert conn.inbox == {(SOURCE, "evt-0")}
    assert len(dead_letters.records) == 1


# --- what is not a handler's failure -----------------------------------------------------------


def two_partitions() -> list[ConsumerRecord[bytes, bytes]]:
    """As a poll returns them: partition 0's records (course 2 fails for good), then partition 1's."""
    return [*batch(3, partition=0), *batch(3, partition=1, first=3)]


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (KafkaTimeoutError(), logging.WARNING),
        (NotEnoughReplicasError(), logging.WARNING),
        (RuntimeError("a bug in the publisher"), logging.ERROR),
    ],
)
async def test_a_dead_letter_that_cannot_be_published_leaves_it_and_all_after_it_unsettled(
    error: Exception, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    handler, dead_letters = FailingOn(uuid.UUID(int=2), failures=99), DeadLetters(error, failures=1)
    conn = InboxConnection()
    eventful = consumer(handler, FakePool(conn), dead_letters)
    records = two_partitions()

    with caplog.at_level(logging.INFO, logger="microcred_runtime.consumers"):
        settled = await eventful.process_batch(records)

    # Only partition 0's first event is settled: its second and all of partition 1 come again.
    assert settled == 1
    assert conn.inbox == {(SOURCE, "evt-0")}
    assert dead_letters.records == []
    (redelivered,) = [entry for entry in caplog.records if "redelivered after a pause" in entry.message]
    assert redelivered.levelno == level
    assert (redelivered.exc_info is not None) == (level == logging.ERROR)

    # Once the dead letter goes through, the rest are applied once each and it is published once.
    seen = len(handler.events)
    assert await eventful.process_batch(records[settled:]) == 5
    assert conn.inbox == {(SOURCE, f"evt-{number}") for number in (0, 2, 3, 4, 5)}
    assert course_ids(handler)[seen:] == [2, 2, 2, 3, 4, 5, 6]
    assert len(dead_letters.records) == 1
    assert dead_letters.only_headers()["dlq_offset"] == b"1"


@pytest.mark.parametrize("error", [MessageSizeTooLargeError(), RecordListTooLargeError()])
async def test_a_dead_letter_too_large_for_the_broker_goes_without_the_originals_content(
    error: Exception,
) -> None:
    handler, dead_letters = Handler(), DeadLetters(error, failures=1)
    conn = InboxConnection()
    records = batch(2)
    records[0] = not_json(records[0])

    assert await consumer(handler, FakePool(conn), dead_letters).process_batch(records) == 2

    assert course_ids(handler) == [2]
    (letter,) = dead_letters.records
    headers = dict(letter.headers)
    assert (headers["dlq_reason"], headers["dlq_topic"], headers["dlq_partition"], headers["dlq_offset"]) == (
        b"malformed_body",
        b"catalog.course.v1",
        b"1",
        b"0",
    )
    assert (letter.key, letter.value) == (None, b"")
    assert all(name.startswith("dlq_") for name in headers)
    assert headers["dlq_value_dropped"] == str(len(b"{not json")).encode()
    assert headers["dlq_key_sha256"] == hashlib.sha256(b"k").hexdigest().encode()


async def test_a_batch_takes_no_new_step_once_its_budget_is_spent() -> None:
    handler, dead_letters = Handler(), DeadLetters()
    conn = InboxConnection()
    records = batch(3)

    spent = consumer(handler, FakePool(conn), dead_letters, budget_seconds=0)

    # The first step (the first event's transaction) is always taken; the dead letter is not.
    assert await spent.process_batch([records[0], not_json(records[1]), records[2]]) == 1
    assert dead_letters.records == []
    assert await spent.process_batch([not_json(records[1]), records[2]]) == 1
    assert await spent.process_batch([records[2]]) == 1
    assert course_ids(handler) == [1, 3]


async def test_a_batch_takes_no_new_step_once_a_rebalance_took_one_of_its_partitions() -> None:
    assigned = {TopicPartition("catalog.course.v1", 0), TopicPartition("catalog.course.v1", 1)}

    class Revoking(Handler):
        """The group takes partition 0 from this member while the first event is applied."""

        async def __call__(self, conn: Connection, event: Any) -> None:
            await super().__call__(conn, event)
            assigned.discard(TopicPartition("catalog.course.v1", 0))

    handler, dead_letters = Revoking(), DeadLetters()
    conn = InboxConnection()
    records = two_partitions()
    records[1] = not_json(records[1])

    settled = await consumer(handler, FakePool(conn), dead_letters).process_batch(
        records, assigned=lambda: assigned
    )

    # Applied and committed, the first event stays; nothing after it is applied or dead-lettered.
    assert settled == 1
    assert course_ids(handler) == [1]
    assert conn.inbox == {(SOURCE, "evt-0")}
    assert dead_letters.records == []


async def test_a_failing_event_is_not_retried_or_dead_lettered_once_a_rebalance_took_its_partition() -> None:
    assigned = {TopicPartition("catalog.course.v1", 1)}

    class FailingRevoked(Handler):
        """Fails; during its second attempt, the group takes the event's partition from this member."""

        async def __call__(self, conn: Connection, event: Any) -> None:
            if self.events:
                assigned.clear()
            await super().__call__(conn, event)

    handler, dead_letters = FailingRevoked(failures=10), DeadLetters()
    conn = InboxConnection()

    settled = await consumer(handler, FakePool(conn), dead_letters).process_batch(
        batch(1), assigned=lambda: assigned
    )

    # Left to the partition's new owner: neither a third attempt nor a dead letter here.
    assert settled == 0
    assert course_ids(handler) == [1, 1]
    assert dead_letters.records == []


async def test_a_failing_event_is_not_retried_or_dead_lettered_once_the_batch_budget_is_spent() -> None:
    class SlowToFail(Handler):
        """Fails at once the first time, then only after the batch's budget is spent."""

        async def __call__(self, conn: Connection, event: Any) -> None:
            if self.events:
                await asyncio.sleep(0.2)
            await super().__call__(conn, event)

    handler, dead_letters = SlowToFail(failures=10), DeadLetters()
    conn = InboxConnection()

    spent = consumer(handler, FakePool(conn), dead_letters, budget_seconds=0.1)

    # Its third attempt and its dead letter wait for the next poll, which brings it again.
    assert await spent.process_batch(batch(1)) == 0
    assert course_ids(handler) == [1, 1]
    assert dead_letters.records == []


# --- raw subscriptions ---------------------------------------------------------------------------


def read_raw(record: ConsumerRecord[bytes, bytes]) -> Inbound:
    """A partner's plain message: `<source> <id> <text>`; `reject` dead-letters it, `crash` is a bug."""
    source, message_id, text = (record.value or b"").decode().split(" ", 2)
    if text == "reject":
        raise Rejected("unknown_partner", f"{source} is no partner")
    if text == "crash":
        raise KeyError("a bug in the reader")
    return Inbound(source, message_id, "partner.message", text)


def raw_record(text: str, message_id: str, *, offset: int) -> ConsumerRecord[bytes, bytes]:
    value = f"urn:partner:1 {message_id} {text}".encode()
    return consumer_record(KafkaRecord("partner.x.v1", b"k", value, []), offset=offset)


def raw_consumer(handler: Handler, pool: FakePool, dead_letters: DeadLetters) -> EventConsumer:
    subscriptions = Subscriptions()
    subscriptions.raw("partner.x.v1", group="enrollment-partners", read=read_raw)(handler)
    (route,) = subscriptions.routes(GROUP)
    return EventConsumer(
        route,
        pool=pool,  # type: ignore[arg-type]  # a fake pool lending a fake connection
        publish_dead_letter=dead_letters.publish,
        retry=RetryPolicy(max_attempts=3, backoff_seconds=0.001),
        budget_seconds=60,
    )


async def test_a_raw_handler_gets_what_its_reader_made_of_the_record_in_the_inbox_by_its_key() -> None:
    handler, dead_letters = Handler(), DeadLetters()
    conn = InboxConnection()
    records = [raw_record("first", "m-1", offset=0), raw_record("second", "m-2", offset=1)]

    assert (
        await raw_consumer(handler, FakePool(conn), dead_letters).process_batch([*records, records[0]]) == 3
    )

    assert handler.events == ["first", "second"]
    assert conn.inbox == {("urn:partner:1", "m-1"), ("urn:partner:1", "m-2")}
    ((_, args),) = conn.fetched
    assert args[0] == "enrollment-partners"
    assert list(args[3]) == ["partner.message"] * 3


async def test_a_raw_record_its_reader_refuses_or_fails_on_is_dead_lettered_at_once() -> None:
    handler, dead_letters = Handler(), DeadLetters()
    conn = InboxConnection()
    records = [
        raw_record("reject", "m-1", offset=0),
        raw_record("crash", "m-2", offset=1),
        raw_record("fine", "m-3", offset=2),
    ]

    assert await raw_consumer(handler, FakePool(conn), dead_letters).process_batch(records) == 3

    letters = [dict(record.headers) for record in dead_letters.records]
    assert [(h["dlq_reason"], h["dlq_attempts"]) for h in letters] == [
        (b"unknown_partner", b"0"),
        (b"unreadable", b"0"),
    ]
    assert letters[1]["dlq_detail"] == b"KeyError: 'a bug in the reader'"
    assert {record.topic for record in dead_letters.records} == {"enrollment-partners.dlq"}
    assert handler.events == ["fine"]


async def test_a_raw_handler_is_retried_and_dead_lettered_like_an_events() -> None:
    handler, dead_letters = Handler(failures=99), DeadLetters()
    conn = InboxConnection()

    settled = await raw_consumer(handler, FakePool(conn), dead_letters).process_batch(
        [raw_record("fails", "m-1", offset=0)]
    )

    assert settled == 1
    assert handler.events == ["fails"] * 3
    headers = dead_letters.only_headers()
    assert (headers["dlq_reason"], headers["dlq_attempts"]) == (b"handler_failed", b"3")
    assert conn.inbox == set()


async def test_a_deadlock_with_another_transaction_is_retried_without_spending_an_attempt() -> None:
    deadlock = asyncpg.DeadlockDetectedError("deadlock detected")
    handler, dead_letters, metrics = Handler(failures=4, error=deadlock), DeadLetters(), Metrics()
    pool = FakePool(InboxConnection())

    await consumer(handler, pool, dead_letters, metrics=metrics).process_batch(
        [consumer_record(valid_record())]
    )

    # Four conflicts, then applied: not dead-lettered after three attempts.
    assert consumed(metrics, Outcome.APPLIED) == 1
    assert pool.conn.transactions == ["rolled back"] * 4 + ["committed"]
    assert dead_letters.records == []
