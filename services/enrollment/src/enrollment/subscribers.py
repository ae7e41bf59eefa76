"""The events enrollment reacts to, and the use case each one drives.

Two consumers: the runtime's, for other contexts' events (`subscriptions`), and one of our own for
the partner topic (`consuming_partner_reports`), because a partner's message is judged on more
than its decoded event: its signature covers `ce_id`, `ce_time` and the raw body, and a signed
body that is not a valid report is told back to the partner rather than dead-lettered.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker

from microcred_events import (
    CompletionReported,
    CoursePublished,
    CourseRetired,
    CourseUpdated,
    InvalidEvent,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
    Topic,
    dead_letter_topic,
    decode,
)
from microcred_events.partner import RejectionReason
from microcred_events.topics import partner_rejection_topic
from microcred_runtime import Connection, Runtime, ServiceSettings, Subscriptions, kafka
from microcred_runtime.consumers import (
    TRANSIENT_ERRORS,
    EventConsumer,
    Outcome,
    PublishDeadLetter,
    RetryPolicy,
    consuming,
    first_delivery,
)

from . import repository, service
from .domain import partner_of_source, partner_source
from .signatures import signed_content

log = logging.getLogger(__name__)

subscriptions = Subscriptions()


@subscriptions.on(CoursePublished, CourseUpdated)
async def on_course_published(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    await service.record_course(conn, event)


@subscriptions.on(CourseRetired)
async def on_course_retired(conn: Connection, event: CourseRetired) -> None:
    await service.record_retirement(conn, event)


@subscriptions.on(PaymentSettled)
async def on_payment_settled(conn: Connection, event: PaymentSettled) -> None:
    await service.settle_payment(conn, event)


@subscriptions.on(PaymentFailed)
async def on_payment_failed(conn: Connection, event: PaymentFailed) -> None:
    await service.fail_payment(conn, event)


@subscriptions.on(RefundIssued)
async def on_refund_issued(conn: Connection, event: RefundIssued) -> None:
    await service.refund_payment(conn, event)


# --- the partner topic -----------------------------------------------------------------------

PARTNER_REPORTS_GROUP = "enrollment-partners"
"""The partner topic's consumer group; its dead letters go to `enrollment-partners.dlq`."""
SIGNATURE_HEADER = "ce_signature"
# What `decode` refuses in the body, after every envelope header checked out.
_BODY_ERRORS = ("malformed_body", "schema_violation")


@dataclass(frozen=True)
class Undeliverable:
    """Why a partner-topic message cannot be answered on a rejection topic: it is dead-lettered."""

    reason: str
    detail: str


def read_partner_message(
    headers: Sequence[tuple[str, bytes]], value: bytes
) -> service.PartnerMessage | Undeliverable:
    """What a message from the partner topic says, before anything is looked up.

    An envelope that does not decode, or a `ce_source` that is not a partner's URN, cannot be
    answered: there is no partner to tell. A body that is not a valid report can be, once the
    signature shows who sent it.
    """
    try:
        envelope = decode(headers, value)
    except InvalidEvent as exc:
        if exc.reason not in _BODY_ERRORS:
            return Undeliverable(exc.reason, exc.detail)
        report: service.Report = service.MalformedReport(exc.detail, service.loose_report_id(value))
    else:
        if isinstance(envelope.event, CompletionReported):
            report = envelope.event
        else:
            report = service.MalformedReport(
                f"the partner topic takes {CompletionReported.TYPE} only, not {envelope.type}",
                service.loose_report_id(value),
            )
    # `decode` got as far as the body, so these headers are there, single and readable.
    source, message_id, time = (_header(headers, name) or "" for name in ("ce_source", "ce_id", "ce_time"))
    partner_id = partner_of_source(source)
    if partner_id is None:
        return Undeliverable(
            RejectionReason.UNKNOWN_PARTNER,
            f"ce_source {source[:100]!r} names no partner; partners send urn:microcred:partner:<partner_id>",
        )
    return service.PartnerMessage(
        partner_id=partner_id,
        message_id=message_id,
        signed_content=signed_content(message_id, time, value),
        signature=_header(headers, SIGNATURE_HEADER, join=True),
        report=report,
    )


def _header(headers: Sequence[tuple[str, bytes]], name: str, *, join: bool = False) -> str | None:
    """The header's text (every occurrence, space-separated, with `join`); None if absent or not UTF-8."""
    values: list[str] = []
    for key, raw in headers:
        if key.lower() != name:
            continue
        try:
            values.append(raw.decode())
        except UnicodeDecodeError:
            continue
        if not join:
            break
    return " ".join(values) if values else None


class PartnerReportConsumer(EventConsumer):
    """The partner topic's consumer: the runtime's guarantees (inbox in the effect's transaction,
    bounded retries, dead letters, an outage redelivered rather than dead-lettered), with the
    envelope and raw body that judging a partner's message needs.

    The runtime's consumer hands a handler only the decoded event, and dead-letters a body that
    does not validate; this subclass replaces `process` (judging each report on its own, with the
    runtime's `settle` for retries and dead letters), and drops out once the runtime can hand a
    subscription the raw record.
    """

    def __init__(
        self, *, pool: asyncpg.Pool, publish_dead_letter: PublishDeadLetter, retry: RetryPolicy
    ) -> None:
        # No handlers to look up: `process` takes the topic's one event type itself.
        super().__init__(
            group=PARTNER_REPORTS_GROUP,
            subscriptions=Subscriptions(),
            pool=pool,
            publish_dead_letter=publish_dead_letter,
            retry=retry,
        )

    async def process_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> int:
        # One by one: each report is judged on its own signature, in its own transaction.
        return await self.process_each(records)

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> Outcome:
        message = read_partner_message(record.headers, record.value or b"")
        if isinstance(message, Undeliverable):
            await self._dead_letter(record, message.reason, message.detail, attempts=0)
            return Outcome.DEAD_LETTERED
        context = {"topic": record.topic, "offset": record.offset, "message_id": message.message_id}
        try:
            return await self.settle(
                record, CompletionReported.TYPE, lambda: self._take(record, message), context=context
            )
        except TRANSIENT_ERRORS:
            # As in the runtime: an outage is not the message's fault; it is redelivered.
            await asyncio.sleep(self._retry.delay(self._retry.max_attempts))
            raise

    async def _take(self, record: ConsumerRecord[bytes, bytes], message: service.PartnerMessage) -> Outcome:
        with consuming(record, self.group):
            async with self._pool.acquire() as conn, conn.transaction():
                source = partner_source(message.partner_id)
                if not await first_delivery(
                    conn, self.group, record, source, message.message_id, CompletionReported.TYPE
                ):
                    return Outcome.DUPLICATE
                await service.take_partner_message(conn, message)
            return Outcome.APPLIED


async def ensure_partner_topics(settings: ServiceSettings, partner_ids: Sequence[UUID]) -> None:
    """Create the partners' rejection topics (and our dead-letter topic) where missing.

    Before a rejection is ever queued: a broker that does not create topics on first use would
    refuse it, and a partner can subscribe to its topic as soon as it is registered.
    """
    topics = [dead_letter_topic(PARTNER_REPORTS_GROUP), *map(partner_rejection_topic, partner_ids)]
    await kafka.ensure_topics(
        settings.kafka_bootstrap_servers,
        [settings.kafka_topic_prefix + topic for topic in topics],
        partitions=settings.kafka_topic_partitions,
        replication=settings.kafka_topic_replication,
    )


@contextlib.asynccontextmanager
async def consuming_partner_reports(runtime: Runtime[Any]) -> AsyncIterator[None]:
    """Consume the partner topic in its own consumer group, beside the runtime's consumer.

    Started once the service runs and stopped before it (see `Service.background`), so reports in
    flight commit and their outbox rows are flushed by the relay on shutdown.
    """
    settings: ServiceSettings = runtime.settings
    prefix = settings.kafka_topic_prefix
    async with runtime.pool.acquire() as conn:
        partner_ids = await repository.partner_ids(conn)
    # Partners registered before their topic could be made, or whose topic was deleted since.
    await ensure_partner_topics(settings, partner_ids)
    async with contextlib.AsyncExitStack() as stack:
        producer = kafka.reliable_producer(settings.kafka_bootstrap_servers, client_id=PARTNER_REPORTS_GROUP)
        await producer.start()
        stack.push_async_callback(producer.stop)
        broker = KafkaBroker(
            settings.kafka_bootstrap_servers,
            client_id=PARTNER_REPORTS_GROUP,
            graceful_timeout=settings.shutdown_grace_seconds,
            logger=logging.getLogger("faststream"),
            log_level=logging.DEBUG,
        )
        consumer = PartnerReportConsumer(
            pool=runtime.pool,
            publish_dead_letter=lambda record: kafka.publish_one(producer, record, prefix=prefix),
            retry=RetryPolicy(settings.consumer_max_attempts, settings.consumer_retry_backoff_seconds),
        )
        kafka.subscribe(
            broker,
            consumer,
            [Topic.PARTNER_COMPLETION],
            prefix=prefix,
            batch_size=settings.consumer_batch_size,
        )
        await broker.start()
        stack.push_async_callback(broker.stop)
        yield
