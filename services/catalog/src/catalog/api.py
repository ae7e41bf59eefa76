"""The catalog's HTTP API: parse, call the use case in a transaction, answer.

Reading is public: anyone may browse published courses and pathways, and staff (with a token)
may also see drafts and retired courses. Changing the catalog needs the staff or admin role.
Every answer about one course or pathway carries its version as an `ETag`; sending it back in
`If-Match` makes a change fail with 412 when someone else changed the item first, in
`If-None-Match` makes a read answer 304 while the item is unchanged. What anyone may read is kept
in each process until the next write (see `public_cache`).
"""

import contextlib
import re
from datetime import datetime
from typing import Annotated, Any, Self
from uuid import UUID

from fastapi import APIRouter, Body, Depends, Header, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from microcred_events import CourseFormat, CourseSnapshot, PathwaySnapshot, example_data
from microcred_events.base import INT64_MAX
from microcred_runtime import (
    Cursor,
    Db,
    Limit,
    Page,
    Principal,
    Problem,
    Staff,
    Viewer,
    decode_cursor,
    encode_cursor,
    problem_doc,
)

from . import service
from .domain import (
    WITHOUT_NUL,
    Course,
    CourseDetails,
    CourseFilter,
    CourseStatus,
    InvalidFilter,
    Label,
    Pathway,
    PathwayDetails,
    PathwayStatus,
)
from .public_cache import Cache, Read, version_tag
from .repository import SortKey
from .service import IfMatch

_COURSE_ID = "3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"
# What the catalog adds to staff's details, for the response examples.
_HELD = {
    "version": 2,
    "status": "published",
    "created_at": "2025-03-01T09:30:00Z",
    "updated_at": "2025-03-15T14:00:00Z",
}


Responses = dict[int | str, dict[str, Any]]


_UNAUTHORIZED: Responses = {401: problem_doc("No bearer token, or one that is not valid.")}
_STAFF_ONLY: Responses = {
    **_UNAUTHORIZED,
    403: problem_doc("The caller is neither staff nor admin, or changes what another issuer issues."),
}
_PRECONDITION: Responses = {412: problem_doc("`If-Match` names a version the item is no longer at.")}
_ETAG = {
    "ETag": {
        "description": "The item's version, for `If-Match` and `If-None-Match`.",
        "schema": {"type": "string"},
    }
}
_PAGE_ETAG = {
    "ETag": {"description": "The page's digest, for `If-None-Match`.", "schema": {"type": "string"}}
}
_CACHE_CONTROL = {
    "Cache-Control": {
        "description": "The published catalog: how long it may be kept (a staff write shows at once); "
        "a staff listing: `private, no-cache`.",
        "schema": {"type": "string"},
    }
}
_LIST_RESPONSES: Responses = {
    200: {"headers": {**_CACHE_CONTROL, **_PAGE_ETAG}},
    304: {"description": "Not modified: the page `If-None-Match` names is current.", "headers": _PAGE_ETAG},
    400: problem_doc("The cursor is not one this API returned."),
}
_ITEM_RESPONSES: Responses = {
    200: {"headers": _ETAG},
    304: {"description": "Not modified: the version `If-None-Match` names is current.", "headers": _ETAG},
}

courses = APIRouter(prefix="/courses", tags=["courses"])
pathways = APIRouter(prefix="/pathways", tags=["pathways"])
_OUR_TAG = re.compile('"([0-9]{1,18})"')


class CourseOut(CourseDetails):
    """A course as the catalog holds it."""

    model_config = ConfigDict(json_schema_extra={"examples": [example_data(CourseSnapshot) | _HELD]})

    course_id: UUID
    version: int = Field(description="Increases by one on every change; the `ETag`.", examples=[2])
    status: CourseStatus = Field(description="Only published courses take enrollments.")
    created_at: datetime = Field(description="UTC.", examples=["2025-03-01T09:30:00Z"])
    updated_at: datetime = Field(description="UTC.", examples=["2025-03-15T14:00:00Z"])

    @classmethod
    def of(cls, course: Course) -> Self:
        return cls(
            course_id=course.course_id,
            version=course.version,
            status=course.status,
            created_at=course.created_at,
            updated_at=course.updated_at,
            **dict(course.details),
        )


class PathwayOut(PathwayDetails):
    """A pathway as the catalog holds it."""

    model_config = ConfigDict(json_schema_extra={"examples": [example_data(PathwaySnapshot) | _HELD]})

    pathway_id: UUID
    version: int = Field(description="Increases by one on every change; the `ETag`.", examples=[2])
    status: PathwayStatus
    created_at: datetime = Field(description="UTC.", examples=["2025-04-01T08:00:00Z"])
    updated_at: datetime = Field(description="UTC.", examples=["2025-04-01T08:00:00Z"])

    @classmethod
    def of(cls, pathway: Pathway) -> Self:
        return cls(
            pathway_id=pathway.pathway_id,
            version=pathway.version,
            status=pathway.status,
            created_at=pathway.created_at,
            updated_at=pathway.updated_at,
            **dict(pathway.details),
        )


class Retirement(BaseModel):
    """Optional details of a retirement."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Why, for people; other services pass it on.",
        examples=["Replaced by a new edition."],
    )


async def if_match_versions(
    if_match: Annotated[
        str | None,
        Header(
            description='The `ETag` you read (e.g. `"3"`): the change applies only at that version.',
            examples=['"3"'],
        ),
    ] = None,
) -> IfMatch:
    """The versions an `If-Match` header admits; None when it sets no precondition."""
    if if_match is None or if_match.strip() == "*":
        return None
    # Strong comparison (RFC 9110 13.1.1): a weak tag or anything not ours matches no version.
    tags = (_OUR_TAG.fullmatch(tag.strip()) for tag in if_match.split(","))
    return frozenset(int(tag[1]) for tag in tags if tag)


Precondition = Annotated[IfMatch, Depends(if_match_versions)]


def _tag(response: Response, version: int) -> None:
    response.headers["ETag"] = version_tag(version)


def _after(cursor: str | None) -> SortKey | None:
    key = decode_cursor(cursor, 2)
    if key is None:
        return None
    title, item_id = key
    # A forged cursor must not reach PostgreSQL with something it cannot compare or hold.
    if isinstance(title, str) and "\x00" not in title and isinstance(item_id, str):
        with contextlib.suppress(ValueError):
            return title, UUID(item_id)
    raise Problem(400, "invalid-cursor", "the cursor is not one this API returned")


def _require_staff(viewer: Principal | None, what: str) -> None:
    if viewer is None:
        raise Problem(
            401, "unauthorized", f"{what} needs a bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    if not viewer.is_staff:
        raise Problem(403, "forbidden", f"{what} needs the role staff or admin")


@courses.get(
    "",
    summary="Browse and search courses",
    response_model=Page[CourseOut],
    responses={**_LIST_RESPONSES, **_STAFF_ONLY},
)
async def list_courses(
    db: Db,
    viewer: Viewer,
    read: Read,
    status: Annotated[
        list[CourseStatus] | None,
        Query(description="Only courses in these statuses; anything but `published` needs staff."),
    ] = None,
    format: Annotated[list[CourseFormat] | None, Query(description="Only these delivery formats.")] = None,
    min_price: Annotated[
        int | None, Query(ge=0, le=INT64_MAX, description="Lowest price in minor units; needs `currency`.")
    ] = None,
    max_price: Annotated[
        int | None,
        Query(
            ge=0, le=INT64_MAX, description="Highest price in minor units; needs `currency`. 0: free only."
        ),
    ] = None,
    currency: Annotated[
        str | None, Query(pattern="^[A-Za-z]{3}$", description="ISO 4217 code: only courses priced in it.")
    ] = None,
    audience: Annotated[
        Label | None, Query(description="Only courses for this audience (whole label, any case).")
    ] = None,
    skill: Annotated[
        Label | None, Query(description="Only courses teaching this skill (whole label, any case).")
    ] = None,
    q: Annotated[
        str | None,
        Query(
            max_length=200,
            pattern=WITHOUT_NUL,
            description=(
                'Words to find in title, skills or overview; "quoted phrases", `or` and `-word` work. '
                "Blank: no search."
            ),
        ),
    ] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Response:
    """Published courses, by title, with filters that combine (all must match).

    Staff may ask for drafts and retired courses with `status`. Pages follow one another with
    `next_cursor`; a course added meanwhile does not shift or repeat the pages. Each page has an
    `ETag`: send it back in `If-None-Match` to be told `304` while the page is unchanged.
    """
    try:
        where = CourseFilter(
            statuses=frozenset(status or [CourseStatus.PUBLISHED]),
            formats=frozenset(format or []),
            min_price=min_price,
            max_price=max_price,
            currency=currency.upper() if currency else None,
            audience=audience,
            skill=skill,
            text=q.strip() or None if q else None,
        )
    except InvalidFilter as exc:
        raise Problem(422, "invalid-filter", str(exc)) from None
    if where.shows_unpublished:
        _require_staff(viewer, "listing unpublished courses")
    after = _after(cursor)
    async with db.acquire() as conn:
        found, more = await service.list_courses(conn, where, after=after, limit=limit)
    page = Page[CourseOut](
        items=[CourseOut.of(course) for course in found],
        next_cursor=encode_cursor([found[-1].details.title, found[-1].course_id]) if more else None,
    )
    return read.page(page, private=where.shows_unpublished)


@courses.get(
    "/{course_id}",
    summary="One course",
    response_model=CourseOut,
    responses={
        **_ITEM_RESPONSES,
        404: problem_doc("No such course, or (for anyone but staff) not published."),
        **_UNAUTHORIZED,
    },
)
async def get_course(course_id: UUID, db: Db, viewer: Viewer, read: Read) -> Response:
    """A published course; staff also see drafts and retired courses. The `ETag` is its version."""
    async with db.acquire() as conn:
        course = await service.get_course(
            conn, course_id, include_unpublished=viewer is not None and viewer.is_staff
        )
    return read.item(CourseOut.of(course), course.version)


@courses.post(
    "",
    status_code=201,
    summary="Create a draft course",
    responses={201: {"headers": _ETAG}, **_STAFF_ONLY},
)
async def create_course(details: CourseDetails, db: Db, staff: Staff, response: Response) -> CourseOut:
    """A new course, as a draft at version 1: only staff see it until it is published."""
    async with db.acquire() as conn, conn.transaction():
        course = await service.create_course(conn, details, by=staff)
    response.headers["Location"] = f"{courses.prefix}/{course.course_id}"
    _tag(response, course.version)
    return CourseOut.of(course)


@courses.put(
    "/{course_id}",
    summary="Replace a course's details",
    responses={
        200: {"headers": _ETAG},
        404: problem_doc("No such course."),
        **_PRECONDITION,
        **_STAFF_ONLY,
    },
)
async def update_course(
    course_id: UUID,
    details: CourseDetails,
    db: Db,
    staff: Staff,
    if_match: Precondition,
    response: Response,
    cache: Cache,
) -> CourseOut:
    """Replace every detail of a course (send the whole course, as `GET` returns it).

    The version goes up by one; a published course is announced with `CourseUpdated`, a draft
    or retired one is not (it is announced when published). Sending identical details changes
    nothing. Learners already enrolled keep the price and version they enrolled with.
    """
    async with db.acquire() as conn, conn.transaction():
        course = await service.update_course(conn, course_id, details, by=staff, if_match=if_match)
    cache.clear()
    _tag(response, course.version)
    return CourseOut.of(course)


@courses.post(
    "/{course_id}/publish",
    summary="Publish a course: learners can enroll from now on",
    responses={
        200: {"headers": _ETAG},
        404: problem_doc("No such course."),
        409: problem_doc("The course is already published."),
        **_PRECONDITION,
        **_STAFF_ONLY,
    },
)
async def publish_course(
    course_id: UUID, db: Db, staff: Staff, if_match: Precondition, response: Response, cache: Cache
) -> CourseOut:
    """Publish a draft, or bring back a retired course; announced with `CoursePublished`."""
    async with db.acquire() as conn, conn.transaction():
        course = await service.publish_course(conn, course_id, by=staff, if_match=if_match)
    cache.clear()
    _tag(response, course.version)
    return CourseOut.of(course)


@courses.post(
    "/{course_id}/retire",
    summary="Retire a course: no new enrollments",
    responses={
        200: {"headers": _ETAG},
        404: problem_doc("No such course."),
        409: problem_doc("Only a published course can be retired."),
        **_PRECONDITION,
        **_STAFF_ONLY,
    },
)
async def retire_course(
    course_id: UUID,
    db: Db,
    staff: Staff,
    if_match: Precondition,
    response: Response,
    cache: Cache,
    retirement: Annotated[Retirement | None, Body()] = None,
) -> CourseOut:
    """Stop enrollments; announced with `CourseRetired`. Credentials already issued stay valid,
    and the course may be published again later."""
    reason = retirement.reason if retirement else None
    async with db.acquire() as conn, conn.transaction():
        course = await service.retire_course(conn, course_id, reason, by=staff, if_match=if_match)
    cache.clear()
    _tag(response, course.version)
    return CourseOut.of(course)


@pathways.get(
    "",
    summary="Browse pathways",
    response_model=Page[PathwayOut],
    responses={**_LIST_RESPONSES, **_STAFF_ONLY},
)
async def list_pathways(
    db: Db,
    viewer: Viewer,
    read: Read,
    status: Annotated[
        list[PathwayStatus] | None,
        Query(description="Only pathways in these statuses; `draft` needs staff."),
    ] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Response:
    """Published pathways, by title: groups of courses that together earn a larger credential.

    Each page has an `ETag`: send it back in `If-None-Match` to be told `304` while it is unchanged.
    """
    statuses = frozenset(status or [PathwayStatus.PUBLISHED])
    drafts = statuses != {PathwayStatus.PUBLISHED}
    if drafts:
        _require_staff(viewer, "listing draft pathways")
    after = _after(cursor)
    async with db.acquire() as conn:
        found, more = await service.list_pathways(conn, statuses, after=after, limit=limit)
    page = Page[PathwayOut](
        items=[PathwayOut.of(pathway) for pathway in found],
        next_cursor=encode_cursor([found[-1].details.title, found[-1].pathway_id]) if more else None,
    )
    return read.page(page, private=drafts)


@pathways.get(
    "/{pathway_id}",
    summary="One pathway",
    response_model=PathwayOut,
    responses={
        **_ITEM_RESPONSES,
        404: problem_doc("No such pathway, or (for anyone but staff) not published."),
        **_UNAUTHORIZED,
    },
)
async def get_pathway(pathway_id: UUID, db: Db, viewer: Viewer, read: Read) -> Response:
    """A published pathway; staff also see drafts. The `ETag` is its version."""
    async with db.acquire() as conn:
        pathway = await service.get_pathway(
            conn, pathway_id, include_unpublished=viewer is not None and viewer.is_staff
        )
    return read.item(PathwayOut.of(pathway), pathway.version)


@pathways.post(
    "",
    status_code=201,
    summary="Create a draft pathway",
    responses={
        201: {"headers": _ETAG},
        **_STAFF_ONLY,
        422: problem_doc("The request is not valid, or names courses the catalog does not have."),
    },
)
async def create_pathway(details: PathwayDetails, db: Db, staff: Staff, response: Response) -> PathwayOut:
    """A new pathway of at least two distinct existing courses, as a draft at version 1."""
    async with db.acquire() as conn, conn.transaction():
        pathway = await service.create_pathway(conn, details, by=staff)
    response.headers["Location"] = f"{pathways.prefix}/{pathway.pathway_id}"
    _tag(response, pathway.version)
    return PathwayOut.of(pathway)


@pathways.post(
    "/{pathway_id}/publish",
    summary="Publish a pathway",
    responses={
        200: {"headers": _ETAG},
        404: problem_doc("No such pathway."),
        409: problem_doc("The pathway is already published, or one of its courses is not."),
        **_PRECONDITION,
        **_STAFF_ONLY,
    },
)
async def publish_pathway(
    pathway_id: UUID, db: Db, staff: Staff, if_match: Precondition, response: Response, cache: Cache
) -> PathwayOut:
    """Announce a pathway with `PathwayPublished`; every course in it must be published."""
    async with db.acquire() as conn, conn.transaction():
        pathway = await service.publish_pathway(conn, pathway_id, by=staff, if_match=if_match)
    cache.clear()
    _tag(response, pathway.version)
    return PathwayOut.of(pathway)
