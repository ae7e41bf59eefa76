"""One call wires a service: settings, FastAPI + FastStream with one lifecycle, database, outbox,
inbox consumers, health, telemetry, a request body limit and problem+json errors.

Every service describes itself with a `Service` and calls `run()`; tests call `create_app()`.

A service's process answers its probes from its first instant: it starts PostgreSQL's pool, the
migrations, the topics, the producer and the consumers beside the HTTP server (`Startup`), each
external step bounded in time and tried again, with a log line naming what it waits for, while
the infrastructure is unavailable. Meanwhile /health/live answers 200 (nothing is stuck: a
restart would not help) and /health/ready 503, naming the step and its last error.
"""

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import asyncpg
import uvicorn
from aiokafka import AIOKafkaProducer
from aiokafka.errors import BrokerNotAvailableError, KafkaError, KafkaTimeoutError, ReplicaNotAvailableError
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from microcred_events import Topic, dead_letter_topic
from microcred_events.topics import CONFIGS as TOPIC_CONFIGS

from . import kafka, workers
from .auth import AuthConfig, Authenticator
from .body_limit import BodySizeLimit
from .consumers import DEAD_LETTER_TOPIC_MAX_BYTES, EventConsumer, RetryPolicy, Subscriptions
from .db import Connection
from .metrics import Metrics, every_worker, serving_beside_a_loop
from .migrations import migrate
from .outbox import OutboxRelay, RelaySettings
from .problems import Problem, install_problem_handlers, problem_doc, problem_response
from .rate_limit import RateLimiter, with_rate_limit_problems
from .settings import ConfigurationError, ServiceSettings, load_settings
from .telemetry import configure_logging, configure_tracing

log = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)
T = TypeVar("T")

_EXPOSED_HEADERS = ("ETag", "Location", "Retry-After")
_RUNTIME_MIGRATIONS = Path(str(files("microcred_runtime") / "migrations"))
_READINESS_TIMEOUT = 2.0
# Start-up. One try of a step that only connects, creates topics or starts a client.
_STEP_TIMEOUT = 30.0
# One try of the consumers' start: bootstrap, the topics' metadata, then the first join of each
# group, which waits at most for the other members to rejoin (their session timeout, 6 s) once a
# coordinator answers. Past this the coordinator is not answering: the consumers start again.
_JOIN_TIMEOUT = 60.0
_RETRY_FIRST_SECONDS = 0.5
_RETRY_MAX_SECONDS = 10.0
# A step that has not finished says so this often (a migration may take long, or wait for another
# replica's).
_STILL_WAITING_SECONDS = 10.0


@dataclass
class Runtime(Generic[SettingsT]):
    """What a running service holds; routes reach it through the `RuntimeDep` dependency."""

    settings: SettingsT
    pool: asyncpg.Pool
    broker: KafkaBroker
    relay: OutboxRelay
    consumers: list[EventConsumer]  # one per consumer group (see `Subscriptions.routes`)
    metrics: Metrics  # background work registers its own series in `metrics.registry` (served at /metrics)


class Startup:
    """How far a service's start has come: the step it is waiting for and why it has not got it
    yet (/health/ready answers with both until the service runs)."""

    def __init__(self) -> None:
        self.waiting_for = "its start to begin"
        self.last_error: str | None = None

    async def step(self, what: str, attempt: Callable[[], Awaitable[T]], *, per_try: float | None) -> T:
        """`attempt()`, each try bounded by `per_try` seconds (None: a step that takes what it
        takes, e.g. a migration) and tried again while PostgreSQL or Kafka is unavailable
        (`_transient_at_start`); any other error is the start's failure. A try undoes what it
        started before it fails."""
        self.waiting_for, self.last_error = what, None
        pause = _RETRY_FIRST_SECONDS
        tries = 0
        while True:
            tries += 1
            try:
                async with _saying_still_waiting(what), asyncio.timeout(per_try) as deadline:
                    return await attempt()
            except Exception as exc:
                if not _transient_at_start(exc):
                    raise
                if deadline.expired():
                    self.last_error = f"no answer within {per_try:g} s"
                else:
                    self.last_error = _describe(exc)
            log.warning(
                "start-up waits for %s: %s; trying again in %.1f s",
                what,
                self.last_error,
                pause,
                extra={"waiting_for": what, "error": self.last_error, "tries": tries},
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX_SECONDS)


# What says, at start, that PostgreSQL or Kafka is not there yet. Narrower than the consumers'
# is_outage (any OSError): an error that a retry cannot mend (a certificate that does not verify,
# a permission denied, a password refused) must end the start with its reason, not keep the
# process live and unready for ever.
_TRANSIENT_AT_START: tuple[type[BaseException], ...] = (
    ConnectionError,
    socket.gaierror,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    KafkaTimeoutError,
    BrokerNotAvailableError,
    ReplicaNotAvailableError,
)
# Network errors that OSError itself carries, e.g. asyncio's "Multiple exceptions: [Errno 111] ..."
# when every address of a host refused.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ETIMEDOUT,
    }
)


def _transient_at_start(error: BaseException) -> bool:
    if isinstance(error, ssl.SSLError):  # an OSError, and a configuration's fault
        return False
    if isinstance(error, kafka.TopicsNotCreated):
        return error.transient
    if isinstance(error, KafkaError):
        return error.retriable or isinstance(error, _TRANSIENT_AT_START)
    if type(error) is OSError:
        return error.errno in _TRANSIENT_ERRNOS or str(error).startswith("Multiple exceptions: ")
    return isinstance(error, _TRANSIENT_AT_START)


def _describe(error: BaseException) -> str:
    name, text = type(error).__name__, str(error)
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"  # aiokafka's name themselves


@contextlib.asynccontextmanager
async def _saying_still_waiting(what: str) -> AsyncIterator[None]:
    async def remind() -> None:
        for waited in itertools.count(1):
            await asyncio.sleep(_STILL_WAITING_SECONDS)
            seconds = waited * _STILL_WAITING_SECONDS
            log.warning(
                "start-up still waits for %s after %g s",
                what,
                seconds,
                extra={"waiting_for": what, "waited_seconds": seconds},
            )

    reminder = asyncio.create_task(remind(), name="start-up reminder")
    try:
        yield
    finally:
        reminder.cancel()


@dataclass(frozen=True)
class Service(Generic[SettingsT]):
    """A microcred service: its name, settings, SQL migrations, HTTP routes and subscriptions."""

    name: str
    settings_class: type[SettingsT]
    migrations: Path
    routers: Sequence[APIRouter] = ()
    subscriptions: Subscriptions = field(default_factory=Subscriptions)
    # ASGI middleware of the service's own, innermost: each sees a request after the runtime's
    # (CORS, metrics, the body limit) and before routing.
    middleware: Sequence[Middleware] = ()
    # Work a service runs beside its API and consumers (e.g. delivery workers): each is entered
    # once everything else runs and exited first on shutdown.
    background: Sequence[Callable[[Runtime[Any]], contextlib.AbstractAsyncContextManager[object]]] = ()
    version: str = "0.1.0"
    description: str = ""

    def create_app(self, settings: SettingsT | None = None) -> FastAPI:
        """The ASGI app; its lifespan starts everything the service needs (it has once the
        lifespan has entered) and stops it.

        Unless the app's `state.give_up` is set (`run()` sets it): the lifespan then starts the
        service beside the HTTP server, so that the probes answer while the start waits for
        PostgreSQL or Kafka, and calls `give_up` when the start fails for any other reason.
        """
        settings = settings or load_settings(self.settings_class)
        configure_tracing(self.name, self.version)
        metrics = Metrics()
        startup = Startup()

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            give_up: Callable[[], None] | None = getattr(app.state, "give_up", None)
            async with contextlib.AsyncExitStack() as stack:
                if settings.metrics_port is not None and settings.http_workers == 1:
                    # From the first instant, like the probes: a start that waits is seen too.
                    # (HTTP workers' supervisor serves it for them all.)
                    await stack.enter_async_context(
                        serving_beside_a_loop(metrics.registry, settings.http_host, settings.metrics_port)
                    )
                if give_up is None:
                    app.state.runtime = await stack.enter_async_context(
                        self._running(settings, metrics, startup)
                    )
                else:
                    await stack.enter_async_context(
                        self._started_beside(app, settings, metrics, startup, give_up)
                    )
                yield

        app = FastAPI(
            title=f"microcred {self.name}",
            version=self.version,
            description=self.description,
            lifespan=lifespan,
            middleware=list(self.middleware),
        )
        app.state.startup = startup
        app.state.authenticator = Authenticator(
            AuthConfig(
                issuer=settings.auth_issuer,
                audience=settings.auth_audience,
                algorithms=tuple(settings.auth_algorithms),
                jwks_url=str(settings.auth_jwks_url) if settings.auth_jwks_url else None,
                jwks_file=settings.auth_jwks_file,
                roles_claim=settings.auth_roles_claim,
                issuers_claim=settings.auth_issuers_claim,
                token_types=tuple(settings.auth_token_types),
                uuid_subjects_are_learner_ids=settings.auth_uuid_subjects_are_learner_ids,
            )
        )
        app.state.rate_limiter = RateLimiter(self.name, settings)
        install_problem_handlers(app)
        if settings.cors_origins:
            app.add_middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
                # What a browser app must read to use the API: versions and page digests for
                # If-Match / If-None-Match, where a created item is, when to try again.
                expose_headers=list(_EXPOSED_HEADERS),
            )
        app.include_router(_health_router())
        if settings.metrics_port is None:
            app.include_router(
                _metrics_router(every_worker() if settings.http_workers > 1 else metrics.registry)
            )
        Instrumentator(registry=metrics.registry, excluded_handlers=["/health/.*", "/metrics"]).instrument(
            app
        )
        for router in self.routers:
            # FastAPI documents validation errors with its own schema; ours are problems.
            app.include_router(
                router, responses={422: problem_doc("The request is not valid; see `errors`.")}
            )
        app.add_middleware(BodySizeLimit, settings=settings)
        if settings.http_trusted_proxies:
            # The client's address for everything that follows (rate limits, logs, traces).
            app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.http_trusted_proxies)
        # FastAPI's documented way to extend its OpenAPI document.
        app.openapi = _with_body_problems(app.openapi, settings.http_max_body_bytes)  # type: ignore[method-assign]
        app.openapi = with_rate_limit_problems(app, app.openapi)  # type: ignore[method-assign]
        # A span per request, not also one per ASGI message received and sent: those took a fifth of
        # the CPU of a catalog answer kept ready (measured in-process, issue 14) and say nothing
        # the request's span does not.
        FastAPIInstrumentor.instrument_app(app, excluded_urls="/health/.*", exclude_spans=["receive", "send"])
        return app

    def run(self) -> None:
        """Entry point of the service's process: refuse bad settings, then serve until SIGTERM,
        in HTTP_WORKERS processes (see `workers`)."""
        try:
            settings = load_settings(self.settings_class)
        except ConfigurationError as exc:
            print(f"{self.name}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        configure_logging(self.name, settings.log_level)
        if settings.http_workers == 1:
            self._serve(settings)
        else:
            workers.supervise(settings, functools.partial(self._serve, settings))

    def _serve(self, settings: SettingsT, sockets: list[socket.socket] | None = None) -> None:
        """Serve until SIGTERM: on HTTP_HOST:HTTP_PORT, or on the `sockets` of HTTP workers."""
        app = self.create_app(settings)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.http_host,
                port=settings.http_port,
                log_config=None,
                # X-Forwarded-For is believed from HTTP_TRUSTED_PROXIES only (create_app), not
                # from uvicorn's default of any local peer.
                proxy_headers=False,
                # uvicorn turns SIGTERM into the lifespan shutdown; give in-flight work its grace time.
                timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
            )
        )
        failed = False

        def give_up() -> None:
            nonlocal failed
            failed = True
            server.should_exit = True

        app.state.give_up = give_up
        server.run(sockets)
        if failed:
            raise SystemExit(1)

    async def migrate(self, conn: Connection) -> None:
        """Bring the database up to date: the runtime's tables, then the service's own."""
        await migrate(conn, "runtime", _RUNTIME_MIGRATIONS)
        await migrate(conn, self.name, self.migrations)

    @contextlib.asynccontextmanager
    async def _started_beside(
        self,
        app: FastAPI,
        settings: SettingsT,
        metrics: Metrics,
        startup: Startup,
        give_up: Callable[[], None],
    ) -> AsyncIterator[None]:
        """Run the service in a task of its own while the lifespan lets the HTTP server answer
        the probes; stop it (or its start) when the server stops."""
        stopping = asyncio.Event()

        async def run() -> None:
            try:
                async with self._running(settings, metrics, startup) as runtime:
                    app.state.runtime = runtime
                    await stopping.wait()
            except Exception:
                if hasattr(app.state, "runtime"):
                    raise  # stopping failed: the server's lifespan shutdown reports it
                log.exception("start-up failed at %s", startup.waiting_for)
                give_up()

        task = asyncio.create_task(run(), name="start-up")
        try:
            yield
        finally:
            stopping.set()
            if not hasattr(app.state, "runtime"):
                # Still starting: the start is cut short where it is, and `_running`'s exit stack
                # stops what it started already (by the background work's step, the relay and
                # the consumers too) as the cancellation unwinds it.
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.asynccontextmanager
    async def _running(
        self, settings: SettingsT, metrics: Metrics, startup: Startup
    ) -> AsyncIterator[Runtime[SettingsT]]:
        dsn = str(settings.database_url)
        bootstrap = settings.kafka_bootstrap_servers
        prefix = settings.kafka_topic_prefix
        routes = self.subscriptions.routes(self.name)
        # Where, without the credentials: the log lines and /health/ready name it.
        database = ",".join(
            f"{host['host']}:{host['port']}" if host["port"] else str(host["host"])
            for host in settings.database_url.hosts()
        ) + (settings.database_url.path or "")

        async def connect() -> asyncpg.Pool:
            return await asyncpg.create_pool(
                dsn,
                min_size=settings.db_pool_min_size,
                max_size=settings.db_pool_max_size,
                timeout=_STEP_TIMEOUT,
            )

        async def migrate() -> None:
            async with pool.acquire(timeout=_STEP_TIMEOUT) as conn:
                await self.migrate(conn)

        async def start_producer(
            make: Callable[[str, str], AIOKafkaProducer] = kafka.reliable_producer,
        ) -> AIOKafkaProducer:
            producer = make(bootstrap, self.name)
            try:
                await producer.start()
            except BaseException:
                await _undo("the producer", producer.stop)
                raise
            return producer

        # Exits run in reverse, each even if an earlier one failed: stop taking messages and let
        # in-flight ones commit, then flush what they (and the API) queued in the outbox, then
        # close the Kafka producer and the database pool.
        async with contextlib.AsyncExitStack() as stack:
            pool = await startup.step(f"PostgreSQL at {database}", connect, per_try=_STEP_TIMEOUT)
            stack.push_async_callback(pool.close)
            # Unbounded: a migration takes what it takes, and waits for another replica's.
            await startup.step(f"the migrations of {database}", migrate, per_try=None)
            groups = {self.name, *(route.group for route in routes)}
            dead_letter_topics = [prefix + dead_letter_topic(group) for group in sorted(groups)]
            topics = [*(prefix + topic for topic in Topic), *dead_letter_topics]
            await startup.step(
                f"Kafka at {bootstrap} to create the topics",
                lambda: kafka.ensure_topics(
                    bootstrap,
                    topics,
                    partitions=settings.kafka_topic_partitions,
                    replication=settings.kafka_topic_replication,
                    within=_STEP_TIMEOUT,
                    # Whatever the broker's own limit, a dead letter of the size the consumers
                    # allow one is taken.
                    configs={
                        **{prefix + topic: config for topic, config in TOPIC_CONFIGS.items()},
                        **{
                            topic: {"max.message.bytes": str(DEAD_LETTER_TOPIC_MAX_BYTES)}
                            for topic in dead_letter_topics
                        },
                    },
                ),
                per_try=None,  # ensure_topics bounds itself
            )
            producer = await startup.step(
                f"Kafka at {bootstrap} to start the producer", start_producer, per_try=_STEP_TIMEOUT
            )
            stack.push_async_callback(producer.stop)
            dead_letters = await startup.step(
                f"Kafka at {bootstrap} to start the dead-letter producer",
                functools.partial(start_producer, kafka.dead_letter_producer),
                per_try=_STEP_TIMEOUT,
            )
            stack.push_async_callback(dead_letters.stop)

            relay = OutboxRelay(
                dsn,
                lambda records: kafka.publish(producer, records, prefix=prefix),
                RelaySettings(
                    batch_size=settings.outbox_batch_size,
                    poll_interval=settings.outbox_poll_interval_seconds,
                    retention_hours=settings.outbox_retention_hours,
                    inbox_retention_hours=settings.inbox_retention_hours,
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
                    publish_dead_letter=lambda record: kafka.publish_one(dead_letters, record, prefix=prefix),
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
                    fetch_max_wait_ms=round(settings.consumer_fetch_max_wait_seconds * 1000),
                    fetch_min_bytes=settings.consumer_fetch_min_bytes,
                )

            async def start_consumers() -> None:
                try:
                    await broker.start()
                except BaseException:
                    await _undo("the consumers", broker.stop)
                    raise

            if consumers:
                joining = ", ".join(prefix + consumer.group for consumer in consumers)
                what = f"Kafka at {bootstrap} to let the consumers join their groups ({joining})"
            else:
                what = f"Kafka at {bootstrap} to connect"
            await startup.step(what, start_consumers, per_try=_JOIN_TIMEOUT)
            stack.push_async_callback(broker.stop)
            await stack.enter_async_context(kafka.sampling_consumer_lag(broker, metrics))

            runtime = Runtime(settings, pool, broker, relay, consumers, metrics)
            for worker in self.background:
                name = getattr(worker, "__name__", type(worker).__name__)
                await startup.step(
                    f"the background work {worker.__module__}.{name}",
                    functools.partial(_enter, stack, worker, runtime),
                    # Unbounded: a work bounds its own I/O, and a try cut short would start over what
                    # it had half done. Issuance's proof workers, warming for a minute on a loaded
                    # machine, were shut down and started again every 30 s and never got ready.
                    per_try=None,
                )
            log.info("service started", extra={"http_port": settings.http_port})
            yield runtime
        log.info("service stopped")


async def _enter(
    stack: contextlib.AsyncExitStack,
    worker: Callable[[Runtime[Any]], contextlib.AbstractAsyncContextManager[object]],
    runtime: Runtime[Any],
) -> object:
    return await stack.enter_async_context(worker(runtime))


async def _undo(what: str, stop: Callable[[], Awaitable[None]]) -> None:
    """Stop what a failed try of a start-up step started, before it is tried again.

    A consumer stops once its group's coordinator has answered the join under way, or the
    request timed out (aiokafka's 40 s); past the step's own bound it is left to itself. The stop
    runs to its end even when the try is cut short meanwhile (its deadline, or the service
    stopping): a client stopped halfway would keep its connections and tasks.
    """

    async def bounded() -> None:
        try:
            async with asyncio.timeout(_JOIN_TIMEOUT):
                await stop()
        except Exception:
            log.warning("could not stop %s after a failed start", what, exc_info=True)

    await kafka.uncancellable(bounded())


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


def _metrics_router(registry: CollectorRegistry) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def scrape() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


# Coroutines, not plain functions: FastAPI runs a plain dependency in a worker thread, and the
# hand-off took 15% of the catalog's samples as it served its list (py-spy, issue 14).
async def _runtime(request: Request) -> Runtime[Any]:
    runtime: Runtime[Any] | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        startup: Startup = request.app.state.startup
        raise Problem(
            503,
            "starting",
            f"The service is starting: it waits for {startup.waiting_for}.",
            headers={"Retry-After": "5"},
        )
    return runtime


RuntimeDep = Annotated[Runtime[Any], Depends(_runtime)]


async def _pool(runtime: RuntimeDep) -> asyncpg.Pool:
    return runtime.pool


Db = Annotated[asyncpg.Pool, Depends(_pool)]


def _health_router() -> APIRouter:
    router = APIRouter(prefix="/health", tags=["health"])

    @router.get("/live", summary="The process is up")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/ready", summary="PostgreSQL and Kafka answer", responses={503: {"description": "Not ready"}}
    )
    async def ready(request: Request) -> JSONResponse:
        runtime: Runtime[Any] | None = getattr(request.app.state, "runtime", None)
        if runtime is None:
            startup: Startup = request.app.state.startup
            return problem_response(
                503,
                f"not ready: starting, waiting for {startup.waiting_for}",
                kind="not-ready",
                checks={"startup": "waiting"},
                waiting_for=startup.waiting_for,
                last_error=startup.last_error,
            )
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
