"""A revoked pathway credential stands: stacking mints it again only where the sweeper would, when
a course credential issued after the revocation earns it anew, so the two never disagree."""

from datetime import UTC, datetime
from uuid import UUID

import asyncpg
import pytest

from issuance import service
from issuance.service import Platform
from issuance.sweeper import Sweeper
from microcred_events import CourseCompleted, CourseSnapshot, PathwayPublished, PathwaySnapshot
from microcred_runtime import Principal, Role

from .conftest import a_completion, a_course, a_learner, a_pathway, mint, published

ADMIN = Principal("admin-1", frozenset({Role.ADMIN}))

pytestmark = pytest.mark.integration


async def course_credential(pool: asyncpg.Pool, completion: CourseCompleted) -> UUID:
    credential_id: UUID = await pool.fetchval(
        "SELECT credential_id FROM credentials WHERE enrollment_id = $1", completion.enrollment_id
    )
    return credential_id


def pathway_published(pathway: PathwaySnapshot) -> PathwayPublished:
    return PathwayPublished(pathway=pathway, published_at=datetime.now(UTC))


class Revoked:
    """A learner who completed both courses of a pathway, whose pathway credential staff revoked."""

    def __init__(self, pool: asyncpg.Pool, platform: Platform) -> None:
        self.pool, self.platform = pool, platform
        self.courses: tuple[CourseSnapshot, CourseSnapshot] = (a_course(), a_course())
        self.pathway: PathwaySnapshot = a_pathway(*self.courses)
        self.learner = a_learner()
        self.completions = [a_completion(course, self.learner) for course in self.courses]

    async def stack_and_revoke(self) -> UUID:
        async with self.pool.acquire() as conn, conn.transaction():
            for course in self.courses:
                await service.record_course(conn, self.platform, published(course))
            await service.record_pathway(conn, self.platform, pathway_published(self.pathway))
            for completion in self.completions:
                await mint(conn, self.platform, completion)
        (stacked,) = await self.pathway_credentials()
        async with self.pool.acquire() as conn, conn.transaction():
            await service.revoke_credential(conn, self.platform, ADMIN, stacked, "awarded by mistake")
        return stacked

    async def publish(self, pathway: PathwaySnapshot) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await service.record_pathway(conn, self.platform, pathway_published(pathway))

    async def complete(self, completion: CourseCompleted) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await mint(conn, self.platform, completion)

    async def pathway_credentials(self) -> list[UUID]:
        rows = await self.pool.fetch(
            "SELECT credential_id FROM credentials WHERE kind = 'pathway' AND learner_id = $1",
            self.learner.learner_id,
        )
        return [row["credential_id"] for row in rows]

    async def sweeper_finds_nothing(self) -> bool:
        swept = await Sweeper(self.pool, self.platform, lookback_seconds=900).sweep(full=True)
        return swept.finished == {"parked": 0, "pathway": 0}

    async def stands(self, stacked: UUID) -> bool:
        """Whether the revoked credential is still the learner's only one, and the sweeper agrees."""
        return await self.pathway_credentials() == [stacked] and await self.sweeper_finds_nothing()


@pytest.fixture
def revoked(pool: asyncpg.Pool, platform: Platform) -> Revoked:
    return Revoked(pool, platform)


async def test_a_redelivered_or_resent_last_completion_mints_no_second_pathway_credential(
    revoked: Revoked,
) -> None:
    stacked = await revoked.stack_and_revoke()
    last = revoked.completions[-1]

    await revoked.complete(last)
    await revoked.complete(last.model_copy(update={"completed_at": datetime.now(UTC)}))

    assert await revoked.stands(stacked)


async def test_a_new_version_of_the_pathway_does_not_mint_a_revoked_pathway_credential_again(
    revoked: Revoked,
) -> None:
    stacked = await revoked.stack_and_revoke()

    await revoked.publish(revoked.pathway.model_copy(update={"version": 2}))

    assert await revoked.stands(stacked)


async def test_reinstating_a_course_credential_does_not_mint_a_revoked_pathway_credential_again(
    revoked: Revoked,
) -> None:
    stacked = await revoked.stack_and_revoke()
    first = await course_credential(revoked.pool, revoked.completions[0])
    async with revoked.pool.acquire() as conn, conn.transaction():
        await service.suspend_credential(conn, revoked.platform, ADMIN, first, "checking the completion")
    async with revoked.pool.acquire() as conn, conn.transaction():
        await service.reinstate_credential(conn, revoked.platform, ADMIN, first)

    assert await revoked.stands(stacked)


async def test_a_course_credential_issued_after_the_revocation_earns_the_pathway_credential_again(
    revoked: Revoked,
) -> None:
    stacked = await revoked.stack_and_revoke()
    # Issued at whole seconds: the revocation a second earlier than it was, not a second's sleep.
    await revoked.pool.execute(
        "UPDATE credentials SET revoked_at = revoked_at - interval '1 second' WHERE credential_id = $1",
        stacked,
    )

    await revoked.complete(a_completion(revoked.courses[0], revoked.learner))  # a new enrollment

    credentials = await revoked.pathway_credentials()
    assert len(credentials) == 2
    assert stacked in credentials
    assert await revoked.sweeper_finds_nothing()
