"""The catalog's rules: a course's lifecycle, draft -> published -> retired. No I/O here."""

import enum
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from microcred_events import (
    Achievement,
    CourseFormat,
    CoursePublished,
    CourseSnapshot,
    Duration,
    Issuer,
    Money,
)


class CourseStatus(enum.StrEnum):
    DRAFT = "draft"
    PUBLISHED = "published"
    RETIRED = "retired"


class CourseDetails(BaseModel):
    """Everything staff describe about a course; the catalog adds its id, version and status."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    title: str = Field(min_length=1, max_length=200, examples=["Durable Skills - Communication"])
    overview: str = Field(min_length=1, max_length=5000)
    audiences: tuple[str, ...] = Field(default=(), max_length=20)
    skills: tuple[str, ...] = Field(default=(), max_length=50)
    format: CourseFormat
    duration: Duration
    price: Money
    issuer: Issuer
    achievement: Achievement
    credential_validity_days: int | None = Field(default=None, gt=0, le=36_500)
    delivery_partner_id: UUID | None = None
    image_url: HttpUrl | None = None


class CourseRuleViolated(Exception):
    """A lifecycle rule refuses the change; the message says which."""


@dataclass(frozen=True)
class Course:
    course_id: UUID
    version: int
    status: CourseStatus
    details: CourseDetails
    created_at: datetime
    updated_at: datetime

    def snapshot(self) -> CourseSnapshot:
        return CourseSnapshot(
            course_id=self.course_id,
            version=self.version,
            **self.details.model_dump(exclude={"image_url"}),
        )


def publish(course: Course, now: datetime) -> tuple[Course, CoursePublished]:
    """Make a draft (or retired) course available for enrollment."""
    if course.status is CourseStatus.PUBLISHED:
        raise CourseRuleViolated("the course is already published")
    published = replace(course, status=CourseStatus.PUBLISHED, version=course.version + 1, updated_at=now)
    return published, CoursePublished(course=published.snapshot(), published_at=now)
