"""Prometheus metrics of one service: HTTP, messages consumed/failed/dead-lettered per topic,
the outbox backlog and relay lag, and consumer lag.

Each app gets its own registry (served at `/metrics`), so several apps in one process (tests)
never collide, and a scrape sees exactly the service it asked. With HTTP_WORKERS above 1, a
scrape sees every worker's series instead (`every_worker`, see `workers`).
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.consumed = Counter(
            "microcred_messages_consumed_total",
            "Messages taken from Kafka, by topic and what became of them.",
            ["topic", "outcome"],
            registry=self.registry,
        )
        self.handler_failures = Counter(
            "microcred_handler_failures_total",
            "Handler attempts that raised (each retry counts).",
            ["topic", "event_type"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "microcred_messages_dead_lettered_total",
            "Messages sent to the dead-letter topic, by source topic and reason.",
            ["topic", "reason"],
            registry=self.registry,
        )
        self.outbox_published = Counter(
            "microcred_outbox_published_total", "Outbox events acknowledged by Kafka.", registry=self.registry
        )
        # Under HTTP_WORKERS, the value a live worker set last: the outbox's leader sets the
        # backlog, the member that holds a partition its lag.
        self.outbox_backlog = Gauge(
            "microcred_outbox_backlog",
            "Committed events not yet published.",
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.outbox_lag = Gauge(
            "microcred_outbox_lag_seconds",
            "Age of the oldest unpublished event (0 when none).",
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.consumer_lag = Gauge(
            "microcred_consumer_lag",
            "Messages in a partition after this service's position (sampled).",
            ["topic", "partition"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )


def every_worker() -> CollectorRegistry:
    """What a scrape answers under HTTP_WORKERS: the series of every worker, from the files they
    keep them in (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped library
    return registry


@contextlib.contextmanager
def serving(registry: CollectorRegistry, host: str, port: int) -> Iterator[None]:
    """Serve `registry` on a port of its own while the context lasts (METRICS_PORT).

    prometheus_client's own server, in a thread: a scrape is answered even while the event loop
    (or the supervisor of HTTP workers) is busy, and the series are thread-safe.
    """
    server, thread = start_http_server(port, host, registry)
    try:
        yield
    finally:
        server.shutdown()  # waits for the serving loop to notice, up to half a second
        server.server_close()
        thread.join()


@contextlib.asynccontextmanager
async def serving_beside_a_loop(registry: CollectorRegistry, host: str, port: int) -> AsyncIterator[None]:
    """`serving`, from an event loop: the wait of its end is in a thread, not on the loop."""
    served = contextlib.ExitStack()
    served.enter_context(serving(registry, host, port))
    try:
        yield
    finally:
        await asyncio.to_thread(served.close)
