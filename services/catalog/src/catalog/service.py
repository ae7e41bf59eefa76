"""Catalog use cases: each runs in the caller's transaction and queues the events it causes.

A change reads its course or pathway `FOR UPDATE`, so concurrent changes of one aggregate take
turns and every version is used once; `if_match` (the versions the caller read, from the HTTP
`If-Match` header) turns a change based on a stale read into a 412 instead of a lost update.
Every change is made `by` someone who may act for the issuer of what it changes (staff of that
institution, or an admin): checked on the locked row, so a concurrent change of issuer cannot slip
past it.
"""

import uuid
from datetime import UTC, datetime
from uuid import UUID

from microcred_runtime import Connection, Principal, Problem, outbox

from . import domain, repository
from .domain import (
    Course,
    CourseDetails,
    CourseFilter,
    CourseStatus,
    Pathway,
    PathwayDetails,
    PathwayStatus,
)
from .repository import SortKey

IfMatch = frozenset[int] | None
"""The versions a change may apply to; None when the caller sets no precondition."""


async def create_course(
    conn: Connection, details: CourseDetails, *, by: Principal, course_id: UUID | None = None
) -> Course:
    by.require_issuer(details.issuer.issuer_id)
    course = domain.draft_course(course_id or uuid.uuid4(), details, _now())
    await repository.insert_course(conn, course)
    return course


async def update_course(
    conn: Connection, course_id: UUID, details: CourseDetails, *, by: Principal, if_match: IfMatch = None
) -> Course:
    course = await _course_to_change(conn, course_id, if_match, by)
    by.require_issuer(details.issuer.issuer_id)
    updated, event = domain.update(course, details, _now())
    if updated is not course:
        await repository.save_course(conn, updated)
    if event is not None:
        await outbox.add(conn, event)
    return updated


async def publish_course(
    conn: Connection, course_id: UUID, *, by: Principal, if_match: IfMatch = None
) -> Course:
    course = await _course_to_change(conn, course_id, if_match, by)
    try:
        published, event = domain.publish(course, _now())
    except domain.CourseRuleViolated as exc:
        raise Problem(409, "course-state", str(exc)) from None
    await repository.save_course(conn, published)
    await outbox.add(conn, event)
    return published


async def retire_course(
    conn: Connection, course_id: UUID, reason: str | None, *, by: Principal, if_match: IfMatch = None
) -> Course:
    course = await _course_to_change(conn, course_id, if_match, by)
    try:
        retired, event = domain.retire(course, reason, _now())
    except domain.CourseRuleViolated as exc:
        raise Problem(409, "course-state", str(exc)) from None
    await repository.save_course(conn, retired)
    await outbox.add(conn, event)
    return retired


async def get_course(conn: Connection, course_id: UUID, *, include_unpublished: bool) -> Course:
    """A course; one that is not published exists only for staff (`include_unpublished`)."""
    course = await repository.get_course(conn, course_id)
    if course is None or (course.status is not CourseStatus.PUBLISHED and not include_unpublished):
        raise _course_not_found(course_id)
    return course


async def list_courses(
    conn: Connection, where: CourseFilter, *, after: SortKey | None, limit: int
) -> tuple[list[Course], bool]:
    """One page of courses, and whether more follow."""
    courses = await repository.list_courses(conn, where, after=after, limit=limit + 1)
    return courses[:limit], len(courses) > limit


async def create_pathway(
    conn: Connection, details: PathwayDetails, *, by: Principal, pathway_id: UUID | None = None
) -> Pathway:
    by.require_issuer(details.issuer.issuer_id)
    existing = await repository.course_statuses(conn, details.course_ids)
    try:
        pathway = domain.draft_pathway(pathway_id or uuid.uuid4(), details, existing, _now())
    except domain.UnknownCourses as exc:
        raise Problem(
            422, "unknown-courses", str(exc), course_ids=[str(course_id) for course_id in exc.course_ids]
        ) from None
    await repository.insert_pathway(conn, pathway)
    return pathway


async def publish_pathway(
    conn: Connection, pathway_id: UUID, *, by: Principal, if_match: IfMatch = None
) -> Pathway:
    pathway = await repository.get_pathway(conn, pathway_id, for_update=True)
    if pathway is None:
        raise _pathway_not_found(pathway_id)
    by.require_issuer(pathway.details.issuer.issuer_id)
    _check_version("pathway", pathway.version, if_match)
    statuses = await repository.course_statuses(conn, pathway.details.course_ids, lock=True)
    try:
        published, event = domain.publish_pathway(pathway, statuses, _now())
    except domain.PathwayRuleViolated as exc:
        raise Problem(409, "pathway-state", str(exc)) from None
    await repository.save_pathway(conn, published)
    await outbox.add(conn, event)
    return published


async def get_pathway(conn: Connection, pathway_id: UUID, *, include_unpublished: bool) -> Pathway:
    """A pathway; a draft exists only for staff (`include_unpublished`)."""
    pathway = await repository.get_pathway(conn, pathway_id)
    if pathway is None or (pathway.status is not PathwayStatus.PUBLISHED and not include_unpublished):
        raise _pathway_not_found(pathway_id)
    return pathway


async def list_pathways(
    conn: Connection, statuses: frozenset[PathwayStatus], *, after: SortKey | None, limit: int
) -> tuple[list[Pathway], bool]:
    """One page of pathways, and whether more follow."""
    pathways = await repository.list_pathways(conn, statuses, after=after, limit=limit + 1)
    return pathways[:limit], len(pathways) > limit


async def _course_to_change(conn: Connection, course_id: UUID, if_match: IfMatch, by: Principal) -> Course:
    course = await repository.get_course(conn, course_id, for_update=True)
    if course is None:
        raise _course_not_found(course_id)
    by.require_issuer(course.details.issuer.issuer_id)
    _check_version("course", course.version, if_match)
    return course


def _check_version(what: str, version: int, if_match: IfMatch) -> None:
    if if_match is not None and version not in if_match:
        raise Problem(
            412,
            "version-mismatch",
            f"the {what} changed since you read it; it is now at version {version}",
            headers={"ETag": f'"{version}"'},
            current_version=version,
        )


def _course_not_found(course_id: UUID) -> Problem:
    return Problem(404, "course-not-found", f"no course {course_id}")


def _pathway_not_found(pathway_id: UUID) -> Problem:
    return Problem(404, "pathway-not-found", f"no pathway {pathway_id}")


def _now() -> datetime:
    return datetime.now(UTC)
