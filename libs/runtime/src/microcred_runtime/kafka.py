"""Kafka plumbing shared by the services: the reliable producer, topics, and the subscriber wiring.

Two defaults are overridden on purpose. aiokafka's producer defaults to `acks=1` without
idempotence, so a leader change can lose or duplicate a write: ours uses `acks="all"` and the
idempotent producer (dead letters: see `dead_letter_producer`). FastStream's Kafka subscriber
defaults to `AckPolicy.ACK_FIRST`, which auto-commits before the handler ran (at-most-once):
ours turns FastStream's acknowledgement off (`AckPolicy.MANUAL`) and commits, per partition, only
the offsets of settled records (`commit_settled`; see `consumers`).
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    InvalidReplicationFactorError,
    KafkaError,
    TopicAlreadyExistsError,
)
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.message import FAKE_CONSUMER
from faststream.kafka.message import KafkaMessage as FastStreamKafkaMessage
from faststream.middlewares import AckPolicy
from opentelemetry import propagate, trace

from microcred_events import KafkaRecord

from .consumers import EventConsumer
from .metrics import Metrics
from .settings import ServiceSettings

log = logging.getLogger(__name__)
tracer = trace.get_tracer("microcred.kafka")


def reliable_producer(bootstrap_servers: str, client_id: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        # A little batching for the relay's bursts; latency stays in single-digit milliseconds.
        linger_ms=5,
        request_timeout_ms=30_000,
    )


def dead_letter_producer(bootstrap_servers: str, client_id: str) -> AIOKafkaProducer:
    """The producer of dead letters: `acks="all"` but not idempotent.

    An idempotent producer gives a batch its partition's next sequence number when it sends it
    and never takes it back when the broker refuses the batch for good (a dead letter too large
    for its topic); the broker has not recorded that number, so every later batch to the
    partition is refused as out of order, for as long as the producer lives. Dead letters come
    from records that failed, whose size nobody chose: a refusal must cost its letter only (it
    goes again without the original's content), not the partition, nor the events the service
    publishes. aiokafka sends one batch at a time per partition, so letters keep their order; a
    retried send may duplicate one, which is harmless in a dead-letter topic.
    """
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=f"{client_id}-dead-letters",
        acks="all",
        enable_idempotence=False,
        request_timeout_ms=30_000,
    )


async def publish(
    producer: AIOKafkaProducer, records: Sequence[KafkaRecord], *, prefix: str = ""
) -> list[BaseException | None]:
    """Send records in order and wait for every acknowledgement; returns None or the error per record.

    `prefix` is the environment's topic prefix; records name the contract's topics.

    Each record continues the trace whose context it carries (the outbox stored it at commit time).
    """
    pending: list[Any] = []
    for index, record in enumerate(records):
        carrier = {name: value.decode("latin-1") for name, value in record.headers}
        parent = propagate.extract(carrier)
        topic = prefix + record.topic
        with tracer.start_as_current_span(
            f"{topic} publish", context=parent, kind=trace.SpanKind.PRODUCER
        ) as span:
            span.set_attribute("messaging.system", "kafka")
            span.set_attribute("messaging.destination.name", topic)
            propagate.inject(carrier)
            headers = [
                (name, value) for name, value in record.headers if name not in ("traceparent", "tracestate")
            ]
            headers += [
                (name, carrier[name].encode()) for name in ("traceparent", "tracestate") if name in carrier
            ]
            try:
                pending.append(await producer.send(topic, record.value, key=record.key, headers=headers))
            except Exception as exc:  # the client refused it before sending (size, closed, ...)
                # Sending the rest could let a later event of the same key overtake this one.
                not_sent = RuntimeError("not sent: an earlier record of the batch was refused")
                pending += [exc] + [not_sent] * (len(records) - index - 1)
                break
    results: list[BaseException | None] = []
    for item in pending:
        if isinstance(item, BaseException):
            results.append(item)
            continue
        try:
            await item
        except Exception as exc:
            results.append(exc)
        else:
            results.append(None)
    return results


async def publish_one(producer: AIOKafkaProducer, record: KafkaRecord, *, prefix: str = "") -> None:
    (error,) = await publish(producer, [record], prefix=prefix)
    if error is not None:
        raise error


class TopicsNotCreated(RuntimeError):
    """The brokers refused to create topics, e.g. with fewer brokers up than the replication
    factor: the message names each topic and the brokers' reason, `errors` their errors."""

    def __init__(self, message: str, errors: Sequence[type[KafkaError]]) -> None:
        super().__init__(message)
        self.errors = tuple(errors)

    @property
    def transient(self) -> bool:
        """Whether asking again later may succeed: the brokers are not all up yet (too few of them
        for the replication factor, no controller, no answer), rather than refusing for good
        (not authorised, against a policy, an invalid name or setting)."""
        return all(error.retriable or error is InvalidReplicationFactorError for error in self.errors)


async def ensure_topics(
    bootstrap_servers: str,
    topics: Sequence[str],
    *,
    partitions: int,
    replication: int,
    within: float = 30.0,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Create the missing topics; existing ones are left as they are (operators may have tuned them).
    `configs`: the topic-level settings of some of them, by name, when created.

    Done `within` seconds or `TimeoutError`: aiokafka's admin client has no deadline of its own
    for its whole work, and a broker that accepts connections without answering would hold a
    caller for ever.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=round(within * 1000))
    try:
        async with asyncio.timeout(within):
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [name for name in topics if name not in existing]
            if not missing:
                return
            response = await admin.create_topics(
                [
                    NewTopic(
                        name,
                        num_partitions=partitions,
                        replication_factor=replication,
                        topic_configs=dict((configs or {}).get(name, {})),
                    )
                    for name in missing
                ]
            )
        # aiokafka reports per-topic errors in the response instead of raising them.
        refused = [
            (name, kafka_errors.for_code(code), " ".join(filter(None, message)))
            for name, code, *message in response.topic_errors
            if code not in (0, TopicAlreadyExistsError.errno)  # another replica may create them first
        ]
        if refused:
            raise TopicsNotCreated(
                "cannot create Kafka topics: "
                + "; ".join(f"{name}: {error.__name__} {text}".strip() for name, error, text in refused),
                [error for _, error, _ in refused],
            )
        log.info("created topics", extra={"topics": missing})
    finally:
        await admin.close()


async def topic_settings(bootstrap_servers: str, topic: str, *, within: float = 30.0) -> dict[str, str]:
    """The topic's settings as the broker has them (its own and the defaults it inherits)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=round(within * 1000))
    try:
        async with asyncio.timeout(within):
            await admin.start()
            (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    ((*_, entries),) = response.resources
    # Each entry: (name, value, read only, source, ...).
    return {entry[0]: entry[1] for entry in entries}


@dataclass(frozen=True)
class Membership:
    """How the consumer group tells a live member from a dead one, and a busy one from a stuck
    one (`ServiceSettings` says why these numbers)."""

    session_timeout_ms: int
    heartbeat_interval_ms: int
    max_poll_interval_ms: int

    @classmethod
    def of(cls, settings: ServiceSettings) -> Self:
        return cls(
            session_timeout_ms=round(settings.consumer_session_timeout_seconds * 1000),
            heartbeat_interval_ms=round(settings.consumer_heartbeat_interval_seconds * 1000),
            max_poll_interval_ms=round(settings.consumer_max_poll_interval_seconds * 1000),
        )


def subscribe(
    broker: KafkaBroker,
    consumer: EventConsumer,
    *,
    membership: Membership,
    prefix: str = "",
    batch_size: int = 100,
    fetch_max_wait_ms: int = 100,
    fetch_min_bytes: int = 1,
) -> None:
    """Register the consumer on the broker, in its consumer group: commit after effect.

    Records come in batches of what each poll returns (up to `batch_size`): under load one
    transaction and one offset commit serve many events; at low load a batch is the one record
    there is, so nothing waits for a batch to fill.
    """
    subscriber = broker.subscriber(
        *(prefix + topic for topic in consumer.topics),
        group_id=prefix + consumer.group,
        # No acknowledgement by FastStream: its ack commits the consumer's positions (`commit()`
        # without offsets) and its nack rewinds to the batch's start, dead-lettering some twice.
        ack_policy=AckPolicy.MANUAL,
        # A new consumer group reads the topic from its start: read models need every event.
        auto_offset_reset="earliest",
        batch=True,
        max_records=batch_size,
        # FastStream sleeps this long again after an empty poll: the most an idle consumer adds.
        batch_timeout_ms=50,
        # aiokafka sends a broker no fetch while one to it is in flight, and leaves out of a fetch
        # the partitions whose records are still waiting to be handled; a fetch of only idle
        # partitions is held by the broker this long, and new records on the busy ones wait
        # behind it (with Kafka's 500 ms default, 250-400 ms gaps between batches were measured).
        fetch_max_wait_ms=fetch_max_wait_ms,
        fetch_min_bytes=fetch_min_bytes,
        session_timeout_ms=membership.session_timeout_ms,
        heartbeat_interval_ms=membership.heartbeat_interval_ms,
        max_poll_interval_ms=membership.max_poll_interval_ms,
        parser=_batch_of_records,
        decoder=_raw_body,
    )

    async def consume(message: KafkaMessage) -> None:
        records: tuple[ConsumerRecord[bytes, bytes], ...] = message.raw_message
        # None only under FastStream's TestKafkaBroker, which delivers without a Kafka consumer.
        client = subscriber.consumer
        try:
            settled = await consumer.process_batch(
                records, assigned=None if client is None else client.assignment
            )
            if client is not None:
                # FastStream cancels a batch that outlives the shutdown grace (then stops the
                # client), and a commit cut short would have settled records come again: the
                # commit goes on.
                await uncancellable(commit_settled(client, records, settled))
        except Exception:
            # FastStream logs what escapes and goes on polling from past the batch, and the next
            # batch's commit would pass it: it comes again instead, what it settled as duplicates.
            if client is not None:
                rewind(client, records)
            raise

    subscriber(consume)


# The event loop holds tasks weakly: these are kept until they are done.
_running_on: set[asyncio.Task[None]] = set()


async def uncancellable(work: Coroutine[Any, Any, None]) -> None:
    """Runs `work` to its end even when the caller is cancelled (which then goes on at once)."""
    task = asyncio.create_task(work)
    _running_on.add(task)
    task.add_done_callback(_running_on.discard)
    await asyncio.shield(task)


def rewind(client: AIOKafkaConsumer, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
    """Leave each partition of `records` that this member still holds at its first record there."""
    first: dict[TopicPartition, int] = {}
    for record in records:
        first.setdefault(TopicPartition(record.topic, record.partition), record.offset)
    assigned = client.assignment()
    for partition, offset in first.items():
        if partition in assigned:
            client.seek(partition, offset)


# As long as one request of aiokafka's consumer may take (its default request_timeout_ms).
_COMMIT_TIMEOUT = 40.0


async def commit_settled(
    client: AIOKafkaConsumer, records: Sequence[ConsumerRecord[bytes, bytes]], settled: int
) -> None:
    """Leave each partition of a batch at its first unsettled record, and commit what is settled:
    per partition, the offset after its last settled record (the first `settled` records are).

    Only these offsets are ever committed: `commit()` without them would commit the client's
    positions, past records that are not settled. A partition that a rebalance took from this
    member meanwhile is neither rewound nor committed: its new owner reads it from the last
    commit, and what this batch applied of it again is a duplicate in the inbox.
    """
    done: dict[TopicPartition, int] = {}
    for record in records[:settled]:
        done[TopicPartition(record.topic, record.partition)] = record.offset + 1
    # Rewound first: whatever the commit does, the next poll starts at the first unsettled records.
    rewind(client, records[settled:])
    assigned = client.assignment()
    owned = {partition: offset for partition, offset in done.items() if partition in assigned}
    if not owned:
        return
    try:
        # aiokafka asks again, without end, for a group coordinator that is not available, even
        # once the client is stopping; this commit runs on past its batch's cancellation.
        async with asyncio.timeout(_COMMIT_TIMEOUT):
            await client.commit(owned)
    except TimeoutError:
        log.warning("offsets not committed: no group coordinator answered within %g s", _COMMIT_TIMEOUT)
    except (CommitFailedError, IllegalStateError) as exc:
        log.info("offsets not committed, the group rebalanced meanwhile: %s", exc)
    except KafkaError as exc:
        # The partition's next commit covers them; redelivered before, they are inbox duplicates.
        log.warning("offsets not committed: %s", exc)


async def _batch_of_records(
    records: tuple[ConsumerRecord[bytes, bytes], ...],
) -> FastStreamKafkaMessage:
    """FastStream's message for a batch, as its own parser builds it but without its headers.

    Its parser decodes every header as UTF-8 text, and fails on one that is not (a poison
    message's bytes, or a header without a value: Kafka allows null ones); a batch whose parsing
    fails never reaches `consume`, which could rewind it, and the next batch's commit passes it.
    The runtime reads the raw records (`raw_message`) itself, so FastStream is given no headers.
    """
    first, last = records[0], records[-1]
    return FastStreamKafkaMessage(
        body=[record.value or b"" for record in records],  # what FastStream's metrics measure
        raw_message=records,
        message_id=f"{first.offset}-{last.offset}-{first.timestamp}",
        consumer=FAKE_CONSUMER,  # acknowledging is the runtime's (commit_settled), never FastStream's
    )


async def _raw_body(message: Any) -> list[bytes]:
    # Decoding is ours (CloudEvents + pydantic), with reasons; FastStream's JSON guess would raise.
    body: list[bytes] = message.body
    return body


_LAG_SAMPLE_SECONDS = 10.0


@contextlib.asynccontextmanager
async def sampling_consumer_lag(broker: KafkaBroker, metrics: Metrics) -> AsyncIterator[None]:
    """Sample each assigned partition's lag (high watermark minus position) into `metrics`."""

    async def sample() -> None:
        while True:
            for subscriber in broker.subscribers:
                consumer = getattr(subscriber, "consumer", None)
                if consumer is None:
                    continue
                for partition in consumer.assignment():
                    highwater = consumer.highwater(partition)
                    if highwater is None:
                        continue  # nothing fetched from it yet
                    with contextlib.suppress(Exception):  # a partition revoked meanwhile
                        position = await consumer.position(partition)
                        metrics.consumer_lag.labels(partition.topic, partition.partition).set(
                            max(highwater - position, 0)
                        )
            await asyncio.sleep(_LAG_SAMPLE_SECONDS)

    task = asyncio.create_task(sample(), name="consumer-lag")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
