"""Events between partner institutions and enrollment, in the same CloudEvents envelope as ours.

Partners are outside our deployment: what they send is checked like any input. Enrollment
matches a report to an active enrollment and checks that the partner may report the course (it
delivers it, `CourseSnapshot.delivery_partner_id`, or the partner registry grants it) before it
records a `CourseCompleted`; a refused report is answered with a `CompletionRejected` on the
partner's own rejection topic (`partner_rejection_topic`).
"""

from enum import StrEnum
from typing import ClassVar, Self
from uuid import UUID

from pydantic import Field, HttpUrl, model_validator

from microcred_events.base import EmailAddress, Event, NonEmptyStr, Score, UtcDateTime
from microcred_events.topics import Topic


class CompletionReported(Event):
    """A partner institution reports that a learner completed a course it delivers.

    Published by the partner to the partner topic, signed (see docs/partners.md); enrollment's
    signed HTTP endpoint takes the same report and applies it the same way. The learner is named
    by `learner_id`, `learner_email` or both; `enrollment_id` when the partner knows it.
    Consumers may rely on its shape only: a report is a claim, not a completion.
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


class RejectionReason(StrEnum):
    """Why enrollment refused a partner's report; stable to branch on.

    `unknown_partner` and `bad_signature` never reach a rejection topic: they are the reasons such
    messages are dead-lettered (an unregistered sender has no topic, and an unverified message
    may come from anyone: telling the partner it names would let anyone write to that partner's
    topic). Over HTTP they are answered 404 and 401.
    """

    UNKNOWN_PARTNER = "unknown_partner"
    PARTNER_SUSPENDED = "partner_suspended"
    BAD_SIGNATURE = "bad_signature"
    PARTNER_MISMATCH = "partner_mismatch"
    MALFORMED_REPORT = "malformed_report"
    COURSE_NOT_ALLOWED = "course_not_allowed"
    NO_ACTIVE_ENROLLMENT = "no_active_enrollment"
    LEARNER_MISMATCH = "learner_mismatch"
    ALREADY_COMPLETED = "already_completed"
    STALE_MESSAGE = "stale_message"


# Not in the registry (see `EVENTS`): the registry's topic map cannot express per-partner topics.
class CompletionRejected(Event):
    """Enrollment refused a partner's completion report; nothing was completed.

    Published by enrollment (`ce_source` `urn:microcred:enrollment`) to the reporting partner's
    own topic, `partner.<partner_id>.rejections.v1`, so each partner reads only its own refusals.
    One per refused message: a redelivery of the same message (same `ce_source` and `ce_id`) is
    not refused twice. A report refused for a reason that can change (`no_active_enrollment`,
    `course_not_allowed`, `partner_suspended`, `stale_message`) may be sent again under the same
    `report_id` (a `stale_message` under a new `ce_id` and a current `ce_time`).
    """

    TYPE: ClassVar[str] = "org.microcred.partner.completion.rejected.v1"
    # The reports' topic, as the registry requires a topic of the contract; a rejection is always
    # published with `topic=partner_rejection_topic(partner_id)` instead.
    TOPIC: ClassVar[Topic] = Topic.PARTNER_COMPLETION
    KEY: ClassVar[str] = "message_id"

    message_id: NonEmptyStr = Field(
        description="`ce_id` of the refused message (the message key).",
        examples=["0b6b5c1e-3f5a-4f4e-9a49-8d2f4c6e7a10"],
    )
    partner_id: UUID = Field(
        description="The partner the message came from (its `ce_source`).",
        examples=["b3d5f7a9-2c4e-4e61-9a83-5f1b7d3c9e20"],
    )
    report_id: UUID | None = Field(
        default=None,
        description="The refused report's `report_id`; null when the body did not carry a readable one.",
        examples=["6f4a2c8e-9b1d-4a53-8c7e-2d0b5f9a1c36"],
    )
    reason: RejectionReason = Field(description="Why, for branching on.", examples=["no_active_enrollment"])
    detail: str = Field(
        description="What to fix, for people.",
        examples=[
            "the learner's enrollment in course 3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15 is waiting for payment"
        ],
    )
    rejected_at: UtcDateTime = Field(description="When it was refused.", examples=["2025-05-02T16:45:02Z"])


EVENTS: tuple[type[Event], ...] = (CompletionReported,)
"""The registered partner events. `CompletionRejected` is not one: the registry requires a topic of
the topic map, and its topic is the partner's own (`topics.partner_rejection_topic`)."""
