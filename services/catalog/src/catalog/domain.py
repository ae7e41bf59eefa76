"""The catalog's rules: courses (draft -> published <-> retired) and pathways (draft -> published).

Every function here is pure: it takes the current state and the time, and returns the new state
with the event other services must hear of, or raises when a rule refuses the change.
"""

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints, model_validator

from microcred_events import (
    Achievement,
    CourseFormat,
    CoursePublished,
    CourseRetired,
    CourseSnapshot,
    CourseUpdated,
    Duration,
    Issuer,
    Money,
    PathwayPublished,
    PathwaySnapshot,
    example_data,
)

WITHOUT_NUL = r"^[^\x00]*$"
"""PostgreSQL text and jsonb cannot hold the NUL character: refuse it as input, not fail on it."""

Label = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100, pattern=WITHOUT_NUL)
]
"""A free-text audience or skill label, as shown to learners and matched by the filters."""


class CourseStatus(enum.StrEnum):
    DRAFT = "draft"
    PUBLISHED = "published"
    RETIRED = "retired"


class PathwayStatus(enum.StrEnum):
    DRAFT = "draft"
    PUBLISHED = "published"


def _example(snapshot: type[BaseModel], *held: str) -> dict[str, Any]:
    """The contract's example snapshot without what the catalog adds (`held`): staff's part."""
    return {name: value for name, value in example_data(snapshot).items() if name not in held}


def _holds_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(item) for item in value)
    return False


class _Document(BaseModel):
    """What staff write about a course or pathway; stored as jsonb."""

    model_config = ConfigDict(str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        # Checked on the raw input, so the nested contract models (issuer, achievement) are covered.
        if _holds_nul(data):
            raise ValueError("text must not contain the NUL character (\\u0000)")
        return data


class CourseDetails(_Document):
    """Everything staff describe about a course; the catalog adds its id, version and status."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"examples": [_example(CourseSnapshot, "course_id", "version")]},
    )

    title: str = Field(min_length=1, max_length=200, examples=["Durable Skills: Communication"])
    overview: str = Field(
        min_length=1,
        max_length=5000,
        description="What the course covers, for the catalog page; searched by `q`.",
        examples=["Four weeks of practice in writing, speaking and listening at work."],
    )
    audiences: tuple[Label, ...] = Field(
        default=(), max_length=20, description="Who the course is for.", examples=[["new managers"]]
    )
    skills: tuple[Label, ...] = Field(
        default=(),
        max_length=50,
        description="Skills taught; searched by `q`.",
        examples=[["public speaking"]],
    )
    format: CourseFormat = Field(description="How the course is delivered.")
    duration: Duration = Field(description="How long the course takes a learner.")
    price: Money = Field(description="Price of one enrollment; amount 0 means free.")
    issuer: Issuer = Field(description="The institution that issues the credential.")
    achievement: Achievement = Field(description="What the credential attests.")
    credential_validity_days: int | None = Field(
        default=None,
        gt=0,
        le=36_500,
        description="How long an issued credential stays valid; null means it does not expire.",
        examples=[365],
    )
    delivery_partner_id: UUID | None = Field(
        default=None, description="The partner institution that delivers the course, if not the platform."
    )
    image_url: HttpUrl | None = Field(
        default=None,
        description="A picture for the catalog page; not part of the credential.",
        examples=["https://academy.microcred.example/images/communication.png"],
    )


class PathwayDetails(_Document):
    """What staff describe about a pathway: courses that together earn a larger credential."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={"examples": [_example(PathwaySnapshot, "pathway_id", "version")]},
    )

    title: str = Field(min_length=1, max_length=200, examples=["Durable Skills"])
    description: str = Field(
        min_length=1,
        max_length=5000,
        examples=["Communication and Critical Thinking, recognised together with one stacked credential."],
    )
    course_ids: tuple[UUID, ...] = Field(
        min_length=2,
        max_length=20,
        description="The courses whose credentials complete the pathway, in the suggested order; no repeats.",
        examples=[["3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15", "0d7b3f9a-6e2c-4a18-b4d7-3a9c5e1f8b62"]],
    )
    issuer: Issuer = Field(description="The institution that issues the pathway credential.")
    achievement: Achievement = Field(description="What the pathway credential attests.")

    @model_validator(mode="after")
    def _distinct_courses(self) -> Self:
        if len(set(self.course_ids)) != len(self.course_ids):
            raise ValueError("a course appears more than once in course_ids")
        return self


class CourseRuleViolated(Exception):
    """A course's lifecycle refuses the change; the message says which rule."""


class PathwayRuleViolated(Exception):
    """A pathway's rules refuse the change; the message says which."""


class UnknownCourses(Exception):
    """A pathway names courses the catalog does not have."""

    def __init__(self, course_ids: Collection[UUID]) -> None:
        super().__init__(f"no such course: {', '.join(sorted(map(str, course_ids)))}")
        self.course_ids = sorted(course_ids)


class InvalidFilter(Exception):
    """A course search that cannot mean anything; the message says why."""


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


def draft_course(course_id: UUID, details: CourseDetails, now: datetime) -> Course:
    """A new course starts as a draft that only staff see; nobody else hears of it yet."""
    return Course(course_id, 1, CourseStatus.DRAFT, details, created_at=now, updated_at=now)


def update(course: Course, details: CourseDetails, now: datetime) -> tuple[Course, CourseUpdated | None]:
    """Replace a course's details.

    Only a published course is announced: other services know nothing of drafts, and a retired
    course's new details reach them with the `CoursePublished` that brings it back. Sending the
    same details again is not a change, so it neither bumps the version nor says anything.
    """
    if details == course.details:
        return course, None
    updated = replace(course, details=details, version=course.version + 1, updated_at=now)
    if course.status is not CourseStatus.PUBLISHED:
        return updated, None
    return updated, CourseUpdated(course=updated.snapshot(), updated_at=now)


def publish(course: Course, now: datetime) -> tuple[Course, CoursePublished]:
    """Make a draft (or retired) course available for enrollment."""
    if course.status is CourseStatus.PUBLISHED:
        raise CourseRuleViolated("the course is already published")
    published = replace(course, status=CourseStatus.PUBLISHED, version=course.version + 1, updated_at=now)
    return published, CoursePublished(course=published.snapshot(), published_at=now)


def retire(course: Course, reason: str | None, now: datetime) -> tuple[Course, CourseRetired]:
    """Stop enrollments in a published course; it may be published again later."""
    if course.status is not CourseStatus.PUBLISHED:
        raise CourseRuleViolated(f"only a published course can be retired; this one is {course.status}")
    retired = replace(course, status=CourseStatus.RETIRED, version=course.version + 1, updated_at=now)
    event = CourseRetired(course_id=course.course_id, version=retired.version, retired_at=now, reason=reason)
    return retired, event


@dataclass(frozen=True)
class Pathway:
    pathway_id: UUID
    version: int
    status: PathwayStatus
    details: PathwayDetails
    created_at: datetime
    updated_at: datetime

    def snapshot(self) -> PathwaySnapshot:
        return PathwaySnapshot(pathway_id=self.pathway_id, version=self.version, **self.details.model_dump())


def draft_pathway(
    pathway_id: UUID, details: PathwayDetails, existing_courses: Collection[UUID], now: datetime
) -> Pathway:
    """A new pathway, as a draft; every course it names must exist (in any status)."""
    unknown = set(details.course_ids) - set(existing_courses)
    if unknown:
        raise UnknownCourses(unknown)
    return Pathway(pathway_id, 1, PathwayStatus.DRAFT, details, created_at=now, updated_at=now)


def publish_pathway(
    pathway: Pathway, course_statuses: Mapping[UUID, CourseStatus], now: datetime
) -> tuple[Pathway, PathwayPublished]:
    """Announce a pathway; a learner must be able to enroll in each of its courses."""
    if pathway.status is PathwayStatus.PUBLISHED:
        raise PathwayRuleViolated("the pathway is already published")
    unavailable = [
        str(course_id)
        for course_id in pathway.details.course_ids
        if course_statuses.get(course_id) is not CourseStatus.PUBLISHED
    ]
    if unavailable:
        raise PathwayRuleViolated(f"publish these courses first: {', '.join(unavailable)}")
    published = replace(pathway, status=PathwayStatus.PUBLISHED, version=pathway.version + 1, updated_at=now)
    return published, PathwayPublished(pathway=published.snapshot(), published_at=now)


@dataclass(frozen=True)
class CourseFilter:
    """What a catalog search asks for; an unset field does not filter."""

    statuses: frozenset[CourseStatus] = frozenset({CourseStatus.PUBLISHED})
    formats: frozenset[CourseFormat] = frozenset()
    min_price: int | None = None
    max_price: int | None = None
    currency: str | None = None
    audience: str | None = None
    skill: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.min_price is not None and self.max_price is not None and self.min_price > self.max_price:
            raise InvalidFilter(f"min_price ({self.min_price}) is greater than max_price ({self.max_price})")
        if (self.min_price is not None or self.max_price is not None) and self.currency is None:
            # Minor units of different currencies do not compare (100 USD cents vs 100 yen).
            raise InvalidFilter("min_price and max_price need a currency")

    @property
    def shows_unpublished(self) -> bool:
        return self.statuses != {CourseStatus.PUBLISHED}
