"""Courses and pathways in the catalog's PostgreSQL database, as plain SQL.

Only the `details` document is written; the columns that filters and search use are generated
from it by PostgreSQL (see migrations/002_course_search.sql).
"""

from collections.abc import Sequence
from uuid import UUID

import asyncpg

from microcred_runtime import Connection

from .domain import Course, CourseDetails, CourseFilter, CourseStatus, Pathway, PathwayDetails, PathwayStatus

_COURSE_COLUMNS = "course_id, version, status, details, created_at, updated_at"
_PATHWAY_COLUMNS = "pathway_id, version, status, details, created_at, updated_at"

SortKey = tuple[str, UUID]
"""Where a page of a list ends: the title and id of its last item."""


def _course(row: asyncpg.Record) -> Course:
    return Course(
        course_id=row["course_id"],
        version=row["version"],
        status=CourseStatus(row["status"]),
        details=CourseDetails.model_validate_json(row["details"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _pathway(row: asyncpg.Record) -> Pathway:
    return Pathway(
        pathway_id=row["pathway_id"],
        version=row["version"],
        status=PathwayStatus(row["status"]),
        details=PathwayDetails.model_validate_json(row["details"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def insert_course(conn: Connection, course: Course) -> None:
    await conn.execute(
        f"INSERT INTO courses ({_COURSE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)",
        course.course_id,
        course.version,
        course.status,
        course.details.model_dump_json(),
        course.created_at,
        course.updated_at,
    )


async def get_course(conn: Connection, course_id: UUID, *, for_update: bool = False) -> Course | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_COURSE_COLUMNS} FROM courses WHERE course_id = $1{lock}", course_id)
    return _course(row) if row else None


async def save_course(conn: Connection, course: Course) -> None:
    await conn.execute(
        "UPDATE courses SET version = $2, status = $3, details = $4, updated_at = $5 WHERE course_id = $1",
        course.course_id,
        course.version,
        course.status,
        course.details.model_dump_json(),
        course.updated_at,
    )


async def course_statuses(
    conn: Connection, course_ids: Sequence[UUID], *, lock: bool = False
) -> dict[UUID, CourseStatus]:
    """The status of each of these courses that exists.

    With `lock`, the rows stay share-locked until the transaction ends, so a concurrent retire
    waits rather than changing a status the caller is deciding on.
    """
    share = " FOR SHARE" if lock else ""
    rows = await conn.fetch(
        f"SELECT course_id, status FROM courses WHERE course_id = ANY($1::uuid[]){share}", course_ids
    )
    return {row["course_id"]: CourseStatus(row["status"]) for row in rows}


async def list_courses(
    conn: Connection, where: CourseFilter, *, after: SortKey | None, limit: int
) -> list[Course]:
    """Courses matching `where`, by title then id, starting after `after`."""
    args: list[object] = []

    def arg(value: object) -> str:
        args.append(value)
        return f"${len(args)}"

    # Only the conditions a search uses go into the statement, so the planner can pick the
    # index that serves each one (a `$n IS NULL OR ...` catch-all would defeat the GIN indexes).
    conditions = [f"status = ANY({arg(sorted(where.statuses))}::text[])"]
    if where.formats:
        conditions.append(f"format = ANY({arg(sorted(where.formats))}::text[])")
    if where.currency is not None:
        conditions.append(f"currency = {arg(where.currency)}")
    if where.min_price is not None:
        conditions.append(f"price_minor >= {arg(where.min_price)}")
    if where.max_price is not None:
        conditions.append(f"price_minor <= {arg(where.max_price)}")
    if where.audience is not None:
        conditions.append(f"audience_keys @> ARRAY[lower({arg(where.audience)})]")
    if where.skill is not None:
        conditions.append(f"skill_keys @> ARRAY[lower({arg(where.skill)})]")
    if where.text is not None:
        # websearch_to_tsquery accepts any input (quotes, OR, -word) without a syntax error.
        conditions.append(f"search @@ websearch_to_tsquery('english', {arg(where.text)})")
    if after is not None:
        conditions.append(f"(title, course_id) > ({arg(after[0])}, {arg(after[1])})")
    rows = await conn.fetch(
        f"SELECT {_COURSE_COLUMNS} FROM courses WHERE {' AND '.join(conditions)}"
        f" ORDER BY title, course_id LIMIT {arg(limit)}",
        *args,
    )
    return [_course(row) for row in rows]


async def insert_pathway(conn: Connection, pathway: Pathway) -> None:
    await conn.execute(
        f"INSERT INTO pathways ({_PATHWAY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)",
        pathway.pathway_id,
        pathway.version,
        pathway.status,
        pathway.details.model_dump_json(),
        pathway.created_at,
        pathway.updated_at,
    )


async def get_pathway(conn: Connection, pathway_id: UUID, *, for_update: bool = False) -> Pathway | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {_PATHWAY_COLUMNS} FROM pathways WHERE pathway_id = $1{lock}", pathway_id
    )
    return _pathway(row) if row else None


async def save_pathway(conn: Connection, pathway: Pathway) -> None:
    await conn.execute(
        "UPDATE pathways SET version = $2, status = $3, details = $4, updated_at = $5 WHERE pathway_id = $1",
        pathway.pathway_id,
        pathway.version,
        pathway.status,
        pathway.details.model_dump_json(),
        pathway.updated_at,
    )


async def list_pathways(
    conn: Connection, statuses: frozenset[PathwayStatus], *, after: SortKey | None, limit: int
) -> list[Pathway]:
    """Pathways in these statuses, by title then id, starting after `after`."""
    if after is None:
        rows = await conn.fetch(
            f"SELECT {_PATHWAY_COLUMNS} FROM pathways WHERE status = ANY($1::text[])"
            " ORDER BY title, pathway_id LIMIT $2",
            sorted(statuses),
            limit,
        )
    else:
        rows = await conn.fetch(
            f"SELECT {_PATHWAY_COLUMNS} FROM pathways WHERE status = ANY($1::text[])"
            " AND (title, pathway_id) > ($2, $3) ORDER BY title, pathway_id LIMIT $4",
            sorted(statuses),
            *after,
            limit,
        )
    return [_pathway(row) for row in rows]
