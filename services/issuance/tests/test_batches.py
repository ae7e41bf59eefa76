"""Completions minted a consumer batch at a time: the result of minting them one by one, in order,
with statements per batch rather than per completion."""

import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
import pytest

from issuance import service
from issuance.service import Platform
from microcred_events import CourseCompleted, CredentialIssued, PathwayPublished

from .conftest import a_completion, a_course, a_learner, a_pathway, mint, published

pytestmark = pytest.mark.integration


@pytest.fixture
async def conn(database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database)
    try:
        yield connection
    finally:
        await connection.close()


async def course_credentials(conn: asyncpg.Connection) -> dict[UUID, asyncpg.Record]:
    """The course credentials by enrollment id (the unique constraint keeps it one each)."""
    rows = await conn.fetch(
        "SELECT enrollment_id, revocation_list_id, revocation_index, document FROM credentials"
        " WHERE kind = 'course'"
    )
    return {row["enrollment_id"]: row for row in rows}


async def issued_kinds(conn: asyncpg.Connection) -> list[str]:
    """The kinds of the CredentialIssued queued, in their order."""
    rows = await conn.fetch(
        "SELECT payload FROM outbox WHERE event_type = $1 ORDER BY id", CredentialIssued.TYPE
    )
    return [json.loads(row["payload"])["kind"] for row in rows]


async def test_a_batch_mints_what_its_completions_one_by_one_would(
    conn: asyncpg.Connection, platform: Platform
) -> None:
    course, later, other = a_course(), a_course(version=2), a_course()
    pathway = a_pathway(course, other)
    holder, newcomer = a_learner(), a_learner()  # `holder` holds `other` already
    minted_before = a_completion(course, a_learner())
    async with conn.transaction():
        for known in (course, other):
            await service.record_course(conn, platform, published(known))
        await service.record_pathway(
            conn, platform, PathwayPublished(pathway=pathway, published_at=datetime.now(UTC))
        )
        await mint(conn, platform, minted_before, a_completion(other, holder))
    before = await course_credentials(conn)
    queued_before = len(await issued_kinds(conn))

    plain = [a_completion(course, a_learner()) for _ in range(5)]
    # The same enrollment reported again, a minute later: the first report counts.
    again = plain[0].model_copy(update={"completed_at": plain[0].completed_at + timedelta(minutes=1)})
    parked = a_completion(later, a_learner())  # its course version is not known yet
    batch: list[CourseCompleted] = [
        plain[0],
        minted_before,  # already has its credential (a redelivery under another event id)
        plain[1],
        again,
        parked,
        a_completion(course, holder),  # completes the pathway
        plain[2],
        a_completion(course, newcomer),  # and, with the next, a pathway completed in one batch
        a_completion(other, newcomer),
        *plain[3:],
    ]
    async with conn.transaction():
        await mint(conn, platform, *batch)

    minted = await course_credentials(conn)
    earned = {completion.enrollment_id for completion in batch} - {parked.enrollment_id} - set(before)
    assert set(minted) == earned | set(before)
    assert minted[minted_before.enrollment_id] == before[minted_before.enrollment_id]
    awarded = json.loads(minted[plain[0].enrollment_id]["document"])["awardedDate"]
    assert awarded == plain[0].completed_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    # Every index its own, and each credential states the one it holds.
    places = {(row["revocation_list_id"], row["revocation_index"]) for row in minted.values()}
    assert len(places) == len(minted)
    for row in minted.values():
        status = json.loads(row["document"])["credentialStatus"]
        assert status["statusListIndex"] == str(row["revocation_index"])
        assert status["statusListCredential"] == platform.status_list_url(row["revocation_list_id"])
    assert await conn.fetchval("SELECT enrollment_id FROM awaiting_course_version") == parked.enrollment_id
    stacked = await conn.fetch(
        "SELECT learner_id FROM credentials WHERE kind = 'pathway' AND pathway_id = $1", pathway.pathway_id
    )
    assert sorted(row["learner_id"] for row in stacked) == sorted([holder.learner_id, newcomer.learner_id])
    assert (await issued_kinds(conn))[queued_before:] == ["course"] * len(earned) + ["pathway"] * 2

    async with conn.transaction():  # the version arrives
        await service.record_course(conn, platform, published(later))
    assert parked.enrollment_id in await course_credentials(conn)
    assert await conn.fetchval("SELECT count(*) FROM awaiting_course_version") == 0


async def test_the_statements_of_a_batch_do_not_grow_with_it(
    conn: asyncpg.Connection, platform: Platform
) -> None:
    course = a_course()
    async with conn.transaction():
        await service.record_course(conn, platform, published(course))
        await mint(conn, platform, a_completion(course, a_learner()))  # opens the status list
    statements: list[str] = []
    conn.add_query_logger(lambda logged: statements.append(logged.query))

    async def count(batch: Sequence[CourseCompleted]) -> int:
        statements.clear()
        async with conn.transaction():
            await mint(conn, platform, *batch)
        made = [query for query in statements if query.strip(" ;") not in ("BEGIN", "COMMIT")]
        # Indexes are drawn at random from a list other tests share: one that was taken already is
        # drawn again, by a further claim, as chance has it. Those claims are not the batch's size.
        claims = [query for query in made if query.startswith("INSERT INTO status_indexes")]
        chunks = -(-len(batch) // service.MINT_CHUNK)
        assert len(claims) >= chunks
        return len(made) - (len(claims) - chunks)

    one = await count([a_completion(course, a_learner())])
    fifty = await count([a_completion(course, a_learner()) for _ in range(50)])
    chunked = [a_completion(course, a_learner()) for _ in range(2 * service.MINT_CHUNK + 1)]
    three_chunks = await count(chunked)

    # Which have credentials, the locks (3), versions, the open list, its indexes, the credentials,
    # their events, the pathways of the courses: whatever the batch's size.
    assert one == fifty == 10
    # Minted a chunk at a time, so that signing never keeps the transaction idle for long: the
    # open list, its indexes, the credentials and their events again for each further chunk.
    assert three_chunks == 10 + 2 * 4
    minted = await course_credentials(conn)
    assert {completion.enrollment_id for completion in chunked} <= minted.keys()
    indexes = [(row["revocation_list_id"], row["revocation_index"]) for row in minted.values()]
    assert len(set(indexes)) == len(indexes)


class Draws:
    """Status list indexes drawn as scripted, a list per draw (one index for each credential still
    without one)."""

    def __init__(self, *draws: list[int]) -> None:
        self.draws = list(draws)

    def sample(self, population: range, k: int) -> list[int]:
        drawn = self.draws.pop(0)
        assert len(drawn) == k
        assert all(index in population for index in drawn)
        return drawn


async def mint_drawing(
    conn: asyncpg.Connection,
    platform: Platform,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
    *draws: list[int],
) -> list[tuple[UUID, int]]:
    """Mint a batch of `count` completions of a new course, drawing status list indexes as
    scripted: (list id, index) of each credential, in the batch's order."""
    course = a_course()
    completions = [a_completion(course, a_learner()) for _ in range(count)]
    scripted = Draws(*draws)
    monkeypatch.setattr(service, "_random", scripted)
    async with conn.transaction():
        await service.record_course(conn, platform, published(course))
        await mint(conn, platform, *completions)
    assert scripted.draws == []
    minted = await course_credentials(conn)
    return [
        (minted[c.enrollment_id]["revocation_list_id"], minted[c.enrollment_id]["revocation_index"])
        for c in completions
    ]


async def open_list_with_indexes_0_to_9_taken(
    conn: asyncpg.Connection, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> UUID:
    ((list_id, _),) = await mint_drawing(conn, platform, monkeypatch, 1, [0])
    await conn.execute(
        "INSERT INTO status_indexes (list_id, list_index) SELECT $1, generate_series(1, 9)", list_id
    )
    return list_id


async def test_a_credential_that_draws_taken_indexes_eight_times_in_a_row_opens_a_new_list(
    conn: asyncpg.Connection, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_list = await open_list_with_indexes_0_to_9_taken(conn, platform, monkeypatch)

    places = await mint_drawing(
        conn,
        platform,
        monkeypatch,
        3,
        [0, 11, 1],  # one credential takes 11; the other two drew taken indexes
        *[[2, 3]] * 7,  # and draw taken ones seven times more: eight in a row, the list is full
        [5, 6],  # in the new list
    )

    second_list = await conn.fetchval("SELECT list_id FROM status_lists WHERE NOT is_full")
    assert second_list != first_list
    assert places == [(first_list, 11), (second_list, 5), (second_list, 6)]


async def test_a_credential_that_draws_a_free_index_at_the_eighth_attempt_keeps_the_list(
    conn: asyncpg.Connection, platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    first_list = await open_list_with_indexes_0_to_9_taken(conn, platform, monkeypatch)

    places = await mint_drawing(conn, platform, monkeypatch, 1, *[[index] for index in range(7)], [12])

    assert places == [(first_list, 12)]
    assert await conn.fetchval("SELECT count(*) FROM status_lists") == 1
