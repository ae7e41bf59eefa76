"""One call wires a service: settings, FastAPI + FastStream with one lifecycle, database, outbox,
inbox consumers, health, telemetry, a request body limit and problem+json errors.

Every service describes itself with a `Service` and calls `run()`; tests call `create_app()`.
"""

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import asyncpg
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator

from microcred_events import Topic, dead_letter_topic

from . import kafka
from .auth import AuthConfig, Authenticator
from .body_limit import BodySizeLimit
from .consumers import EventConsumer, RetryPolicy, Subscriptions
from .db import Connection
from .metrics import Metrics
from .migrations import migrate
from .outbox import OutboxRelay, RelaySettings
from .problems import install_problem_handlers, problem_doc, problem_response
from .settings import ConfigurationError, ServiceSettings, load_settings
from .telemetry import configure_logging, configure_tracing

log = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)

_RUNTIME_MIGRATIONS = Path(str(files("microcred_runtime") / "migrations"))
_READINESS_TIMEOUT = 2.0


@dataclass
class Runtime(Generic[SettingsT]):
    """What a running service holds; routes reach it through the `RuntimeDep` dependency."""

    settings: SettingsT
    pool: asyncpg.Pool
    broker: KafkaBroker
    relay: OutboxRelay
    consumers: list[EventConsumer]  # one per consumer group (see `Subscriptions.routes`)
    metrics: Metrics  # background work registers its own series in `metrics.registry` (served at /metrics)


@dataclass(frozen=True)
class Service(Generic[SettingsT]):
    """A microcred service: its name, settings, SQL migrations, HTTP routes and subscriptions."""

    name: str
    settings_class: type[SettingsT]
    migrations: Path
    routers: Sequence[APIRouter] = ()
    subscriptions: Subscriptions = field(default_factory=Subscriptions)
    # Work a service runs beside its API and consumers (e.g. delivery workers): each is entered
    # once everything else runs and exited first on shutdown.
    background: Sequence[Callable[[Runtime[Any]], contextlib.AbstractAsyncContextManager[object]]] = ()
    version: str = "0.1.0"
    description: str = ""

    def create_app(self, settings: SettingsT | None = None) -> FastAPI:
        """The ASGI app; its lifespan starts and stops everything the service needs."""
        settings = settings or load_settings(self.settings_class)
        configure_tracing(self.name, self.version)
        metrics = Metrics()

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with self._running(settings, metrics) as runtime:
                app.state.runtime = runtime
                yield

        app = FastAPI(
            title=f"microcred {self.name}",
            version=self.version,
            description=self.description,
            lifespan=lifespan,
        )
        app.state.authenticator = Authenticator(
            AuthConfig(
                issuer=settings.auth_issuer,
                audience=settings.auth_audience,
                algorithms=tuple(settings.auth_algorithms),
                jwks_url=str(settings.auth_jwks_url) if settings.auth_jwks_url else None,
                jwks_file=settings.auth_jwks_file,
                roles_claim=settings.auth_roles_claim,
            )
        )
        install_problem_handlers(app)
        if settings.cors_origins:
            app.add_middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
            )
        app.include_router(_health_router())
        app.include_router(_metrics_router(metrics))
        Instrumentator(registry=metrics.registry, excluded_handlers=["/health/.*", "/metrics"]).instrument(
            app
        )
        for router in self.routers:
            # FastAPI documents validation errors with its own schema; ours are problems.
            app.include_router(
                router, responses={422: problem_doc("The request is not valid; see `errors`.")}
            )
        app.add_middleware(BodySizeLimit, settings=settings)
        # FastAPI's documented way to extend its OpenAPI document.
        app.openapi = _with_body_problems(app.openapi, settings.http_max_body_bytes)  # type: ignore[method-assign]
        FastAPIInstrumentor.instrument_app(app, excluded_urls="/health/.*")
        return app

    def run(self) -> None:
        """Entry point of the service's process: refuse bad settings, then serve until SIGTERM."""
        try:
            settings = load_settings(self.settings_class)
        except ConfigurationError as exc:
            print(f"{self.name}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        configure_logging(self.name, settings.log_level)
        uvicorn.run(
            self.create_app(settings),
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
            # uvicorn turns SIGTERM into the lifespan shutdown; give in-flight work its grace time.
            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        )

    async def migrate(self, conn: Connection) -> None:
        """Bring the database up to date: the runtime's tables, then the service's own."""
        await migrate(conn, "runtime", _RUNTIME_MIGRATIONS)
        await migrate(conn, self.name, self.migrations)

    @contextlib.asynccontextmanager
    async def _running(self, settings: SettingsT, metrics: Metrics) -> AsyncIterator[Runtime[SettingsT]]:
        dsn = str(settings.database_url)
        bootstrap = settings.kafka_bootstrap_servers
        prefix = settings.kafka_topic_prefix
        routes = self.subscriptions.routes(self.name)
        # Exits run in reverse, each even if an earlier one failed: stop taking messages and let
        # in-flight ones commit, then flush what they (and the API) queued in the outbox, then
        # close the Kafka producer and the database pool.
        async with contextlib.AsyncExitStack() as stack:
            pool = await asyncpg.create_pool(
                dsn, min_size=settings.db_pool_min_size, max_size=settings.db_pool_max_size
            )
            stack.push_async_callback(pool.close)
            async with pool.acquire() as conn:
                await self.migrate(conn)
            groups = {self.name, *(route.group for route in routes)}
            await kafka.ensure_topics(
                bootstrap,
                [prefix + topic for topic in (*Topic, *sorted(map(dead_letter_topic, groups)))],
                partitions=settings.kafka_topic_partitions,
                replication=settings.kafka_topic_replication,
            )
            producer = kafka.reliable_producer(bootstrap, client_id=self.name)
            await producer.start()
            stack.push_async_callback(producer.stop)

            relay = OutboxRelay(
                dsn,
                lambda records: kafka.publish(producer, records, prefix=prefix),
                RelaySettings(
                    batch_size=settings.outbox_batch_size,
                    poll_interval=settings.outbox_poll_interval_seconds,
                    retention_hours=settings.outbox_retention_hours,
                ),
                metrics,
            )
            relay.start()
            stack.push_async_callback(relay.stop)

            broker = KafkaBroker(
                settings.kafka_servers,
                client_id=self.name,
                graceful_timeout=settings.shutdown_grace_seconds,
                # No FastStream telemetry: it gives a batch one span in a trace of its own, and each
                # event must continue its journey's trace (the consumer makes a span per event).
                middlewares=[KafkaPrometheusMiddleware(registry=metrics.registry, app_name=self.name)],
                # FastStream's own handler prints coloured text: send its records to ours (JSON),
                # with the per-message lines at DEBUG.
                logger=logging.getLogger("faststream"),
                log_level=logging.DEBUG,
            )
            consumers = [
                EventConsumer(
                    route,
                    pool=pool,
                    publish_dead_letter=lambda record: kafka.publish_one(producer, record, prefix=prefix),
                    retry=RetryPolicy(
                        settings.consumer_max_attempts, settings.consumer_retry_backoff_seconds
                    ),
                    # The other half of the poll interval is for the step under way when it is spent.
                    budget_seconds=settings.consumer_max_poll_interval_seconds / 2,
                    metrics=metrics,
                )
                for route in routes
            ]
            for consumer in consumers:
                kafka.subscribe(
                    broker,
                    consumer,
                    membership=kafka.Membership.of(settings),
                    prefix=prefix,
                    batch_size=settings.consumer_batch_size,
                )
            await broker.start()
            stack.push_async_callback(broker.stop)
            await stack.enter_async_context(kafka.sampling_consumer_lag(broker, metrics))

            runtime = Runtime(settings, pool, broker, relay, consumers, metrics)
            for worker in self.background:
                await stack.enter_async_context(worker(runtime))
            log.info("service started", extra={"http_port": settings.http_port})
            yield runtime
        log.info("service stopped")


def _with_body_problems(openapi: Callable[[], dict[str, Any]], limit: int) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, plus the 400 and 413 that any operation taking a body may answer
    where it does not document its own."""
    # FastAPI's own answer to a body it cannot decode (not UTF-8), before the route runs.
    unreadable = problem_doc("The body cannot be read (it is not UTF-8 JSON).")
    too_large = problem_doc(f"The body is larger than {limit} bytes (`body-too-large`).")

    def document() -> dict[str, Any]:
        schema = openapi()
        for operations in schema["paths"].values():
            for operation in operations.values():
                if "requestBody" in operation:
                    operation["responses"].setdefault("400", unreadable)
                    operation["responses"].setdefault("413", too_large)
        return schema

    return document


def _metrics_router(metrics: Metrics) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def _runtime(request: Request) -> Runtime[Any]:
    runtime: Runtime[Any] = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime[Any], Depends(_runtime)]


def _pool(request: Request) -> asyncpg.Pool:
    return _runtime(request).pool


Db = Annotated[asyncpg.Pool, Depends(_pool)]


def _health_router() -> APIRouter:
    router = APIRouter(prefix="/health", tags=["health"])

    @router.get("/live", summary="The process is up")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/ready", summary="PostgreSQL and Kafka answer", responses={503: {"description": "Not ready"}}
    )
    async def ready(runtime: RuntimeDep) -> JSONResponse:
        checks = dict(
            zip(
                ("postgres", "kafka"),
                await asyncio.gather(_postgres_ready(runtime.pool), runtime.broker.ping(_READINESS_TIMEOUT)),
                strict=True,
            )
        )
        if all(checks.values()):
            return JSONResponse({"status": "ready", "checks": dict.fromkeys(checks, "ok")})
        failing = sorted(name for name, ok in checks.items() if not ok)
        return problem_response(
            503,
            f"not ready: {', '.join(failing)} unreachable",
            kind="not-ready",
            checks={name: "ok" if ok else "failing" for name, ok in checks.items()},
        )

    return router


async def _postgres_ready(pool: asyncpg.Pool) -> bool:
    try:
        async with asyncio.timeout(_READINESS_TIMEOUT):
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
    except Exception:
        return False
    return True
