"""Messages as large as Kafka lets anyone send: refused at the broker, or dead-lettered.

The broker takes a record batch of at most `message.max.bytes` (1 MiB by default, as here), so a
2 MB message never reaches a consumer: the broker refuses it. The largest message it does take is
found by probing, and sent on every consumed topic; each consumer must dead-letter it like any
other bad message (without its value, which would not fit beside the dlq_* headers) and move on.

A module of its own: a consumer that cannot dead-letter such a message keeps taking it again,
and must not slow down the other abuse tests.
"""

import functools
import json
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from enrollment.subscribers import PARTNER_REPORTS_GROUP
from microcred_events import CompletionReported, Topic, dead_letter_topic, encode

from .conftest import Platform, ce_headers, header, records_where, wait_for
from .test_events import CONSUMERS, SOURCE, dead_letter_of, good_events, in_inbox, subscriptions_of

# Every consumed topic and its consumer groups, the partner topic included.
READERS: dict[str, tuple[str, ...]] = {
    **{str(topic): services for topic, services in CONSUMERS.items()},
    Topic.PARTNER_COMPLETION: (PARTNER_REPORTS_GROUP,),
}
TWO_MB = 2 * 1000 * 1000
HEADERS_LENGTH = len(
    b"".join(
        name.encode() + value
        for name, value in ce_headers("x" * 80, key=str(uuid.uuid4()), source=SOURCE + "/")
    )
)


@pytest.fixture
async def big_producer(platform: Platform) -> AIOKafkaProducer:
    """A client that lets the broker decide: its own request limit is far above the broker's.

    Not idempotent: a batch the broker refuses would leave an idempotent producer's sequence
    numbers out of step.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=platform.kafka_bootstrap, acks="all", max_request_size=8 * 1024 * 1024
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


def oversized(size: int) -> bytes:
    """A JSON object of exactly `size` bytes that is no event of the contract."""
    envelope = b'{"padding": ""}'
    return envelope[:-2] + b"x" * (size - len(envelope)) + envelope[-2:]


async def largest_accepted(
    producer: AIOKafkaProducer, topic: str, key: str, headers: list[tuple[str, bytes]], low: int, high: int
) -> int:
    """The largest value the broker takes with these headers and key, between `low` (taken) and
    `high` (refused): a binary search on a topic nobody reads."""
    while high - low > 1:
        middle = (low + high) // 2
        try:
            await producer.send_and_wait(topic, oversized(middle), key=key.encode(), headers=headers)
        except MessageSizeTooLargeError:
            high = middle
        else:
            low = middle
    return low


def sized_headers(event_type: str, key: str) -> list[tuple[str, bytes]]:
    """CloudEvents headers of one length whatever the event type (the source takes up the slack),
    so the largest message the broker takes with the probe's headers is the largest with these."""
    headers = ce_headers(event_type, key=key, source=SOURCE + "/" + "x" * (80 - len(event_type)))
    assert sum(len(name) + len(value) for name, value in headers) == HEADERS_LENGTH, headers
    return headers


async def test_a_2_mb_message_is_refused_by_the_broker_on_every_consumed_topic(
    platform: Platform, big_producer: AIOKafkaProducer
) -> None:
    for topic in READERS:
        key = str(uuid.uuid4())
        headers = ce_headers("org.microcred.abuse.huge.v1", key=key, source=SOURCE)
        with pytest.raises(MessageSizeTooLargeError):
            await big_producer.send_and_wait(
                platform.prefix + topic, oversized(TWO_MB), key=key.encode(), headers=headers
            )


async def test_the_largest_message_the_broker_takes_is_dead_lettered_and_the_partition_keeps_moving(
    platform: Platform, big_producer: AIOKafkaProducer
) -> None:
    probe = platform.prefix + "abuse.size-probe"
    probe_key = str(uuid.uuid4())
    probe_headers = sized_headers("org.microcred.abuse.probe.v1", probe_key)
    limit = await largest_accepted(big_producer, probe, probe_key, probe_headers, 512 * 1024, TWO_MB)
    assert 1_000_000 < limit < 1024 * 1024, f"the broker takes up to {limit} bytes"

    sent: dict[str, tuple[str, list[tuple[str, str]]]] = {}  # topic -> key, [(good event type, id)]
    for topic in READERS:
        key = str(uuid.uuid4())
        good = [] if topic == Topic.PARTNER_COMPLETION else good_events(Topic(topic), key)
        event_type = good[0].TYPE if good else CompletionReported.TYPE
        headers = sized_headers(event_type, key)
        await big_producer.send_and_wait(
            platform.prefix + topic, oversized(limit), key=key.encode(), headers=headers
        )
        good_ids = []
        for event in good:
            record = encode(event, source=SOURCE)
            await platform.producer.send_and_wait(
                platform.prefix + topic, record.value, key=record.key, headers=record.headers
            )
            good_ids.append((event.TYPE, dict(record.headers)["ce_id"].decode()))
        sent[topic] = (key, good_ids)

    for topic, (key, good_ids) in sent.items():
        for group in READERS[topic]:
            letters = await records_where(
                platform.kafka_bootstrap,
                platform.prefix + dead_letter_topic(group),
                dead_letter_of(platform, topic, key),
                count=1,
                timeout=10,
            )
            assert [header(letter, "dlq_reason") for letter in letters] == [
                "unknown_partner" if group == PARTNER_REPORTS_GROUP else "schema_violation"
            ], f"{group} did not dead-letter the broker-sized message from {topic}"
            assert [(letter.value, header(letter, "dlq_value_dropped")) for letter in letters] == [
                (b"", str(limit))
            ], "the value is dropped, and its size said, so that the dead letter fits"
            if group == PARTNER_REPORTS_GROUP:
                continue
            subscriptions = subscriptions_of(platform, group)
            applied = [event_id for event_type, event_id in good_ids if subscriptions.handler_for(event_type)]
            assert await wait_for(functools.partial(in_inbox, platform, group, group, applied)), (
                f"{group} is stuck on {topic}"
            )


def test_the_probe_builds_exact_sizes() -> None:
    assert len(oversized(600_000)) == 600_000
    assert json.loads(oversized(1000)) == {"padding": "x" * (1000 - len(b'{"padding": ""}'))}
