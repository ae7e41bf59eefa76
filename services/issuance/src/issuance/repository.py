"""Issuance's tables, as plain SQL."""

import hashlib
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from uuid import UUID

import asyncpg

from microcred_events import (
    CourseCompleted,
    CourseSnapshot,
    CredentialKind,
    Issuer,
    Learner,
    PathwaySnapshot,
)
from microcred_runtime import Connection

from .domain import Credential, StatusChange

# --- serialization: transaction-level advisory locks -----------------------------------------
#
# Released at commit or rollback. The key is the first 64 bits of a SHA-256 of a namespaced
# name ("issuance.course:<uuid>"): the same in every replica and process (unlike Python's hash),
# and a collision (about 2**-64 per pair, with the runtime's two fixed keys too) would only make
# two unrelated transactions take turns, never a wrong result. What each lock serializes and in
# which order they are taken is said in service.py.

# How long, in all, a transaction waits for these locks (PostgreSQL's lock_timeout, set for these
# waits only, to what is left of it since the first began). Their holders are consumers' batches
# and sweeper finds, seconds long; one held this long is stuck (e.g. its process frozen
# mid-transaction, and not yet ended by `IDLE_HOLDER_TIMEOUT`). A quarter of the default
# CONSUMER_MAX_POLL_INTERVAL_SECONDS (300 s): a batch starts no step after half of it, and a step
# that then waits this long, over all of its events' locks, still ends, pauses and polls in the
# other half, so its consumer is not taken for dead and its partitions do not move to a replica
# that would wait the same.
LOCK_TIMEOUT = "75s"

# How long a transaction that took one of these locks may sit idle before PostgreSQL ends its
# session, and with it the transaction and its locks (idle_in_transaction_session_timeout, set for
# the rest of the transaction). Between two statements a holder waits for nothing but its own work
# on the event loop, the longest being signing a chunk of credentials (service.MINT_CHUNK): about
# a CPU-millisecond each, well under a second even on a loaded machine. No Kafka (the
# outbox is a table, offsets are committed after the COMMIT, dead letters and retry pauses come
# between transactions) and no HTTP. One idle this long is stuck: its process frozen, or its host
# gone, which PostgreSQL would otherwise notice only when TCP keepalives give up (about two hours
# by default). Well within LOCK_TIMEOUT, so those waiting for it proceed; if the holder wakes, it
# finds its connection closed: an outage, and its batch is redelivered.
IDLE_HOLDER_TIMEOUT = "30s"

# The transaction's first lock wait sets its deadline (a setting of the transaction's own, gone at
# its end); each wait gets what is left of it, at least 1 ms (0 would be no limit).
_BOUND_WAITS = """
    SELECT set_config('idle_in_transaction_session_timeout', $2, true),
           set_config('lock_timeout',
                      greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000))::text, true)
    FROM (SELECT coalesce(
        nullif(current_setting('issuance.lock_wait_deadline', true), '')::timestamptz,
        set_config('issuance.lock_wait_deadline', (clock_timestamp() + $1::text::interval)::text, true)
            ::timestamptz
    ) AS deadline) waits
"""


class LockWaitTimedOut(TimeoutError):
    """The locks were not granted within `LOCK_TIMEOUT`. A TimeoutError, so the runtime takes it for
    an outage (`is_outage`): the consumer's batch is rolled back and redelivered after a pause, not
    retried as the event's failure and then dead-lettered, the event being in no way at fault."""


def lock_key(namespace: str, identifier: UUID | str) -> int:
    digest = hashlib.sha256(f"issuance.{namespace}:{identifier}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def lock_courses(conn: Connection, course_ids: Iterable[UUID], *, exclusive: bool) -> None:
    """Lock courses, in ascending key order (the same order in every transaction)."""
    function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    await _lock(conn, function, {lock_key("course", course_id) for course_id in course_ids})


async def lock_learners(conn: Connection, learner_ids: Iterable[UUID]) -> None:
    """Lock learners, in ascending key order."""
    await _lock(
        conn, "pg_advisory_xact_lock", {lock_key("learner", learner_id) for learner_id in learner_ids}
    )


async def _lock(conn: Connection, function: str, keys: set[int]) -> None:
    if not keys:
        return
    await conn.execute(_BOUND_WAITS, LOCK_TIMEOUT, IDLE_HOLDER_TIMEOUT)
    try:
        # All in one statement: unnest gives the keys in the array's (ascending) order, and each is
        # locked as its row is counted, so in that order (the functions are parallel restricted:
        # never in a worker).
        await conn.execute(f"SELECT count({function}(key)) FROM unnest($1::bigint[]) AS key", sorted(keys))
    except asyncpg.LockNotAvailableError as exc:
        raise LockWaitTimedOut(
            f"advisory locks were not granted within {LOCK_TIMEOUT} in all: another transaction holds one"
        ) from exc
    # The rest of the transaction waits (rows, the inbox) as the session would have it.
    await conn.execute("SET LOCAL lock_timeout TO DEFAULT")


async def try_lock_full_sweep(conn: Connection) -> bool:
    """Take the lock of the sweeper's full pass for the connection's session unless another session
    holds it (another replica's full pass): True when taken. Held until the session releases it, or
    ends; a pooled connection's reset releases it (asyncpg's `Connection.reset`)."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key("sweep", "full")))


# --- the catalog read model ------------------------------------------------------------------


async def record_course_version(conn: Connection, course: CourseSnapshot) -> bool:
    """Keep this version of the course; False when it was already held (a redelivery)."""
    stored = await conn.fetchval(
        "INSERT INTO course_versions (course_id, version, snapshot) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING RETURNING true",
        course.course_id,
        course.version,
        course.model_dump_json(),
    )
    return bool(stored)


async def course_versions(
    conn: Connection, wanted: Collection[tuple[UUID, int]]
) -> dict[tuple[UUID, int], CourseSnapshot]:
    """The versions held of those wanted, by (course id, version)."""
    rows = await conn.fetch(
        "SELECT course_id, version, snapshot FROM course_versions"
        " WHERE (course_id, version) IN (SELECT * FROM unnest($1::uuid[], $2::bigint[]))",
        [course_id for course_id, _ in wanted],
        [version for _, version in wanted],
    )
    return {
        (row["course_id"], row["version"]): CourseSnapshot.model_validate_json(row["snapshot"])
        for row in rows
    }


async def record_issuer(conn: Connection, issuer: Issuer) -> None:
    """The institution's latest name and home page (every snapshot carries them)."""
    await conn.execute(
        "INSERT INTO issuers (issuer_id, name, url) VALUES ($1, $2, $3)"
        " ON CONFLICT (issuer_id) DO UPDATE SET name = EXCLUDED.name, url = EXCLUDED.url, updated_at = now()",
        issuer.issuer_id,
        issuer.name,
        str(issuer.url),
    )


async def issuer_known(conn: Connection, issuer_id: UUID) -> bool:
    return bool(await conn.fetchval("SELECT true FROM issuers WHERE issuer_id = $1", issuer_id))


async def record_pathway(conn: Connection, pathway: PathwaySnapshot) -> bool:
    """Store the pathway unless a same-or-newer version is held; True when stored."""
    stored = await conn.fetchval(
        """
        INSERT INTO pathways (pathway_id, version, course_ids, snapshot) VALUES ($1, $2, $3, $4)
        ON CONFLICT (pathway_id) DO UPDATE SET
            version = EXCLUDED.version, course_ids = EXCLUDED.course_ids,
            snapshot = EXCLUDED.snapshot, updated_at = now()
        WHERE pathways.version < EXCLUDED.version
        RETURNING true
        """,
        pathway.pathway_id,
        pathway.version,
        list(pathway.course_ids),
        pathway.model_dump_json(),
    )
    return bool(stored)


async def pathway(conn: Connection, pathway_id: UUID) -> PathwaySnapshot | None:
    snapshot = await conn.fetchval("SELECT snapshot FROM pathways WHERE pathway_id = $1", pathway_id)
    return PathwaySnapshot.model_validate_json(snapshot) if snapshot else None


async def pathways_with_courses(conn: Connection, course_ids: Collection[UUID]) -> list[PathwaySnapshot]:
    """The pathways with any of these courses, by pathway id."""
    rows = await conn.fetch(
        "SELECT snapshot FROM pathways WHERE course_ids && $1::uuid[] ORDER BY pathway_id", list(course_ids)
    )
    return [PathwaySnapshot.model_validate_json(row["snapshot"]) for row in rows]


# --- completions waiting for their course version --------------------------------------------


async def park_completions(conn: Connection, completions: Sequence[CourseCompleted]) -> None:
    if not completions:
        return
    await conn.execute(
        "INSERT INTO awaiting_course_version (enrollment_id, course_id, course_version, completion)"
        " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::jsonb[])"
        " ON CONFLICT (enrollment_id) DO NOTHING",
        [completion.enrollment_id for completion in completions],
        [completion.course_id for completion in completions],
        [completion.course_version for completion in completions],
        [completion.model_dump_json() for completion in completions],
    )


async def take_parked_completions(conn: Connection, course_id: UUID, version: int) -> list[CourseCompleted]:
    """Remove and return the completions that waited for this course version."""
    rows = await conn.fetch(
        "DELETE FROM awaiting_course_version WHERE course_id = $1 AND course_version = $2"
        " RETURNING completion",
        course_id,
        version,
    )
    return [CourseCompleted.model_validate_json(row["completion"]) for row in rows]


async def parked_with_known_version(
    conn: Connection, *, after: tuple[UUID, UUID] | None, limit: int
) -> list[tuple[UUID, UUID]]:
    """Parked completions whose course version is held: (enrollment id, course id), in that order,
    those after `after` (None: from the first).

    Recording a version takes what waited for it in the same transaction, so any row found here
    was left behind."""
    rows = await conn.fetch(
        """
        SELECT a.enrollment_id, a.course_id FROM awaiting_course_version a
        JOIN course_versions v ON v.course_id = a.course_id AND v.version = a.course_version
        WHERE $1::uuid IS NULL OR (a.enrollment_id, a.course_id) > ($1, $2::uuid)
        ORDER BY a.enrollment_id, a.course_id
        LIMIT $3
        """,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [(row["enrollment_id"], row["course_id"]) for row in rows]


async def take_parked_completion(conn: Connection, enrollment_id: UUID) -> CourseCompleted | None:
    """Remove and return one parked completion if its course version is held (else leave it)."""
    completion = await conn.fetchval(
        """
        DELETE FROM awaiting_course_version a WHERE enrollment_id = $1
          AND EXISTS (SELECT FROM course_versions v
                      WHERE v.course_id = a.course_id AND v.version = a.course_version)
        RETURNING completion
        """,
        enrollment_id,
    )
    return CourseCompleted.model_validate_json(completion) if completion else None


# --- credentials -----------------------------------------------------------------------------

# A credential's columns and their types, in the order of `_values`.
_COLUMN_TYPES = {
    "credential_id": "uuid",
    "kind": "text",
    "learner_id": "uuid",
    "learner_email": "text",
    "learner_display_name": "text",
    "enrollment_id": "uuid",
    "course_id": "uuid",
    "course_version": "bigint",
    "pathway_id": "uuid",
    "pathway_version": "bigint",
    "issuer_id": "uuid",
    "achievement_id": "uuid",
    "achievement_name": "text",
    "document": "text",
    "document_sha256": "text",
    "issued_at": "timestamptz",
    "valid_until": "timestamptz",
    "revocation_list_id": "uuid",
    "revocation_index": "integer",
    "revoked_at": "timestamptz",
    "revocation_reason": "text",
    "suspended_at": "timestamptz",
    "suspension_reason": "text",
}
_COLUMNS = ", ".join(_COLUMN_TYPES)
_ARRAYS = ", ".join(f"${number}::{type_}[]" for number, type_ in enumerate(_COLUMN_TYPES.values(), 1))


def _credential(row: asyncpg.Record) -> Credential:
    return Credential(
        credential_id=row["credential_id"],
        kind=CredentialKind(row["kind"]),
        learner=Learner(
            learner_id=row["learner_id"],
            email=row["learner_email"],
            display_name=row["learner_display_name"],
        ),
        enrollment_id=row["enrollment_id"],
        course_id=row["course_id"],
        course_version=row["course_version"],
        pathway_id=row["pathway_id"],
        pathway_version=row["pathway_version"],
        issuer_id=row["issuer_id"],
        achievement_id=row["achievement_id"],
        achievement_name=row["achievement_name"],
        document=row["document"],
        document_sha256=row["document_sha256"],
        issued_at=row["issued_at"],
        valid_until=row["valid_until"],
        revocation_list_id=row["revocation_list_id"],
        revocation_index=row["revocation_index"],
        revoked_at=row["revoked_at"],
        revocation_reason=row["revocation_reason"],
        suspended_at=row["suspended_at"],
        suspension_reason=row["suspension_reason"],
    )


def _values(credential: Credential) -> tuple[object, ...]:
    return (
        credential.credential_id,
        credential.kind,
        credential.learner.learner_id,
        credential.learner.email,
        credential.learner.display_name,
        credential.enrollment_id,
        credential.course_id,
        credential.course_version,
        credential.pathway_id,
        credential.pathway_version,
        credential.issuer_id,
        credential.achievement_id,
        credential.achievement_name,
        credential.document,
        credential.document_sha256,
        credential.issued_at,
        credential.valid_until,
        credential.revocation_list_id,
        credential.revocation_index,
        credential.revoked_at,
        credential.revocation_reason,
        credential.suspended_at,
        credential.suspension_reason,
    )


async def insert_credentials(conn: Connection, credentials: Sequence[Credential]) -> None:
    """Record new credentials, in one statement. A second course credential for an enrollment, or a
    second live pathway credential, violates a unique constraint: the caller's transaction fails and
    is retried, and the retry finds the credential that won."""
    if not credentials:
        return
    columns = zip(*map(_values, credentials), strict=True)
    await conn.execute(
        f"INSERT INTO credentials ({_COLUMNS}) SELECT * FROM unnest({_ARRAYS})", *map(list, columns)
    )


async def get_credential(
    conn: Connection, credential_id: UUID, *, for_update: bool = False
) -> Credential | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM credentials WHERE credential_id = $1{lock}", credential_id
    )
    return _credential(row) if row else None


async def credentials_for_enrollments(conn: Connection, enrollment_ids: Collection[UUID]) -> dict[UUID, UUID]:
    """The credential ids of those of these enrollments that have one, by enrollment id."""
    rows = await conn.fetch(
        "SELECT enrollment_id, credential_id FROM credentials WHERE enrollment_id = ANY($1::uuid[])",
        list(enrollment_ids),
    )
    return {row["enrollment_id"]: row["credential_id"] for row in rows}


async def save_status(conn: Connection, credential: Credential) -> None:
    """Write a credential's status back; nothing else of a credential ever changes."""
    await conn.execute(
        "UPDATE credentials SET revoked_at = $2, revocation_reason = $3, suspended_at = $4,"
        " suspension_reason = $5 WHERE credential_id = $1",
        credential.credential_id,
        credential.revoked_at,
        credential.revocation_reason,
        credential.suspended_at,
        credential.suspension_reason,
    )


async def record_status_change(
    conn: Connection,
    credential_id: UUID,
    change: str,
    reason: str | None,
    actor: str,
    at: datetime,
    *,
    caused_by: UUID | None = None,
) -> None:
    """`caused_by`: the course credential whose change cascaded to this (pathway) credential."""
    await conn.execute(
        "INSERT INTO credential_status_changes (credential_id, change, reason, actor, changed_at, caused_by)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        credential_id,
        change,
        reason,
        actor,
        at,
        caused_by,
    )


async def suspended_by_cascade(conn: Connection, learner_id: UUID) -> list[Credential]:
    """The learner's pathway credentials suspended because a part was (their latest status change
    has a cause; staff's own suspensions have none), locked."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM credentials c
        WHERE c.learner_id = $1 AND c.kind = 'pathway' AND c.suspended_at IS NOT NULL
          AND (SELECT s.caused_by FROM credential_status_changes s
               WHERE s.credential_id = c.credential_id ORDER BY s.id DESC LIMIT 1) IS NOT NULL
        ORDER BY c.credential_id FOR UPDATE
        """,
        learner_id,
    )
    return [_credential(row) for row in rows]


async def status_changes(conn: Connection, credential_id: UUID) -> list[StatusChange]:
    """A credential's status changes, oldest first."""
    rows = await conn.fetch(
        "SELECT change, reason, actor, changed_at FROM credential_status_changes"
        " WHERE credential_id = $1 ORDER BY id",
        credential_id,
    )
    return [StatusChange(row["change"], row["reason"], row["actor"], row["changed_at"]) for row in rows]


async def list_credentials(
    conn: Connection, learner_id: UUID | None, *, after: tuple[datetime, UUID] | None, limit: int
) -> list[Credential]:
    """Credentials newest first, of one learner or of everyone, starting after the sort key `after`."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM credentials
        WHERE ($1::uuid IS NULL OR learner_id = $1)
          AND ($2::timestamptz IS NULL OR (issued_at, credential_id) < ($2, $3::uuid))
        ORDER BY issued_at DESC, credential_id DESC
        LIMIT $4
        """,
        learner_id,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [_credential(row) for row in rows]


async def current_course_ids(conn: Connection, learner_id: UUID, now: datetime) -> set[UUID]:
    """The courses the learner holds a current credential for: not revoked, suspended or expired."""
    rows = await conn.fetch(
        "SELECT DISTINCT course_id FROM credentials"
        " WHERE learner_id = $1 AND kind = 'course' AND revoked_at IS NULL AND suspended_at IS NULL"
        " AND (valid_until IS NULL OR valid_until > $2)",
        learner_id,
        now,
    )
    return {row["course_id"] for row in rows}


async def not_in_good_standing(conn: Connection, credential_ids: Sequence[UUID]) -> bool:
    """Whether any of these credentials is revoked or suspended."""
    return bool(
        credential_ids
        and await conn.fetchval(
            "SELECT EXISTS (SELECT FROM credentials WHERE credential_id = ANY($1::uuid[])"
            " AND (revoked_at IS NOT NULL OR suspended_at IS NOT NULL))",
            list(credential_ids),
        )
    )


async def revoked_among(conn: Connection, credential_ids: Sequence[UUID]) -> list[UUID]:
    """Those of these credentials that are revoked."""
    if not credential_ids:
        return []
    rows = await conn.fetch(
        "SELECT credential_id FROM credentials"
        " WHERE credential_id = ANY($1::uuid[]) AND revoked_at IS NOT NULL ORDER BY credential_id",
        list(credential_ids),
    )
    return [row["credential_id"] for row in rows]


async def live_pathway_credentials(conn: Connection, learner_id: UUID) -> list[Credential]:
    """The learner's pathway credentials that are not revoked, locked for a status change."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM credentials WHERE learner_id = $1 AND kind = 'pathway'"
        " AND revoked_at IS NULL ORDER BY credential_id FOR UPDATE",
        learner_id,
    )
    return [_credential(row) for row in rows]


async def current_course_credentials(
    conn: Connection, learner_id: UUID, course_ids: Sequence[UUID], now: datetime
) -> dict[UUID, tuple[UUID, str]]:
    """The learner's newest current credential for each of these courses: (id, name) by course."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (course_id) course_id, credential_id, achievement_name FROM credentials"
        " WHERE learner_id = $1 AND kind = 'course' AND course_id = ANY($2::uuid[])"
        " AND revoked_at IS NULL AND suspended_at IS NULL AND (valid_until IS NULL OR valid_until > $3)"
        " ORDER BY course_id, issued_at DESC",
        learner_id,
        list(course_ids),
        now,
    )
    return {row["course_id"]: (row["credential_id"], row["achievement_name"]) for row in rows}


async def learners_holding_all(conn: Connection, course_ids: list[UUID], now: datetime) -> list[UUID]:
    """Learners with a current credential for every one of these courses."""
    rows = await conn.fetch(
        """
        SELECT learner_id FROM credentials
        WHERE kind = 'course' AND course_id = ANY($1::uuid[])
          AND revoked_at IS NULL AND suspended_at IS NULL AND (valid_until IS NULL OR valid_until > $2)
        GROUP BY learner_id
        HAVING count(DISTINCT course_id) = cardinality($1::uuid[])
        ORDER BY learner_id
        """,
        course_ids,
        now,
    )
    return [row["learner_id"] for row in rows]


# A learner is missing a pathway credential when they hold a current credential for every course
# of the pathway and no pathway credential stands: none is live, and none was revoked after the
# latest of those course credentials was issued (staff's revocation stands until a course
# credential earned since earns it again). Stacking decides by it too. `r` names the candidates
# (learner_id, pathway_id, course_ids); $1 is the time that decides whether a credential is current.
_MISSING_PATHWAY = """
    CROSS JOIN LATERAL (
        SELECT array_agg(DISTINCT h.course_id) AS course_ids, max(h.issued_at) AS latest
        FROM credentials h
        WHERE h.learner_id = r.learner_id AND h.kind = 'course' AND h.course_id = ANY (r.course_ids)
          AND h.revoked_at IS NULL AND h.suspended_at IS NULL
          AND (h.valid_until IS NULL OR h.valid_until > $1)
    ) held
    WHERE held.course_ids @> r.course_ids
      AND NOT EXISTS (
        SELECT FROM credentials pc
        WHERE pc.learner_id = r.learner_id AND pc.pathway_id = r.pathway_id AND pc.kind = 'pathway'
          AND (pc.revoked_at IS NULL OR pc.revoked_at >= held.latest)
      )
"""
_EARLIEST = datetime.min.replace(tzinfo=UTC)


async def missing_pathway_credentials(
    conn: Connection,
    now: datetime,
    *,
    issued_since: datetime | None,
    after: tuple[UUID, UUID] | None,
    limit: int,
) -> list[tuple[UUID, UUID]]:
    """(learner id, pathway id) of learners missing a pathway credential, in that order, among those
    holding a course credential of the pathway issued since `issued_since` (None: every learner),
    those after `after` (None: from the first).

    Minting a course credential or recording a pathway mints the pathway credentials it completes
    in the same transaction, so whatever is found here was left behind."""
    rows = await conn.fetch(
        f"""
        WITH r AS (
            SELECT DISTINCT c.learner_id, p.pathway_id, p.course_ids
            FROM credentials c JOIN pathways p ON c.course_id = ANY (p.course_ids)
            WHERE c.kind = 'course' AND c.issued_at >= $2
              AND ($3::uuid IS NULL OR (c.learner_id, p.pathway_id) > ($3, $4::uuid))
        )
        SELECT r.learner_id, r.pathway_id FROM r
        {_MISSING_PATHWAY}
        ORDER BY r.learner_id, r.pathway_id
        LIMIT $5
        """,
        now,
        issued_since or _EARLIEST,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [(row["learner_id"], row["pathway_id"]) for row in rows]


async def misses_pathway_credential(
    conn: Connection, learner_id: UUID, pathway: PathwaySnapshot, now: datetime
) -> bool:
    """Whether the learner is missing this pathway's credential (see `missing_pathway_credentials`)."""
    return bool(
        await conn.fetchval(
            f"""
            SELECT true FROM (SELECT $2::uuid AS learner_id, $3::uuid AS pathway_id,
                                     $4::uuid[] AS course_ids) r
            {_MISSING_PATHWAY}
            """,
            now,
            learner_id,
            pathway.pathway_id,
            list(pathway.course_ids),
        )
    )


async def latest_learner(conn: Connection, learner_id: UUID) -> Learner | None:
    """The learner as their latest course credential names them."""
    row = await conn.fetchrow(
        "SELECT learner_email, learner_display_name FROM credentials"
        " WHERE learner_id = $1 AND kind = 'course' ORDER BY issued_at DESC, credential_id DESC LIMIT 1",
        learner_id,
    )
    if row is None:
        return None
    return Learner(
        learner_id=learner_id, email=row["learner_email"], display_name=row["learner_display_name"]
    )


async def is_suspended(conn: Connection, credential_id: UUID) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT suspended_at IS NOT NULL FROM credentials WHERE credential_id = $1", credential_id
        )
    )


# --- status lists ----------------------------------------------------------------------------


async def open_status_list(conn: Connection, purpose: str) -> tuple[UUID, int] | None:
    """The list of this purpose that new credentials take indexes from, and its size."""
    row = await conn.fetchrow(
        "SELECT list_id, size FROM status_lists WHERE purpose = $1 AND NOT is_full", purpose
    )
    return (row["list_id"], row["size"]) if row else None


async def create_status_list(
    conn: Connection, list_id: UUID, purpose: str, bits: bytes, document: str, now: datetime
) -> bool:
    """Open a new list; False when another transaction opened one first (use that one)."""
    created = await conn.fetchval(
        "INSERT INTO status_lists (list_id, purpose, size, bits, document, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $6)"
        " ON CONFLICT (purpose) WHERE NOT is_full DO NOTHING RETURNING true",
        list_id,
        purpose,
        len(bits) * 8,
        bits,
        document,
        now,
    )
    return bool(created)


async def claim_status_indexes(conn: Connection, list_id: UUID, indexes: Collection[int]) -> set[int]:
    """Take these indexes of the list, in one statement; returns those taken now, without those
    taken already (or being taken by a concurrent transaction)."""
    # In ascending order: two transactions claiming some of the same indexes, each waiting for the
    # other's, always wait in the same direction, never for each other.
    rows = await conn.fetch(
        "INSERT INTO status_indexes (list_id, list_index)"
        " SELECT $1, index FROM unnest($2::integer[]) AS index"
        " ON CONFLICT DO NOTHING RETURNING list_index",
        list_id,
        sorted(indexes),
    )
    return {row["list_index"] for row in rows}


async def close_status_list(conn: Connection, list_id: UUID) -> None:
    await conn.execute("UPDATE status_lists SET is_full = true WHERE list_id = $1", list_id)


async def status_list_bits(
    conn: Connection, list_id: UUID, *, for_update: bool = False
) -> tuple[str, bytes] | None:
    """A list's purpose and bits."""
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT purpose, bits FROM status_lists WHERE list_id = $1{lock}", list_id)
    return (row["purpose"], bytes(row["bits"])) if row else None


async def save_status_list(
    conn: Connection, list_id: UUID, bits: bytes, document: str, now: datetime
) -> None:
    await conn.execute(
        "UPDATE status_lists SET bits = $2, document = $3, updated_at = $4 WHERE list_id = $1",
        list_id,
        bits,
        document,
        now,
    )


async def status_list_document(conn: Connection, list_id: UUID) -> str | None:
    document: str | None = await conn.fetchval(
        "SELECT document FROM status_lists WHERE list_id = $1", list_id
    )
    return document
