"""What enrollment consumes, and the use case each one drives.

Other contexts' events, and the partner topic's records as they are (`on_partner_report`, in a
consumer group of its own): a partner's message is judged on more than its decoded event, since
its signature covers `ce_id`, `ce_time` and the raw body, and a signed body that is not a valid
report is told back to the partner rather than dead-lettered.
"""

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from aiokafka import ConsumerRecord

from microcred_events import (
    CompletionReported,
    CoursePublished,
    CourseRetired,
    CourseUpdated,
    CredentialIssued,
    CredentialKind,
    CredentialReinstated,
    CredentialRevoked,
    InvalidEvent,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
    Topic,
    decode,
)
from microcred_events.partner import RejectionReason
from microcred_events.topics import CONFIGS as TOPIC_CONFIGS
from microcred_events.topics import partner_rejection_topic
from microcred_runtime import Connection, Delivery, Rejected, Runtime, ServiceSettings, Subscriptions, kafka
from microcred_runtime.consumers import Inbound

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


# The course credentials learners hold (keyed by credential: one partition, in order). One comes
# with every credential minted: a poll's are recorded in one statement.
@subscriptions.on_batch(CredentialIssued)
async def on_credentials_issued(conn: Connection, deliveries: Sequence[Delivery]) -> None:
    issued: list[CredentialIssued] = [delivery.content for delivery in deliveries]
    await repository.record_held_credentials(
        conn, [event for event in issued if event.kind is CredentialKind.COURSE]
    )


@subscriptions.on(CredentialRevoked, CredentialReinstated)
async def on_credential_status(conn: Connection, event: CredentialRevoked | CredentialReinstated) -> None:
    await repository.record_held_credential_status(conn, event)


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
# `ConsumerRecord.timestamp_type` of a record the broker stamped (the topic's LogAppendTime; the
# record format's attribute bit, aiokafka's `DefaultRecordBase.LOG_APPEND_TIME`).
_LOG_APPEND_TIME = 1
# What `decode` refuses in the body, after every envelope header checked out.
_BODY_ERRORS = ("malformed_body", "schema_violation")


@dataclass(frozen=True)
class Undeliverable:
    """Why a partner-topic message cannot be answered on a rejection topic: it is dead-lettered."""

    reason: str
    detail: str


def read_partner_message(
    headers: Sequence[tuple[str, bytes]], value: bytes, appended_at: datetime | None = None
) -> service.PartnerMessage | Undeliverable:
    """What a message from the partner topic says, before anything is looked up; `appended_at`:
    when the broker took it, if the topic stamps records so (else it is judged when applied).

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
        # `decode` parsed it before the body, so it is an RFC 3339 time with an offset.
        sent_at=datetime.fromisoformat(time).astimezone(UTC),
        appended_at=appended_at,
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


def read_partner_record(record: ConsumerRecord[bytes, bytes]) -> Inbound:
    """A partner-topic record as the runtime applies it: in the inbox by the partner's source and
    `ce_id`; `Rejected` (dead-lettered) when there is no partner to answer."""
    appended_at = (
        datetime.fromtimestamp(record.timestamp / 1000, UTC)
        if record.timestamp_type == _LOG_APPEND_TIME and record.timestamp >= 0
        # A topic not configured so (see `ensuring_partner_topics`): the producer's time is the
        # sender's to choose, so the message is judged when it is applied.
        else None
    )
    message = read_partner_message(record.headers, record.value or b"", appended_at)
    if isinstance(message, Undeliverable):
        raise Rejected(message.reason, message.detail)
    return Inbound(partner_source(message.partner_id), message.message_id, CompletionReported.TYPE, message)


# Together: a batch's reports are looked up and written back with a few statements. A forged
# one is left out (`Delivery.reject`) and dead-lettered once the others are committed.
@subscriptions.raw(
    Topic.PARTNER_COMPLETION, group=PARTNER_REPORTS_GROUP, read=read_partner_record, batched=True
)
async def on_partner_reports(conn: Connection, deliveries: Sequence[Delivery]) -> None:
    await service.take_partner_messages(conn, deliveries)


async def ensure_partner_topics(settings: ServiceSettings, partner_ids: Sequence[UUID]) -> None:
    """Create the partners' rejection topics where missing.

    Before a rejection is ever queued: a broker that does not create topics on first use would
    refuse it, and a partner can subscribe to its topic as soon as it is registered.
    """
    await kafka.ensure_topics(
        settings.kafka_bootstrap_servers,
        [settings.kafka_topic_prefix + partner_rejection_topic(partner_id) for partner_id in partner_ids],
        partitions=settings.kafka_topic_partitions,
        replication=settings.kafka_topic_replication,
    )


@contextlib.asynccontextmanager
async def ensuring_partner_topics(runtime: Runtime[Any]) -> AsyncIterator[None]:
    """Once the service runs, the rejection topics of partners registered before their topic
    could be made, or whose topic was deleted since."""
    async with runtime.pool.acquire() as conn:
        partner_ids = await repository.partner_ids(conn)
    await ensure_partner_topics(runtime.settings, partner_ids)
    await _check_partner_timestamps(runtime.settings)
    yield


async def _check_partner_timestamps(settings: ServiceSettings) -> None:
    """Say so when the partner topic does not stamp records with the broker's time (a topic made
    before this was asked of it): ensure_topics leaves an existing topic's settings alone."""
    topic = settings.kafka_topic_prefix + Topic.PARTNER_COMPLETION
    wanted = TOPIC_CONFIGS[Topic.PARTNER_COMPLETION]["message.timestamp.type"]
    found = (await kafka.topic_settings(settings.kafka_bootstrap_servers, topic)).get(
        "message.timestamp.type"
    )
    if found != wanted:
        log.error(
            "%s has message.timestamp.type=%s: a partner's ce_time is judged when its message is "
            "applied, so a consumer lag of 5 minutes refuses good reports as stale_message; set it "
            "to %s (kafka-configs.sh --alter --entity-type topics --entity-name %s --add-config "
            "message.timestamp.type=%s)",
            topic,
            found,
            wanted,
            topic,
            wanted,
        )
