"""Where the pipeline stands: counters sampled from the services' databases, the sinks' journals
and the workload, every `interval`, kept as a history so that a fault's stall can be read back.

A counter that does not move tells nothing on its own: the stage may have nothing left to do. A
stage is therefore judged together with what was released to it (`Stage.finished`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from .sinks import MailJournal, WebhookJournal

# What a database that is down or restarting raises (InternalClientError: a connection dying as
# PostgreSQL is killed under it).
DB_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class Stalled(RuntimeError):
    """Nothing moved for longer than allowed while the run waited for something."""


class Database:
    """One connection to a service's database that survives PostgreSQL restarts."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        """The row, or None while the database cannot be reached."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self.dsn, timeout=5)
            return await self._conn.fetchrow(query, *args, timeout=30)
        except DB_ERRORS:
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
            return None

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """For the final accounting: PostgreSQL is up by then, and an error must not pass silently.

        On a connection of its own: the monitor's may be mid-query (a second operation on it
        fails, and the monitor's recovery from that closes it under this one).
        """
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return await conn.fetch(query, *args, timeout=600)
        finally:
            await conn.close(timeout=5)

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(*DB_ERRORS):
                await self._conn.close(timeout=5)


@dataclass(frozen=True)
class Progress:
    """The workload's side: what it has sent and done (its own counters, not evidence)."""

    sent: int = 0  # completion reports Kafka acknowledged
    pathway_sent: int = 0  # pathway learners all of whose reports Kafka acknowledged
    pathway_started: int = 0  # pathway learners who began enrolling
    catalog_reads: int = 0  # catalog answers the learners got


@dataclass(frozen=True)
class Counts:
    """Where the flow stands; every counter only grows, except the backlogs."""

    progress: Progress = Progress()
    completed: int = 0  # enrollments completed (enrollment)
    billed: int = 0  # payments opened plus payments settled (billing)
    settled: int = 0  # payments settled (billing)
    credentials: int = 0  # credential rows, course and pathway (issuance)
    pathway_credentials: int = 0
    relayed: int = 0  # issuance outbox rows Kafka acknowledged
    in_app: int = 0  # in-app CredentialIssued notifications (notifications)
    notified: int = 0  # in-app notifications of any kind (notifications)
    emails: int = 0  # credentials with an email in the sink's journal
    mails: int = 0  # emails of any kind the sink accepted
    webhooks: int = 0  # credentials with a correctly signed webhook in the receiver's journal
    backlog: int = 0  # unpublished outbox rows, all services
    open_deliveries: int = 0  # emails and webhooks neither delivered nor dead

    @property
    def sent(self) -> int:
        return self.progress.sent

    @property
    def catalog_reads(self) -> int:
        return self.progress.catalog_reads

    @property
    def credentials_due(self) -> int:
        """Credentials owed for what Kafka acknowledged: one per report, one per finished pathway."""
        return self.progress.sent + self.progress.pathway_sent

    def line(self) -> str:
        return (
            f"sent {self.sent} completed {self.completed} billed {self.billed} (settled {self.settled}) "
            f"credentials {self.credentials} (pathway {self.pathway_credentials}) relayed {self.relayed} "
            f"in-app {self.in_app}/{self.notified} emails {self.emails}/{self.mails} "
            f"webhooks {self.webhooks} catalog-reads {self.catalog_reads} "
            f"outbox-backlog {self.backlog} open-deliveries {self.open_deliveries}"
        )


@dataclass(frozen=True)
class Stage:
    """The counter that shows one part of the pipeline moving, and when it has nothing left to do."""

    counter: str
    finished: Callable[[Counts], bool]

    def value(self, counts: Counts) -> int:
        value: int = getattr(counts, self.counter)
        return value


_QUERIES = {
    "enrollment": (
        "SELECT (SELECT count(*) FROM enrollments WHERE status = 'completed') AS completed,"
        " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS backlog"
    ),
    "billing": (
        "SELECT (SELECT count(*) FROM payments) AS opened,"
        " (SELECT count(*) FROM payments WHERE status = 'settled') AS settled,"
        " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS backlog"
    ),
    "issuance": (
        "SELECT (SELECT count(*) FROM credentials) AS credentials,"
        " (SELECT count(*) FROM credentials WHERE kind = 'pathway') AS pathway,"
        " (SELECT count(*) FROM outbox WHERE published_at IS NOT NULL) AS relayed,"
        " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS backlog"
    ),
    "notifications": (
        "SELECT (SELECT count(*) FROM notifications WHERE kind = 'credential.issued') AS in_app,"
        " (SELECT count(*) FROM notifications) AS notified,"
        " (SELECT count(*) FROM deliveries"
        "   WHERE state IN ('pending', 'sending', 'awaiting_address')) AS open,"
        " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS backlog"
    ),
    "catalog": "SELECT (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS backlog",
}


class Monitor:
    """Samples the counters every `interval` and keeps them; waits on conditions, failing when
    nothing moves for too long."""

    def __init__(
        self,
        databases: Mapping[str, Database],
        mail: MailJournal,
        webhooks: WebhookJournal,
        progress: Callable[[], Progress],
        interval: float,
        say: Callable[[str], None],
    ) -> None:
        self._databases = databases
        self._mail = mail
        self._webhooks = webhooks
        self._progress = progress
        self._interval = interval
        self._say = say
        self.counts = Counts()
        # (monotonic time, counts) of every sample: the record a fault's stall is read from.
        self.history: list[tuple[float, Counts]] = []
        # False while a database does not answer: its figures are then the last ones it gave.
        self.complete = False
        self.moved_at = time.monotonic()
        self.fatal: Exception | None = None
        self._tick = asyncio.Event()
        self._last_print = 0.0
        # The loop and a fault sample side by side; one asyncpg connection takes one query at a time.
        self._sampling = asyncio.Lock()

    async def run(self, supervise: Callable[[], None]) -> None:
        """Sample until cancelled; `supervise` runs before each sample. Whatever either raises ends
        the monitor, and whoever waits in `until` gets it (a dead monitor must not leave them
        waiting for a sample that never comes)."""
        try:
            while True:
                supervise()
                await self.sample()
                now = time.monotonic()
                if now - self._last_print >= 15:
                    self._last_print = now
                    self._say(f"  {self.counts.line()}")
                await asyncio.sleep(self._interval)
        except Exception as exc:
            self.fatal = exc
            self._tick.set()
            raise

    async def sample(self) -> Counts:
        async with self._sampling:
            return await self._sample()

    async def fresh(self) -> Counts:
        """A sample every database answered (after a PostgreSQL restart, the first may not)."""
        while True:
            counts = await self.sample()
            if self.complete:
                return counts
            await asyncio.sleep(0.1)

    async def _sample(self) -> Counts:
        previous = self.counts
        names = list(_QUERIES)
        rows = dict(
            zip(
                names,
                await asyncio.gather(*(self._databases[name].fetchrow(_QUERIES[name]) for name in names)),
                strict=True,
            )
        )
        self._mail.refresh()
        self._webhooks.refresh()
        self.complete = all(row is not None for row in rows.values())
        enrollment, billing, issuance, notifications = (
            rows["enrollment"],
            rows["billing"],
            rows["issuance"],
            rows["notifications"],
        )
        # A database that does not answer (PostgreSQL restarting) keeps its last figures.
        self.counts = dataclasses.replace(
            previous,
            progress=self._progress(),
            emails=len(self._mail.by_credential),
            mails=self._mail.received,
            webhooks=len(self._webhooks.by_credential),
            **({"completed": enrollment["completed"]} if enrollment else {}),
            **(
                {"billed": billing["opened"] + billing["settled"], "settled": billing["settled"]}
                if billing
                else {}
            ),
            **(
                {
                    "credentials": issuance["credentials"],
                    "pathway_credentials": issuance["pathway"],
                    "relayed": issuance["relayed"],
                }
                if issuance
                else {}
            ),
            **(
                {
                    "in_app": notifications["in_app"],
                    "notified": notifications["notified"],
                    "open_deliveries": notifications["open"],
                }
                if notifications
                else {}
            ),
            **(
                {"backlog": sum(row["backlog"] for row in rows.values() if row is not None)}
                if self.complete
                else {}
            ),
        )
        now = time.monotonic()
        if self.counts != previous:
            self.moved_at = now
        self.history.append((now, self.counts))
        self._tick.set()
        self._tick = asyncio.Event()
        return self.counts

    async def until(self, what: str, done: Callable[[Counts], bool], stall_timeout: float) -> Counts:
        """Wait until `done(counts)`; raise Stalled when no counter moved for `stall_timeout`."""
        while not done(self.counts):
            if self.fatal is not None:
                raise self.fatal
            if time.monotonic() - self.moved_at > stall_timeout:
                raise Stalled(
                    f"nothing moved for {stall_timeout:.0f}s waiting for {what}: {self.counts.line()}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), timeout=max(1.0, 4 * self._interval))
        return self.counts

    def longest_stall(self, stage: Stage, start: float, end: float) -> float:
        """The longest time in [start, end] that `stage`'s counter stood still while the stage had
        work left (time it spent caught up with everything released to it is not a stall)."""
        return longest_stall(self.history, stage, start, end)


def longest_stall(history: list[tuple[float, Counts]], stage: Stage, start: float, end: float) -> float:
    longest = 0.0
    still_since = start
    value: int | None = None
    for at, counts in history:
        if at < start:
            value = stage.value(counts)
            continue
        if at > end:
            break
        current = stage.value(counts)
        grew = value is not None and current > value
        if grew:
            longest = max(longest, at - still_since)
        if grew or stage.finished(counts):
            still_since = at
        value = current
    return max(longest, end - still_since)
