"""The sweeper: finds and finishes what a race between replicas left behind.

The locks in `service` close the known races by construction; this is the net under them (and
under replicas still running code without them, during a rolling upgrade). Every interval it
looks for a parked completion whose course version is held, and for a learner holding a current
credential for every course of a pathway but no pathway credential; it finishes each in a
transaction of its own, under the same locks as the consumers, re-checking under them, so several
replicas may sweep at once and still mint one credential (the unique constraints back that).

A find means a race slipped through: each is logged at WARNING and counted in
`issuance_sweeper_found_total{kind="parked"|"pathway"}`. A find that cannot be finished (a bug, a
signing error, a deadlock with a consumer's batch, a lock holder stuck past `LOCK_TIMEOUT`) is
logged with what it is, counted in `issuance_sweeper_failed_total{kind}`, and left to later
passes; the pass goes on with the next.
PostgreSQL being unavailable ends the pass instead, with one warning: every find would fail alike.

Each pass looks at the parked completions (few: recording a version takes them). For pathways, a
full pass looks at every learner: a process's first, then one every
`ISSUANCE_SWEEP_FULL_INTERVAL_SECONDS`, one replica at a time (a try lock, held by a connection of
the pass until it ends; a replica that finds it taken makes an ordinary pass, and tries again at its
next until it has made a complete full pass itself). An ordinary pass looks only at learners with
a course credential issued since the start of this sweeper's last complete pass (it ran to its end)
less `ISSUANCE_SWEEP_LOOKBACK_SECONDS`: a race leaves a pathway
behind only while its last course credential is being minted, and `issued_at` is taken up to a
consumer batch's length before the commit. A pass cut short by an outage moves nothing, however
long the outage. A find that failed on its own does not hold the window back either (a lasting
failure would widen every pass to everything): the passes of the lookback after it and the next
full pass find it again.

A pass takes its finds in pages, in key order, each page after the last find of the one before,
to the end: finds that keep failing, however many, do not keep a pass from the others.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from microcred_runtime import Connection, Runtime
from microcred_runtime.consumers import is_outage

from . import repository, service
from .service import Platform
from .settings import Settings

log = logging.getLogger(__name__)

# Finds of one kind read at a time; a pass reads page after page until one is not full.
_PAGE_SIZE = 500

_Finish = Callable[[Connection, Platform, UUID, UUID], Awaitable[bool]]
# A page of finds of one kind, each two ids, in key order: those after `after` (None: from the start).
_Find = Callable[[Connection, tuple[UUID, UUID] | None], Awaitable[list[tuple[UUID, UUID]]]]

# What a find of each kind means, as logged when it is finished (the fault run counts these lines).
FOUND = {
    "parked": "a parked completion was left behind by a race: minted it now",
    "pathway": "a pathway credential was left behind by a race: minted it now",
}
# What the two ids of a find of each kind are, as logged.
_IDS = {"parked": ("enrollment_id", "course_id"), "pathway": ("learner_id", "pathway_id")}


@dataclass
class Pass:
    """What one pass found and finished, of each kind; whether it looked at every learner
    (`full`), and whether it is `complete`: it ran to its end (PostgreSQL stayed available)."""

    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FOUND, 0))
    full: bool = False
    complete: bool = False


class _Unavailable(Exception):
    """PostgreSQL cannot be reached: the pass ends."""


class Sweeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        platform: Platform,
        *,
        lookback_seconds: float,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`registry`: the service's, served at /metrics (a test's sweeper gets one of its own)."""
        registry = registry if registry is not None else CollectorRegistry()
        self.found = Counter(
            "issuance_sweeper_found_total",
            "Work a race between replicas left behind, found and finished by the sweeper.",
            ["kind"],
            registry=registry,
        )
        self.failed = Counter(
            "issuance_sweeper_failed_total",
            "Finds the sweeper could not finish (logged with what they are); later passes try again.",
            ["kind"],
            registry=registry,
        )
        self._pool = pool
        self._platform = platform
        self._lookback = timedelta(seconds=lookback_seconds)
        # When the last complete pass started: the next looks back from there, less the lookback.
        self._covered_until: datetime | None = None

    async def sweep(self, *, full: bool = False) -> Pass:
        """One pass. `full`: every learner, unless another replica's full pass is looking."""
        swept = Pass()
        started = datetime.now(UTC)
        try:
            await self._sweep_pages(
                swept,
                "parked",
                lambda conn, after: repository.parked_with_known_version(conn, after=after, limit=_PAGE_SIZE),
                service.finish_parked_completion,
            )
            async with self._full_pass(full) as swept.full:
                since = None if swept.full else (self._covered_until or started) - self._lookback
                await self._sweep_pages(
                    swept,
                    "pathway",
                    lambda conn, after: repository.missing_pathway_credentials(
                        conn, started, issued_since=since, after=after, limit=_PAGE_SIZE
                    ),
                    service.finish_pathway,
                )
        except _Unavailable as exc:
            log.warning(
                "PostgreSQL is unavailable: this sweep ends here, the next one goes on: %s", exc.__cause__
            )
            return swept
        swept.complete = True
        self._covered_until = started
        return swept

    async def _sweep_pages(self, swept: Pass, kind: str, find: _Find, finish: _Finish) -> None:
        after: tuple[UUID, UUID] | None = None
        while True:
            async with self._acquire() as conn:
                page = await find(conn, after)
            for first, second in page:
                context = dict(zip(_IDS[kind], (str(first), str(second)), strict=True))
                await self._finish(swept, kind, finish, first, second, context)
            if len(page) < _PAGE_SIZE:
                return
            after = page[-1]

    @contextlib.asynccontextmanager
    async def _full_pass(self, full: bool) -> AsyncIterator[bool]:
        """Whether this pass looks at every learner: `full` asked for, and no other replica's full
        pass looking (its lock, held by a connection of its own until the pass ends)."""
        if not full:
            yield False
            return
        # Released when the connection goes back to the pool (its reset releases advisory locks),
        # or with its session.
        async with self._acquire() as conn:
            yield await repository.try_lock_full_sweep(conn)

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Connection]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except repository.LockWaitTimedOut:
            raise  # one find's wait for a stuck lock holder: PostgreSQL itself answers
        except Exception as exc:
            if is_outage(exc):
                raise _Unavailable from exc
            raise

    async def _finish(
        self, swept: Pass, kind: str, finish: _Finish, first: UUID, second: UUID, context: dict[str, str]
    ) -> None:
        try:
            async with self._acquire() as conn, conn.transaction():
                finished = await finish(conn, self._platform, first, second)
        except _Unavailable:
            raise
        except (asyncpg.PostgresError, repository.LockWaitTimedOut) as exc:
            # E.g. a deadlock with a consumer's batch, a replica without the locks minting it first
            # (a unique violation), a stuck lock holder: rolled back, and the next pass looks again.
            self.failed.labels(kind=kind).inc()
            log.warning("could not finish a find, the next pass tries again: %s", exc, extra=context)
        except Exception:
            # One find's own trouble (a bug, a signing error) must not keep the others from being finished.
            self.failed.labels(kind=kind).inc()
            log.exception("could not finish a find, the next pass tries again", extra=context)
        else:
            if finished:
                swept.finished[kind] += 1
                self.found.labels(kind=kind).inc()
                log.warning(FOUND[kind], extra=context)

    @contextlib.asynccontextmanager
    async def running(self, interval_seconds: float, full_interval_seconds: float) -> AsyncIterator[None]:
        """Sweep every `interval_seconds` while the context is open, a full pass first and then
        every `full_interval_seconds`."""
        task = asyncio.create_task(
            self._loop(interval_seconds, full_interval_seconds), name="issuance-sweeper"
        )
        try:
            yield
        finally:
            # Each find is one transaction: cancelled mid-way, it rolls back and is found again.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, interval_seconds: float, full_interval_seconds: float) -> None:
        full_due = time.monotonic()
        while True:
            await asyncio.sleep(interval_seconds)
            full = time.monotonic() >= full_due
            try:
                swept = await self.sweep(full=full)
            except Exception:
                log.exception("the sweep failed; trying again in %.0f s", interval_seconds)
                continue
            # Full until this replica has made a complete one: another's full pass (the lock found
            # taken) may yet end short of its end, and this one then made an ordinary pass.
            if swept.full and swept.complete:
                full_due = time.monotonic() + full_interval_seconds


def sweeping(platform: Platform) -> Callable[[Runtime[Any]], contextlib.AbstractAsyncContextManager[None]]:
    """The sweeper as background work of the service (see `Service.background`)."""

    def start(runtime: Runtime[Any]) -> contextlib.AbstractAsyncContextManager[None]:
        settings: Settings = runtime.settings
        sweeper = Sweeper(
            runtime.pool,
            platform,
            lookback_seconds=settings.issuance_sweep_lookback_seconds,
            registry=runtime.metrics.registry,
        )
        return sweeper.running(
            settings.issuance_sweep_interval_seconds, settings.issuance_sweep_full_interval_seconds
        )

    return start
