"""Consuming events: inbox de-duplication, bounded retries, and the dead-letter topic.

What a service relies on:
- Its handler runs in one PostgreSQL transaction together with the inbox row for the event, so
  a redelivered event (same CloudEvents source and id) is a no-op.
- The Kafka offset is committed only after that transaction has committed: `kafka.subscribe`
  commits, per partition, the offset after the last settled record and nothing else (FastStream's
  own acknowledgement is off), so a crash at any moment means redelivery, never loss.
- A message that is not a valid event goes straight to the dead-letter topic with the reason; a
  handler that raises is retried `max_attempts` times with exponential backoff and then
  dead-lettered; `Rejected` skips the retries. Either way the partition moves on, even when the
  broker refuses the dead letter for its size: it goes again without the original's content (and
  through a producer of its own, `kafka.dead_letter_producer`, that such a refusal cannot break).
- Whatever else fails is not the message's fault, and nothing is skipped for it: an outage
  (PostgreSQL unreachable, Kafka unavailable for a dead letter, see `is_outage`) and an
  unexpected error outside a handler (a bug, logged with its traceback) both end the batch; after
  a pause each partition is rewound to its first record not yet settled, which comes again
  instead of being dead-lettered.
- Records come in batches (what a poll returns): consecutive events share one transaction, one
  inbox INSERT and one offset commit (`process_batch`); what a failing handler changes is the
  batch's shape, never the guarantees above. A batch that has run for its budget (half the
  consumer group's poll interval) takes no further step (a transaction, an attempt at a failed
  event, a dead letter) and leaves the rest to the next poll, so a member retrying a slow batch
  is not taken for dead; nor does a batch of which a rebalance took a partition (the consumer's
  assignment, asked before each step). Each event's handler
  runs in a CONSUMER span of the trace its record carries, so a journey keeps one trace.
- A handler takes one event (`Subscriptions.on`), or consecutive events of a batch at once
  (`Subscriptions.on_batch`, a `BatchHandler`: set-based SQL instead of statements per event).
  The guarantees are the same for both: a batch handler that raises is given fewer events at a
  time (halves) until the one at fault is alone, and it alone is retried and dead-lettered.
- A subscription can take a topic's records as they are (`Subscriptions.raw`), for messages that
  are judged on more than their decoded event (a partner's signature). The service reads each
  record into its inbox key and what its handler gets (`Inbound`); everything above holds for it.
"""

import asyncio
import contextlib
import enum
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import (
    BrokerNotAvailableError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    ReplicaNotAvailableError,
)
from opentelemetry import propagate, trace
from opentelemetry.context import Context

from microcred_events import Event, InvalidEvent, KafkaRecord, dead_letter_topic, decode

from .db import Connection
from .metrics import Metrics

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("microcred.consumers")

Handler = Callable[[Connection, Any], Awaitable[None]]
"""`async def on_<event>(conn, event)`: applies one event (or what a raw record was read into)
inside the consumer's transaction."""
H = TypeVar("H", bound=Handler)


@dataclass
class Delivery:
    """One event of those a batch handler is given: what it applies (`content`), and the span of
    its journey under which to queue the events it causes (`with delivery.current(): ...`)."""

    content: Any
    span: trace.Span
    rejected: "Rejected | None" = field(default=None, init=False)

    def current(self) -> contextlib.AbstractContextManager[trace.Span]:
        """The event's span made current: what is queued in the outbox (`outbox.prepare`) and
        logged inside it stays in the event's journey."""
        return trace.use_span(self.span, end_on_exit=False)

    def reject(self, reason: str, detail: str) -> None:
        """This event can never be applied: the handler leaves it out, and once the others are
        committed the runtime dead-letters it, as it does an event a handler raises `Rejected`
        for, without applying its neighbours again. (Cheaper than raising, which costs the
        batch's halves: for what a sender can make many of, e.g. a forged signature.)"""
        self.rejected = Rejected(reason, detail)


BatchHandler = Callable[[Connection, Sequence[Delivery]], Awaitable[None]]
"""`async def on_<events>(conn, deliveries)`: applies consecutive events of a batch, in their
order, inside the consumer's transaction, with set-based SQL rather than statements per event.
Raising rolls them all back; the runtime then finds the failing event by applying fewer at a
time, down to one alone (its retries, `Rejected` and dead letter as for any handler)."""
B = TypeVar("B", bound=BatchHandler)

# Errors that say the infrastructure is down, not that the message is bad.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.CannotConnectNowError,
    # A pooled connection that died mid-operation (e.g. PostgreSQL restarting) is handed back so.
    asyncpg.InternalClientError,
    # aiokafka's errors for a broker that is not there and that it does not mark retriable.
    KafkaTimeoutError,
    BrokerNotAvailableError,
    ReplicaNotAvailableError,
)
_DETAIL_LIMIT = 2000
# A record too large to take: the producer's max_request_size, the broker's or topic's limit.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
# Conflicts with other transactions (deadlocks, serialization failures) retried before they count
# as the handler's failures.
_CONFLICT_RETRIES = 10


def is_outage(error: BaseException) -> bool:
    """Whether `error` says PostgreSQL or Kafka is unavailable (try again later), rather than that
    the message is bad: aiokafka marks the errors of a broker it cannot reach, of a leader being
    elected or of too few in-sync replicas (`NotEnoughReplicas...`) retriable."""
    return isinstance(error, _UNAVAILABLE) or (isinstance(error, KafkaError) and error.retriable)


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


@dataclass(frozen=True)
class Inbound:
    """A consumed record as the runtime applies it: its inbox key (`source`, `id`; `type` is
    recorded beside them) and what its handler is given (`content`)."""

    source: str
    id: str
    type: str
    content: Any


Reader = Callable[[ConsumerRecord[bytes, bytes]], Inbound]
"""Reads a raw record, without I/O, into an `Inbound`; raises `Rejected` for a record that can
never be applied."""


@dataclass(frozen=True)
class Route:
    """One consumer group of a service: the topics it reads, and how a record becomes work."""

    group: str
    topics: tuple[str, ...]
    # The record's inbox key and how to apply it (None: not for this service), or `Rejected`.
    read: Callable[[ConsumerRecord[bytes, bytes]], tuple[Inbound, "_Apply | None"]]


@dataclass(frozen=True, eq=False)
class _Apply:
    """A registered handler and how it takes events: several at once (`batched`) or one."""

    function: Handler | BatchHandler
    batched: bool


class Subscriptions:
    """The one place where a service lists what it consumes: the events it reacts to and the
    handler for each (`on`, or `on_batch` for a handler of several at once), and any topic it
    takes record by record (`raw`)."""

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[type[Event], _Apply]] = {}
        self._raw: list[Route] = []

    def on(self, *event_types: type[Event]) -> Callable[[H], H]:
        def register(handler: H) -> H:
            self._register(event_types, _Apply(handler, batched=False))
            return handler

        return register

    def on_batch(self, *event_types: type[Event]) -> Callable[[B], B]:
        """Register a `BatchHandler`: consecutive events of these types in a poll's batch are
        given to it together."""

        def register(handler: B) -> B:
            self._register(event_types, _Apply(handler, batched=True))
            return handler

        return register

    def _register(self, event_types: Sequence[type[Event]], apply: _Apply) -> None:
        for event_type in event_types:
            if event_type.TYPE in self._handlers:
                raise ValueError(f"{event_type.TYPE} already has a handler")
            self._handlers[event_type.TYPE] = (event_type, apply)

    def raw(self, topic: str, *, group: str, read: Reader, batched: bool = False) -> Callable[[H], H]:
        """Hand the handler every record of `topic` as `read` makes of it, in a consumer group of
        its own (`group`; dead letters go to `<group>.dlq`).

        The runtime does the rest, as for events: the inbox row with `read`'s key in the handler's
        transaction, retries, dead letters, outages, offsets. A record `read` raises `Rejected` for
        is dead-lettered at once, and so is one it fails on otherwise (`unreadable`): reading does
        no I/O, so it would fail again.
        `batched`: the handler is a `BatchHandler`, given consecutive records' contents together.
        """

        def register(handler: H) -> H:
            taken = [route for route in self._raw if route.group == group or topic in route.topics]
            if taken:
                raise ValueError(f"{topic} or group {group} already has a raw subscription")
            apply = _Apply(handler, batched=batched)

            def read_record(record: ConsumerRecord[bytes, bytes]) -> tuple[Inbound, _Apply | None]:
                return read(record), apply

            self._raw.append(Route(group, (topic,), read_record))
            return handler

        return register

    @property
    def topics(self) -> list[str]:
        """The topics of the events handled (`on`, `on_batch`), read in the service's own consumer
        group."""
        return sorted({event_type.TOPIC for event_type, _ in self._handlers.values()})

    def handler_for(self, type_: str) -> Handler | BatchHandler | None:
        entry = self._handlers.get(type_)
        return entry[1].function if entry else None

    def routes(self, group: str) -> list[Route]:
        """The consumer groups to run: the events', named `group` (the service's), then each raw
        subscription's."""
        if any(route.group == group for route in self._raw):
            raise ValueError(f"a raw subscription cannot use the events' consumer group {group}")
        events = [Route(group, tuple(self.topics), self._read_event)] if self._handlers else []
        return [*events, *self._raw]

    def _read_event(self, record: ConsumerRecord[bytes, bytes]) -> tuple[Inbound, _Apply | None]:
        try:
            envelope = decode(record.headers, record.value or b"")
        except InvalidEvent as exc:
            raise Rejected(exc.reason, exc.detail) from exc
        inbound = Inbound(envelope.source, envelope.id, envelope.type, envelope.event)
        # Topics carry every event type of their aggregate; this service needs only some.
        entry = self._handlers.get(envelope.type)
        return inbound, entry[1] if entry else None


PublishDeadLetter = Callable[[KafkaRecord], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_seconds: float = 0.2

    def delay(self, attempt: int) -> float:
        return float(self.backoff_seconds * 2 ** (attempt - 1))

    @property
    def pause(self) -> float:
        """How long an outage or an unexpected error holds a batch before it is redelivered."""
        return self.delay(self.max_attempts)


class EventConsumer:
    """Applies the records of one consumer group to the service's database, exactly once in effect."""

    def __init__(
        self,
        route: Route,
        *,
        pool: asyncpg.Pool,
        publish_dead_letter: PublishDeadLetter,
        retry: RetryPolicy,
        budget_seconds: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._route = route
        self._metrics = metrics or Metrics()
        self._pool = pool
        self._publish_dead_letter = publish_dead_letter
        self._retry = retry
        self._budget_seconds = budget_seconds

    @property
    def group(self) -> str:
        return self._route.group

    @property
    def topics(self) -> tuple[str, ...]:
        return self._route.topics

    async def process_batch(
        self,
        records: Sequence[ConsumerRecord[bytes, bytes]],
        *,
        assigned: Callable[[], Collection[TopicPartition]] | None = None,
    ) -> int:
        """Applies a poll's records in order; returns how many, from the first, are settled.

        Consecutive events are applied in one transaction with one inbox INSERT for them all: per
        event, the BEGIN, COMMIT (and its WAL flush) and inbox round trips of applying each alone
        are paid once per batch. A handler that raises rolls the transaction back; the events
        before it are applied again without it, it is retried on its own (the failed run was its
        first attempt), and the rest go on together. A batch handler that raises for several
        events is given halves of them, and halves of the half that fails again, down to the
        event at fault alone, retried the same way. Records that cannot be read are dead-lettered
        in their place in the order.

        Fewer than all are settled when the batch's budget is spent (the rest come with the next
        poll), when a rebalance took one of its partitions (`assigned`: the consumer's partitions
        now), and, after a pause, when something other than a handler failed: an outage, or an
        unexpected error (logged with its traceback). Nothing is raised: the caller rewinds each
        partition to its first unsettled record.

        A header without a value (Kafka allows null ones) is read, traced and dead-lettered as an
        empty one.

        The batch has a span of its own, linked to the traces its events carry; each event's
        span is in its own journey's trace.
        """
        # Not made current: what is logged of a record keeps its own journey's trace id.
        span = _tracer.start_span(
            f"{self.group} process batch",
            kind=trace.SpanKind.CONSUMER,
            links=[trace.Link(context) for context in map(_carried, records) if context.is_valid],
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.consumer.group.name": self.group,
                "messaging.batch.message_count": len(records),
            },
        )
        try:
            settled = await self._process_batch(records, assigned, span)
            span.set_attribute("microcred.batch.settled_count", settled)
            return settled
        finally:
            span.end()

    async def _process_batch(
        self,
        records: Sequence[ConsumerRecord[bytes, bytes]],
        assigned: Callable[[], Collection[TopicPartition]] | None,
        span: trace.Span,
    ) -> int:
        partitions = {TopicPartition(record.topic, record.partition) for record in records}

        def owned() -> bool:
            return assigned is None or partitions.issubset(assigned())

        progress = _Progress(self._budget_seconds, owned)
        run: list[_Pending] = []
        try:
            for index, record in enumerate(map(_with_header_values, records)):
                read = self._read(record)
                if isinstance(read, Exception):
                    await self._apply_run(run, progress)
                    run = []
                    progress.step()
                    await self._dead_letter_unread(record, read)
                    progress.settled = index + 1
                    continue
                run.append(_Pending(index, record, *read))
            await self._apply_run(run, progress)
        except _BudgetSpent:
            log.info(
                "batch budget of %.0f s spent: %d of %d records left for the next poll",
                self._budget_seconds,
                len(records) - progress.settled,
                len(records),
            )
        except _Revoked:
            log.info(
                "a rebalance took a partition of the batch: %d of %d records left to the next poll "
                "or the partition's new owner",
                len(records) - progress.settled,
                len(records),
            )
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, "rewound: redelivered after a pause")
            unsettled = len(records) - progress.settled
            if is_outage(exc):
                log.warning(
                    "cannot apply events, %d of %d redelivered after a pause: %s",
                    unsettled,
                    len(records),
                    exc,
                )
            else:
                log.error(
                    "unexpected error, %d of %d records redelivered after a pause",
                    unsettled,
                    len(records),
                    exc_info=exc,
                )
            await asyncio.sleep(self._retry.pause)
        return progress.settled

    def _count(self, record: ConsumerRecord[bytes, bytes], outcome: Outcome) -> None:
        self._metrics.consumed.labels(record.topic, outcome).inc()

    def _read(self, record: ConsumerRecord[bytes, bytes]) -> tuple[Inbound, _Apply | None] | Exception:
        try:
            return self._route.read(record)
        except Exception as exc:
            return exc

    async def _dead_letter_unread(self, record: ConsumerRecord[bytes, bytes], error: Exception) -> None:
        if isinstance(error, Rejected):
            reason, detail = error.reason, error.detail
        else:
            # Reading does no I/O: it would fail again on this record, which must not stall the partition.
            log.error(
                "cannot read record",
                exc_info=error,
                extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
            )
            reason, detail = "unreadable", f"{type(error).__name__}: {error}"
        await self._dead_letter(record, reason, detail, attempts=0)
        self._count(record, Outcome.DEAD_LETTERED)

    async def _settle(
        self, item: "_Pending", progress: "_Progress", *, failed: Exception | None = None
    ) -> Outcome:
        """Applies the item (one transaction) until it succeeds, retrying a failure with backoff up
        to the policy's attempts; then, or at once for `Rejected`, dead-letters its record. An
        outage is raised. `failed`: how a first attempt, made already, went.

        The caller has taken the first attempt's step; each later attempt and the dead letter
        take one of their own (`progress.step`), so a retried event neither outlives the batch's
        budget nor goes on once a rebalance took its partition: it is left unsettled."""
        assert item.handler is not None  # only an item with a handler is applied
        record, context = item.record, _log_context(item.record, item.inbound)
        attempt, conflicts = 1, 0
        while True:
            if failed is None:
                try:
                    return await self._apply(item)
                except Exception as exc:
                    if is_outage(exc):
                        # Redelivered after a pause rather than dead-lettered: see the module docstring.
                        raise
                    failed = exc
            if isinstance(failed, Rejected):
                progress.step()
                await self._dead_letter(record, failed.reason, failed.detail, attempts=attempt)
                return Outcome.DEAD_LETTERED
            if isinstance(failed, asyncpg.TransactionRollbackError) and conflicts < _CONFLICT_RETRIES:
                # A deadlock or serialization failure with another replica's transaction (e.g.
                # issuance's advisory locks taken by two batches in opposite orders): not the
                # message's fault, so it spends no attempt; alone, it takes few locks and passes.
                conflicts += 1
                log.info("transaction lost a conflict, again: %s", failed, extra=context)
                await asyncio.sleep(self._retry.delay(1))
                progress.step()
                failed = None
                continue
            self._metrics.handler_failures.labels(record.topic, item.inbound.type).inc()
            if attempt >= self._retry.max_attempts:
                log.error("handler failed for good", exc_info=failed, extra=context)
                progress.step()
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
            progress.step()
            attempt += 1
            failed = None

    async def _apply(self, item: "_Pending") -> Outcome:
        async with self._pool.acquire() as conn, conn.transaction():
            if not await _first_delivery(conn, self.group, item.record, item.inbound):
                return Outcome.DUPLICATE
            for _, rejected in await self._handle(conn, [item]):
                raise rejected  # rolled back, and dead-lettered at once
        return Outcome.APPLIED

    async def _handle(
        self, conn: Connection, items: Sequence["_Pending"]
    ) -> list[tuple["_Pending", Rejected]]:
        """Runs the items' handler in the caller's transaction: a batch handler once for them all,
        a handler of one event for its one. Each event has a CONSUMER span in the trace its
        record carries. Returns the items a batch handler rejected (`Delivery.reject`)."""
        apply = items[0].handler
        assert apply is not None  # only items with a handler are applied
        if not apply.batched:
            (item,) = items
            with trace.use_span(_event_span(item.record, self.group), end_on_exit=True):
                await apply.function(conn, item.inbound.content)
            return []
        spans = [_event_span(item.record, self.group) for item in items]
        deliveries = [Delivery(item.inbound.content, span) for item, span in zip(items, spans, strict=True)]
        try:
            await apply.function(conn, deliveries)
        except Exception as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(trace.StatusCode.ERROR, "rolled back with its batch")
            raise
        finally:
            for span in spans:
                span.end()
        return [
            (item, delivery.rejected)
            for item, delivery in zip(items, deliveries, strict=True)
            if delivery.rejected
        ]

    async def _apply_run(self, run: list["_Pending"], progress: "_Progress") -> None:
        while run:
            progress.step()
            failure = await self._apply_together(run)
            if isinstance(failure, list):
                # Committed without the events their batch handler rejected: their inbox rows went
                # with them, so if a dead letter cannot be published the run comes again, its
                # applied events as duplicates and these to be rejected again.
                for item, rejected in failure:
                    await self._dead_letter(item.record, rejected.reason, rejected.detail, attempts=1)
                    self._count(item.record, Outcome.DEAD_LETTERED)
                progress.settled = run[-1].index + 1
                return
            failing, error = failure
            if failing is None:
                # Not a handler's failure but the batch's own statement: each on its own instead.
                log.warning("applying %d events together failed, one by one instead: %s", len(run), error)
                for item in run:
                    progress.step()
                    outcome = Outcome.IGNORED if item.handler is None else await self._settle(item, progress)
                    self._count(item.record, outcome)
                    progress.settled = item.index + 1
                return
            start, end = failing
            if start:
                # Rolled back with the failure, though they did not fail: again, without it.
                await self._apply_run(run[:start], progress)
            if end - start > 1:
                # A batch handler failed for several events at once: halves, then halves of the
                # half that fails again, find the one at fault in a few transactions.
                middle = (start + end) // 2
                await self._apply_run(run[start:middle], progress)
                await self._apply_run(run[middle:end], progress)
            else:
                failed = run[start]
                progress.step()
                outcome = await self._settle(failed, progress, failed=error)
                self._count(failed.record, outcome)
                progress.settled = failed.index + 1
            run = run[end:]

    async def _apply_together(
        self, run: list["_Pending"]
    ) -> tuple[tuple[int, int] | None, Exception] | list[tuple["_Pending", Rejected]]:
        """Applies the run in one transaction: the items a batch handler rejected (left out, to
        dead-letter), or which items' handler raised (the run's slice [start, end); None: no
        handler's, the run's own statements) and what."""
        rejected: list[tuple[_Pending, Rejected]] = []
        outcomes: list[Outcome] = []
        # Consecutive fresh events of one batch handler go to it together; every other one alone.
        units: list[list[int]] = []
        failing: tuple[int, int] | None = None
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    fresh = await _claim(conn, self.group, [item for item in run if item.handler])
                    for position, item in enumerate(run):
                        key = (item.inbound.source, item.inbound.id)
                        if item.handler is None:
                            outcomes.append(Outcome.IGNORED)
                        elif key not in fresh:
                            outcomes.append(Outcome.DUPLICATE)
                        else:
                            fresh.discard(key)  # the same event again later in the run is a duplicate
                            outcomes.append(Outcome.APPLIED)
                            last = run[units[-1][-1]].handler if units else None
                            if item.handler.batched and last is item.handler:
                                units[-1].append(position)
                            else:
                                units.append([position])
                    for unit in units:
                        failing = (unit[0], unit[-1] + 1)
                        rejected += await self._handle(conn, [run[position] for position in unit])
                    failing = None
                    await _forget(conn, self.group, [item for item, _ in rejected])
            except Exception as exc:
                if is_outage(exc):
                    raise
                return failing, exc
        left_out = {id(item) for item, _ in rejected}
        for item, outcome in zip(run, outcomes, strict=True):
            if id(item) not in left_out:
                self._count(item.record, outcome)
        return rejected

    async def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], reason: str, detail: str, *, attempts: int
    ) -> None:
        log.warning(
            "dead-lettering message: %s: %s",
            reason,
            detail,
            extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
        )
        try:
            await self._publish_dead_letter(dead_letter_record(record, self.group, reason, detail, attempts))
        except _TOO_LARGE as exc:
            # The broker, or the dead-letter topic (max.message.bytes), takes less than
            # DEAD_LETTER_MAX_BYTES: the same letter would be refused for good, and the partition
            # would never move on. The reason and the original's coordinates fit anywhere.
            log.warning(
                "dead letter refused as too large, sent without the original's content: %s",
                exc,
                extra={"topic": record.topic, "partition": record.partition, "offset": record.offset},
            )
            await self._publish_dead_letter(
                dead_letter_record(record, self.group, reason, detail, attempts, max_bytes=0)
            )
        self._metrics.dead_lettered.labels(record.topic, reason).inc()


DEAD_LETTER_HEADER_PREFIX = "dlq_"
# What one dead letter may weigh, key, value and headers: the producer's max_request_size
# (aiokafka's default, kept by kafka.reliable_producer) and the broker's message.max.bytes are
# both about 1 MiB; 16 KiB of it stay free for the record's framing and the trace headers that
# publishing adds. A message the broker took at its limit does not fit with the dlq_* headers.
DEAD_LETTER_MAX_BYTES = 1024 * 1024 - 16 * 1024
# What the runtime's dead-letter topics take (max.message.bytes, set when it creates them): Kafka's
# default, so that a broker whose message.max.bytes is lower still takes a letter of the size above.
DEAD_LETTER_TOPIC_MAX_BYTES = 1024 * 1024 + 12


def dead_letter_record(
    record: ConsumerRecord[bytes, bytes],
    group: str,
    reason: str,
    detail: str,
    attempts: int,
    *,
    max_bytes: int = DEAD_LETTER_MAX_BYTES,
) -> KafkaRecord:
    """The original message, unchanged, plus headers saying where it came from and why it failed.

    One heavier than `max_bytes` with those headers loses what does not fit, in this order: its
    value, its own headers, its key; `dlq_<part>_dropped` (the part's size in bytes) and
    `dlq_<part>_sha256` say so (`max_bytes=0`: all three). The reason and where to find the
    original always survive, and the partition moves on.
    """
    original: list[tuple[str, bytes]] = [
        (name, value) for name, value in record.headers if not name.startswith(DEAD_LETTER_HEADER_PREFIX)
    ]
    # A keyless record's letter stays keyless: spread over the partitions, not all on the one of b"".
    key, value = record.key, record.value or b""
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

    if _size(key, value, [*original, *failure]) > max_bytes:
        failure += dropped("value", value)
        value = b""
    if _size(key, value, [*original, *failure]) > max_bytes:
        failure += dropped("headers", b"".join(name.encode() + content for name, content in original))
        original = []
    if key is not None and _size(key, value, failure) > max_bytes:
        failure += dropped("key", key)
        key = None
    return KafkaRecord(topic=dead_letter_topic(group), key=key, value=value, headers=[*original, *failure])


def _size(key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value) + sum(len(name.encode()) + len(content) for name, content in headers)


def _with_header_values(record: ConsumerRecord[bytes, bytes]) -> ConsumerRecord[bytes, bytes]:
    # aiokafka gives a null header value as None; readers, spans and dead letters take bytes.
    if all(value is not None for _, value in record.headers):
        return record
    return replace(record, headers=[(name, value or b"") for name, value in record.headers])


def _log_context(record: ConsumerRecord[bytes, bytes], inbound: Inbound) -> dict[str, object]:
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "event_id": inbound.id,
        "event_type": inbound.type,
    }


class _BudgetSpent(Exception):
    """The batch has run for its budget: the rest of it waits for the next poll."""


class _Revoked(Exception):
    """A rebalance took a partition of the batch: its new owner reads it from the last commit."""


@dataclass
class _Progress:
    budget: float  # seconds
    # Whether the consumer still holds every partition of the batch.
    owned: Callable[[], bool]
    settled: int = 0  # how many records of the batch, from the first, are settled
    started: float = field(default_factory=time.monotonic)
    steps: int = 0

    def step(self) -> None:
        """Called before each unit of work: a transaction of events, each attempt at a failed
        event (a retry, a conflict's retry) and each dead letter. None once a rebalance took a
        partition of the batch (its new owner applies the partition from the last commit, and two
        members applying it at once could apply its events out of order); none once the budget is
        spent either, but always a first, so that every batch makes progress."""
        if not self.owned():
            raise _Revoked
        if self.steps and time.monotonic() - self.started >= self.budget:
            raise _BudgetSpent
        self.steps += 1


@dataclass(frozen=True)
class _Pending:
    """A record of a batch, read, waiting to be applied with its neighbours."""

    index: int  # in the batch
    record: ConsumerRecord[bytes, bytes]
    inbound: Inbound
    handler: _Apply | None  # None: an event this service does not react to


async def _first_delivery(
    conn: Connection, group: str, record: ConsumerRecord[bytes, bytes], inbound: Inbound
) -> bool:
    """Records the event in the inbox; False when it is there already (a redelivery)."""
    inserted = await conn.fetchval(
        'INSERT INTO inbox (consumer, source, event_id, event_type, topic, partition, "offset")'
        " VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT DO NOTHING RETURNING true",
        group,
        inbound.source,
        inbound.id,
        inbound.type,
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
        [item.inbound.source for item in items],
        [item.inbound.id for item in items],
        [item.inbound.type for item in items],
        [item.record.topic for item in items],
        [item.record.partition for item in items],
        [item.record.offset for item in items],
    )
    return {(row["source"], row["event_id"]) for row in rows}


async def _forget(conn: Connection, group: str, items: Sequence[_Pending]) -> None:
    """Takes the events' inbox rows back: rejected, they are not applied, and a redelivery (when
    their dead letters could not be published) must judge them again."""
    if items:
        await conn.execute(
            "DELETE FROM inbox WHERE consumer = $1 AND (source, event_id) IN"
            " (SELECT * FROM unnest($2::text[], $3::text[]))",
            group,
            [item.inbound.source for item in items],
            [item.inbound.id for item in items],
        )


def _journey(record: ConsumerRecord[bytes, bytes]) -> Context:
    """The trace context the record's headers carry (an empty one if none)."""
    return propagate.extract({name: (value or b"").decode("latin-1") for name, value in record.headers})


def _carried(record: ConsumerRecord[bytes, bytes]) -> trace.SpanContext:
    """The span context the record's headers carry (an invalid one if none)."""
    return trace.get_current_span(_journey(record)).get_span_context()


def _event_span(record: ConsumerRecord[bytes, bytes], group: str) -> trace.Span:
    """A CONSUMER span for applying the record, in the trace it carries, for the handler and the
    events it queues (the outbox stores the context): a journey keeps one trace across every hop."""
    return _tracer.start_span(
        f"{record.topic} process",
        context=_journey(record),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": group,
        },
    )
