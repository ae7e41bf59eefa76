"""Enrollment's tables, as plain SQL."""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from microcred_events import (
    CancellationReason,
    CompletedBy,
    CompletionReported,
    CourseSnapshot,
    CredentialIssued,
    CredentialReinstated,
    CredentialRevoked,
    Learner,
    Money,
    StatusPurpose,
)
from microcred_runtime import Connection

from .domain import (
    Completion,
    Course,
    CourseStatus,
    Credential,
    CredentialKind,
    Enrollment,
    EnrollmentStatus,
    Partner,
    PartnerStatus,
)

# --- the course read model -------------------------------------------------------------------


async def upsert_course(
    conn: Connection, course: CourseSnapshot, status: CourseStatus | None, at: datetime
) -> bool:
    """Store the snapshot unless a same-or-newer version is already held; True when stored.

    `status` None keeps the stored status (an update does not reopen a retired course), and
    means published for a course not seen before.
    """
    stored = await conn.fetchval(
        """
        INSERT INTO courses (course_id, version, status, title, price_minor, currency, snapshot, updated_at)
        VALUES ($1, $2, coalesce($3, 'published'), $4, $5, $6, $7, $8)
        ON CONFLICT (course_id) DO UPDATE SET
            version = EXCLUDED.version, status = coalesce($3, courses.status), title = EXCLUDED.title,
            price_minor = EXCLUDED.price_minor, currency = EXCLUDED.currency,
            snapshot = EXCLUDED.snapshot, updated_at = EXCLUDED.updated_at
        WHERE courses.version < EXCLUDED.version
        RETURNING true
        """,
        course.course_id,
        course.version,
        status,
        course.title,
        course.price.amount_minor,
        course.price.currency,
        course.model_dump_json(),
        at,
    )
    return bool(stored)


async def retire_course(conn: Connection, course_id: UUID, version: int, at: datetime) -> bool:
    """Mark the course retired at `version`; a tombstone when it was never seen published."""
    stored = await conn.fetchval(
        """
        INSERT INTO courses (course_id, version, status, updated_at) VALUES ($1, $2, 'retired', $3)
        ON CONFLICT (course_id) DO UPDATE SET
            version = EXCLUDED.version, status = 'retired', updated_at = EXCLUDED.updated_at
        WHERE courses.version < EXCLUDED.version
        RETURNING true
        """,
        course_id,
        version,
        at,
    )
    return bool(stored)


async def get_course(conn: Connection, course_id: UUID) -> Course | None:
    """The course, share-locked: a retirement waits for the enrollment being made to commit, and
    then sees (and cancels) it if it is still pending."""
    return (await courses(conn, [course_id])).get(course_id)


async def courses(conn: Connection, course_ids: Iterable[UUID]) -> dict[UUID, Course]:
    """The courses known of these, share-locked (see `get_course`), in id order."""
    rows = await conn.fetch(
        "SELECT course_id, version, status, price_minor, currency,"
        " (snapshot ->> 'delivery_partner_id')::uuid AS delivery_partner_id,"
        " (snapshot -> 'issuer' ->> 'issuer_id')::uuid AS issuer_id"
        " FROM courses WHERE course_id = ANY($1::uuid[]) ORDER BY course_id FOR SHARE",
        sorted(set(course_ids)),
    )
    return {row["course_id"]: _course(row) for row in rows}


def _course(row: asyncpg.Record) -> Course:
    price = (
        Money(amount_minor=row["price_minor"], currency=row["currency"])
        if row["price_minor"] is not None
        else None
    )
    return Course(
        row["course_id"],
        row["version"],
        CourseStatus(row["status"]),
        price,
        row["delivery_partner_id"],
        row["issuer_id"],
    )


async def course_issuer(conn: Connection, course_id: UUID) -> UUID | None:
    """The institution that issues the course's credential, as the read model last saw it."""
    issuer_id: UUID | None = await conn.fetchval(
        "SELECT (snapshot -> 'issuer' ->> 'issuer_id')::uuid FROM courses WHERE course_id = $1", course_id
    )
    return issuer_id


# --- enrollments -----------------------------------------------------------------------------

_COLUMN_NAMES = (
    "enrollment_id",
    "learner_id",
    "learner_email",
    "learner_display_name",
    "course_id",
    "course_version",
    "price_minor",
    "currency",
    "status",
    "created_at",
    "updated_at",
    "activated_at",
    "payment_id",
    "cancelled_at",
    "cancellation_reason",
    "cancellation_detail",
    "cancelled_by",
    "completed_at",
    "completed_by",
    "score",
    "evidence_url",
    "completion_recorded_by",
    "partner_id",
    "partner_report_id",
)
_COLUMNS = ", ".join(_COLUMN_NAMES)


def _enrollment(row: asyncpg.Record) -> Enrollment:
    completion = None
    if row["completed_at"] is not None:
        completion = Completion(
            completed_at=row["completed_at"],
            completed_by=CompletedBy(row["completed_by"]),
            score=row["score"],
            evidence_url=row["evidence_url"],
            recorded_by=row["completion_recorded_by"],
            partner_id=row["partner_id"],
            partner_report_id=row["partner_report_id"],
        )
    reason = row["cancellation_reason"]
    return Enrollment(
        enrollment_id=row["enrollment_id"],
        learner=Learner(
            learner_id=row["learner_id"],
            email=row["learner_email"],
            display_name=row["learner_display_name"],
        ),
        course_id=row["course_id"],
        course_version=row["course_version"],
        price=Money(amount_minor=row["price_minor"], currency=row["currency"]),
        status=EnrollmentStatus(row["status"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        activated_at=row["activated_at"],
        payment_id=row["payment_id"],
        cancelled_at=row["cancelled_at"],
        cancellation_reason=CancellationReason(reason) if reason else None,
        cancellation_detail=row["cancellation_detail"],
        cancelled_by=row["cancelled_by"],
        completion=completion,
    )


def _values(enrollment: Enrollment) -> tuple[Any, ...]:
    """The enrollment as the values of `_COLUMNS`, in order."""
    completion = enrollment.completion
    return (
        enrollment.enrollment_id,
        enrollment.learner.learner_id,
        enrollment.learner.email,
        enrollment.learner.display_name,
        enrollment.course_id,
        enrollment.course_version,
        enrollment.price.amount_minor,
        enrollment.price.currency,
        enrollment.status,
        enrollment.created_at,
        enrollment.updated_at,
        enrollment.activated_at,
        enrollment.payment_id,
        enrollment.cancelled_at,
        enrollment.cancellation_reason,
        enrollment.cancellation_detail,
        enrollment.cancelled_by,
        completion.completed_at if completion else None,
        completion.completed_by if completion else None,
        completion.score if completion else None,
        completion.evidence_url if completion else None,
        completion.recorded_by if completion else None,
        completion.partner_id if completion else None,
        completion.partner_report_id if completion else None,
    )


_PLACEHOLDERS = ", ".join(f"${number}" for number in range(1, len(_COLUMN_NAMES) + 1))


async def insert_enrollment(conn: Connection, enrollment: Enrollment) -> bool:
    """Insert a new enrollment; False when the learner already has a live one in the course.

    The partial unique index decides, so two concurrent requests cannot both get in.
    """
    inserted = await conn.fetchval(
        f"INSERT INTO enrollments ({_COLUMNS}) VALUES ({_PLACEHOLDERS})"
        " ON CONFLICT (learner_id, course_id) WHERE status IN ('pending_payment', 'active') DO NOTHING"
        " RETURNING true",
        *_values(enrollment),
    )
    return bool(inserted)


async def record_held_credentials(conn: Connection, events: Sequence[CredentialIssued]) -> None:
    if not events:
        return
    await conn.execute(
        "INSERT INTO held_credentials (credential_id, learner_id, course_id, valid_until)"
        " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[])"
        " ON CONFLICT (credential_id) DO NOTHING",
        [event.credential_id for event in events],
        [event.learner_id for event in events],
        [event.course_id for event in events],
        [event.valid_until for event in events],
    )


async def record_held_credential_status(
    conn: Connection, event: CredentialRevoked | CredentialReinstated
) -> None:
    """A pathway credential's (not held here) changes nothing."""
    if isinstance(event, CredentialReinstated):
        await conn.execute(
            "UPDATE held_credentials SET suspended_at = NULL WHERE credential_id = $1", event.credential_id
        )
    elif event.status_purpose is StatusPurpose.REVOCATION:
        await conn.execute(
            "UPDATE held_credentials SET revoked_at = $2, suspended_at = NULL WHERE credential_id = $1",
            event.credential_id,
            event.revoked_at,
        )
    else:
        await conn.execute(
            "UPDATE held_credentials SET suspended_at = $2 WHERE credential_id = $1 AND revoked_at IS NULL",
            event.credential_id,
            event.revoked_at,
        )


async def valid_credential_for(
    conn: Connection, learner_id: UUID, course_id: UUID, now: datetime
) -> UUID | None:
    """A credential for the course that the learner holds and that is valid now, if any."""
    credential_id: UUID | None = await conn.fetchval(
        "SELECT credential_id FROM held_credentials WHERE learner_id = $1 AND course_id = $2"
        " AND revoked_at IS NULL AND suspended_at IS NULL AND (valid_until IS NULL OR valid_until > $3)"
        " ORDER BY credential_id LIMIT 1",
        learner_id,
        course_id,
        now,
    )
    return credential_id


async def live_enrollment_id(conn: Connection, learner_id: UUID, course_id: UUID) -> UUID | None:
    enrollment_id: UUID | None = await conn.fetchval(
        "SELECT enrollment_id FROM enrollments"
        " WHERE learner_id = $1 AND course_id = $2 AND status IN ('pending_payment', 'active')",
        learner_id,
        course_id,
    )
    return enrollment_id


async def get_enrollment(
    conn: Connection, enrollment_id: UUID, *, for_update: bool = False
) -> Enrollment | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM enrollments WHERE enrollment_id = $1{lock}", enrollment_id
    )
    return _enrollment(row) if row else None


async def save_enrollment(conn: Connection, enrollment: Enrollment) -> None:
    """Write an enrollment's state back; the learner, course and price never change."""
    await save_enrollments(conn, [enrollment])


async def save_enrollments(conn: Connection, enrollments: Sequence[Enrollment]) -> None:
    """`save_enrollment` of each, in one round trip."""
    await conn.executemany(
        """
        UPDATE enrollments SET
            status = $2, updated_at = $3, activated_at = $4, payment_id = $5, cancelled_at = $6,
            cancellation_reason = $7, cancellation_detail = $8, completed_at = $9, completed_by = $10,
            score = $11, evidence_url = $12, completion_recorded_by = $13, partner_id = $14,
            partner_report_id = $15, cancelled_by = $16
        WHERE enrollment_id = $1
        """,
        [_saved(enrollment) for enrollment in enrollments],
    )


def _saved(enrollment: Enrollment) -> tuple[object, ...]:
    completion = enrollment.completion
    return (
        enrollment.enrollment_id,
        enrollment.status,
        enrollment.updated_at,
        enrollment.activated_at,
        enrollment.payment_id,
        enrollment.cancelled_at,
        enrollment.cancellation_reason,
        enrollment.cancellation_detail,
        completion.completed_at if completion else None,
        completion.completed_by if completion else None,
        completion.score if completion else None,
        completion.evidence_url if completion else None,
        completion.recorded_by if completion else None,
        completion.partner_id if completion else None,
        completion.partner_report_id if completion else None,
        enrollment.cancelled_by,
    )


async def list_for_learner(
    conn: Connection,
    learner_id: UUID,
    *,
    status: EnrollmentStatus | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Enrollment]:
    """A learner's enrollments, newest first, starting after the sort key `after`."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM enrollments
        WHERE learner_id = $1
          AND ($2::text IS NULL OR status = $2)
          AND ($3::timestamptz IS NULL OR (created_at, enrollment_id) < ($3, $4::uuid))
        ORDER BY created_at DESC, enrollment_id DESC
        LIMIT $5
        """,
        learner_id,
        status,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [_enrollment(row) for row in rows]


async def pending_for_course(conn: Connection, course_id: UUID) -> list[Enrollment]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM enrollments WHERE course_id = $1 AND status = 'pending_payment'"
        " ORDER BY created_at FOR UPDATE",
        course_id,
    )
    return [_enrollment(row) for row in rows]


async def enrollments_for_reports(
    conn: Connection, reports: Sequence[CompletionReported]
) -> tuple[list[list[UUID]], dict[UUID, Enrollment]]:
    """The enrollments each partner's report may mean (ids in order, one list per report): the one
    it names by id, else the learner's in the course, found by learner id, else by email; and
    those enrollments, locked, by id."""
    if not reports:
        return [], {}
    # Each report's way of naming its enrollment, one index-backed join each; then the rows locked
    # (FOR UPDATE cannot go with UNION), in id order as every transaction takes them.
    matches = await conn.fetch(
        """
        WITH report AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[])
                WITH ORDINALITY AS r (enrollment_id, learner_id, learner_email, course_id, position)
        )
        SELECT r.position, e.enrollment_id FROM report r
            JOIN enrollments e ON e.enrollment_id = r.enrollment_id
        UNION ALL
        SELECT r.position, e.enrollment_id FROM report r
            JOIN enrollments e ON e.learner_id = r.learner_id AND e.course_id = r.course_id
            WHERE r.enrollment_id IS NULL
        UNION ALL
        SELECT r.position, e.enrollment_id FROM report r
            JOIN enrollments e
                ON lower(e.learner_email) = lower(r.learner_email) AND e.course_id = r.course_id
            WHERE r.enrollment_id IS NULL AND r.learner_id IS NULL
        """,
        [report.enrollment_id for report in reports],
        [report.learner_id for report in reports],
        [report.learner_email for report in reports],
        [report.course_id for report in reports],
    )
    meant: list[list[UUID]] = [[] for _ in reports]
    for row in matches:
        meant[row["position"] - 1].append(row["enrollment_id"])
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM enrollments WHERE enrollment_id = ANY($1::uuid[])"
        " ORDER BY enrollment_id FOR UPDATE",
        sorted({enrollment_id for ids in meant for enrollment_id in ids}),
    )
    return [sorted(ids) for ids in meant], {row["enrollment_id"]: _enrollment(row) for row in rows}


async def accepted_reports(
    conn: Connection, reports: Iterable[tuple[UUID, UUID]]
) -> dict[tuple[UUID, UUID], UUID]:
    """Of these (partner id, report id), those accepted before: the enrollment each completed."""
    pairs = sorted(set(reports))
    rows = await conn.fetch(
        "SELECT e.partner_id, e.partner_report_id, e.enrollment_id"
        " FROM unnest($1::uuid[], $2::uuid[]) AS r (partner_id, report_id)"
        " JOIN enrollments e ON e.partner_id = r.partner_id AND e.partner_report_id = r.report_id",
        [partner_id for partner_id, _ in pairs],
        [report_id for _, report_id in pairs],
    )
    return {(row["partner_id"], row["partner_report_id"]): row["enrollment_id"] for row in rows}


# --- idempotency keys ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class IdempotencyRecord:
    request_fingerprint: str
    response: StoredResponse


async def claim_idempotency_key(conn: Connection, caller: str, key: str, fingerprint: str) -> bool:
    """Claim the key for this request; False when it was used before (that use has committed)."""
    claimed = await conn.fetchval(
        "INSERT INTO idempotency_keys (caller, key, request_fingerprint) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING RETURNING true",
        caller,
        key,
        fingerprint,
    )
    return bool(claimed)


async def get_idempotency_record(conn: Connection, caller: str, key: str) -> IdempotencyRecord:
    row = await conn.fetchrow(
        "SELECT request_fingerprint, response_status, response_body FROM idempotency_keys"
        " WHERE caller = $1 AND key = $2",
        caller,
        key,
    )
    # Only called after a lost claim: the row exists, and it committed together with its response.
    assert row is not None
    return IdempotencyRecord(
        row["request_fingerprint"], StoredResponse(row["response_status"], json.loads(row["response_body"]))
    )


async def store_response(conn: Connection, caller: str, key: str, response: StoredResponse) -> None:
    await conn.execute(
        "UPDATE idempotency_keys SET response_status = $3, response_body = $4 WHERE caller = $1 AND key = $2",
        caller,
        key,
        response.status,
        json.dumps(response.body),
    )


# --- payments that activated nothing ---------------------------------------------------------


async def record_unapplied_payment(
    conn: Connection,
    *,
    payment_id: UUID,
    enrollment_id: UUID,
    learner_id: UUID,
    amount: Money,
    reason: str,
    settled_at: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO unapplied_payments"
        " (payment_id, enrollment_id, learner_id, amount_minor, currency, reason, settled_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (payment_id) DO NOTHING",
        payment_id,
        enrollment_id,
        learner_id,
        amount.amount_minor,
        amount.currency,
        reason,
        settled_at,
    )


# --- the partner registry --------------------------------------------------------------------


async def insert_partner(conn: Connection, partner: Partner) -> None:
    await conn.execute(
        "INSERT INTO partners (partner_id, display_name, status, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $5)",
        partner.partner_id,
        partner.display_name,
        partner.status,
        partner.created_at,
        partner.updated_at,
    )
    await set_partner_courses(conn, partner.partner_id, partner.course_ids)
    for credential in partner.credentials:
        await insert_credential(conn, partner.partner_id, credential)


async def save_partner(conn: Connection, partner: Partner) -> None:
    """Write back the partner's name, status and courses; credentials change on their own."""
    await conn.execute(
        "UPDATE partners SET display_name = $2, status = $3, updated_at = $4, suspended_at = $5,"
        " suspension_reason = $6 WHERE partner_id = $1",
        partner.partner_id,
        partner.display_name,
        partner.status,
        partner.updated_at,
        partner.suspended_at,
        partner.suspension_reason,
    )
    await set_partner_courses(conn, partner.partner_id, partner.course_ids)


async def set_partner_courses(conn: Connection, partner_id: UUID, course_ids: frozenset[UUID]) -> None:
    await conn.execute(
        "DELETE FROM partner_courses WHERE partner_id = $1 AND NOT course_id = ANY($2::uuid[])",
        partner_id,
        list(course_ids),
    )
    await conn.execute(
        "INSERT INTO partner_courses (partner_id, course_id) SELECT $1, unnest($2::uuid[])"
        " ON CONFLICT DO NOTHING",
        partner_id,
        list(course_ids),
    )


async def insert_credential(conn: Connection, partner_id: UUID, credential: Credential) -> None:
    await conn.execute(
        "INSERT INTO partner_credentials"
        " (credential_id, partner_id, kind, secret, public_key, created_at, revoked_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        credential.credential_id,
        partner_id,
        credential.kind,
        credential.secret,
        credential.public_key,
        credential.created_at,
        credential.revoked_at,
    )


async def revoke_credential(conn: Connection, partner_id: UUID, credential_id: UUID, at: datetime) -> None:
    await conn.execute(
        "UPDATE partner_credentials SET revoked_at = $3 WHERE partner_id = $1 AND credential_id = $2",
        partner_id,
        credential_id,
        at,
    )


async def get_partner(conn: Connection, partner_id: UUID, *, for_update: bool = False) -> Partner | None:
    lock = " FOR UPDATE OF p" if for_update else ""
    row = await conn.fetchrow(f"{_PARTNERS} WHERE p.partner_id = $1{lock}", partner_id)
    return _partner(row) if row else None


async def partners(conn: Connection, partner_ids: Iterable[UUID]) -> dict[UUID, Partner]:
    """The registered partners of these, by id."""
    rows = await conn.fetch(f"{_PARTNERS} WHERE p.partner_id = ANY($1::uuid[])", list(set(partner_ids)))
    return {row["partner_id"]: _partner(row) for row in rows}


async def list_partners(
    conn: Connection,
    *,
    status: PartnerStatus | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Partner]:
    """Partners, newest first, starting after the sort key `after`."""
    rows = await conn.fetch(
        f"""
        {_PARTNERS}
        WHERE ($1::text IS NULL OR p.status = $1)
          AND ($2::timestamptz IS NULL OR (p.created_at, p.partner_id) < ($2, $3::uuid))
        ORDER BY p.created_at DESC, p.partner_id DESC
        LIMIT $4
        """,
        status,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [_partner(row) for row in rows]


async def partner_ids(conn: Connection) -> list[UUID]:
    return [row["partner_id"] for row in await conn.fetch("SELECT partner_id FROM partners")]


# A partner with its courses and credentials, in one round trip (a report is judged on all three).
_PARTNERS = """
    SELECT p.*,
        ARRAY(SELECT c.course_id FROM partner_courses c WHERE c.partner_id = p.partner_id) AS course_ids,
        ARRAY(
            SELECT (k.credential_id, k.kind, k.created_at, k.secret, k.public_key, k.revoked_at)
            FROM partner_credentials k WHERE k.partner_id = p.partner_id
            ORDER BY k.created_at, k.credential_id
        ) AS credentials
    FROM partners p"""


def _partner(row: asyncpg.Record) -> Partner:
    return Partner(
        partner_id=row["partner_id"],
        display_name=row["display_name"],
        status=PartnerStatus(row["status"]),
        course_ids=frozenset(row["course_ids"]),
        credentials=tuple(
            Credential(
                credential_id=credential_id,
                kind=CredentialKind(kind),
                created_at=created_at,
                secret=secret,
                public_key=public_key,
                revoked_at=revoked_at,
            )
            for credential_id, kind, created_at, secret, public_key, revoked_at in row["credentials"]
        ),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        suspended_at=row["suspended_at"],
        suspension_reason=row["suspension_reason"],
    )


async def record_webhook_id(conn: Connection, partner_id: UUID, webhook_id: str, keep: timedelta) -> bool:
    """Record a signed request's id; False when it was taken before (a replay).

    Ids older than `keep` are forgotten first: requests that old are refused by their timestamp.
    """
    await conn.execute(
        "DELETE FROM partner_webhook_ids WHERE partner_id = $1 AND received_at < now() - $2::interval",
        partner_id,
        keep,
    )
    recorded = await conn.fetchval(
        "INSERT INTO partner_webhook_ids (partner_id, webhook_id) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING true",
        partner_id,
        webhook_id,
    )
    return bool(recorded)
