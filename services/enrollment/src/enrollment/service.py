"""Enrollment use cases; each runs in the caller's transaction."""

from microcred_events import CoursePublished, CourseRetired, CourseUpdated
from microcred_runtime import Connection

from . import repository


async def record_course(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    at = event.published_at if isinstance(event, CoursePublished) else event.updated_at
    await repository.upsert_course(conn, event.course, "published", at)


async def record_retirement(conn: Connection, event: CourseRetired) -> None:
    await repository.retire_course(conn, event.course_id, event.version, event.retired_at)
