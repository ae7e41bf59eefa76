"""Courses in the catalog's PostgreSQL database, as plain SQL."""

from uuid import UUID

import asyncpg

from microcred_runtime import Connection

from .domain import Course, CourseDetails, CourseStatus

_COLUMNS = "course_id, version, status, details, created_at, updated_at"


def _course(row: asyncpg.Record) -> Course:
    return Course(
        course_id=row["course_id"],
        version=row["version"],
        status=CourseStatus(row["status"]),
        details=CourseDetails.model_validate_json(row["details"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def insert(conn: Connection, course: Course) -> None:
    await conn.execute(
        f"INSERT INTO courses ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)",
        course.course_id,
        course.version,
        course.status,
        course.details.model_dump_json(),
        course.created_at,
        course.updated_at,
    )


async def get(conn: Connection, course_id: UUID, *, for_update: bool = False) -> Course | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM courses WHERE course_id = $1{lock}", course_id)
    return _course(row) if row else None


async def save(conn: Connection, course: Course) -> None:
    await conn.execute(
        "UPDATE courses SET version = $2, status = $3, details = $4, updated_at = $5 WHERE course_id = $1",
        course.course_id,
        course.version,
        course.status,
        course.details.model_dump_json(),
        course.updated_at,
    )


async def list_published(conn: Connection, *, limit: int) -> list[Course]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM courses WHERE status = 'published' ORDER BY created_at, course_id LIMIT $1",
        limit,
    )
    return [_course(row) for row in rows]
