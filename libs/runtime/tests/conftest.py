"""Small fakes that stand in for asyncpg and aiokafka, so these tests need no PostgreSQL and no Kafka."""

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer

from microcred_events import CourseUpdated, KafkaRecord, example_data


class FakeConnection:
    """Records every statement; `fetchval` answers with `fetchval_result` (the inbox insert's reply)."""

    def __init__(self, *, fetchval_result: object = True, rows: list[dict[str, Any]] | None = None) -> None:
        self.fetchval_result = fetchval_result
        self.rows = rows or []
        self.executed: list[tuple[str, tuple[Any, ...]]] = []
        self.fetched: list[tuple[str, tuple[Any, ...]]] = []
        self.transactions: list[str] = []

    async def execute(self, query: str, *args: Any) -> str:
        self.executed.append((query, args))
        return "OK"

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        self.fetched.append((query, args))
        return self.rows

    async def fetchval(self, query: str, *args: Any) -> object:
        self.fetched.append((query, args))
        return self.fetchval_result

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            self.transactions.append("rolled back")
            raise
        self.transactions.append("committed")


class FakePool:
    """Lends its one connection, or raises `acquire_error` as an unreachable server would."""

    def __init__(self, conn: FakeConnection | None = None, *, acquire_error: Exception | None = None) -> None:
        self.conn = conn or FakeConnection()
        self.acquire_error = acquire_error

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConnection]:
        if self.acquire_error is not None:
            raise self.acquire_error
        yield self.conn


def course_updated() -> CourseUpdated:
    return CourseUpdated.model_validate(example_data(CourseUpdated))


def consumer_record(
    record: KafkaRecord, *, partition: int = 1, offset: int = 42, key: bytes | None = None
) -> ConsumerRecord[bytes, bytes]:
    """The record as a consumer would receive it from the topic it was produced to."""
    return ConsumerRecord(
        topic=record.topic,
        partition=partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=record.key if key is None else key,
        value=record.value,
        checksum=None,
        serialized_key_size=len(record.key or b""),
        serialized_value_size=len(record.value),
        headers=record.headers,
    )


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    """An SDK tracer of a provider of its own, so spans have real ids without a global provider."""
    provider = TracerProvider()
    yield provider.get_tracer("microcred.runtime.tests")
    provider.shutdown()
