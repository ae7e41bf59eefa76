"""Enrollment's tables, as plain SQL."""

from datetime import datetime
from uuid import UUID

from microcred_events import CourseSnapshot
from microcred_runtime import Connection


async def upsert_course(conn: Connection, course: CourseSnapshot, status: str, at: datetime) -> bool:
    """Store the snapshot unless a same-or-newer version is already held; True when stored."""
    stored = await conn.fetchval(
        """
        INSERT INTO courses (course_id, version, status, title, price_minor, currency, snapshot, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (course_id) DO UPDATE SET
            version = EXCLUDED.version, status = EXCLUDED.status, title = EXCLUDED.title,
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
