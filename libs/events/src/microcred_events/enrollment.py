"""Events published by the enrollment context: a learner's enrollment in a course, to completion.

An enrollment goes created -> active -> completed, or is cancelled before completion. All its
events share the enrollment topic and key, so consumers see them in that order.
"""

from enum import StrEnum
from typing import ClassVar, Self
from uuid import UUID

from pydantic import Field, HttpUrl, model_validator

from microcred_events.base import (
    ACTOR_EXAMPLE,
    INT64_MAX,
    Actor,
    ContractModel,
    EmailAddress,
    Event,
    Money,
    NonEmptyStr,
    Score,
    UtcDateTime,
    example_data,
)
from microcred_events.topics import Topic

_ENROLLMENT_ID = "e2a7c4f1-3b9d-4e85-a6c0-7f1d2b8e9a34"
_LEARNER_ID = "1d6f8b3a-4c2e-4a97-b5d1-8e0c3f7a2b59"
_COURSE_ID = "3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"
_ENROLLMENT_DESCRIPTION = "The enrollment (the aggregate id and message key)."


class Learner(ContractModel):
    """The person enrolled, as much as other contexts need to address and name them."""

    learner_id: UUID = Field(description="Stable id of the learner.", examples=[_LEARNER_ID])
    email: EmailAddress = Field(description="Where the learner is reached.", examples=["ada@example.org"])
    display_name: NonEmptyStr = Field(
        description="Name to address the learner by.", examples=["Ada Lovelace"]
    )


class CancellationReason(StrEnum):
    """Why an enrollment was cancelled; stable to branch on."""

    LEARNER_REQUEST = "learner_request"
    PAYMENT_FAILED = "payment_failed"
    REFUNDED = "refunded"
    COURSE_RETIRED = "course_retired"
    STAFF_ACTION = "staff_action"


class CompletedBy(StrEnum):
    """Who attested the completion."""

    STAFF = "staff"
    PARTNER = "partner"


class EnrollmentCreated(Event):
    """A learner enrolled in a course; the enrollment is pending until paid (or at once, if free).

    Consumers may rely on: `price` and `course_version` are fixed for this enrollment. Billing
    collects `price` when `requires_payment` is true; when it is false, `EnrollmentActivated`
    follows without a payment.
    """

    TYPE: ClassVar[str] = "org.microcred.enrollment.enrollment.created.v1"
    TOPIC: ClassVar[Topic] = Topic.ENROLLMENT
    KEY: ClassVar[str] = "enrollment_id"

    enrollment_id: UUID = Field(description=_ENROLLMENT_DESCRIPTION, examples=[_ENROLLMENT_ID])
    learner: Learner = Field(description="Who enrolled.", examples=[example_data(Learner)])
    course_id: UUID = Field(description="The course enrolled in.", examples=[_COURSE_ID])
    course_version: int = Field(
        ge=1,
        le=INT64_MAX,
        description="The course version enrolled in, as in the catalog snapshot.",
        examples=[3],
    )
    price: Money = Field(
        description="What the learner owes for this enrollment.", examples=[example_data(Money)]
    )
    requires_payment: bool = Field(
        description=(
            "Whether billing must collect `price` before the enrollment is active; false for free "
            "courses and for enrollments paid some other way (e.g. by an employer)."
        ),
        examples=[True],
    )
    created_at: UtcDateTime = Field(
        description="When the learner enrolled.", examples=["2025-03-20T10:15:00Z"]
    )
    issuer_id: UUID | None = Field(
        default=None,
        description=(
            "The institution that issues the course's credential, whose staff may act on the "
            "enrollment and its payment. Absent from older producers."
        ),
        examples=["8a0d6c3b-2f4e-4b91-a7c5-1e9f3d2b6a40"],
    )


class EnrollmentActivated(Event):
    """The enrollment became active: paid, or not requiring payment. The learner may now study.

    Consumers may rely on: this is emitted at most once per enrollment, and only after
    `EnrollmentCreated`.
    """

    TYPE: ClassVar[str] = "org.microcred.enrollment.enrollment.activated.v1"
    TOPIC: ClassVar[Topic] = Topic.ENROLLMENT
    KEY: ClassVar[str] = "enrollment_id"

    enrollment_id: UUID = Field(description=_ENROLLMENT_DESCRIPTION, examples=[_ENROLLMENT_ID])
    learner_id: UUID = Field(description="The enrolled learner.", examples=[_LEARNER_ID])
    course_id: UUID = Field(description="The course.", examples=[_COURSE_ID])
    payment_id: UUID | None = Field(
        default=None,
        description="The settled payment that activated it; null when no payment was required.",
        examples=["9c3e5a7b-1d2f-4b8a-9e64-0f7c2d1a3b85"],
    )
    activated_at: UtcDateTime = Field(description="When it became active.", examples=["2025-03-20T10:17:30Z"])


class EnrollmentCancelled(Event):
    """The enrollment ended without completion. Terminal: no later event follows for it.

    Consumers may rely on: `reason` is stable to branch on; `refunded` means the money was
    already returned (a `RefundIssued` came first), so billing must not refund it again.
    """

    TYPE: ClassVar[str] = "org.microcred.enrollment.enrollment.cancelled.v1"
    TOPIC: ClassVar[Topic] = Topic.ENROLLMENT
    KEY: ClassVar[str] = "enrollment_id"

    enrollment_id: UUID = Field(description=_ENROLLMENT_DESCRIPTION, examples=[_ENROLLMENT_ID])
    learner_id: UUID = Field(description="The enrolled learner.", examples=[_LEARNER_ID])
    course_id: UUID = Field(description="The course.", examples=[_COURSE_ID])
    reason: CancellationReason = Field(description="Why, for branching on.", examples=["learner_request"])
    detail: str | None = Field(
        default=None,
        description="Free-text explanation for people.",
        examples=["Schedule conflict with work."],
    )
    cancelled_at: UtcDateTime = Field(description="When it was cancelled.", examples=["2025-03-22T08:00:00Z"])
    cancelled_by: Actor | None = Field(
        default=None,
        description=(
            "Who cancelled it: the learner or staff member (`<role>:<subject>`), the refund's issuer, "
            "or the context whose event did (`billing`, `catalog`). Absent from older producers."
        ),
        examples=["learner:auth0|ada"],
    )


class CourseCompleted(Event):
    """The learner completed the course, as attested by staff or by the delivering partner.

    Consumers may rely on: emitted at most once per enrollment, only for an active one. Issuance
    issues the course's credential (for `course_version`'s achievement) in response. When
    `completed_by` is `partner`, `partner_id` is set, and `partner_report_id` names the partner's
    `CompletionReported` if it came from one; when it is `staff`, both are null.
    """

    TYPE: ClassVar[str] = "org.microcred.enrollment.course.completed.v1"
    TOPIC: ClassVar[Topic] = Topic.ENROLLMENT
    KEY: ClassVar[str] = "enrollment_id"

    enrollment_id: UUID = Field(description=_ENROLLMENT_DESCRIPTION, examples=[_ENROLLMENT_ID])
    learner: Learner = Field(description="Who completed the course.", examples=[example_data(Learner)])
    course_id: UUID = Field(description="The course completed.", examples=[_COURSE_ID])
    course_version: int = Field(
        ge=1, le=INT64_MAX, description="The course version the learner was enrolled in.", examples=[3]
    )
    completed_at: UtcDateTime = Field(
        description="When the learner completed it.", examples=["2025-05-02T16:45:00Z"]
    )
    score: Score | None = Field(
        default=None, description="Final result in percent, if graded.", examples=[87.5]
    )
    evidence_url: HttpUrl | None = Field(
        default=None,
        description="Where the work that earned the completion can be seen; goes into the credential.",
        examples=["https://northwind.example.edu/portfolio/ada/final-project"],
    )
    completed_by: CompletedBy = Field(description="Who attested the completion.", examples=["partner"])
    partner_id: UUID | None = Field(
        default=None,
        description="The attesting partner institution; set exactly when `completed_by` is `partner`.",
        examples=["b3d5f7a9-2c4e-4e61-9a83-5f1b7d3c9e20"],
    )
    partner_report_id: UUID | None = Field(
        default=None,
        description="The partner's `CompletionReported` this follows from, if any; only for `partner`.",
        examples=["6f4a2c8e-9b1d-4a53-8c7e-2d0b5f9a1c36"],
    )
    recorded_by: Actor | None = Field(
        default=None,
        description=(
            "Who attested it: the staff member (`<role>:<subject>`) or the partner's URN. Absent "
            "from older producers."
        ),
        examples=[ACTOR_EXAMPLE],
    )

    @model_validator(mode="after")
    def _partner_fields_match_attester(self) -> Self:
        by_partner = self.completed_by is CompletedBy.PARTNER
        if by_partner != (self.partner_id is not None):
            raise ValueError("partner_id must be set exactly when completed_by is 'partner'")
        if not by_partner and self.partner_report_id is not None:
            raise ValueError("partner_report_id is only allowed when completed_by is 'partner'")
        return self


EVENTS: tuple[type[Event], ...] = (
    EnrollmentCreated,
    EnrollmentActivated,
    EnrollmentCancelled,
    CourseCompleted,
)
