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
  after a pause the consumer rewinds to the first record not yet settled, and it is tried again
  instead of being dead-lettered.
- Records come in batches (what a poll returns): consecutive events share one transaction, one
  inbox INSERT and one offset commit (`process_batch`); what a failing handler changes is the
  batch's shape, never the guarantees above. Each event's handler runs in a CONSUMER span of the
  trace its record carries, so a journey keeps one trace.
"""

import asyncio
import contextlib
import enum
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiokafka import ConsumerRecord
from opentelemetry import propagate, trace

from microcred_events import Envelope, Event, InvalidEvent, KafkaRecord, dead_letter_topic, decode

from .db import Connection
from .metrics import Metrics

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("microcred.consumers")

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
        """Applies one record; an outage is raised (after a pause) for the caller to redeliver it."""
        try:
            outcome = await self._process(record)
        except TRANSIENT_ERRORS:
            await asyncio.sleep(self._retry.delay(self._retry.max_attempts))
            raise
        self._count(record, outcome)
        return outcome

    async def process_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> int:
        """Applies a poll's records in order; returns how many, from the first, are settled.

        Consecutive events are applied in one transaction with one inbox INSERT for them all: per
        event, the BEGIN, COMMIT (and its WAL flush) and inbox round trips of `process` are paid
        once per batch. A handler that raises rolls the transaction back; the events before it are
        applied again without it, it is retried on its own (the failed run was its first attempt),
        and the rest go on together. Invalid messages are dead-lettered in their place in the order.

        Fewer than all are settled only after an outage (after a pause): the caller redelivers the
        rest, from the first unsettled record of each partition.
        """
        progress = _Progress()
        run: list[_Pending] = []
        try:
            for index, record in enumerate(records):
                try:
                    envelope = decode(record.headers, record.value or b"")
                except InvalidEvent as exc:
                    await self._apply_run(run, progress)
                    run = []
                    await self._dead_letter(record, exc.reason, exc.detail, attempts=0)
                    self._count(record, Outcome.DEAD_LETTERED)
                    progress.settled = index + 1
                    continue
                run.append(_Pending(index, record, envelope, self._subscriptions.handler_for(envelope.type)))
            await self._apply_run(run, progress)
        except TRANSIENT_ERRORS as exc:
            log.warning(
                "cannot apply events, %d of %d redelivered after a pause: %s",
                len(records) - progress.settled,
                len(records),
                exc,
            )
            await asyncio.sleep(self._retry.delay(self._retry.max_attempts))
        return progress.settled

    async def process_each(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> int:
        """`process_batch` for consumers that take their records one by one (`process`)."""
        for index, record in enumerate(records):
            try:
                await self.process(record)
            except TRANSIENT_ERRORS:
                return index
        return len(records)

    def _count(self, record: ConsumerRecord[bytes, bytes], outcome: Outcome) -> None:
        self._metrics.consumed.labels(record.topic, outcome).inc()

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
        return await self._settle(record, envelope, handler)

    async def _settle(
        self,
        record: ConsumerRecord[bytes, bytes],
        envelope: Envelope,
        handler: Handler,
        *,
        failed: Exception | None = None,
    ) -> Outcome:
        return await self.settle(
            record,
            envelope.type,
            lambda: self._apply(record, envelope, handler),
            context=_log_context(record, envelope),
            failed=failed,
        )

    async def settle(
        self,
        record: ConsumerRecord[bytes, bytes],
        event_type: str,
        apply: Callable[[], Awaitable[Outcome]],
        *,
        context: dict[str, object],
        failed: Exception | None = None,
    ) -> Outcome:
        """Runs `apply` (one transaction) until it succeeds, retrying a failure with backoff up to
        the policy's attempts; then, or at once for `Rejected`, dead-letters the record. An outage
        is raised. `failed`: how a first attempt, made already, went."""
        attempt = 1
        while True:
            if failed is None:
                try:
                    return await apply()
                except TRANSIENT_ERRORS:
                    # Redelivered after a pause rather than dead-lettered: see the module docstring.
                    raise
                except Exception as exc:
                    failed = exc
            if isinstance(failed, Rejected):
                await self._dead_letter(record, failed.reason, failed.detail, attempts=attempt)
                return Outcome.DEAD_LETTERED
            self._metrics.handler_failures.labels(record.topic, event_type).inc()
            if attempt >= self._retry.max_attempts:
                log.error("handler failed for good", exc_info=failed, extra=context)
                await self._dead_letter(
                    record, "handler_failed", f"{type(failed).__name__}: {failed}", attempts=attempt
                )
                return Outcome.DEAD_LETTERED
            log.warning(
                "handler failed (attempt %d of %d): %s",
                attempt,
                self._retry.max_attempts,
                failed,
                extra=context,
            )
            await asyncio.sleep(self._retry.delay(attempt))
            attempt += 1
            failed = None

    async def _apply(
        self, record: ConsumerRecord[bytes, bytes], envelope: Envelope, handler: Handler
    ) -> Outcome:
        with consuming(record, self.group):
            async with self._pool.acquire() as conn, conn.transaction():
                if not await first_delivery(
                    conn, self.group, record, envelope.source, envelope.id, envelope.type
                ):
                    return Outcome.DUPLICATE
                await handler(conn, envelope.event)
        return Outcome.APPLIED

    async def _apply_run(self, run: list["_Pending"], progress: "_Progress") -> None:
        while run:
            failure = await self._apply_together(run)
            if failure is None:
                progress.settled = run[-1].index + 1
                return
            position, error = failure
            if position is None:
                # Not a handler's failure but the batch's own statement: each on its own instead.
                log.warning("applying %d events together failed, one by one instead: %s", len(run), error)
                for item in run:
                    outcome = Outcome.IGNORED
                    if item.handler is not None:
                        outcome = await self._settle(item.record, item.envelope, item.handler)
                    self._count(item.record, outcome)
                    progress.settled = item.index + 1
                return
            if position:
                # Rolled back with the failure, though they did not fail: again, without it.
                await self._apply_run(run[:position], progress)
            failed = run[position]
            assert failed.handler is not None  # only a handler raises
            outcome = await self._settle(failed.record, failed.envelope, failed.handler, failed=error)
            self._count(failed.record, outcome)
            progress.settled = failed.index + 1
            run = run[position + 1 :]

    async def _apply_together(self, run: list["_Pending"]) -> tuple[int | None, Exception] | None:
        """Applies the run in one transaction: None, or where a handler raised (None: no handler)
        and what."""
        outcomes: list[Outcome] = []
        running: int | None = None
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    fresh = await _claim(conn, self.group, [item for item in run if item.handler])
                    for item in run:
                        key = (item.envelope.source, item.envelope.id)
                        if item.handler is None:
                            # Topics carry every event type of their aggregate; this service needs only some.
                            outcomes.append(Outcome.IGNORED)
                        elif key not in fresh:
                            outcomes.append(Outcome.DUPLICATE)
                        else:
                            fresh.discard(key)  # the same event again later in the run is a duplicate
                            running = len(outcomes)
                            with consuming(item.record, self.group):
                                await item.handler(conn, item.envelope.event)
                            running = None
                            outcomes.append(Outcome.APPLIED)
            except TRANSIENT_ERRORS:
                raise
            except Exception as exc:
                return running, exc
        for item, outcome in zip(run, outcomes, strict=True):
            self._count(item.record, outcome)
        return None

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

    One too large to publish with those headers loses what does not fit, in this order: its
    value, its own headers, its key; `dlq_<part>_dropped` (the part's size in bytes) and
    `dlq_<part>_sha256` say so. The reason and where to find the original always survive, and
    the partition moves on.
    """
    original: list[tuple[str, bytes]] = [
        (name, value) for name, value in record.headers if not name.startswith(DEAD_LETTER_HEADER_PREFIX)
    ]
    key, value = record.key or b"", record.value or b""
    failure = [
        (DEAD_LETTER_HEADER_PREFIX + name, text.encode())
        for name, text in {
            "reason": reason,
            "detail": detail[:_DETAIL_LIMIT],
            "topic": record.topic,
            "partition": str(record.partition),
            "offset": str(record.offset),
            "consumer_group": group,
            "attempts": str(attempts),
            "failed_at": datetime.now(UTC).isoformat(),
        }.items()
    ]

    def dropped(part: str, content: bytes) -> list[tuple[str, bytes]]:
        return [
            (f"{DEAD_LETTER_HEADER_PREFIX}{part}_dropped", str(len(content)).encode()),
            (f"{DEAD_LETTER_HEADER_PREFIX}{part}_sha256", hashlib.sha256(content).hexdigest().encode()),
        ]

    if _size(key, value, [*original, *failure]) > DEAD_LETTER_MAX_BYTES:
        failure += dropped("value", value)
        value = b""
    if _size(key, value, [*original, *failure]) > DEAD_LETTER_MAX_BYTES:
        failure += dropped("headers", b"".join(name.encode() + content for name, content in original))
        original = []
    if _size(key, value, failure) > DEAD_LETTER_MAX_BYTES:
        failure += dropped("key", key)
        key = b""
    return KafkaRecord(topic=dead_letter_topic(group), key=key, value=value, headers=[*original, *failure])


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


@dataclass
class _Progress:
    settled: int = 0  # how many records of the batch, from the first, are settled


@dataclass(frozen=True)
class _Pending:
    """A record of a batch, decoded, waiting to be applied with its neighbours."""

    index: int  # in the batch
    record: ConsumerRecord[bytes, bytes]
    envelope: Envelope
    handler: Handler | None  # None: an event this service does not react to


async def first_delivery(
    conn: Connection,
    group: str,
    record: ConsumerRecord[bytes, bytes],
    source: str,
    event_id: str,
    event_type: str,
) -> bool:
    """Records the event in the inbox; False when it is there already (a redelivery)."""
    inserted = await conn.fetchval(
        'INSERT INTO inbox (consumer, source, event_id, event_type, topic, partition, "offset")'
        " VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT DO NOTHING RETURNING true",
        group,
        source,
        event_id,
        event_type,
        record.topic,
        record.partition,
        record.offset,
    )
    return bool(inserted)


async def _claim(conn: Connection, group: str, items: Sequence[_Pending]) -> set[tuple[str, str]]:
    """Inbox rows for the events, in one statement; returns (source, id) of those seen first now."""
    if not items:
        return set()
    rows = await conn.fetch(
        'INSERT INTO inbox (consumer, source, event_id, event_type, topic, partition, "offset")'
        " SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::bigint[])"
        " ON CONFLICT DO NOTHING RETURNING source, event_id",
        group,
        [item.envelope.source for item in items],
        [item.envelope.id for item in items],
        [item.envelope.type for item in items],
        [item.record.topic for item in items],
        [item.record.partition for item in items],
        [item.record.offset for item in items],
    )
    return {(row["source"], row["event_id"]) for row in rows}


@contextlib.contextmanager
def consuming(record: ConsumerRecord[bytes, bytes], group: str) -> Iterator[None]:
    """A CONSUMER span in the trace the record carries, for the handler's SQL and the events it
    queues (the outbox stores the context): a journey keeps one trace across every hop."""
    carrier = {name: value.decode("latin-1") for name, value in record.headers}
    with _tracer.start_as_current_span(
        f"{record.topic} process",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": group,
        },
    ):
        yield
