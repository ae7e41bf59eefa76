"""Catalog use cases: each runs in the caller's transaction and queues the events it causes."""

import uuid
from datetime import UTC, datetime
from uuid import UUID

from microcred_runtime import Connection, Problem, outbox

from . import domain, repository
from .domain import Course, CourseDetails, CourseStatus


async def create_course(conn: Connection, details: CourseDetails) -> Course:
    now = datetime.now(UTC)
    course = Course(uuid.uuid4(), 1, CourseStatus.DRAFT, details, created_at=now, updated_at=now)
    await repository.insert(conn, course)
    return course


async def publish_course(conn: Connection, course_id: UUID) -> Course:
    course = await _existing(conn, course_id, for_update=True)
    try:
        published, event = domain.publish(course, datetime.now(UTC))
    except domain.CourseRuleViolated as exc:
        raise Problem(409, "course-state", str(exc)) from None
    await repository.save(conn, published)
    await outbox.add(conn, event)
    return published


async def get_course(conn: Connection, course_id: UUID) -> Course:
    return await _existing(conn, course_id)


async def list_published_courses(conn: Connection, *, limit: int) -> list[Course]:
    return await repository.list_published(conn, limit=limit)


async def _existing(conn: Connection, course_id: UUID, *, for_update: bool = False) -> Course:
    course = await repository.get(conn, course_id, for_update=for_update)
    if course is None:
        raise Problem(404, "course-not-found", f"no course {course_id}")
    return course
