"""Events published by the catalog context: courses and pathways.

Catalog events carry a full snapshot rather than a diff, with a `version` that increases by one
on every change of the course or pathway (publish, update, retire). A consumer keeps a read model
by storing the snapshot with the highest version it has seen and ignoring any event whose
version is not higher, which makes replays and duplicates harmless.
"""

from enum import StrEnum
from typing import ClassVar
from uuid import UUID

from pydantic import Field, HttpUrl, field_validator

from microcred_events.base import (
    INT64_MAX,
    ContractModel,
    Event,
    Money,
    NonEmptyStr,
    UtcDateTime,
    example_data,
)
from microcred_events.topics import Topic

_COURSE_ID = "3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"
_PATHWAY_ID = "5b9e2d41-7a3c-4f08-b6e1-9c2d4a7f8e03"
_VERSION_DESCRIPTION = (
    "Starts at 1 and increases by one on every change; a consumer ignores an event whose version "
    "is not higher than the one it holds."
)


class CourseFormat(StrEnum):
    """How a course is delivered."""

    ONLINE = "online"
    IN_PERSON = "in_person"
    HYBRID = "hybrid"
    EMPLOYER_SITE = "employer_site"


class DurationUnit(StrEnum):
    """Unit of a course duration."""

    HOURS = "hours"
    DAYS = "days"
    WEEKS = "weeks"


class Duration(ContractModel):
    """How long a course takes a learner."""

    amount: int = Field(gt=0, le=INT64_MAX, description="Number of units.", examples=[6])
    unit: DurationUnit = Field(description="Unit of `amount`.", examples=["weeks"])


class Issuer(ContractModel):
    """The institution whose name and key the credential is issued under (Open Badges issuer profile)."""

    issuer_id: UUID = Field(
        description="Stable id of the issuing institution.", examples=["8a0d6c3b-2f4e-4b91-a7c5-1e9f3d2b6a40"]
    )
    name: NonEmptyStr = Field(
        description="Display name of the institution.", examples=["Northwind University"]
    )
    url: HttpUrl = Field(
        description="Public home page of the institution.", examples=["https://northwind.example.edu/"]
    )


class SkillAlignment(ContractModel):
    """A skill in an external framework that an achievement aligns to (an Open Badges Alignment)."""

    target_name: NonEmptyStr = Field(
        description="Name of the skill in the framework.", examples=["Manage data for analysis"]
    )
    target_url: HttpUrl = Field(
        description="Where the skill is defined.",
        examples=[
            "https://esco.ec.europa.eu/en/classification/skill?uri=http://data.europa.eu/esco/skill/S5.6.1"
        ],
    )
    target_framework: str | None = Field(
        default=None, description="Name of the framework, when the skill belongs to one.", examples=["ESCO"]
    )
    target_code: str | None = Field(
        default=None, description="Code of the skill within its framework.", examples=["S5.6.1"]
    )


class Achievement(ContractModel):
    """What a credential attests: the Open Badges achievement a course or pathway awards."""

    achievement_id: UUID = Field(
        description="Stable id of the achievement; credentials refer to it.",
        examples=["c7e4b1a2-9d3f-4e6a-8b05-2a1f7c9d3e68"],
    )
    name: NonEmptyStr = Field(
        description="Name shown on the credential.", examples=["Data Analysis Foundations"]
    )
    description: NonEmptyStr = Field(
        description="What the holder of the credential has achieved.",
        examples=["Cleans, analyses and visualises tabular data with Python."],
    )
    criteria_narrative: NonEmptyStr = Field(
        description="What a learner must do to earn the achievement (Open Badges criteria narrative).",
        examples=["Complete all six modules and pass the final project with a score of at least 70%."],
    )
    alignments: tuple[SkillAlignment, ...] = Field(
        description="Skills in external frameworks that the achievement aligns to; may be empty.",
        examples=[[example_data(SkillAlignment)]],
    )


class CourseSnapshot(ContractModel):
    """A course as the catalog holds it at one version: everything a consumer's read model needs."""

    course_id: UUID = Field(description="Stable id of the course.", examples=[_COURSE_ID])
    version: int = Field(ge=1, le=INT64_MAX, description=_VERSION_DESCRIPTION, examples=[3])
    title: NonEmptyStr = Field(description="Course title.", examples=["Data Analysis with Python"])
    overview: NonEmptyStr = Field(
        description="Short description for the catalog.",
        examples=["A six-week, hands-on introduction to analysing data with pandas."],
    )
    audiences: tuple[str, ...] = Field(
        description="Who the course is for.", examples=[["career changers", "junior analysts"]]
    )
    skills: tuple[str, ...] = Field(
        description="Skills taught, as free-text labels for search.",
        examples=[["python", "pandas", "data cleaning"]],
    )
    format: CourseFormat = Field(description="How the course is delivered.", examples=["online"])
    duration: Duration = Field(description="How long the course takes.", examples=[example_data(Duration)])
    price: Money = Field(
        description="Price of one enrollment; amount 0 means free.", examples=[example_data(Money)]
    )
    issuer: Issuer = Field(description="Who issues the credential.", examples=[example_data(Issuer)])
    achievement: Achievement = Field(
        description="The achievement a learner earns by completing the course.",
        examples=[example_data(Achievement)],
    )
    credential_validity_days: int | None = Field(
        default=None,
        gt=0,
        le=INT64_MAX,
        description="How long an issued credential stays valid; null means it does not expire.",
        examples=[730],
    )
    delivery_partner_id: UUID | None = Field(
        default=None,
        description=(
            "The partner institution that delivers the course and may report its completions; "
            "null when the course is delivered on the platform."
        ),
        examples=["b3d5f7a9-2c4e-4e61-9a83-5f1b7d3c9e20"],
    )


class PathwaySnapshot(ContractModel):
    """A pathway at one version: a stackable group of courses that together earn an achievement."""

    pathway_id: UUID = Field(description="Stable id of the pathway.", examples=[_PATHWAY_ID])
    version: int = Field(ge=1, le=INT64_MAX, description=_VERSION_DESCRIPTION, examples=[1])
    title: NonEmptyStr = Field(description="Pathway title.", examples=["Data Analyst Pathway"])
    description: NonEmptyStr = Field(
        description="What the pathway covers.",
        examples=["Three courses from spreadsheets to dashboards, recognised with one stacked credential."],
    )
    course_ids: tuple[UUID, ...] = Field(
        min_length=2,
        description="The courses whose credentials complete the pathway, in the suggested order; no repeats.",
        examples=[[_COURSE_ID, "0d7b3f9a-6e2c-4a18-b4d7-3a9c5e1f8b62"]],
    )
    issuer: Issuer = Field(description="Who issues the pathway credential.", examples=[example_data(Issuer)])
    achievement: Achievement = Field(
        description="The achievement a learner earns by completing every course of the pathway.",
        examples=[example_data(Achievement)],
    )

    @field_validator("course_ids")
    @classmethod
    def _no_repeated_course(cls, course_ids: tuple[UUID, ...]) -> tuple[UUID, ...]:
        if len(set(course_ids)) != len(course_ids):
            raise ValueError("a course appears more than once")
        return course_ids


class CoursePublished(Event):
    """A course became available for enrollment (first publication, or again after retirement).

    Consumers may rely on: `course` is the complete course at `course.version`; enrollment may
    accept enrollments for it from now on; issuance may issue its achievement.
    """

    TYPE: ClassVar[str] = "org.microcred.catalog.course.published.v1"
    TOPIC: ClassVar[Topic] = Topic.CATALOG_COURSE
    KEY: ClassVar[str] = "course.course_id"

    course: CourseSnapshot = Field(
        description="The course as published.", examples=[example_data(CourseSnapshot)]
    )
    published_at: UtcDateTime = Field(description="When it was published.", examples=["2025-03-01T09:30:00Z"])


class CourseUpdated(Event):
    """A published course changed (title, price, achievement, ...).

    Consumers may rely on: `course` is the complete course at `course.version` and replaces any
    lower version. Existing enrollments keep the version and price they were created with.
    """

    TYPE: ClassVar[str] = "org.microcred.catalog.course.updated.v1"
    TOPIC: ClassVar[Topic] = Topic.CATALOG_COURSE
    KEY: ClassVar[str] = "course.course_id"

    course: CourseSnapshot = Field(
        description="The course after the change.", examples=[example_data(CourseSnapshot)]
    )
    updated_at: UtcDateTime = Field(description="When it changed.", examples=["2025-03-15T14:00:00Z"])


class CourseRetired(Event):
    """A course stopped taking enrollments.

    Consumers may rely on: no enrollment is accepted for the course from now on, until a later
    `CoursePublished` with a higher version. Enrollments not yet active may be cancelled with
    reason `course_retired`; credentials already issued stay valid.
    """

    TYPE: ClassVar[str] = "org.microcred.catalog.course.retired.v1"
    TOPIC: ClassVar[Topic] = Topic.CATALOG_COURSE
    KEY: ClassVar[str] = "course_id"

    course_id: UUID = Field(description="The retired course.", examples=[_COURSE_ID])
    version: int = Field(
        ge=1,
        le=INT64_MAX,
        description="The course's version after retirement. " + _VERSION_DESCRIPTION,
        examples=[4],
    )
    retired_at: UtcDateTime = Field(description="When it was retired.", examples=["2025-09-30T17:00:00Z"])
    reason: str | None = Field(
        default=None,
        description="Why, for people; not for branching on.",
        examples=["Replaced by a new edition."],
    )


class PathwayPublished(Event):
    """A pathway became available (or was republished at a higher version).

    Consumers may rely on: `pathway` is complete at `pathway.version`. Issuance issues the
    pathway's credential to a learner once they hold a credential for every course in it.
    """

    TYPE: ClassVar[str] = "org.microcred.catalog.pathway.published.v1"
    TOPIC: ClassVar[Topic] = Topic.CATALOG_PATHWAY
    KEY: ClassVar[str] = "pathway.pathway_id"

    pathway: PathwaySnapshot = Field(
        description="The pathway as published.", examples=[example_data(PathwaySnapshot)]
    )
    published_at: UtcDateTime = Field(description="When it was published.", examples=["2025-04-01T08:00:00Z"])


EVENTS: tuple[type[Event], ...] = (CoursePublished, CourseUpdated, CourseRetired, PathwayPublished)
