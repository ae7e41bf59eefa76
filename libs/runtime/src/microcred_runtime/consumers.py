"""Consuming events: inbox de-duplication, bounded retries, and the dead-letter topic.

What a service relies on:
- Its handler runs in one PostgreSQL transaction together with the inbox row for the event, so
  a redelivered event (same CloudEvents source and id) is a no-op.
- The Kafka offset is committed only after that transaction has committed (the FastStream
  subscriber runs with `AckPolicy.NACK_ON_ERROR` and auto-commit off), so a crash at any moment
  means redelivery, never loss.
- A message that is not a valid event goes straight to the dead-letter topic with the reason; a
  handler that raises is retried `max_attempts` times with exponential backoff and then
  dead-lettered; `Rejected` skips the retries. Either way the partition moves on.
- An outage (PostgreSQL unreachable, Kafka refusing the dead letter) is not the message's fault:
  the error propagates, FastStream seeks back, and the same message is tried again later instead
  of being dead-lettered.
"""

import asyncio
import enum
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiokafka import ConsumerRecord

from microcred_events import Envelope, Event, InvalidEvent, KafkaRecord, dead_letter_topic, decode

from .db import Connection
from .metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[Connection, Any], Awaitable[None]]
"""`async def on_<event>(conn, event)`: applies one event inside the consumer's transaction."""
H = TypeVar("H", bound=Handler)

# Errors that say the infrastructure is down, not that the message is bad.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.CannotConnectNowError,
    # A pooled connection that died mid-operation (e.g. PostgreSQL restarting) is handed back so.
    asyncpg.InternalClientError,
)
_DETAIL_LIMIT = 2000


class Rejected(Exception):
    """Raised by a handler for an event that can never be applied; it is dead-lettered at once."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    DEAD_LETTERED = "dead_lettered"


class Subscriptions:
    """The one place where a service lists the events it reacts to and the handler for each."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[type[Event], Handler]] = {}

    def on(self, *event_types: type[Event]) -> Callable[[H], H]:
        def register(handler: H) -> H:
            for event_type in event_types:
                if event_type.TYPE in self._handlers:
                    raise ValueError(f"{event_type.TYPE} already has a handler")
                self._handlers[event_type.TYPE] = (event_type, handler)
            return handler

        return register

    @property
    def topics(self) -> list[str]:
        return sorted({event_type.TOPIC for event_type, _ in self._handlers.values()})

    def handler_for(self, type_: str) -> Handler | None:
        entry = self._handlers.get(type_)
        return entry[1] if entry else None


PublishDeadLetter = Callable[[KafkaRecord], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_seconds: float = 0.2

    def delay(self, attempt: int) -> float:
        return float(self.backoff_seconds * 2 ** (attempt - 1))


class EventConsumer:
    """Applies one Kafka record to the service's database, exactly once in effect."""

    def __init__(
        self,
        *,
        group: str,
        subscriptions: Subscriptions,
        pool: asyncpg.Pool,
        publish_dead_letter: PublishDeadLetter,
        retry: RetryPolicy,
        metrics: Metrics | None = None,
    ) -> None:
        self.group = group
        self._metrics = metrics or Metrics()
        self._subscriptions = subscriptions
        self._pool = pool
        self._publish_dead_letter = publish_dead_letter
        self._retry = retry

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> Outcome:
        outcome = await self._process(record)
        self._metrics.consumed.labels(record.topic, outcome).inc()
        return outcome

    async def _process(self, record: ConsumerRecord[bytes, bytes]) -> Outcome:
        try:
            envelope = decode(record.headers, record.value or b"")
        except InvalidEvent as exc:
            await self._dead_letter(record, exc.reason, exc.detail, attempts=0)
            return Outcome.DEAD_LETTERED
        handler = self._subscriptions.handler_for(envelope.type)
        if handler is None:
            # Topics carry every event type of their aggregate; this service needs only some.
            return Outcome.IGNORED
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._apply(record, envelope, handler)
            except Rejected as exc:
                await self._dead_letter(record, exc.reason, exc.detail, attempts=attempt)
                return Outcome.DEAD_LETTERED
            except TRANSIENT_ERRORS:
                # Redelivered after a pause rather than dead-lettered: see the module docstring.
                await asyncio.sleep(self._retry.delay(self._retry.max_attempts))
                raise
            except Exception as exc:
                self._metrics.handler_failures.labels(record.topic, envelope.type).inc()
                if attempt >= self._retry.max_attempts:
                    log.exception("handler failed for good", extra=_log_context(record, envelope))
                    await self._dead_letter(
                        record, "handler_failed", f"{type(exc).__name__}: {exc}", attempts=attempt
                    )
                    return Outcome.DEAD_LETTERED
                log.warning(
                    "handler failed (attempt %d of %d): %s",
                    attempt,
                    self._retry.max_attempts,
                    exc,
                    extra=_log_context(record, envelope),
                )
                await asyncio.sleep(self._retry.delay(attempt))

    async def _apply(
        self, record: ConsumerRecord[bytes, bytes], envelope: Envelope, handler: Handler
    ) -> Outcome:
        async with self._pool.acquire() as conn, conn.transaction():
            first_time = await conn.fetchval(
                'INSERT INTO inbox (consumer, source, event_id, event_type, topic, partition, "offset")'
                " VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT DO NOTHING RETURNING true",
                self.group,
                envelope.source,
                envelope.id,
                envelope.type,
                record.topic,
                record.partition,
                record.offset,
            )
            if not first_time:
                return Outcome.DUPLICATE
            await handler(conn, envelope.event)
        return Outcome.APPLIED

    async def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], reason: str, detail: str, *, attempts: int
    ) -> None:
        log.warning(
            "dead-lettering message: %s: %s",
            reason,
            detail,
            extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
        )
        await self._publish_dead_letter(dead_letter_record(record, self.group, reason, detail, attempts))
        self._metrics.dead_lettered.labels(record.topic, reason).inc()


DEAD_LETTER_HEADER_PREFIX = "dlq_"
# What one dead letter may weigh, key, value and headers: the producer's max_request_size
# (aiokafka's default, kept by kafka.reliable_producer) and the broker's message.max.bytes are
# both about 1 MiB; 16 KiB of it stay free for the record's framing and the trace headers that
# publishing adds. A message the broker took at its limit does not fit with the dlq_* headers.
DEAD_LETTER_MAX_BYTES = 1024 * 1024 - 16 * 1024


def dead_letter_record(
    record: ConsumerRecord[bytes, bytes], group: str, reason: str, detail: str, attempts: int
) -> KafkaRecord:
    """The original message, unchanged, plus headers saying where it came from and why it failed.

    One too large to publish with those headers is dead-lettered without its value, and
    `dlq_value_dropped` (its size in bytes) and `dlq_value_sha256` say so: the reason and where
    to find the original survive, and the partition moves on.
    """
    original: Sequence[tuple[str, bytes]] = [
        (name, value) for name, value in record.headers if not name.startswith(DEAD_LETTER_HEADER_PREFIX)
    ]
    key, value = record.key or b"", record.value or b""
    failure = {
        "reason": reason,
        "detail": detail[:_DETAIL_LIMIT],
        "topic": record.topic,
        "partition": str(record.partition),
        "offset": str(record.offset),
        "consumer_group": group,
        "attempts": str(attempts),
        "failed_at": datetime.now(UTC).isoformat(),
    }
    headers = [
        *original,
        *((DEAD_LETTER_HEADER_PREFIX + name, text.encode()) for name, text in failure.items()),
    ]
    if _size(key, value, headers) > DEAD_LETTER_MAX_BYTES:
        headers += [
            (DEAD_LETTER_HEADER_PREFIX + "value_dropped", str(len(value)).encode()),
            (DEAD_LETTER_HEADER_PREFIX + "value_sha256", hashlib.sha256(value).hexdigest().encode()),
        ]
        value = b""
    return KafkaRecord(topic=dead_letter_topic(group), key=key, value=value, headers=headers)


def _size(key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> int:
    return len(key) + len(value) + sum(len(name.encode()) + len(content) for name, content in headers)


def _log_context(record: ConsumerRecord[bytes, bytes], envelope: Envelope) -> dict[str, object]:
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "event_id": envelope.id,
        "event_type": envelope.type,
    }
