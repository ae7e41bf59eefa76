"""The sweeper: finds and finishes what a race between replicas left behind.

The locks in `service` close the known races by construction; this is the net under them (and
under replicas still running code without them, during a rolling upgrade). Every interval it
looks for a parked completion whose course version is held, and for a learner holding a current
credential for every course of a pathway but no pathway credential; it finishes each in a
transaction of its own, under the same locks as the consumers, re-checking under them, so several
replicas may sweep at once and still mint one credential (the unique constraints back that).

A find means a race slipped through: each is logged at WARNING and counted in
`issuance_sweeper_found_total{kind="parked"|"pathway"}`.

The first pass of a process looks at every learner; later passes only at learners with a course
credential issued within `ISSUANCE_SWEEP_LOOKBACK_SECONDS`: a race leaves a pathway behind only
when its last course credential was being minted at that moment.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from microcred_runtime import Connection, Runtime

from . import repository, service
from .service import Platform
from .settings import Settings

log = logging.getLogger(__name__)

# Most finds of each kind one pass takes on; the rest wait for the next pass.
_PASS_LIMIT = 500


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
        self.found = Counter(
            "issuance_sweeper_found_total",
            "Work a race between replicas left behind, found and finished by the sweeper.",
            ["kind"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        self._pool = pool
        self._platform = platform
        self._lookback = timedelta(seconds=lookback_seconds)

    async def sweep(self, *, everything: bool = False) -> dict[str, int]:
        """One pass; how many of each kind it found and finished. `everything`: every learner,
        not only those with a recent course credential."""
        finished = {"parked": 0, "pathway": 0}
        async with self._pool.acquire() as conn:
            parked = await repository.parked_with_known_version(conn, _PASS_LIMIT)
        for enrollment_id, course_id in parked:
            context = {"enrollment_id": str(enrollment_id), "course_id": str(course_id)}
            finish = service.finish_parked_completion
            if await self._finish(finish, enrollment_id, course_id, context=context):
                finished["parked"] += 1
                self.found.labels(kind="parked").inc()
                log.warning("a parked completion was left behind by a race: minted it now", extra=context)

        now = datetime.now(UTC)
        async with self._pool.acquire() as conn:
            missing = await repository.missing_pathway_credentials(
                conn, now, issued_since=None if everything else now - self._lookback, limit=_PASS_LIMIT
            )
        for learner_id, pathway_id in missing:
            context = {"learner_id": str(learner_id), "pathway_id": str(pathway_id)}
            if await self._finish(service.finish_pathway, learner_id, pathway_id, context=context):
                finished["pathway"] += 1
                self.found.labels(kind="pathway").inc()
                log.warning("a pathway credential was left behind by a race: minted it now", extra=context)
        return finished

    async def _finish(
        self,
        finish: Callable[[Connection, Platform, UUID, UUID], Awaitable[bool]],
        first: UUID,
        second: UUID,
        *,
        context: dict[str, str],
    ) -> bool:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await finish(conn, self._platform, first, second)
        except asyncpg.PostgresError as exc:
            # E.g. a deadlock with a consumer's batch, or a replica without the locks minting it
            # first (a unique violation): rolled back, and the next pass looks again.
            log.warning("could not finish a find, the next pass tries again: %s", exc, extra=context)
            return False

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
                await self.sweep(everything=everything)
            except Exception:
                log.exception("the sweep failed; trying again in %.0f s", interval_seconds)
                continue
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
