"""How many credentials per second issuance mints: signing alone, and end to end.

    python -m issuance.benchmark [--count N] [--signing-only]

Signing alone builds and signs N distinct course credentials (eddsa-rdfc-2022) in this process.
End to end publishes N CourseCompleted events to Kafka and times the service consuming them,
minting, signing and recording each credential and publishing its CredentialIssued through the
outbox: from the first event sent to the last CredentialIssued acknowledged by Kafka. It uses a
throwaway database, topic prefix and key folder on the servers named by KAFKA_BOOTSTRAP_SERVERS
and POSTGRES_URL (a role that may create databases), by default the project's local ones.
A benchmark, not a test: nothing here asserts a speed.
"""

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from microcred_events import (
    CompletedBy,
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    CredentialIssued,
    Event,
    Learner,
    encode,
    example_data,
)

from . import domain, keys
from .main import create_app
from .service import Platform
from .settings import Settings

COURSE = CourseSnapshot.model_validate(
    {**example_data(CourseSnapshot), "course_id": str(uuid.uuid4()), "credential_validity_days": 365}
)


def _completion(number: int) -> CourseCompleted:
    return CourseCompleted(
        enrollment_id=uuid.uuid4(),
        learner=Learner(
            learner_id=uuid.uuid4(), email=f"learner{number}@example.org", display_name=f"Learner {number}"
        ),
        course_id=COURSE.course_id,
        course_version=COURSE.version,
        completed_at=datetime.now(UTC),
        score=80 + number % 20,
        evidence_url=f"https://northwind.example.edu/portfolio/{number}",
        completed_by=CompletedBy.STAFF,
    )


def signing_rate(count: int, platform: Platform) -> float:
    """Credentials built and signed per second, one core, distinct values each time."""
    list_id = uuid.uuid4()

    def sign(number: int) -> str:
        now = datetime.now(UTC)
        issuance = platform.issuance(COURSE.issuer.issuer_id, list_id, number, now)
        return platform.sign(
            domain.course_credential(issuance, COURSE, _completion(number)), issuance.issuer_did, now
        )

    for number in range(10):  # warm-up: the canonicalizer's templates, pyld's context cache
        sign(number)
    started = time.perf_counter()
    for number in range(count):
        sign(number)
    return count / (time.perf_counter() - started)


@contextlib.asynccontextmanager
async def _throwaway(postgres_url: str, bootstrap: str) -> AsyncIterator[tuple[str, str]]:
    """A database and a topic prefix of the benchmark's own, removed afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}."
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rpartition("/")[0] + f"/{name}", prefix
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        kafka = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await kafka.start()
        try:
            mine = [topic for topic in await kafka.list_topics() if topic.startswith(prefix)]
            if mine:
                await kafka.delete_topics(mine)
        finally:
            await kafka.close()


async def _send(producer: AIOKafkaProducer, prefix: str, event: Event, source: str) -> None:
    record = encode(event, source=source, event_id=str(uuid.uuid4()))
    await producer.send(prefix + record.topic, record.value, key=record.key, headers=record.headers)


async def end_to_end_rate(count: int, keys_dir: Path, postgres_url: str, bootstrap: str) -> float:
    """Completions turned into recorded credentials with their CredentialIssued on Kafka, per second."""
    with tempfile.TemporaryDirectory() as scratch:
        jwks = Path(scratch) / "jwks.json"
        jwks.write_text(json.dumps({"keys": []}))
        async with _throwaway(postgres_url, bootstrap) as (database_url, prefix):
            settings = Settings(
                database_url=database_url,
                kafka_bootstrap_servers=bootstrap,
                kafka_topic_prefix=prefix,
                auth_issuer="https://benchmark.invalid",
                auth_jwks_file=jwks,
                issuer_keys_dir=keys_dir,
                outbox_poll_interval_seconds=0.2,
            )
            app = create_app(settings)
            producer = AIOKafkaProducer(
                bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
            )
            async with app.router.lifespan_context(app), asyncpg.create_pool(database_url) as pool:
                await producer.start()
                try:
                    await _send(
                        producer,
                        prefix,
                        CoursePublished(course=COURSE, published_at=datetime.now(UTC)),
                        "urn:microcred:catalog",
                    )
                    await _until(pool, "SELECT count(*) FROM course_versions", 1)
                    started = time.perf_counter()
                    for number in range(count):
                        await _send(producer, prefix, _completion(number), "urn:microcred:enrollment")
                    await producer.flush()
                    await _until(pool, _ISSUED_PUBLISHED, count, CredentialIssued.TYPE)
                    return count / (time.perf_counter() - started)
                finally:
                    await producer.stop()


_ISSUED_PUBLISHED = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL AND event_type = $1"


async def _until(pool: asyncpg.Pool, count_query: str, count: int, *arguments: object) -> None:
    """Poll until the query counts `count` rows: the service shares nothing else to wait on."""
    while await pool.fetchval(count_query, *arguments) < count:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2000, help="credentials per measurement (default 2000)")
    parser.add_argument("--signing-only", action="store_true", help="skip the end-to-end measurement")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        keys_dir = Path(scratch) / "keys"
        keys.generate_key(keys_dir)
        platform = Platform("http://127.0.0.1:8004", keys.load_keyring(keys_dir))
        print(f"signing alone:  {signing_rate(arguments.count, platform):8.0f} credentials/s (one core)")
        if arguments.signing_only:
            return
        postgres_url = os.environ.get(
            "POSTGRES_URL", "postgresql://microcred:microcred@127.0.0.1:5432/postgres"
        )
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
        rate = asyncio.run(end_to_end_rate(arguments.count, keys_dir, postgres_url, bootstrap))
        print(
            f"end to end:     {rate:8.0f} credentials/s (consume -> sign -> record -> publish, one replica)"
        )


if __name__ == "__main__":
    main()
