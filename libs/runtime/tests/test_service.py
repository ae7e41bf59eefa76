import asyncio
import dataclasses
import errno
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from aiokafka.errors import (
    InvalidReplicationFactorError,
    KafkaConnectionError,
    PolicyViolationError,
    TopicAuthorizationFailedError,
)
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware import Middleware
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from microcred_runtime import (
    Db,
    Runtime,
    Service,
    ServiceSettings,
    kafka,
    max_body_bytes,
    problem_doc,
    service,
)
from microcred_runtime.metrics import Metrics
from microcred_runtime.outbox import OutboxRelay, RelaySettings
from microcred_runtime.problems import PROBLEM_JSON

from .conftest import FakeConnection, FakePool

MIGRATIONS = Path(__file__).parent / "no-migrations"


class FakeBroker:
    def __init__(self, *, answers: bool) -> None:
        self.answers = answers
        self.timeouts: list[float | None] = []

    async def ping(self, timeout: float | None) -> bool:
        self.timeouts.append(timeout)
        return self.answers


def settings(**changes: Any) -> ServiceSettings:
    return ServiceSettings(
        database_url="postgresql://catalog:secret@db:5432/catalog",
        kafka_bootstrap_servers="kafka:9092",
        auth_issuer="https://id.microcred.example",
        auth_jwks_url="https://id.microcred.example/jwks.json",
        **changes,
    )


def catalog(*routers: APIRouter) -> Service[ServiceSettings]:
    return Service(name="catalog", settings_class=ServiceSettings, migrations=MIGRATIONS, routers=routers)


@pytest.fixture(autouse=True)
def no_global_tracing(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """`configure_tracing` installs a process-wide provider and instruments asyncpg: not in unit tests."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(service, "configure_tracing", lambda name, version: calls.append((name, version)))
    return calls


def with_runtime(app: FastAPI, pool: FakePool, broker: FakeBroker) -> FastAPI:
    """What the lifespan would store, without connecting to PostgreSQL and Kafka."""

    async def publish(records: Any) -> list[BaseException | None]:
        return []

    app.state.runtime = Runtime(
        settings=settings(),
        pool=pool,  # type: ignore[arg-type]  # a fake pool
        broker=broker,  # type: ignore[arg-type]  # a fake broker that only answers ping
        relay=OutboxRelay("postgresql://unused", publish, RelaySettings()),
        consumers=[],
        metrics=Metrics(),
    )
    return app


@pytest.fixture
def app() -> FastAPI:
    return catalog().create_app(settings())


def free_port() -> int:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port: int = free.getsockname()[1]
        return port


async def get(app: FastAPI, path: str, **options: Any) -> httpx.Response:
    # httpx does not run the lifespan, which would connect to PostgreSQL and Kafka.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return await client.get(path, **options)


def test_create_app_serves_health_and_the_services_routes(no_global_tracing: list[tuple[str, str]]) -> None:
    router = APIRouter()

    @router.get("/courses")
    async def courses() -> list[str]:
        return []

    app = catalog(router).create_app(settings())

    assert {"/health/live", "/health/ready", "/courses"} <= set(app.openapi()["paths"])
    assert app.title == "microcred catalog"
    assert no_global_tracing == [("catalog", "0.1.0")]


async def test_liveness_needs_nothing_but_the_process(app: FastAPI) -> None:
    response = await get(app, "/health/live")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_when_postgresql_and_kafka_answer(app: FastAPI) -> None:
    pool, broker = FakePool(), FakeBroker(answers=True)

    response = await get(with_runtime(app, pool, broker), "/health/ready")

    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"postgres": "ok", "kafka": "ok"}}
    assert [query for query, _ in pool.conn.fetched] == ["SELECT 1"]
    assert broker.timeouts == [2.0]


@pytest.mark.parametrize(
    ("postgres_up", "kafka_up", "detail"),
    [
        (False, True, "not ready: postgres unreachable"),
        (True, False, "not ready: kafka unreachable"),
        (False, False, "not ready: kafka, postgres unreachable"),
    ],
)
async def test_not_ready_is_a_503_problem_naming_the_failing_check(
    app: FastAPI, postgres_up: bool, kafka_up: bool, detail: str
) -> None:
    pool = FakePool() if postgres_up else FakePool(acquire_error=ConnectionRefusedError("refused"))

    response = await get(with_runtime(app, pool, FakeBroker(answers=kafka_up)), "/health/ready")

    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["type"] == "urn:microcred:problem:not-ready"
    assert body["detail"] == detail
    assert body["checks"] == {
        "postgres": "ok" if postgres_up else "failing",
        "kafka": "ok" if kafka_up else "failing",
    }


async def test_routes_reach_the_pool_through_the_db_dependency() -> None:
    router = APIRouter()

    @router.get("/answer")
    async def answer(db: Db) -> dict[str, object]:
        async with db.acquire() as conn:
            return {"answer": await conn.fetchval("SELECT 42")}

    app = catalog(router).create_app(settings())
    pool = FakePool(FakeConnection(fetchval_result=42))

    response = await get(with_runtime(app, pool, FakeBroker(answers=True)), "/answer")

    assert response.json() == {"answer": 42}


async def test_cors_origins_from_the_settings_are_allowed() -> None:
    app = catalog().create_app(settings(cors_origins=["https://learn.example.edu"]))
    preflight = {"origin": "https://learn.example.edu", "access-control-request-method": "GET"}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        allowed = await client.options("/health/live", headers=preflight)
        other = await client.options("/health/live", headers={**preflight, "origin": "https://evil.example"})

    assert allowed.headers["access-control-allow-origin"] == "https://learn.example.edu"
    assert "access-control-allow-origin" not in other.headers


async def test_a_browser_app_may_read_the_etag_location_and_retry_after() -> None:
    app = catalog().create_app(settings(cors_origins=["https://learn.example.edu"]))

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.get("/health/live", headers={"origin": "https://learn.example.edu"})

    exposed = {name.strip().lower() for name in answer.headers["access-control-expose-headers"].split(",")}
    assert {"etag", "location", "retry-after"} <= exposed


class AnswersFast:
    """A service's own middleware that answers one path itself, as a cache would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/fast":
            await PlainTextResponse("fast")(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def test_a_services_own_middleware_answers_inside_the_runtimes() -> None:
    origin = "https://learn.example.edu"
    service = dataclasses.replace(catalog(), middleware=[Middleware(AnswersFast)])
    app = service.create_app(settings(cors_origins=[origin]))

    fast = await get(app, "/fast", headers={"origin": origin})
    routed = await get(app, "/health/live", headers={"origin": origin})

    assert (fast.status_code, fast.text) == (200, "fast")
    assert fast.headers["access-control-allow-origin"] == origin  # CORS wraps it
    assert routed.json() == {"status": "ok"}


def test_run_refuses_to_start_without_a_database_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("database_url", raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")

    def serve(*args: object, **kwargs: object) -> None:
        raise AssertionError("the service must not start")

    monkeypatch.setattr(uvicorn, "Server", serve)

    with pytest.raises(SystemExit) as exited:
        catalog().run()

    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("catalog: invalid configuration")
    assert "DATABASE_URL" in error


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "_RETRY_FIRST_SECONDS", 0.01)
    monkeypatch.setattr(service, "_STILL_WAITING_SECONDS", 0.05)


@pytest.mark.usefixtures("quick_retries")
async def test_a_start_up_step_waits_out_an_outage_saying_what_it_waits_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    startup = service.Startup()
    errors: list[Exception] = [ConnectionRefusedError("refused"), KafkaConnectionError("no broker")]
    seen: list[str | None] = []

    async def connect() -> str:
        seen.append(startup.last_error)
        if errors:
            raise errors.pop(0)
        return "connected"

    with caplog.at_level(logging.WARNING, logger=service.__name__):
        assert await startup.step("PostgreSQL at db:5432/catalog", connect, per_try=1) == "connected"

    assert seen == [None, "ConnectionRefusedError: refused", "KafkaConnectionError: no broker"]
    assert [record.getMessage() for record in caplog.records] == [
        "start-up waits for PostgreSQL at db:5432/catalog: ConnectionRefusedError: refused;"
        " trying again in 0.0 s",
        "start-up waits for PostgreSQL at db:5432/catalog: KafkaConnectionError: no broker;"
        " trying again in 0.0 s",
    ]


@pytest.mark.usefixtures("quick_retries")
async def test_a_start_up_step_that_does_not_answer_is_cut_short_tried_again_and_said_to_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    startup = service.Startup()
    tries: list[float] = []

    async def join() -> None:
        tries.append(asyncio.get_running_loop().time())
        if len(tries) == 1:
            await asyncio.Event().wait()  # a group coordinator that never answers

    with caplog.at_level(logging.WARNING, logger=service.__name__):
        await startup.step("Kafka to let the consumers join their groups (g)", join, per_try=0.2)

    assert len(tries) == 2
    assert startup.last_error == "no answer within 0.2 s"
    messages = [record.getMessage() for record in caplog.records]
    waiting = "Kafka to let the consumers join their groups (g)"
    assert f"start-up still waits for {waiting} after 0.05 s" in messages
    assert messages[-1] == f"start-up waits for {waiting}: no answer within 0.2 s; trying again in 0.0 s"


async def test_a_start_up_step_failing_for_another_reason_than_an_outage_ends_the_start() -> None:
    tries = 0

    async def migrate() -> None:
        nonlocal tries
        tries += 1
        raise ValueError("migration 003 was changed after it was applied")

    with pytest.raises(ValueError, match="changed after it was applied"):
        await service.Startup().step("the migrations", migrate, per_try=None)
    assert tries == 1


@pytest.mark.parametrize(
    "error",
    [
        ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate"),
        PermissionError(13, "Permission denied"),
        FileNotFoundError(2, "No such file or directory: '/run/secrets/ca.pem'"),
        kafka.TopicsNotCreated(
            "cannot create Kafka topics: t: TopicAuthorizationFailedError", [TopicAuthorizationFailedError]
        ),
        kafka.TopicsNotCreated("cannot create Kafka topics: t: PolicyViolationError", [PolicyViolationError]),
    ],
    ids=["certificate", "permission", "missing-file", "topic-authorization", "topic-policy"],
)
@pytest.mark.usefixtures("quick_retries")
async def test_a_start_up_step_failing_for_good_ends_the_start_though_it_is_an_os_or_kafka_error(
    error: Exception,
) -> None:
    tries = 0

    async def connect() -> None:
        nonlocal tries
        tries += 1
        raise error

    with pytest.raises(type(error)):
        async with asyncio.timeout(5):  # not tried again for ever
            await service.Startup().step("Kafka at kafka:9093 to start the producer", connect, per_try=1)
    assert tries == 1


@pytest.mark.parametrize(
    "error",
    [
        socket.gaierror(-2, "Name or service not known"),
        OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432, 0, 0), [Errno 111] ..."),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        TimeoutError(),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        kafka.TopicsNotCreated(
            "cannot create Kafka topics: t: InvalidReplicationFactorError", [InvalidReplicationFactorError]
        ),
    ],
    ids=["dns", "every-address-refused", "no-route", "timeout", "postgres-starting", "too-few-brokers"],
)
@pytest.mark.usefixtures("quick_retries")
async def test_a_start_up_step_tries_again_after_a_network_or_starting_error(error: Exception) -> None:
    errors = [error]

    async def connect() -> str:
        if errors:
            raise errors.pop()
        return "connected"

    assert await service.Startup().step("PostgreSQL at db:5432/catalog", connect, per_try=1) == "connected"


async def test_what_a_failed_try_started_is_stopped_to_its_end_though_the_try_is_cut_short() -> None:
    stopped = asyncio.Event()

    async def stop() -> None:
        await asyncio.sleep(0.2)  # e.g. a consumer leaving its group
        stopped.set()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the step's deadline, firing during the undo
            await service._undo("the producer", stop)

    await asyncio.wait_for(stopped.wait(), timeout=5)


def test_a_service_whose_start_fails_for_good_exits_1(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    for name, value in {
        "DATABASE_URL": "postgresql://catalog:secret@db:5432/catalog",
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "AUTH_ISSUER": "https://id.microcred.example",
        "AUTH_JWKS_URL": "https://id.microcred.example/jwks.json",
        "HTTP_PORT": str(port),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(service, "configure_logging", lambda name, level: None)

    async def refused(*args: object, **kwargs: object) -> None:
        raise ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")

    monkeypatch.setattr(asyncpg, "create_pool", refused)

    with caplog.at_level(logging.ERROR, logger=service.__name__), pytest.raises(SystemExit) as exited:
        catalog().run()

    assert exited.value.code == 1
    (failed,) = [record for record in caplog.records if record.name == service.__name__]
    assert failed.getMessage() == "start-up failed at PostgreSQL at db:5432/catalog"
    assert isinstance(failed.exc_info and failed.exc_info[1], ssl.SSLCertVerificationError)


async def test_while_the_service_starts_it_is_live_not_ready_and_says_what_it_waits_for() -> None:
    router = APIRouter()

    @router.get("/answer")
    async def answer(db: Db) -> dict[str, object]:
        raise AssertionError("no route runs before the service does")

    app = catalog(router).create_app(settings())
    app.state.startup.waiting_for = "Kafka at kafka:9092 to create the topics"
    app.state.startup.last_error = "KafkaConnectionError: Unable to bootstrap"

    live, ready, route = [await get(app, path) for path in ("/health/live", "/health/ready", "/answer")]

    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    assert ready.status_code == 503
    assert ready.headers["content-type"] == PROBLEM_JSON
    assert ready.json() == {
        "type": "urn:microcred:problem:not-ready",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "not ready: starting, waiting for Kafka at kafka:9092 to create the topics",
        "checks": {"startup": "waiting"},
        "waiting_for": "Kafka at kafka:9092 to create the topics",
        "last_error": "KafkaConnectionError: Unable to bootstrap",
    }
    assert route.status_code == 503
    assert route.headers["retry-after"] == "5"
    assert route.json()["type"] == "urn:microcred:problem:starting"


def body_routes() -> APIRouter:
    router = APIRouter()

    class Course(BaseModel):
        title: str

    @router.post("/courses")
    async def create(course: Course) -> Course:
        return course

    @router.post(
        "/webhooks",
        openapi_extra={"requestBody": {"content": {"application/json": {}}}},
        responses={413: problem_doc("The body is larger than 262144 bytes.")},
    )
    @max_body_bytes(256 * 1024)
    async def webhook(request: Request) -> int:
        return len(await request.body())

    @router.post("/batches", responses={413: problem_doc("Too many reports, or too many bytes.")})
    @max_body_bytes(2 * 1024 * 1024)
    async def batch(reports: list[Course]) -> int:
        return len(reports)

    @router.get("/courses")
    async def courses() -> list[Course]:
        return []

    return router


async def test_request_bodies_are_limited_by_http_max_body_bytes_or_the_routes_own_limit() -> None:
    app = catalog(body_routes()).create_app(settings(http_max_body_bytes=2048))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        fits = await client.post("/courses", json={"title": "x" * 2000})
        too_large = await client.post("/courses", json={"title": "x" * 2048})
        own_limit = await client.post("/webhooks", content=b" " * 100_000)

    assert fits.status_code == 200
    assert (too_large.status_code, too_large.headers["content-type"]) == (413, PROBLEM_JSON)
    assert too_large.json()["type"] == "urn:microcred:problem:body-too-large"
    assert too_large.json()["limit"] == 2048
    assert (own_limit.status_code, own_limit.json()) == (200, 100_000)


def test_every_operation_that_takes_a_body_documents_the_400_and_413_problems_unless_it_does_itself() -> None:
    paths = catalog(body_routes()).create_app(settings()).openapi()["paths"]
    responses = {
        (method, path): operation["responses"]
        for path, operations in paths.items()
        for method, operation in operations.items()
    }

    for operation in (("post", "/courses"), ("post", "/webhooks"), ("post", "/batches")):
        assert {"400", "413"} <= set(responses[operation]), operation
        for status in ("400", "413"):
            assert set(responses[operation][status]["content"]) == {PROBLEM_JSON}, operation
    assert "larger than 1048576 bytes" in responses["post", "/courses"]["413"]["description"]
    assert responses["post", "/webhooks"]["413"]["description"] == "The body is larger than 262144 bytes."
    assert responses["post", "/batches"]["413"]["description"] == "Too many reports, or too many bytes."
    assert not {"400", "413"} & set(responses["get", "/courses"])


async def test_a_body_that_is_not_utf8_is_a_documented_400_problem() -> None:
    app = catalog(body_routes()).create_app(settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/courses", content=b'{"title": "\xff\xfe"}', headers={"content-type": "application/json"}
        )

    assert (response.status_code, response.headers["content-type"]) == (400, PROBLEM_JSON)
    assert response.json()["detail"] == "There was an error parsing the body"
    assert "400" in app.openapi()["paths"]["/courses"]["post"]["responses"]


async def test_metrics_are_on_the_api_port_unless_metrics_port_is_set() -> None:
    response = await get(catalog().create_app(settings()), "/metrics")

    assert response.status_code == 200
    assert "microcred_outbox_backlog" in response.text


async def test_with_a_metrics_port_metrics_are_served_there_while_the_service_runs_and_not_on_the_api_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def waits(*args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()  # PostgreSQL does not answer: the service is still starting

    monkeypatch.setattr(asyncpg, "create_pool", waits)
    port = free_port()
    app = catalog().create_app(settings(http_host="127.0.0.1", metrics_port=port))
    app.state.give_up = lambda: None  # as `run()` does: the start goes on beside the lifespan

    async with app.router.lifespan_context(app), httpx.AsyncClient() as client:
        scraped = await client.get(f"http://127.0.0.1:{port}/metrics")
        on_the_api = await get(app, "/metrics")

    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    assert "microcred_outbox_backlog" in scraped.text
    assert on_the_api.status_code == 404
    assert on_the_api.headers["content-type"] == PROBLEM_JSON
    with pytest.raises(httpx.ConnectError):  # stopped with the service
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/metrics")


def test_a_metrics_port_taken_by_the_api_is_refused() -> None:
    with pytest.raises(ValueError, match="METRICS_PORT must differ from HTTP_PORT"):
        settings(http_port=8001, metrics_port=8001)


def test_a_service_whose_metrics_port_is_taken_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for name, value in {
            "DATABASE_URL": "postgresql://catalog:secret@db:5432/catalog",
            "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
            "AUTH_ISSUER": "https://id.microcred.example",
            "AUTH_JWKS_URL": "https://id.microcred.example/jwks.json",
            "HTTP_PORT": str(free_port()),
            "METRICS_PORT": str(taken.getsockname()[1]),
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(service, "configure_logging", lambda name, level: None)

        with pytest.raises(SystemExit) as exited:
            catalog().run()

    assert exited.value.code == 3  # uvicorn's own for a start that failed
