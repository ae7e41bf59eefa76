"""Revoking a course credential takes the pathway credentials that stand on it with it: revoked, or
suspended by policy, with the reason, in the revocation's transaction, each with its event."""

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from issuance import service, status_list
from issuance.domain import CascadePolicy, Credential, DisplayStatus
from issuance.service import Platform
from microcred_events import CredentialRevoked, PathwayPublished, StatusPurpose
from microcred_runtime import Principal, Problem, Role

from .conftest import a_completion, a_course, a_learner, a_pathway, mint, published

ADMIN = Principal("admin-1", frozenset({Role.ADMIN}))

pytestmark = pytest.mark.integration


class Holder:
    """A learner holding both course credentials of a pathway and the pathway credential."""

    def __init__(self, pool: asyncpg.Pool, platform: Platform) -> None:
        self.pool, self.platform = pool, platform
        self.courses = (a_course(), a_course())
        self.pathway = a_pathway(*self.courses)
        self.learner = a_learner()

    async def earn_all(self) -> tuple[list[UUID], UUID]:
        completions = [a_completion(course, self.learner) for course in self.courses]
        async with self.pool.acquire() as conn, conn.transaction():
            for course in self.courses:
                await service.record_course(conn, self.platform, published(course))
            await service.record_pathway(
                conn, self.platform, PathwayPublished(pathway=self.pathway, published_at=datetime.now(UTC))
            )
            await mint(conn, self.platform, *completions)
        parts = [
            await self.pool.fetchval(
                "SELECT credential_id FROM credentials WHERE enrollment_id = $1", completion.enrollment_id
            )
            for completion in completions
        ]
        stacked = await self.pool.fetchval(
            "SELECT credential_id FROM credentials WHERE kind = 'pathway' AND learner_id = $1",
            self.learner.learner_id,
        )
        return parts, stacked

    async def revoke(self, credential_id: UUID, reason: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await service.revoke_credential(conn, self.platform, ADMIN, credential_id, reason)

    async def credential(self, credential_id: UUID) -> Credential:
        async with self.pool.acquire() as conn:
            return await service.get_credential(conn, credential_id)

    async def revocations(self) -> list[CredentialRevoked]:
        rows = await self.pool.fetch(
            "SELECT payload FROM outbox WHERE event_type = $1 ORDER BY id", CredentialRevoked.TYPE
        )
        return [CredentialRevoked.model_validate(json.loads(row["payload"])) for row in rows]


async def test_revoking_a_part_revokes_the_pathway_credential_with_the_reason(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    holder = Holder(pool, platform)
    parts, stacked = await holder.earn_all()

    await holder.revoke(parts[0], "plagiarised final project")

    pathway_credential = await holder.credential(stacked)
    assert pathway_credential.status(datetime.now(UTC)) is DisplayStatus.REVOKED
    assert pathway_credential.revocation_reason is not None
    assert "plagiarised final project" in pathway_credential.revocation_reason
    assert holder.courses[0].achievement.name in pathway_credential.revocation_reason
    events = await holder.revocations()
    assert [(event.credential_id, event.status_purpose) for event in events] == [
        (parts[0], StatusPurpose.REVOCATION),
        (stacked, StatusPurpose.REVOCATION),
    ]
    # Its bit is set in its status list, as for any revocation: outside verifiers see it.
    bits = await pool.fetchval(
        "SELECT bits FROM status_lists WHERE list_id = $1", pathway_credential.revocation_list_id
    )
    assert status_list.get_bit(bits, pathway_credential.revocation_index)
    assert (await holder.credential(parts[1])).status(datetime.now(UTC)) is DisplayStatus.VALID


async def test_by_policy_the_pathway_credential_is_suspended_and_stays_so(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    holder = Holder(pool, dataclasses.replace(platform, pathway_cascade=CascadePolicy.SUSPEND))
    parts, stacked = await holder.earn_all()

    await holder.revoke(parts[1], "score entered for the wrong learner")

    suspended = await holder.credential(stacked)
    assert suspended.status(datetime.now(UTC)) is DisplayStatus.SUSPENDED
    assert suspended.suspension_reason is not None
    assert "score entered for the wrong learner" in suspended.suspension_reason
    assert [event.status_purpose for event in await holder.revocations()] == [
        StatusPurpose.REVOCATION,
        StatusPurpose.SUSPENSION,
    ]
    # Standing on a revoked part, it stays suspended.
    with pytest.raises(Problem) as refused:
        async with pool.acquire() as conn, conn.transaction():
            await service.reinstate_credential(conn, holder.platform, ADMIN, stacked)
    assert (refused.value.status, refused.value.kind) == (409, "part-revoked")
    assert (await holder.credential(stacked)).status(datetime.now(UTC)) is DisplayStatus.SUSPENDED


async def test_a_cascade_that_fails_partway_leaves_everything_as_it_was(
    pool: asyncpg.Pool, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = Holder(pool, platform)
    parts, stacked = await holder.earn_all()
    set_status_bit = service._set_status_bit
    calls = 0

    async def fails_the_second_time(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the pathway credential's bit, after the course credential's
            raise RuntimeError("the status list could not be written")
        await set_status_bit(*args)

    monkeypatch.setattr(service, "_set_status_bit", fails_the_second_time)
    with pytest.raises(RuntimeError):
        await holder.revoke(parts[0], "plagiarised final project")

    assert calls == 2
    for credential_id in (parts[0], stacked):
        assert (await holder.credential(credential_id)).status(datetime.now(UTC)) is DisplayStatus.VALID
    assert await holder.revocations() == []


async def test_revoking_a_course_credential_of_no_pathway_touches_nothing_else(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    holder = Holder(pool, platform)
    _, stacked = await holder.earn_all()
    elsewhere = a_course()
    completion = a_completion(elsewhere, holder.learner)
    async with pool.acquire() as conn, conn.transaction():
        await service.record_course(conn, platform, published(elsewhere))
        await mint(conn, platform, completion)
    other = await pool.fetchval(
        "SELECT credential_id FROM credentials WHERE enrollment_id = $1", completion.enrollment_id
    )

    await holder.revoke(other, "not part of the pathway")

    assert (await holder.credential(stacked)).status(datetime.now(UTC)) is DisplayStatus.VALID
    assert [event.credential_id for event in await holder.revocations()] == [other]


async def suspend(holder: Holder, credential_id: UUID, reason: str) -> None:
    async with holder.pool.acquire() as conn, conn.transaction():
        await service.suspend_credential(conn, holder.platform, ADMIN, credential_id, reason)


async def reinstate(holder: Holder, credential_id: UUID) -> None:
    async with holder.pool.acquire() as conn, conn.transaction():
        await service.reinstate_credential(conn, holder.platform, ADMIN, credential_id)


async def status(holder: Holder, credential_id: UUID) -> DisplayStatus:
    return (await holder.credential(credential_id)).status(datetime.now(UTC))


async def test_a_suspended_part_suspends_the_pathway_credential_until_it_is_reinstated(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    holder = Holder(pool, platform)
    parts, stacked = await holder.earn_all()

    await suspend(holder, parts[0], "completion under review")
    suspended = await holder.credential(stacked)
    await reinstate(holder, parts[0])

    assert suspended.status(datetime.now(UTC)) is DisplayStatus.SUSPENDED
    assert suspended.suspension_reason is not None
    assert "was suspended: completion under review" in suspended.suspension_reason
    assert await status(holder, stacked) is DisplayStatus.VALID
    caused = await pool.fetch(
        "SELECT change, caused_by FROM credential_status_changes WHERE credential_id = $1 ORDER BY id",
        stacked,
    )
    assert [(row["change"], row["caused_by"]) for row in caused] == [
        ("suspended", parts[0]),
        ("reinstated", parts[0]),
    ]
    assert len(await pool.fetch("SELECT FROM credentials WHERE kind = 'pathway'")) == 1  # none minted anew


async def test_the_pathway_credential_comes_back_only_when_every_part_has(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    holder = Holder(pool, platform)
    parts, stacked = await holder.earn_all()
    await suspend(holder, parts[0], "first under review")
    await suspend(holder, parts[1], "second under review")

    await reinstate(holder, parts[0])
    while_one_is_suspended = await status(holder, stacked)
    await reinstate(holder, parts[1])

    assert while_one_is_suspended is DisplayStatus.SUSPENDED
    assert await status(holder, stacked) is DisplayStatus.VALID


async def test_staffs_own_suspension_of_a_pathway_credential_is_not_lifted_by_a_part(
    pool: asyncpg.Pool, platform: Platform
) -> None:
    holder = Holder(pool, platform)
    parts, stacked = await holder.earn_all()
    await suspend(holder, stacked, "pathway awarded by mistake?")
    await suspend(holder, parts[0], "under review")

    await reinstate(holder, parts[0])

    assert await status(holder, stacked) is DisplayStatus.SUSPENDED
