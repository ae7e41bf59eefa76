"""The catalog's HTTP API: parse, call the use case in a transaction, answer."""

from datetime import datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query
from pydantic import BaseModel

from microcred_runtime import Db, Staff

from . import service
from .domain import Course, CourseDetails, CourseStatus

router = APIRouter(prefix="/courses", tags=["courses"])


class CourseOut(CourseDetails):
    course_id: UUID
    version: int
    status: CourseStatus
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, course: Course) -> "CourseOut":
        return cls(
            course_id=course.course_id,
            version=course.version,
            status=course.status,
            created_at=course.created_at,
            updated_at=course.updated_at,
            **dict(course.details),
        )


class CoursePage(BaseModel):
    items: list[CourseOut]


@router.post("", status_code=201, summary="Create a draft course")
async def create_course(details: CourseDetails, db: Db, _: Staff) -> CourseOut:
    async with db.acquire() as conn, conn.transaction():
        return CourseOut.of(await service.create_course(conn, details))


@router.post("/{course_id}/publish", summary="Publish a course: learners can enroll from now on")
async def publish_course(course_id: UUID, db: Db, _: Staff) -> CourseOut:
    async with db.acquire() as conn, conn.transaction():
        return CourseOut.of(await service.publish_course(conn, course_id))


@router.get("/{course_id}", summary="One course")
async def get_course(course_id: UUID, db: Db) -> CourseOut:
    async with db.acquire() as conn:
        return CourseOut.of(await service.get_course(conn, course_id))


@router.get("", summary="Published courses")
async def list_courses(db: Db, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> CoursePage:
    async with db.acquire() as conn:
        courses = await service.list_published_courses(conn, limit=limit)
    return CoursePage(items=[CourseOut.of(course) for course in courses])
