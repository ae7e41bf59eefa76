"""Enrollment's tables, as plain SQL."""

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from microcred_events import CancellationReason, CompletedBy, CourseSnapshot, Learner, Money
from microcred_runtime import Connection

from .domain import Completion, Course, CourseStatus, Enrollment, EnrollmentStatus

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
    row = await conn.fetchrow(
        "SELECT course_id, version, status, price_minor, currency FROM courses WHERE course_id = $1"
        " FOR SHARE",
        course_id,
    )
    if row is None:
        return None
    price = (
        Money(amount_minor=row["price_minor"], currency=row["currency"])
        if row["price_minor"] is not None
        else None
    )
    return Course(row["course_id"], row["version"], CourseStatus(row["status"]), price)


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
    "completed_at",
    "completed_by",
    "score",
    "evidence_url",
    "completion_recorded_by",
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
        completion.completed_at if completion else None,
        completion.completed_by if completion else None,
        completion.score if completion else None,
        completion.evidence_url if completion else None,
        completion.recorded_by if completion else None,
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
    completion = enrollment.completion
    await conn.execute(
        """
        UPDATE enrollments SET
            status = $2, updated_at = $3, activated_at = $4, payment_id = $5, cancelled_at = $6,
            cancellation_reason = $7, cancellation_detail = $8, completed_at = $9, completed_by = $10,
            score = $11, evidence_url = $12, completion_recorded_by = $13
        WHERE enrollment_id = $1
        """,
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
