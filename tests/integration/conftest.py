"""Real Kafka and PostgreSQL for the integration tests.

Where they come from, in order: `KAFKA_BOOTSTRAP_SERVERS` and `POSTGRES_URL` from the
environment; containers (testcontainers) when a Docker engine answers; otherwise the project's
own broker and server (`scripts/infra.py`), started if they are not running yet.
Each test gets its own databases and its own topic prefix, so tests never see each other's data.
"""

import asyncio
import contextlib
import inspect
import json
import os
import socket
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from fastapi import FastAPI

from microcred_events import Issuer, example_data
from microcred_runtime import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
KAFKA_IMAGE = "apache/kafka:4.1.1"
POSTGRES_IMAGE = "postgres:16-alpine"
T = TypeVar("T")
S = TypeVar("S", bound=ServiceSettings)


@dataclass(frozen=True)
class Infrastructure:
    kafka_bootstrap: str
    postgres_url: str  # a role that may create databases


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def _docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _containers() -> Iterator[Infrastructure]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer

    with KafkaContainer(KAFKA_IMAGE) as kafka, PostgresContainer(POSTGRES_IMAGE, driver=None) as postgres:
        yield Infrastructure(kafka.get_bootstrap_server(), postgres.get_connection_url())


@pytest.fixture(scope="session")
def infrastructure(pytestconfig: pytest.Config) -> Iterator[Infrastructure]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("POSTGRES_URL"):
        yield Infrastructure(os.environ["KAFKA_BOOTSTRAP_SERVERS"], os.environ["POSTGRES_URL"])
        return
    if _docker_engine_answers():
        with _containers() as infra:
            yield infra
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import infra as local

    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    # The first run downloads Kafka: let its progress reach the terminal.
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        endpoints = local.ensure_up()
    yield Infrastructure(endpoints.kafka_bootstrap, endpoints.postgres_url)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on, for a service process under test."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
async def new_database(infrastructure: Infrastructure) -> AsyncIterator[Callable[[], Any]]:
    """Creates throwaway databases for the test; all are dropped at its end."""
    created: list[str] = []
    admin = await asyncpg.connect(infrastructure.postgres_url)

    async def create() -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return _with_database(infrastructure.postgres_url, name)

    try:
        yield create
    finally:
        for name in created:
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except asyncpg.PostgresError as exc:
                # A leftover throwaway database harms no test; failing this one for it would.
                warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)
        await admin.close()


@pytest.fixture
async def topic_prefix(infrastructure: Infrastructure) -> AsyncIterator[str]:
    """A Kafka namespace of the test's own; its topics are deleted afterwards, so a broker that
    serves many test runs does not pile up thousands of partitions."""
    prefix = f"test-{uuid.uuid4().hex[:8]}."
    yield prefix
    admin = AIOKafkaAdminClient(bootstrap_servers=infrastructure.kafka_bootstrap)
    await admin.start()
    try:
        mine = [topic for topic in await admin.list_topics() if topic.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run an app's whole lifespan (database, broker, relay) and talk to it over ASGI."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            yield client


@pytest.fixture
def serve() -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]:
    return serving


@pytest.fixture
async def producer(infrastructure: Infrastructure) -> AsyncIterator[AIOKafkaProducer]:
    """A plain Kafka client, as a partner or another service would use."""
    client = AIOKafkaProducer(
        bootstrap_servers=infrastructure.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


async def read_topic(
    bootstrap: str, topic: str, count: int, timeout: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """The first `count` records of a topic, or fewer if the timeout runs out."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=500)
                records += [record for partition in batch.values() for record in partition]
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return records


@pytest.fixture
def topic_reader(infrastructure: Infrastructure) -> Callable[..., Any]:
    async def read(topic: str, count: int, timeout: float = 30.0) -> list[ConsumerRecord[bytes, bytes]]:
        return await read_topic(infrastructure.kafka_bootstrap, topic, count, timeout)

    return read


async def eventually(
    check: Callable[[], T | Awaitable[T]], *, timeout: float = 30.0, interval: float = 0.1
) -> T:
    """Poll `check` until it returns something truthy; the last value otherwise (which fails the test)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        result = await value if inspect.isawaitable(value) else value
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(interval)


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    return eventually


@pytest.fixture(scope="session")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A token issuer for the tests, with its own key; services trust it through a JWKS file."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from dev_issuer import DevIssuer

    return DevIssuer(tmp_path_factory.mktemp("issuer"), issuer="https://issuer.test", audience="microcred")


@pytest.fixture(scope="session")
def jwks_file(issuer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    return path


@pytest.fixture
def make_settings(infrastructure: Infrastructure, topic_prefix: str, jwks_file: Path) -> Callable[..., Any]:
    """Settings for a service under test: this test's Kafka prefix, the test issuer, quick retries."""

    def make(settings_class: type[S], database_url: str, **overrides: Any) -> S:
        values: dict[str, Any] = {
            "database_url": database_url,
            "kafka_bootstrap_servers": infrastructure.kafka_bootstrap,
            "kafka_topic_prefix": topic_prefix,
            "auth_issuer": "https://issuer.test",
            "auth_jwks_file": jwks_file,
            # Tests name a learner by their id in the token's subject (bearer(str(learner_id))), as
            # an issuer whose subjects are learner ids would; the abuse suite runs with the default.
            "auth_uuid_subjects_are_learner_ids": True,
            "consumer_retry_backoff_seconds": 0.05,
            "outbox_poll_interval_seconds": 0.2,
            "shutdown_grace_seconds": 5,
            # Tests send bursts from one address and subject; the limits have tests of their own
            # (abuse/test_rate_limits.py).
            "rate_limit_per_address": "100000/minute",
            "rate_limit_per_subject": "100000/minute",
            **overrides,
        }
        return settings_class(**values)

    return make


# The institution the contract's example course is issued by, and so the tests' courses: a staff
# token acts for it unless the test names other `issuers` (staff roles are scoped to issuers).
EXAMPLE_ISSUER_ID = str(example_data(Issuer)["issuer_id"])


def staff_scope(roles: Sequence[str], claims: dict[str, Any]) -> dict[str, Any]:
    """The claims, with the example issuer as a staff token's scope unless they name one."""
    if "staff" in roles and "issuers" not in claims:
        return {**claims, "issuers": [EXAMPLE_ISSUER_ID]}
    return claims


@pytest.fixture
def bearer(issuer: Any) -> Callable[..., dict[str, str]]:
    """Authorization headers for a caller with the given subject and roles (staff act for the
    example issuer unless `issuers` says otherwise)."""

    def headers(subject: str, *roles: str, **claims: Any) -> dict[str, str]:
        granted = list(roles or ("learner",))
        return {"Authorization": f"Bearer {issuer.token(subject, granted, **staff_scope(granted, claims))}"}

    return headers
