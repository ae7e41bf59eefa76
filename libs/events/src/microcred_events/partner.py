"""Events that partner institutions publish, in the same CloudEvents envelope as ours.

Partners are outside our deployment: what they send is checked like any input. Enrollment
matches a report to an active enrollment and checks that the partner delivers the course
(`CourseSnapshot.delivery_partner_id`) before it records a `CourseCompleted`.
"""

from typing import ClassVar, Self
from uuid import UUID

from pydantic import Field, HttpUrl, model_validator

from microcred_events.base import EmailAddress, Event, Score, UtcDateTime
from microcred_events.topics import Topic


class CompletionReported(Event):
    """A partner institution reports that a learner completed a course it delivers.

    Published by the partner to the partner topic, or by our signed HTTP endpoint on its behalf.
    The learner is named by `learner_id`, `learner_email` or both; `enrollment_id` when the
    partner knows it. Consumers may rely on its shape only: a report is a claim, not a completion.
    """

    TYPE: ClassVar[str] = "org.microcred.partner.completion.reported.v1"
    TOPIC: ClassVar[Topic] = Topic.PARTNER_COMPLETION
    KEY: ClassVar[str] = "report_id"

    report_id: UUID = Field(
        description="The partner's id of this report (the aggregate id and message key); a resend reuses it.",
        examples=["6f4a2c8e-9b1d-4a53-8c7e-2d0b5f9a1c36"],
    )
    partner_id: UUID = Field(
        description="The reporting partner institution.", examples=["b3d5f7a9-2c4e-4e61-9a83-5f1b7d3c9e20"]
    )
    course_id: UUID = Field(
        description="The course completed.", examples=["3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"]
    )
    learner_id: UUID | None = Field(
        default=None,
        description="The learner, if the partner knows our id.",
        examples=["1d6f8b3a-4c2e-4a97-b5d1-8e0c3f7a2b59"],
    )
    learner_email: EmailAddress | None = Field(
        default=None,
        description="The learner's email as enrolled, if the partner does not know our id.",
        examples=["ada@example.org"],
    )
    enrollment_id: UUID | None = Field(
        default=None,
        description="The enrollment, if the partner knows it.",
        examples=["e2a7c4f1-3b9d-4e85-a6c0-7f1d2b8e9a34"],
    )
    completed_at: UtcDateTime = Field(
        description="When the learner completed it.", examples=["2025-05-02T16:45:00Z"]
    )
    score: Score | None = Field(
        default=None, description="Final result in percent, if graded.", examples=[87.5]
    )
    evidence_url: HttpUrl | None = Field(
        default=None,
        description="Where the work that earned the completion can be seen.",
        examples=["https://northwind.example.edu/portfolio/ada/final-project"],
    )

    @model_validator(mode="after")
    def _learner_is_named(self) -> Self:
        if self.learner_id is None and self.learner_email is None:
            raise ValueError("name the learner by learner_id or learner_email")
        return self


EVENTS: tuple[type[Event], ...] = (CompletionReported,)
