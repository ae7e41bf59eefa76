"""The sweeper: finds and finishes what a race between replicas left behind.

The locks in `service` close the known races by construction; this is the net under them (and
under replicas still running code without them, during a rolling upgrade). Every interval it
looks for a parked completion whose course version is held, and for a learner holding a current
credential for every course of a pathway but no pathway credential; it finishes each in a
transaction of its own, under the same locks as the consumers, re-checking under them, so several
replicas may sweep at once and still mint one credential (the unique constraints back that).

A find means a race slipped through: each is logged at WARNING and counted in
`issuance_sweeper_found_total{kind="parked"|"pathway"}`. A find that cannot be finished (a bug, a
signing error, a deadlock with a consumer's batch) is logged with what it is, counted in
`issuance_sweeper_failed_total{kind}`, and left to later passes; the pass goes on with the next.
PostgreSQL being unavailable ends the pass instead, with one warning: every find would fail alike.

The first pass of a process looks at every learner; later passes only at learners with a course
credential issued within `ISSUANCE_SWEEP_LOOKBACK_SECONDS`: a race leaves a pathway behind only
when its last course credential was being minted at that moment.
"""

import asyncio
import contextlib
import logging
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

# Most finds of each kind one pass takes on; the rest wait for the next pass.
_PASS_LIMIT = 500

_Finish = Callable[[Connection, Platform, UUID, UUID], Awaitable[bool]]

# What a find of each kind means, as logged when it is finished.
_FOUND = {
    "parked": "a parked completion was left behind by a race: minted it now",
    "pathway": "a pathway credential was left behind by a race: minted it now",
}


@dataclass
class Pass:
    """What one pass found and finished, of each kind, and whether it ran to its end (False:
    PostgreSQL became unavailable, and the rest waits for the next pass)."""

    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_FOUND, 0))
    ran_to_end: bool = True


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

    async def sweep(self, *, everything: bool = False) -> Pass:
        """One pass. `everything`: every learner, not only those with a recent course credential."""
        swept = Pass()
        try:
            async with self._acquire() as conn:
                parked = await repository.parked_with_known_version(conn, _PASS_LIMIT)
            for enrollment_id, course_id in parked:
                context = {"enrollment_id": str(enrollment_id), "course_id": str(course_id)}
                await self._finish(
                    swept, "parked", service.finish_parked_completion, enrollment_id, course_id, context
                )

            now = datetime.now(UTC)
            async with self._acquire() as conn:
                missing = await repository.missing_pathway_credentials(
                    conn, now, issued_since=None if everything else now - self._lookback, limit=_PASS_LIMIT
                )
            for learner_id, pathway_id in missing:
                context = {"learner_id": str(learner_id), "pathway_id": str(pathway_id)}
                await self._finish(swept, "pathway", service.finish_pathway, learner_id, pathway_id, context)
        except _Unavailable as exc:
            log.warning(
                "PostgreSQL is unavailable: this sweep ends here, the next one goes on: %s", exc.__cause__
            )
            swept.ran_to_end = False
        return swept

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Connection]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
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
        except asyncpg.PostgresError as exc:
            # E.g. a deadlock with a consumer's batch, or a replica without the locks minting it
            # first (a unique violation): rolled back, and the next pass looks again.
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
                log.warning(_FOUND[kind], extra=context)

    @contextlib.asynccontextmanager
    async def running(self, interval_seconds: float) -> AsyncIterator[None]:
        """Sweep every `interval_seconds` while the context is open."""
        task = asyncio.create_task(self._loop(interval_seconds), name="issuance-sweeper")
        try:
            yield
        finally:
            # Each find is one transaction: cancelled mid-way, it rolls back and is found again.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, interval_seconds: float) -> None:
        everything = True
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                swept = await self.sweep(everything=everything)
            except Exception:
                log.exception("the sweep failed; trying again in %.0f s", interval_seconds)
                continue
            if swept.ran_to_end:
                everything = False


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
        return sweeper.running(settings.issuance_sweep_interval_seconds)

    return start
