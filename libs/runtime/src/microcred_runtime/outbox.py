"""Transactional outbox: events are written with the state change that caused them, then relayed.

`add(conn, event)` runs inside the caller's transaction, so an event exists exactly when the
change it describes was committed. The relay publishes committed rows to Kafka in id order
(so in order per aggregate key), with `acks=all` and the idempotent producer, and stamps them
as published only once Kafka has acknowledged them. A crash between the two means a row is
published again after restart: consumers are idempotent (see `inbox`), so nothing is doubled.

Several replicas may run the relay: a session-level advisory lock elects one publisher at a time,
which keeps the per-key order that `FOR UPDATE SKIP LOCKED` sharing would break. If the leader
dies, PostgreSQL drops its session and its lock, and another replica takes over.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from opentelemetry import propagate

from microcred_events import Event, KafkaRecord, encode

from .db import Connection
from .metrics import Metrics

log = logging.getLogger(__name__)

CHANNEL = "microcred_outbox"
# Below Kafka's default max.message.bytes (1 MiB), leaving room for headers and batch overhead.
MAX_EVENT_BYTES = 900_000
# The backlog gauges are scraped seconds apart: probing them at most this often, rather than after
# every drain (up to hundreds a second under load), spares PostgreSQL a query per drain.
OBSERVE_INTERVAL_SECONDS = 1.0


_INSERT = (
    """
WITH rows AS (
    INSERT INTO outbox (event_id, event_type, topic, message_key, payload, headers)
    SELECT event_id, event_type, topic, message_key, payload, headers
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::bytea[], $6::jsonb[])
        WITH ORDINALITY AS queued (event_id, event_type, topic, message_key, payload, headers, position)
    -- Ids in the callers' order: the relay publishes in id order, so per key in the order queued.
    ORDER BY position
    RETURNING 1
)
SELECT pg_notify('"""
    + CHANNEL
    + """', '') FROM (SELECT count(*) FROM rows) AS inserted
"""
)


def event_source(event: Event) -> str:
    """The CloudEvents source of an event we produce: the context that owns its type."""
    context = event.TYPE.split(".")[2]
    return f"urn:microcred:{context}"


@dataclass(frozen=True)
class Queued:
    """An event encoded for the outbox, with the trace context that was current when it was made."""

    event_id: uuid.UUID
    event_type: str
    topic: str
    key: bytes | None
    value: bytes
    headers: str  # JSON


def prepare(event: Event, *, source: str | None = None, topic: str | None = None) -> Queued:
    """Encode `event` for `add_all`, without I/O. The current trace context goes into it, so the
    consumer's span joins this trace: a batch handler prepares each event under its own
    delivery's span. `topic` overrides the event's own topic, for the few events addressed to one
    party (e.g. a partner's own rejection topic). Raises `ValueError` for an event too large to
    publish: refused in the writer's transaction, rather than stranded in the outbox forever."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    event_id = uuid.uuid4()
    record = encode(
        event,
        source=source or event_source(event),
        event_id=str(event_id),
        traceparent=carrier.get("traceparent"),
        tracestate=carrier.get("tracestate"),
    )
    if len(record.value) > MAX_EVENT_BYTES:
        raise ValueError(
            f"{event.TYPE} is {len(record.value)} bytes; events are limited to {MAX_EVENT_BYTES}"
        )
    headers = json.dumps({name: value.decode() for name, value in record.headers})
    return Queued(event_id, event.TYPE, topic or record.topic, record.key, record.value, headers)


async def add_all(conn: Connection, queued: Sequence[Queued]) -> None:
    """Queue prepared events for publication in the caller's transaction, in their order, with
    one statement (and one NOTIFY for the relay) however many they are."""
    if not queued:
        return
    await conn.execute(
        _INSERT,
        [item.event_id for item in queued],
        [item.event_type for item in queued],
        [item.topic for item in queued],
        [item.key for item in queued],
        [item.value for item in queued],
        [item.headers for item in queued],
    )


async def add(
    conn: Connection, event: Event, *, source: str | None = None, topic: str | None = None
) -> uuid.UUID:
    """Queue `event` for publication in the caller's transaction; returns its CloudEvents id.
    See `prepare` for the trace context and `topic`."""
    queued = prepare(event, source=source, topic=topic)
    await add_all(conn, [queued])
    return queued.event_id


PublishBatch = Callable[[Sequence[KafkaRecord]], Awaitable[Sequence[BaseException | None]]]
"""Publishes records in order and waits for Kafka's acknowledgement of each: None or the error."""


@dataclass(frozen=True)
class RelaySettings:
    batch_size: int = 500
    poll_interval: float = 1.0
    retention_hours: int = 168
    # The inbox's rows, older than this, are forgotten by the same leader (see `_purge`).
    inbox_retention_hours: int = 336
    # At most this many rows of each table forgotten a round (at 1,000 events/s, a minute brings 6).
    purge_slice: int = 10_000
    # Advisory-lock key for leader election; distinct per service database is not required
    # (locks are per database) but a fixed value keeps it recognisable in pg_locks.
    lock_key: int = 0x6D6372_6F7574  # "mcr" "out"


class OutboxRelay:
    """Publishes committed outbox rows until stopped; `stop()` flushes what is pending first."""

    def __init__(
        self, dsn: str, publish: PublishBatch, settings: RelaySettings, metrics: Metrics | None = None
    ) -> None:
        self._dsn = dsn
        self._metrics = metrics or Metrics()
        self._publish = publish
        self._settings = settings
        self._wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_purge = 0.0
        # The last purge of the table found a whole slice to forget: the next round goes on.
        self._outbox_behind = False
        self._inbox_behind = False
        self._last_observed = 0.0
        self.is_leader = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        """Stop after one last drain, so what was committed before SIGTERM is not left behind."""
        self._stopped.set()
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                conn = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("outbox relay cannot reach PostgreSQL: %s", exc)
                await self._back_off(self._settings.poll_interval)
                continue
            try:
                await self._lead(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("outbox relay lost PostgreSQL: %s", exc)
                await self._back_off(self._settings.poll_interval)
            except Exception:
                # The relay must outlive any surprise: a dead relay silently strands every event.
                log.exception("outbox relay failed; restarting it")
                await self._back_off(self._settings.poll_interval)
            finally:
                self.is_leader = False
                with contextlib.suppress(Exception):
                    await conn.close(timeout=5)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._settings.lock_key):
            if self._stopped.is_set():
                return
            # Another replica is the leader; check again later in case it died.
            await self._back_off(self._settings.poll_interval * 5)
        self.is_leader = True
        await conn.add_listener(CHANNEL, self._notified)
        while True:
            published = await self.drain_once(conn)
            if self._stopped.is_set():
                if published == 0:
                    return
                continue
            await self._purge(conn)
            await self._observe(conn)
            if published < self._settings.batch_size:
                await self._idle(self._settings.poll_interval)

    def _notified(self, *_: object) -> None:
        self._wakeup.set()

    async def _idle(self, seconds: float) -> None:
        """Wait for a commit's NOTIFY, a stop, or the poll interval, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)
        self._wakeup.clear()

    async def _back_off(self, seconds: float) -> None:
        """Wait after a failure; only a stop cuts it short (a NOTIFY must not turn it into a spin)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout=seconds)

    async def drain_once(self, conn: asyncpg.Connection) -> int:
        """Publish the oldest pending rows; returns how many were acknowledged by Kafka."""
        rows = await conn.fetch(
            "SELECT id, topic, message_key, payload, headers FROM outbox"
            " WHERE published_at IS NULL ORDER BY id LIMIT $1",
            self._settings.batch_size,
        )
        if not rows:
            return 0
        records = [
            KafkaRecord(
                topic=row["topic"],
                key=row["message_key"],
                value=row["payload"],
                headers=[(name, value.encode()) for name, value in json.loads(row["headers"]).items()],
            )
            for row in rows
        ]
        results = await self._publish(records)
        acknowledged = [row["id"] for row, error in zip(rows, results, strict=True) if error is None]
        failures = [error for error in results if error is not None]
        if acknowledged:
            await conn.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", acknowledged
            )
            self._metrics.outbox_published.inc(len(acknowledged))
        if failures:
            log.warning(
                "outbox relay: %d of %d events not acknowledged, will retry: %s",
                len(failures),
                len(rows),
                failures[0],
            )
            # Kafka is unhappy; back off instead of spinning on the same rows.
            await self._back_off(self._settings.poll_interval)
        return len(acknowledged)

    async def _observe(self, conn: asyncpg.Connection) -> None:
        now = time.monotonic()
        if now - self._last_observed < OBSERVE_INTERVAL_SECONDS:
            return
        self._last_observed = now
        row = await conn.fetchrow(
            "SELECT count(*) AS backlog, coalesce(extract(epoch FROM now() - min(created_at)), 0) AS lag"
            " FROM outbox WHERE published_at IS NULL"
        )
        assert row is not None  # an aggregate always returns one row
        self._metrics.outbox_backlog.set(row["backlog"])
        self._metrics.outbox_lag.set(float(row["lag"]))

    async def _purge(self, conn: asyncpg.Connection) -> None:
        """Forget published events and applied ones past their retention, a slice of each table a
        round, oldest first, between drains: a backlog (the first purge after an upgrade, a long
        outage) neither holds up publishing nor makes one huge transaction."""
        now = time.monotonic()
        due = now - self._last_purge >= 60
        if due:
            self._last_purge = now
        slice_ = self._settings.purge_slice
        if due or self._outbox_behind:
            # The outbox's oldest rows are the head of its id index: a slice of it is read, never the
            # whole table (published_at has no index, which would cost every publication a write).
            # Rows are mostly published in id order, so what is past retention is mostly at the head;
            # one that is not (never published, or late) stays there and is read again each round.
            row = await conn.fetchrow(
                "WITH head AS (SELECT id, published_at FROM outbox ORDER BY id LIMIT $2),"
                " gone AS (DELETE FROM outbox WHERE id IN (SELECT id FROM head"
                " WHERE published_at < now() - make_interval(hours => $1)) RETURNING 1)"
                " SELECT (SELECT count(*) FROM head) AS read, (SELECT count(*) FROM gone) AS purged",
                self._settings.retention_hours,
                slice_,
            )
            assert row is not None  # aggregates always give a row
            # More may be past retention behind a full head that still had some: the next round goes on.
            self._outbox_behind = row["read"] >= slice_ and row["purged"] > 0
        if due or self._inbox_behind:
            purged = await conn.fetchval(
                "WITH gone AS (DELETE FROM inbox WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM inbox WHERE processed_at < now() - make_interval(hours => $1)"
                " ORDER BY processed_at LIMIT $2)) RETURNING 1) SELECT count(*) FROM gone",
                self._settings.inbox_retention_hours,
                slice_,
            )
            self._inbox_behind = purged >= slice_
