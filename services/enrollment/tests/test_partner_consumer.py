"""The partner topic on the runtime's one consumer path: its own group, record by record, in the
inbox by the partner's source and `ce_id`, dead-lettered when there is no partner to answer."""

import uuid
from datetime import UTC, datetime

import pytest
from aiokafka import ConsumerRecord

from enrollment import service
from enrollment.domain import partner_source
from enrollment.subscribers import (
    PARTNER_REPORTS_GROUP,
    on_partner_reports,
    read_partner_record,
    subscriptions,
)
from microcred_events import CompletionReported, Topic, encode, example_data
from microcred_events.partner import RejectionReason
from microcred_runtime import Rejected

PARTNER_ID = uuid.uuid4()


SENT_AT = datetime(2025, 5, 2, tzinfo=UTC)
CREATE_TIME, LOG_APPEND_TIME = 0, 1


def partner_record(
    source: str, *, timestamp: int = 0, timestamp_type: int = CREATE_TIME
) -> ConsumerRecord[bytes, bytes]:
    report = CompletionReported.model_validate({**example_data(CompletionReported), "partner_id": PARTNER_ID})
    record = encode(report, source=source, event_id="msg-1", time=SENT_AT)
    return ConsumerRecord(
        topic=Topic.PARTNER_COMPLETION,
        partition=0,
        offset=7,
        timestamp=timestamp,
        timestamp_type=timestamp_type,
        key=record.key,
        value=record.value,
        checksum=None,
        serialized_key_size=len(record.key or b""),
        serialized_value_size=len(record.value),
        headers=[*record.headers, ("ce_signature", b"v1,abc")],
    )


def test_the_partner_topic_is_read_in_batches_in_a_consumer_group_of_its_own() -> None:
    events, partners = subscriptions.routes("enrollment")

    assert events.group == "enrollment"
    assert Topic.PARTNER_COMPLETION not in events.topics
    assert (partners.group, partners.topics) == (PARTNER_REPORTS_GROUP, (Topic.PARTNER_COMPLETION,))
    inbound, handler = partners.read(partner_record(partner_source(PARTNER_ID)))
    assert handler is not None
    assert (handler.function, handler.batched) == (on_partner_reports, True)
    assert isinstance(inbound.content, service.PartnerMessage)


def test_a_partner_message_is_in_the_inbox_by_the_partners_source_and_its_ce_id() -> None:
    inbound = read_partner_record(partner_record(partner_source(PARTNER_ID)))

    assert (inbound.source, inbound.id, inbound.type) == (
        partner_source(PARTNER_ID),
        "msg-1",
        CompletionReported.TYPE,
    )
    message = inbound.content
    assert isinstance(message, service.PartnerMessage)
    assert (message.partner_id, message.message_id, message.signature) == (PARTNER_ID, "msg-1", "v1,abc")


def test_a_message_with_no_partner_to_answer_is_rejected_so_it_is_dead_lettered() -> None:
    with pytest.raises(Rejected) as caught:
        read_partner_record(partner_record("urn:microcred:billing"))

    assert caught.value.reason == RejectionReason.UNKNOWN_PARTNER


@pytest.mark.parametrize(
    ("timestamp", "timestamp_type", "appended_at"),
    [
        (1_746_204_360_000, LOG_APPEND_TIME, datetime(2025, 5, 2, 16, 46, tzinfo=UTC)),
        # The producer's own time is the sender's to choose: a replay would carry its ce_time.
        (int(SENT_AT.timestamp() * 1000), CREATE_TIME, None),
        (-1, LOG_APPEND_TIME, None),
    ],
    ids=["broker-stamped", "producer-stamped", "no-timestamp"],
)
def test_a_partner_message_is_timed_by_the_broker_only(
    timestamp: int, timestamp_type: int, appended_at: datetime | None
) -> None:
    record = partner_record(partner_source(PARTNER_ID), timestamp=timestamp, timestamp_type=timestamp_type)

    message = read_partner_record(record).content

    assert isinstance(message, service.PartnerMessage)
    assert (message.sent_at, message.appended_at) == (SENT_AT, appended_at)
