"""A replica SIGKILLed: the survivor takes over its partitions within seconds, against a real broker.

Two members of one consumer group, each subscribed through `kafka.subscribe` with the membership
the default settings give (`CONSUMER_SESSION_TIMEOUT_SECONDS`, `CONSUMER_HEARTBEAT_INTERVAL_SECONDS`):
one in this process, one in a child process that is SIGKILLed, so it never says goodbye to the
group. A record sent to the dead member's partition after the kill must reach the survivor once
the group has noticed: within the session timeout, a heartbeat and a rejoin.
"""

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from faststream.kafka import KafkaBroker

from microcred_events import Topic
from microcred_runtime import ServiceSettings, kafka

from .conftest import Infrastructure

GROUP = "probe"
TOPIC = Topic.CATALOG_COURSE
# The session timeout, the survivor's next heartbeat, a rejoin and a fetch, with room for a
# machine busy with other tests.
TAKEOVER_LIMIT = 15.0

MEMBER = """
import asyncio
import sys

from faststream.kafka import KafkaBroker

from microcred_runtime import kafka

bootstrap, prefix, group_name, topic, *membership = sys.argv[1:]


class Holder:
    group = group_name
    topics = (topic,)

    async def process_batch(self, records, assigned=None):
        return len(records)


async def main():
    broker = KafkaBroker(bootstrap)
    kafka.subscribe(broker, Holder(), membership=kafka.Membership(*map(int, membership)), prefix=prefix)
    await broker.start()
    await asyncio.Event().wait()


asyncio.run(main())
"""


class Recorder:
    """A consumer that settles every record, noting when each arrived."""

    group = GROUP
    topics = (TOPIC,)

    def __init__(self) -> None:
        self.arrivals: list[tuple[ConsumerRecord[bytes, bytes], float]] = []

    async def process_batch(self, records: Sequence[ConsumerRecord[bytes, bytes]], **options: Any) -> int:
        now = asyncio.get_running_loop().time()
        self.arrivals += [(record, now) for record in records]
        return len(records)


async def test_the_survivor_takes_a_killed_replicas_partitions_within_seconds(
    infrastructure: Infrastructure,
    make_settings: Callable[..., Any],
    topic_prefix: str,
    producer: AIOKafkaProducer,
    wait_for: Any,
) -> None:
    settings: ServiceSettings = make_settings(ServiceSettings, "postgresql://unused@127.0.0.1/unused")
    membership = kafka.Membership.of(settings)
    bootstrap, topic = infrastructure.kafka_bootstrap, topic_prefix + TOPIC
    await kafka.ensure_topics(bootstrap, [topic], partitions=2, replication=1)
    survivor = Recorder()
    broker = KafkaBroker(bootstrap, logger=logging.getLogger("faststream"), log_level=logging.DEBUG)
    kafka.subscribe(broker, survivor, membership=membership, prefix=topic_prefix)  # type: ignore[arg-type]  # a recorder
    member = None
    try:
        await broker.start()
        (subscriber,) = broker.subscribers
        client = getattr(subscriber, "consumer", None)
        assert client is not None

        def assigned() -> set[TopicPartition]:
            partitions: set[TopicPartition] = client.assignment()
            return partitions

        assert await wait_for(lambda: len(assigned()) == 2, timeout=30), "the survivor never joined"
        member = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            MEMBER,
            bootstrap,
            topic_prefix,
            GROUP,
            TOPIC,
            str(membership.session_timeout_ms),
            str(membership.heartbeat_interval_ms),
            str(membership.max_poll_interval_ms),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert await wait_for(lambda: len(assigned()) == 1, timeout=60), "the second member never joined"
        (theirs,) = {TopicPartition(topic, 0), TopicPartition(topic, 1)} - assigned()

        member.kill()  # SIGKILL: no LeaveGroup, the group learns of it only when its session expires
        await member.wait()
        killed_at = asyncio.get_running_loop().time()
        await producer.send_and_wait(topic, b"after the kill", partition=theirs.partition)

        def arrived() -> float | None:
            at = [when for record, when in survivor.arrivals if record.partition == theirs.partition]
            return at[0] - killed_at if at else None

        takeover = await wait_for(arrived, timeout=60)
        assert takeover is not None, "the survivor never took the dead member's partition"
        assert takeover < TAKEOVER_LIMIT, f"took {takeover:.1f} s"
        assert assigned() == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
        logging.getLogger(__name__).info("the survivor took over after %.1f s", takeover)
    finally:
        if member is not None and member.returncode is None:
            member.kill()
            await member.wait()
        await broker.stop()
