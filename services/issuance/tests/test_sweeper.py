"""The sweeper finds and finishes what a race left behind, once, however many replicas sweep.

What a race would leave behind is made directly: the pathway stored without the use case that
awards it, a completion parked and its course version stored without the use case that takes it.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from issuance import repository, service
from issuance import sweeper as sweeper_module
from issuance.service import Platform
from issuance.sweeper import Sweeper
from microcred_events import CourseCompleted, Learner, PathwaySnapshot

from .conftest import a_completion, a_course, a_learner, a_pathway, mint, published

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class LeftBehind:
    learner: Learner
    pathway: PathwaySnapshot
    parked: CourseCompleted


async def leave_behind(pool: asyncpg.Pool, platform: Platform) -> LeftBehind:
    """A learner with both course credentials of a pathway but not its credential, and a parked
    completion whose course version is held."""
    first, second, third = a_course(), a_course(), a_course(version=2)
    learner = a_learner()
    pathway = a_pathway(first, second)
    parked = a_completion(third, a_learner())
    async with pool.acquire() as conn, conn.transaction():
        for course in (first, second):
            await service.record_course(conn, platform, published(course))
            await mint(conn, platform, a_completion(course, learner))
        await repository.record_pathway(conn, pathway)
        await repository.park_completions(conn, [parked])
        await repository.record_course_version(conn, third)
    return LeftBehind(learner, pathway, parked)


async def left_behind_two_hours_ago(pool: asyncpg.Pool, platform: Platform) -> LeftBehind:
    left = await leave_behind(pool, platform)
    await pool.execute(
        "UPDATE credentials SET issued_at = issued_at - interval '2 hours', valid_until = NULL"
        " WHERE learner_id = $1",
        left.learner.learner_id,
    )
    return left


async def refused(*args: object, **kwargs: object) -> None:
    """PostgreSQL not there."""
    raise ConnectionRefusedError("connection refused")


def found(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("issuance_sweeper_found_total", {"kind": kind}) or 0.0


def failed(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("issuance_sweeper_failed_total", {"kind": kind}) or 0.0


async def pathway_credentials(pool: asyncpg.Pool, left: LeftBehind) -> int:
    counted: int = await pool.fetchval(
        "SELECT count(*) FROM credentials WHERE kind = 'pathway' AND learner_id = $1 AND pathway_id = $2",
        left.learner.learner_id,
        left.pathway.pathway_id,
    )
    return counted


async def parked_credentials(pool: asyncpg.Pool, left: LeftBehind) -> int:
    counted: int = await pool.fetchval(
        "SELECT count(*) FROM credentials WHERE enrollment_id = $1", left.parked.enrollment_id
    )
    return counted


async def test_the_sweeper_finishes_a_left_behind_pathway_and_parked_completion(
    pool: asyncpg.Pool, platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    left = await leave_behind(pool, platform)
    registry = CollectorRegistry()
    sweeper = Sweeper(pool, platform, lookback_seconds=900, registry=registry)

    with caplog.at_level(logging.WARNING, logger="issuance.sweeper"):
        swept = await sweeper.sweep()

    assert swept.finished == {"parked": 1, "pathway": 1}
    assert await pathway_credentials(pool, left) == 1
    assert await parked_credentials(pool, left) == 1
    assert await pool.fetchval("SELECT count(*) FROM awaiting_course_version") == 0
    assert (found(registry, "pathway"), found(registry, "parked")) == (1, 1)
    assert sorted(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING) == [
        "a parked completion was left behind by a race: minted it now",
        "a pathway credential was left behind by a race: minted it now",
    ]
    assert (await sweeper.sweep(full=True)).finished == {"parked": 0, "pathway": 0}


async def test_two_sweepers_at_once_mint_exactly_one_credential_of_each(
    database: str, pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    left = await leave_behind(pool, platform)
    registries = (CollectorRegistry(), CollectorRegistry())  # one per replica
    # Both replicas find the same work before either finishes any of it.
    both_found(monkeypatch, "parked_with_known_version")
    both_found(monkeypatch, "missing_pathway_credentials")

    async with asyncpg.create_pool(database, min_size=1, max_size=4) as other_pool:
        one = Sweeper(pool, platform, lookback_seconds=900, registry=registries[0])
        two = Sweeper(other_pool, platform, lookback_seconds=900, registry=registries[1])
        swept = await asyncio.wait_for(asyncio.gather(one.sweep(), two.sweep()), 30)

    assert sum(each.finished["pathway"] for each in swept) == 1
    assert sum(each.finished["parked"] for each in swept) == 1
    assert await pathway_credentials(pool, left) == 1
    assert await parked_credentials(pool, left) == 1
    # Summed over the replicas, as a dashboard would.
    assert [sum(found(registry, kind) for registry in registries) for kind in ("pathway", "parked")] == [1, 1]


def both_found(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    find: Callable[..., Awaitable[Any]] = getattr(repository, name)
    barrier = asyncio.Barrier(2)

    async def find_then_wait(*args: Any, **kwargs: Any) -> Any:
        result = await find(*args, **kwargs)
        assert result, "the work left behind is found"
        await barrier.wait()
        return result

    monkeypatch.setattr(repository, name, find_then_wait)


async def test_a_find_that_cannot_be_finished_is_counted_and_the_pass_goes_on(
    pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = await leave_behind(pool, platform), await leave_behind(pool, platform)
    fail_for(monkeypatch, "finish_pathway", first.learner.learner_id, RuntimeError("a bug"))
    fail_for(monkeypatch, "finish_parked_completion", second.parked.enrollment_id, ValueError("cannot sign"))
    registry = CollectorRegistry()

    with caplog.at_level(logging.WARNING, logger="issuance.sweeper"):
        swept = await Sweeper(pool, platform, lookback_seconds=900, registry=registry).sweep()

    assert swept.finished == {"parked": 1, "pathway": 1}
    assert swept.complete
    assert (await pathway_credentials(pool, second), await parked_credentials(pool, first)) == (1, 1)
    assert (failed(registry, "pathway"), failed(registry, "parked")) == (1, 1)
    # Each logged with its traceback and what it is.
    assert {
        (
            type(record.exc_info[1]),
            getattr(record, "learner_id", None) or getattr(record, "enrollment_id", None),
        )
        for record in caplog.records
        if record.levelno == logging.ERROR and record.exc_info
    } == {(RuntimeError, str(first.learner.learner_id)), (ValueError, str(second.parked.enrollment_id))}


async def test_postgresql_unavailable_ends_the_pass_with_one_warning(
    pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(2):
        await leave_behind(pool, platform)
    attempts: list[UUID] = []

    async def unavailable(conn: asyncpg.Connection, platform: Platform, first: UUID, second: UUID) -> bool:
        attempts.append(first)
        raise asyncpg.CannotConnectNowError("the database system is shutting down")

    monkeypatch.setattr(service, "finish_parked_completion", unavailable)
    monkeypatch.setattr(service, "finish_pathway", unavailable)
    registry = CollectorRegistry()
    sweeper = Sweeper(pool, platform, lookback_seconds=900, registry=registry)

    with caplog.at_level(logging.WARNING, logger="issuance.sweeper"):
        swept = await sweeper.sweep()

    assert (len(attempts), swept.complete) == (1, False)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert (failed(registry, "pathway"), failed(registry, "parked")) == (0, 0)

    monkeypatch.setattr(repository, "parked_with_known_version", refused)
    assert not (await sweeper.sweep()).complete


async def test_a_find_behind_a_stuck_lock_holder_fails_alone(
    database: str, pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "LOCK_TIMEOUT", "200ms")
    first, second = await leave_behind(pool, platform), await leave_behind(pool, platform)
    registry = CollectorRegistry()
    stuck = await asyncpg.connect(database)
    try:
        async with stuck.transaction():
            await repository.lock_learners(stuck, [first.learner.learner_id])
            async with asyncio.timeout(20):
                swept = await Sweeper(pool, platform, lookback_seconds=900, registry=registry).sweep()
    finally:
        await stuck.close()

    assert swept.finished == {"parked": 2, "pathway": 1}
    assert swept.complete
    assert (await pathway_credentials(pool, first), await pathway_credentials(pool, second)) == (0, 1)
    assert failed(registry, "pathway") == 1


def fail_for(monkeypatch: pytest.MonkeyPatch, name: str, first: UUID, error: Exception) -> None:
    """Make the use case `name` of `service` raise `error` for the find whose first id is `first`."""
    finish: Callable[..., Awaitable[bool]] = getattr(service, name)

    async def failing(conn: asyncpg.Connection, platform: Platform, one: UUID, two: UUID) -> bool:
        if one == first:
            raise error
        return await finish(conn, platform, one, two)

    monkeypatch.setattr(service, name, failing)


async def test_later_passes_look_only_at_recent_course_credentials(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    left = await left_behind_two_hours_ago(pool, platform)
    sweeper = Sweeper(pool, platform, lookback_seconds=3600)

    assert (await sweeper.sweep()).finished["pathway"] == 0
    assert (await sweeper.sweep(full=True)).finished["pathway"] == 1
    assert await pathway_credentials(pool, left) == 1


async def test_after_an_outage_longer_than_the_lookback_a_pass_looks_back_from_the_last_complete_one(
    pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweeper = Sweeper(pool, platform, lookback_seconds=1)
    assert (await sweeper.sweep()).complete
    left = await leave_behind(pool, platform)

    with monkeypatch.context() as outage:
        outage.setattr(repository, "missing_pathway_credentials", refused)
        assert not (await sweeper.sweep()).complete
        await asyncio.sleep(2.5)  # longer than the lookback

    assert (await sweeper.sweep()).finished["pathway"] == 1
    assert await pathway_credentials(pool, left) == 1


async def test_one_replica_at_a_time_looks_at_every_learner(pool: asyncpg.Pool, platform: Platform) -> None:
    left = await left_behind_two_hours_ago(pool, platform)
    sweeper = Sweeper(pool, platform, lookback_seconds=900)

    async with pool.acquire() as other:
        assert await repository.try_lock_full_sweep(other)  # another replica's full pass
        swept = await sweeper.sweep(full=True)
        assert (swept.full, swept.complete, swept.finished["pathway"]) == (False, True, 0)

    swept = await sweeper.sweep(full=True)
    assert (swept.full, swept.finished["pathway"]) == (True, 1)
    assert await pathway_credentials(pool, left) == 1


async def test_finds_that_keep_failing_do_not_keep_a_pass_from_the_others(
    pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    left = [await leave_behind(pool, platform) for _ in range(3)]
    # The first of each kind, in the order pages are read, fills a page on its own and always fails.
    monkeypatch.setattr(sweeper_module, "_PAGE_SIZE", 1)
    failing_learner = min(each.learner.learner_id for each in left)
    failing_parked = min(each.parked.enrollment_id for each in left)
    fail_for(monkeypatch, "finish_pathway", failing_learner, RuntimeError("a bug"))
    fail_for(monkeypatch, "finish_parked_completion", failing_parked, ValueError("cannot sign"))
    sweeper = Sweeper(pool, platform, lookback_seconds=900)

    swept = await sweeper.sweep()

    assert (swept.finished, swept.complete) == ({"parked": 2, "pathway": 2}, True)
    assert [await pathway_credentials(pool, each) for each in left] == [
        each.learner.learner_id != failing_learner for each in left
    ]
    assert [await parked_credentials(pool, each) for each in left] == [
        each.parked.enrollment_id != failing_parked for each in left
    ]
    assert (await sweeper.sweep()).finished == {"parked": 0, "pathway": 0}


async def test_the_background_sweeper_is_full_first_until_complete_then_every_full_interval(
    pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    find = repository.missing_pathway_credentials
    looked_since: list[datetime | None] = []

    async def first_unavailable(
        conn: asyncpg.Connection,
        now: datetime,
        *,
        issued_since: datetime | None,
        after: tuple[UUID, UUID] | None,
        limit: int,
    ) -> list[tuple[UUID, UUID]]:
        looked_since.append(issued_since)
        if len(looked_since) == 1:
            raise ConnectionRefusedError("connection refused")
        return await find(conn, now, issued_since=issued_since, after=after, limit=limit)

    monkeypatch.setattr(repository, "missing_pathway_credentials", first_unavailable)

    async with Sweeper(pool, platform, lookback_seconds=900).running(0.05, full_interval_seconds=0.5):
        for _ in range(400):
            if None in looked_since[3:]:
                break
            await asyncio.sleep(0.05)

    full = [since is None for since in looked_since]
    # The first, cut short, again; then bounded passes until the full interval has passed.
    assert full[:3] == [True, True, False]
    assert True in full[3:]


async def test_the_sweeper_sweeps_in_the_background_until_stopped(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    left = await leave_behind(pool, platform)

    async with Sweeper(pool, platform, lookback_seconds=900).running(0.05, full_interval_seconds=3600):
        for _ in range(200):
            if await pathway_credentials(pool, left) and await parked_credentials(pool, left):
                break
            await asyncio.sleep(0.05)

    assert await pathway_credentials(pool, left) == 1
    assert await parked_credentials(pool, left) == 1


async def test_the_background_sweeper_stays_full_while_another_replica_holds_the_full_pass(
    pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweeper = Sweeper(pool, platform, lookback_seconds=900)
    sweep = sweeper.sweep
    passes: list[tuple[bool, bool]] = []  # (asked to be full, was full)

    async def recorded(*, full: bool = False) -> sweeper_module.Pass:
        swept = await sweep(full=full)
        passes.append((full, swept.full))
        return swept

    monkeypatch.setattr(sweeper, "sweep", recorded)

    async with sweeper.running(0.05, full_interval_seconds=3600):
        async with pool.acquire() as other:
            assert await repository.try_lock_full_sweep(other)  # another replica's full pass
            await until(lambda: len(passes) >= 2)
        held = len(passes)
        await until(lambda: len(passes) >= held + 3)

    assert passes[:2] == [(True, False), (True, False)]
    # Full again until one is, then not for the full interval.
    first_full = [was for _, was in passes].index(True)
    assert all(asked for asked, _ in passes[:first_full])
    assert not any(asked for asked, _ in passes[first_full + 1 :])


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not so within 20 s")
