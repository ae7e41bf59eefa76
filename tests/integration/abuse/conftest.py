"""The whole platform for the abuse tests: the five services, started once per test module.

Each module gets its own databases and Kafka topic prefix (so modules never see each other's data),
the test token issuer, the payment-provider simulator and an SMTP sink, all in this process on
real Kafka and PostgreSQL. Starting five services per test would cost more than the attacks do,
hence the module scope; the attacks themselves never depend on each other's leftovers.
"""

import asyncio
import contextlib
import socket
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from fastapi import FastAPI

import billing.main
import billing.settings
import catalog.main
import catalog.settings
import enrollment.main
import enrollment.settings
import issuance.main
import issuance.settings
import notifications.main
import notifications.settings
from billing import api as billing_api
from billing import simulator
from billing.provider import SimulatorProvider
from issuance import keys
from microcred_events import CourseSnapshot, example_data
from microcred_runtime import ServiceSettings
from notifications.smtp_sink import Handler, MailStore, smtp_server

from ..conftest import Infrastructure, eventually, serving, staff_scope

S = TypeVar("S", bound=ServiceSettings)
# The integration suite's poller, typed loosely as its `wait_for` fixture is.
wait_for: Callable[..., Awaitable[Any]] = eventually

SERVICES = ("catalog", "enrollment", "billing", "issuance", "notifications")
PAYMENT_SECRET = "whsec_abuse_7f3c1a9e5b2d4c6e8a0b1d3f"
ISSUANCE_BASE = "https://issuance.test"
# Trusted by POST /verify on port 9 only: the same host on any other port must stay untrusted.
VERIFY_TRUSTED_HOSTS = ["127.0.0.1:9"]
# Production-like: subscribers' hosts only, loopback and link-local left out.
WEBHOOK_ALLOWED_HOSTS = ["*.partner.example", "hooks.employer.example"]
PROBLEM_JSON = "application/problem+json"
COURSE = {
    name: value
    for name, value in example_data(CourseSnapshot).items()
    if name not in ("course_id", "version")
}


@dataclass
class Platform:
    """The running services, their databases, Kafka, and callers with tokens."""

    apps: dict[str, FastAPI]
    clients: dict[str, httpx.AsyncClient]
    databases: dict[str, str]
    prefix: str
    kafka_bootstrap: str
    producer: AIOKafkaProducer
    issuer: Any  # scripts/dev_issuer.DevIssuer
    mail: MailStore

    @property
    def catalog(self) -> httpx.AsyncClient:
        return self.clients["catalog"]

    @property
    def enrollment(self) -> httpx.AsyncClient:
        return self.clients["enrollment"]

    @property
    def billing(self) -> httpx.AsyncClient:
        return self.clients["billing"]

    @property
    def issuance(self) -> httpx.AsyncClient:
        return self.clients["issuance"]

    @property
    def notifications(self) -> httpx.AsyncClient:
        return self.clients["notifications"]

    def bearer(self, subject: str, *roles: str, **claims: Any) -> dict[str, str]:
        """Staff act for the example issuer (the courses' own) unless `issuers` says otherwise."""
        token = self.issuer.token(subject, list(roles), **staff_scope(roles, claims))
        return {"Authorization": f"Bearer {token}"}

    def learner(self, name: str) -> dict[str, str]:
        return self.bearer(name, "learner", email=f"{name}@example.org", name=name.title())

    def staff(self) -> dict[str, str]:
        return self.bearer("staff-1", "staff", email="staff@example.org")

    def admin(self) -> dict[str, str]:
        return self.bearer("admin-1", "admin", email="admin@example.org")

    async def fetchval(self, service: str, query: str, *args: Any) -> Any:
        connection = await asyncpg.connect(self.databases[service])
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()

    async def published_course(self, title: str, amount_minor: int = 0, **details: Any) -> str:
        """A course created and published through catalog's API; its id."""
        body = {
            **COURSE,
            "title": title,
            "price": {"amount_minor": amount_minor, "currency": "EUR"},
            **details,
        }
        created = await self.catalog.post("/courses", json=body, headers=self.staff())
        assert created.status_code == 201, created.text
        course_id: str = created.json()["course_id"]
        published = await self.catalog.post(f"/courses/{course_id}/publish", headers=self.staff())
        assert published.status_code == 200, published.text
        return course_id

    async def enroll(self, learner: str, course_id: str) -> dict[str, Any]:
        """Enroll once enrollment has heard of the course from catalog's events; the enrollment."""

        async def attempt() -> httpx.Response | None:
            response = await self.enrollment.post(
                "/enrollments",
                json={"course_id": course_id},
                headers={**self.learner(learner), "Idempotency-Key": str(uuid.uuid4())},
            )
            return None if response.status_code == 422 else response

        response = await wait_for(attempt)
        assert response is not None, "enrollment never learned of the course"
        assert response.status_code == 201, response.text
        enrolled: dict[str, Any] = response.json()
        return enrolled


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@contextlib.asynccontextmanager
async def _databases(infrastructure: Infrastructure, names: tuple[str, ...]) -> AsyncIterator[dict[str, str]]:
    created: dict[str, str] = {}
    try:
        admin = await asyncpg.connect(infrastructure.postgres_url)
        try:
            for name in names:
                database = f"test_abuse_{name}_{uuid.uuid4().hex[:8]}"
                await admin.execute(f'CREATE DATABASE "{database}"')
                created[name] = database
        finally:
            await admin.close()
        yield {name: _with_database(infrastructure.postgres_url, db) for name, db in created.items()}
    finally:
        # A connection of its own: the module may have run for minutes.
        admin = await asyncpg.connect(infrastructure.postgres_url)
        try:
            for database in created.values():
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                except asyncpg.PostgresError as exc:
                    # A leftover throwaway database harms no test; failing the module for it would.
                    warnings.warn(f"could not drop test database {database}: {exc}", stacklevel=1)
        finally:
            await admin.close()


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        mine = [topic for topic in await admin.list_topics() if topic.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def on_loopback(app: FastAPI) -> AsyncIterator[int]:
    """Serve an ASGI app with uvicorn on a free loopback port (its lifespan left to the caller)."""
    sock = socket.socket()
    # Inherited by accepted connections: without it, a response written in two parts waits for
    # the client's delayed ACK, some 40 ms per request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    # Listening before uvicorn starts: early connections wait in the backlog instead of failing.
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


def ce_headers(
    event_type: str, *, key: str, source: str, event_id: str | None = None, at: datetime | None = None
) -> list[tuple[str, bytes]]:
    """CloudEvents binary-mode headers, written out by hand as any Kafka client could; `ce_time`
    is `at`, or now."""
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", (event_id or str(uuid.uuid4())).encode()),
        ("ce_type", event_type.encode()),
        ("ce_source", source.encode()),
        ("ce_time", (at or datetime.now(UTC)).isoformat().replace("+00:00", "Z").encode()),
        ("ce_subject", key.encode()),
        ("content-type", b"application/json"),
    ]


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    value = next((value for key, value in record.headers if key == name), None)
    return None if value is None else value.decode("utf-8", "replace")


async def records_where(
    bootstrap: str,
    topic: str,
    wanted: Callable[[ConsumerRecord[bytes, bytes]], bool],
    count: int,
    timeout: float = 30.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """The first `count` records of `topic` (all partitions, in partition order) that are `wanted`;
    fewer if the timeout runs out first."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < count:
                batch = await consumer.getmany(timeout_ms=200)
                found += [record for records in batch.values() for record in records if wanted(record)]
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return found


@pytest.fixture(scope="module")
def platform_settings() -> dict[str, Any]:
    """Settings every service of the module's platform gets (one a service does not have, it
    ignores). Rate limits no burst from one address or caller reaches, unless a module asks for
    them by overriding this fixture."""
    return {"rate_limit_per_address": "100000/minute", "rate_limit_per_subject": "100000/minute"}


@pytest.fixture(scope="module")
async def platform(
    infrastructure: Infrastructure,
    issuer: Any,
    jwks_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    platform_settings: dict[str, Any],
) -> AsyncIterator[Platform]:
    prefix = f"test-abuse-{uuid.uuid4().hex[:8]}."
    keys_dir = tmp_path_factory.mktemp("issuer-keys")
    keys.generate_key(keys_dir, "key-abuse-1")
    mail = MailStore()

    def settings(settings_class: type[S], database_url: str, **overrides: Any) -> S:
        values: dict[str, Any] = {
            "database_url": database_url,
            "kafka_bootstrap_servers": infrastructure.kafka_bootstrap,
            "kafka_topic_prefix": prefix,
            "auth_issuer": "https://issuer.test",
            "auth_jwks_file": jwks_file,
            "consumer_retry_backoff_seconds": 0.05,
            "outbox_poll_interval_seconds": 0.2,
            "shutdown_grace_seconds": 5,
            **platform_settings,
            **overrides,
        }
        return settings_class(**values)

    try:
        async with (
            _databases(infrastructure, SERVICES) as databases,
            smtp_server(Handler(mail), port=0) as smtp_port,
        ):
            apps = {
                "catalog": catalog.main.create_app(settings(catalog.settings.Settings, databases["catalog"])),
                "enrollment": enrollment.main.create_app(
                    settings(enrollment.settings.Settings, databases["enrollment"])
                ),
                "billing": billing.main.create_app(
                    settings(
                        billing.settings.Settings,
                        databases["billing"],
                        payment_provider_url="http://simulator",
                        payment_webhook_secret=PAYMENT_SECRET,
                    )
                ),
                "issuance": issuance.main.create_app(
                    settings(
                        issuance.settings.Settings,
                        databases["issuance"],
                        issuer_keys_dir=keys_dir,
                        public_base_url=ISSUANCE_BASE,
                        verify_trusted_hosts=VERIFY_TRUSTED_HOSTS,
                        verify_fetch_timeout_seconds=2,
                    )
                ),
                "notifications": notifications.main.create_app(
                    settings(
                        notifications.settings.Settings,
                        databases["notifications"],
                        smtp_port=smtp_port,
                        webhook_allowed_hosts=WEBHOOK_ALLOWED_HOSTS,
                        delivery_poll_interval_seconds=0.5,
                    )
                ),
            }
            simulator_app = simulator.create_app(
                simulator.SimulatorSettings(
                    webhook_url="http://billing/webhooks/provider", webhook_secret=PAYMENT_SECRET
                ),
                webhook_transport=httpx.ASGITransport(app=apps["billing"]),
            )
            to_simulator = httpx.ASGITransport(app=simulator_app)
            apps["billing"].dependency_overrides[billing_api.payment_provider] = lambda: SimulatorProvider(
                "http://simulator", PAYMENT_SECRET, transport=to_simulator
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=infrastructure.kafka_bootstrap, acks="all", enable_idempotence=True
            )
            await producer.start()
            try:
                async with contextlib.AsyncExitStack() as stack:
                    clients = {
                        name: await stack.enter_async_context(serving(app)) for name, app in apps.items()
                    }
                    yield Platform(
                        apps,
                        clients,
                        databases,
                        prefix,
                        infrastructure.kafka_bootstrap,
                        producer,
                        issuer,
                        mail,
                    )
            finally:
                await producer.stop()
    finally:
        await _delete_topics(infrastructure.kafka_bootstrap, prefix)
