"""Two replicas applying racing events at once, as two concurrent transactions on a real PostgreSQL.

Each test holds the first transaction open after its work, starts the second, and commits the
first only once the second waits for a lock (or has finished: it would, without the locks, and
then neither transaction sees the other's rows). Whatever the interleaving, the credential is minted.
"""

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from uuid import UUID

import asyncpg
import pytest

from issuance import repository, service
from issuance.service import Platform
from microcred_events import PathwayPublished
from microcred_runtime.consumers import is_outage

from .conftest import a_completion, a_course, a_learner, a_pathway, mint, published

pytestmark = pytest.mark.integration

Work = Callable[[asyncpg.Connection], Awaitable[None]]


async def race(database: str, first: Work, second: Work) -> None:
    """`first` in a transaction that commits only once `second`'s (started after it) waits for a
    lock or is done; then `second` commits."""
    one, two, observer = [await asyncpg.connect(database) for _ in range(3)]
    first_done, second_done = asyncio.Event(), asyncio.Event()

    async def run_first() -> None:
        async with one.transaction():
            await first(one)
            first_done.set()
            await waits_for_lock_or(second_done, observer, two.get_server_pid())

    async def run_second() -> None:
        await first_done.wait()
        try:
            async with two.transaction():
                await second(two)
        finally:
            second_done.set()

    try:
        async with asyncio.timeout(30):
            await asyncio.gather(run_first(), run_second())
    finally:
        for conn in (one, two, observer):
            await conn.close()


async def waits_for_lock_or(done: asyncio.Event, observer: asyncpg.Connection, pid: int) -> None:
    while not done.is_set():
        waiting = await observer.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
        if waiting:
            return
        await asyncio.sleep(0.01)


async def count(database: str, query: str, *args: object) -> int:
    conn = await asyncpg.connect(database)
    try:
        counted: int = await conn.fetchval(query, *args)
        return counted
    finally:
        await conn.close()


async def setup(database: str, work: Work) -> None:
    conn = await asyncpg.connect(database)
    try:
        async with conn.transaction():
            await work(conn)
    finally:
        await conn.close()


async def test_two_last_course_credentials_minted_at_once_mint_the_pathway_credential_once(
    database: str, platform: Platform
) -> None:
    first, second = a_course(), a_course()
    pathway = a_pathway(first, second)
    learner = a_learner()

    async def catalog(conn: asyncpg.Connection) -> None:
        for course in (first, second):
            await service.record_course(conn, platform, published(course))
        await service.record_pathway(
            conn, platform, PathwayPublished(pathway=pathway, published_at=datetime.now(UTC))
        )
        # Someone else's credential opens the status list: the first credential would otherwise
        # open it, and the second would wait for that row, not for the lock this test is about.
        await mint(conn, platform, a_completion(first, a_learner()))

    await setup(database, catalog)

    async def complete_first(conn: asyncpg.Connection) -> None:
        await mint(conn, platform, a_completion(first, learner))

    async def complete_second(conn: asyncpg.Connection) -> None:
        await mint(conn, platform, a_completion(second, learner))

    await race(database, complete_first, complete_second)

    assert (
        await count(
            database,
            "SELECT count(*) FROM credentials WHERE kind = 'course' AND learner_id = $1",
            learner.learner_id,
        )
        == 2
    )
    assert (
        await count(
            database,
            "SELECT count(*) FROM credentials WHERE kind = 'pathway' AND pathway_id = $1 AND learner_id = $2",
            pathway.pathway_id,
            learner.learner_id,
        )
        == 1
    )


@pytest.mark.parametrize("pathway_first", [True, False], ids=["pathway-first", "credential-first"])
async def test_a_pathway_published_while_its_last_course_credential_is_minted_is_awarded(
    database: str, platform: Platform, pathway_first: bool
) -> None:
    first, second = a_course(), a_course()
    pathway = a_pathway(first, second)
    learner = a_learner()

    async def catalog_and_first_course(conn: asyncpg.Connection) -> None:
        for course in (first, second):
            await service.record_course(conn, platform, published(course))
        await mint(conn, platform, a_completion(first, learner))

    await setup(database, catalog_and_first_course)

    async def publish_pathway(conn: asyncpg.Connection) -> None:
        await service.record_pathway(
            conn, platform, PathwayPublished(pathway=pathway, published_at=datetime.now(UTC))
        )

    async def complete_last(conn: asyncpg.Connection) -> None:
        await mint(conn, platform, a_completion(second, learner))

    if pathway_first:
        await race(database, publish_pathway, complete_last)
    else:
        await race(database, complete_last, publish_pathway)

    assert (
        await count(
            database,
            "SELECT count(*) FROM credentials WHERE kind = 'pathway' AND pathway_id = $1",
            pathway.pathway_id,
        )
        == 1
    )


@pytest.mark.parametrize("park_first", [True, False], ids=["park-first", "version-first"])
async def test_a_completion_parked_while_its_course_version_arrives_is_minted(
    database: str, platform: Platform, park_first: bool
) -> None:
    course = a_course(version=4)
    completion = a_completion(course, a_learner())

    async def complete(conn: asyncpg.Connection) -> None:
        await mint(conn, platform, completion)

    async def publish_version(conn: asyncpg.Connection) -> None:
        await service.record_course(conn, platform, published(course))

    if park_first:
        await race(database, complete, publish_version)
    else:
        await race(database, publish_version, complete)

    assert (
        await count(
            database, "SELECT count(*) FROM credentials WHERE enrollment_id = $1", completion.enrollment_id
        )
        == 1
    )
    assert await count(database, "SELECT count(*) FROM awaiting_course_version") == 0


async def test_two_batches_with_a_completion_in_common_at_once_mint_its_credential_once(
    database: str, platform: Platform
) -> None:
    course = a_course()

    async def catalog(conn: asyncpg.Connection) -> None:
        await service.record_course(conn, platform, published(course))
        # Opens the status list: both batches would otherwise wait for its row, not for each other.
        await mint(conn, platform, a_completion(course, a_learner()))

    await setup(database, catalog)
    common = a_completion(course, a_learner())  # e.g. reported again, under another event id
    others = [a_completion(course, a_learner()) for _ in range(3)]

    async def first(conn: asyncpg.Connection) -> None:
        await mint(conn, platform, a_completion(course, a_learner()), common)

    async def second(conn: asyncpg.Connection) -> None:
        await mint(conn, platform, *others, common)

    # The second waits for the first's credential of the enrollment, and then fails on it...
    with pytest.raises(asyncpg.UniqueViolationError):
        await race(database, first, second)
    # ...and is applied again (the runtime gives it halves, down to the event at fault alone).
    await setup(database, second)

    for completion in [common, *others]:
        assert (
            await count(
                database,
                "SELECT count(*) FROM credentials WHERE enrollment_id = $1",
                completion.enrollment_id,
            )
            == 1
        )


async def test_a_lock_held_past_the_lock_timeout_is_an_outage_not_the_event_s_fault(
    database: str, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "LOCK_TIMEOUT", "200ms")
    course = a_course()

    async def catalog(conn: asyncpg.Connection) -> None:
        await service.record_course(conn, platform, published(course))

    await setup(database, catalog)
    stuck, waiting = [await asyncpg.connect(database) for _ in range(2)]
    try:
        async with stuck.transaction():
            # A replica frozen while it records a new version of the course.
            await repository.lock_courses(stuck, [course.course_id], exclusive=True)
            with pytest.raises(repository.LockWaitTimedOut) as timed_out:
                async with asyncio.timeout(10), waiting.transaction():
                    await mint(waiting, platform, a_completion(course, a_learner()))
        # The consumer's batch is redelivered after a pause, never dead-lettered for it.
        assert is_outage(timed_out.value)

        async with waiting.transaction():
            await repository.lock_courses(waiting, [course.course_id], exclusive=False)
            # Only the lock waits are bounded: the rest of the transaction waits as it did.
            assert await waiting.fetchval("SHOW lock_timeout") == "0"
    finally:
        for conn in (stuck, waiting):
            await conn.close()


async def test_a_lock_holder_idle_in_its_transaction_is_ended_and_the_waiting_batch_proceeds(
    database: str, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "IDLE_HOLDER_TIMEOUT", "500ms")
    course, learner = a_course(), a_learner()

    async def catalog(conn: asyncpg.Connection) -> None:
        await service.record_course(conn, platform, published(course))

    await setup(database, catalog)
    stuck, waiting = [await asyncpg.connect(database) for _ in range(2)]
    try:
        frozen = stuck.transaction()
        await frozen.start()
        # A replica frozen while it records a new version of the course: it sends nothing more.
        await repository.lock_courses(stuck, [course.course_id], exclusive=True)

        async with asyncio.timeout(10), waiting.transaction():
            await mint(waiting, platform, a_completion(course, learner))

        # PostgreSQL ended the holder's session; woken, its batch meets an outage (redelivered).
        with pytest.raises((asyncpg.InterfaceError, asyncpg.InternalClientError)) as ended:
            await stuck.execute("SELECT 1")
        assert is_outage(ended.value)
        assert stuck.is_closed()
    finally:
        for conn in (stuck, waiting):
            await conn.close()
    assert (
        await count(database, "SELECT count(*) FROM credentials WHERE learner_id = $1", learner.learner_id)
        == 1
    )


async def test_a_transaction_waits_for_its_locks_at_most_the_lock_timeout_in_all(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "LOCK_TIMEOUT", "3s")
    first, second = a_learner().learner_id, a_learner().learner_id
    slow, stuck, waiting = [await asyncpg.connect(database) for _ in range(3)]
    try:
        slow_batch = slow.transaction()
        await slow_batch.start()
        await repository.lock_learners(slow, [first])
        async with stuck.transaction():
            await repository.lock_learners(stuck, [second])

            async def release_first() -> None:
                await asyncio.sleep(2)
                await slow_batch.commit()

            async def one_step() -> None:
                async with waiting.transaction():
                    await repository.lock_learners(waiting, [first])  # about 2 s
                    await repository.lock_learners(waiting, [second])  # what is left: about 1 s

            started = asyncio.get_running_loop().time()
            releasing = asyncio.create_task(release_first())
            with pytest.raises(repository.LockWaitTimedOut):
                await asyncio.wait_for(one_step(), 20)
            waited = asyncio.get_running_loop().time() - started
            await releasing
    finally:
        for conn in (slow, stuck, waiting):
            await conn.close()

    # Not 2 s and then 3 s more.
    assert 2.9 < waited < 4.5


def test_lock_keys_never_change() -> None:
    """Replicas of two releases side by side (a rolling upgrade) must lock the same keys."""
    some_id = UUID("6f1c2a3e-0000-4000-8000-000000000001")

    assert repository.lock_key("course", some_id) == 6958635988656641989
    assert repository.lock_key("learner", some_id) == -4563349452381178562
    assert repository.lock_key("sweep", "full") == 2826820136452152122
