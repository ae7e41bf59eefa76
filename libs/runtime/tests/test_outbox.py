import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import pytest
from opentelemetry.trace import Tracer

from microcred_events import EnrollmentCreated, KafkaRecord, decode, example_data
from microcred_runtime import outbox
from microcred_runtime.metrics import Metrics
from microcred_runtime.outbox import OutboxRelay, RelaySettings

from .conftest import FakeConnection, course_updated


class Publisher:
    """Acknowledges every record except those at the positions in `fail_at`."""

    def __init__(self, fail_at: Sequence[int] = ()) -> None:
        self.fail_at = fail_at
        self.batches: list[list[KafkaRecord]] = []

    async def __call__(self, records: Sequence[KafkaRecord]) -> list[BaseException | None]:
        self.batches.append(list(records))
        return [
            ConnectionError("not acknowledged") if i in self.fail_at else None for i in range(len(records))
        ]


def relay(publish: Publisher) -> OutboxRelay:
    return OutboxRelay("postgresql://unused", publish, RelaySettings(batch_size=100, poll_interval=0.001))


def outbox_row(row_id: int, insert_args: tuple[Any, ...]) -> dict[str, Any]:
    """The row that `outbox.add`'s insert (of one event) would have stored."""
    _, _, (topic,), (key,), (payload,), (headers,) = insert_args
    return {"id": row_id, "topic": topic, "message_key": key, "payload": payload, "headers": headers}


async def rows_of(count: int, *, first_id: int = 1) -> list[dict[str, Any]]:
    writer = FakeConnection()
    for _ in range(count):
        await outbox.add(writer, course_updated())  # type: ignore[arg-type]  # a fake connection
    return [outbox_row(row_id, args) for row_id, (_, args) in enumerate(writer.executed, start=first_id)]


def test_event_source_names_the_context_that_owns_the_type() -> None:
    enrollment = EnrollmentCreated.model_validate(example_data(EnrollmentCreated))

    assert outbox.event_source(course_updated()) == "urn:microcred:catalog"
    assert outbox.event_source(enrollment) == "urn:microcred:enrollment"


async def test_add_inserts_one_row_with_the_encoded_event_and_the_current_trace(tracer: Tracer) -> None:
    conn = FakeConnection()
    event = course_updated()

    with tracer.start_as_current_span("update course") as span:
        event_id = await outbox.add(conn, event)  # type: ignore[arg-type]  # a fake connection

    ((query, args),) = conn.executed
    assert "INSERT INTO outbox" in query
    assert "pg_notify" in query
    # One statement for any number of events: a column of each.
    (row_event_id,), (event_type,), (topic,), (key,), (value,), (headers_json,) = args
    assert isinstance(event_id, uuid.UUID)
    assert row_event_id == event_id
    assert (event_type, topic, key) == (event.TYPE, "catalog.course.v1", event.aggregate_id().encode())
    headers = json.loads(headers_json)
    context = span.get_span_context()
    assert (
        headers["traceparent"]
        == f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    )
    assert headers["ce_id"] == str(event_id)
    assert headers["ce_source"] == "urn:microcred:catalog"
    envelope = decode({name: text.encode() for name, text in headers.items()}, value)
    assert envelope.event == event


async def test_add_outside_a_trace_stores_no_trace_context_and_takes_an_explicit_source() -> None:
    conn = FakeConnection()

    await outbox.add(conn, course_updated(), source="urn:microcred:import")  # type: ignore[arg-type]  # a fake connection

    headers = json.loads(conn.executed[0][1][5][0])
    assert "traceparent" not in headers
    assert headers["ce_source"] == "urn:microcred:import"


async def test_add_all_queues_events_in_one_statement_each_in_the_trace_it_was_prepared_in(
    tracer: Tracer,
) -> None:
    conn = FakeConnection()
    events = [course_updated(), course_updated()]
    queued, spans = [], []
    for event in events:
        with tracer.start_as_current_span("apply one event of a batch") as span:
            queued.append(outbox.prepare(event))
            spans.append(span)

    await outbox.add_all(conn, queued)  # type: ignore[arg-type]  # a fake connection
    await outbox.add_all(conn, [])  # type: ignore[arg-type]  # a fake connection

    ((_, args),) = conn.executed
    event_ids, _, _, _, values, headers_json = args
    assert event_ids == [item.event_id for item in queued]
    for span, value, text in zip(spans, values, headers_json, strict=True):
        headers = json.loads(text)
        assert headers["traceparent"].split("-")[2] == f"{span.get_span_context().span_id:016x}"
        assert decode({name: t.encode() for name, t in headers.items()}, value).event in events


async def test_drain_publishes_pending_rows_in_id_order_and_marks_them_published() -> None:
    rows = await rows_of(3)
    conn, publish = FakeConnection(rows=rows), Publisher()

    published = await relay(publish).drain_once(conn)  # type: ignore[arg-type]  # a fake connection

    assert published == 3
    ((query, args),) = conn.fetched
    assert "ORDER BY id" in query
    assert args == (100,)
    (batch,) = publish.batches
    assert [decode(record.headers, record.value).id for record in batch] == [
        json.loads(row["headers"])["ce_id"] for row in rows
    ]
    assert {record.topic for record in batch} == {"catalog.course.v1"}
    ((update, update_args),) = conn.executed
    assert update.startswith("UPDATE outbox SET published_at")
    assert update_args == ([1, 2, 3],)


async def test_drain_marks_only_the_acknowledged_rows_when_some_fail() -> None:
    conn = FakeConnection(rows=await rows_of(4, first_id=10))

    published = await relay(Publisher(fail_at=[1, 3])).drain_once(conn)  # type: ignore[arg-type]  # a fake connection

    assert published == 2
    assert [args for _, args in conn.executed] == [([10, 12],)]


async def test_drain_with_nothing_pending_publishes_nothing() -> None:
    conn, publish = FakeConnection(rows=[]), Publisher()

    assert await relay(publish).drain_once(conn) == 0  # type: ignore[arg-type]  # a fake connection
    assert publish.batches == []
    assert conn.executed == []


async def test_drain_when_nothing_is_acknowledged_marks_nothing() -> None:
    conn = FakeConnection(rows=await rows_of(1))

    assert await relay(Publisher(fail_at=[0])).drain_once(conn) == 0  # type: ignore[arg-type]  # a fake connection
    assert conn.executed == []


class RelayConnection(FakeConnection):
    """An outbox table in memory, with the advisory lock answer and the NOTIFY listener."""

    def __init__(self, rows: list[dict[str, Any]], *, leader: bool = True) -> None:
        super().__init__(fetchval_result=leader, rows=rows)
        self.published: list[int] = []
        self.listeners: list[Callable[..., None]] = []
        self.closed = False

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        await super().fetch(query, *args)
        return [row for row in self.rows if row["id"] not in self.published]

    async def execute(self, query: str, *args: Any) -> str:
        if query.startswith("UPDATE outbox SET published_at"):
            self.published.extend(args[0])
        return await super().execute(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> dict[str, Any]:
        if query.startswith("WITH head AS"):
            # The purge of published rows past retention: none of these is.
            return {"read": len(self.rows), "purged": 0}
        # The relay's backlog probe: how many rows are still unpublished, and the oldest's age.
        pending = [row for row in self.rows if row["id"] not in self.published]
        return {"backlog": len(pending), "lag": 1.5 if pending else 0}

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None:
        self.listeners.append(callback)

    def notify(self) -> None:
        for callback in self.listeners:
            callback(self, 1, outbox.CHANNEL, "")

    async def close(self, *, timeout: float) -> None:
        self.closed = True


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(1):
        while not condition():  # noqa: ASYNC110  # polling a fake's state is the simplest wait here
            await asyncio.sleep(0.001)


def connect_to(*connections: RelayConnection | Exception) -> Callable[[str], Awaitable[RelayConnection]]:
    """`asyncpg.connect` that hands out the given connections (or raises the given errors), then refuses."""
    remaining = list(connections)

    async def connect(dsn: str) -> RelayConnection:
        outcome = remaining.pop(0) if remaining else ConnectionRefusedError("PostgreSQL is down")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return connect


async def test_the_leader_publishes_committed_rows_and_is_woken_by_notify(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn, publish = RelayConnection(await rows_of(2)), Publisher()
    monkeypatch.setattr(asyncpg, "connect", connect_to(conn))
    # A poll interval far beyond the test's patience: only NOTIFY can explain a prompt publication.
    metrics = Metrics()
    the_relay = OutboxRelay("postgresql://db", publish, RelaySettings(poll_interval=60), metrics)

    the_relay.start()
    await eventually(lambda: conn.published == [1, 2])
    assert the_relay.is_leader
    assert metrics.registry.get_sample_value("microcred_outbox_published_total") == 2
    assert metrics.registry.get_sample_value("microcred_outbox_backlog") == 0
    conn.rows += await rows_of(1, first_id=3)
    conn.notify()
    await eventually(lambda: conn.published == [1, 2, 3])
    await the_relay.stop()

    assert [len(batch) for batch in publish.batches] == [2, 1]
    assert conn.closed
    assert not the_relay.is_leader


async def test_a_replica_that_is_not_the_leader_publishes_nothing_and_stops_promptly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conn, publish = RelayConnection(await rows_of(1), leader=False), Publisher()
    monkeypatch.setattr(asyncpg, "connect", connect_to(conn))
    the_relay = OutboxRelay("postgresql://db", publish, RelaySettings(poll_interval=60))

    the_relay.start()
    await eventually(lambda: len(conn.fetched) == 1)
    async with asyncio.timeout(1):
        await the_relay.stop()

    assert publish.batches == []
    assert not the_relay.is_leader


async def test_the_relay_backs_off_while_postgresql_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    class LostDuringPurge(RelayConnection):
        async def execute(self, query: str, *args: Any) -> str:
            if query.startswith("DELETE"):
                self.notify()  # a commit elsewhere, just before the server went away
                raise ConnectionResetError("server closed the connection")
            return await super().execute(query, *args)

    attempts = 0
    connect = connect_to(LostDuringPurge([]))

    async def counting_connect(dsn: str) -> RelayConnection:
        nonlocal attempts
        attempts += 1
        return await connect(dsn)

    monkeypatch.setattr(asyncpg, "connect", counting_connect)
    the_relay = OutboxRelay("postgresql://db", Publisher(), RelaySettings(poll_interval=0.02))

    the_relay.start()
    await asyncio.sleep(0.1)
    await the_relay.stop()

    # One connection, then one retry per poll interval at most.
    assert attempts <= 1 + 0.1 / 0.02 + 1
