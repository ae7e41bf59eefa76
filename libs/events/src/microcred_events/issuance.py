"""Events published by the issuance context: verifiable credentials issued and revoked.

The credential itself (an Open Badges 3.0 `OpenBadgeCredential`, signed) is served at
`credential_url`; these events announce it, so they carry what a notification or a read model
needs rather than the signed document.
"""

from enum import StrEnum
from typing import ClassVar, Self
from uuid import UUID

from pydantic import Field, HttpUrl, model_validator

from microcred_events.base import ACTOR_EXAMPLE, Actor, Event, NonEmptyStr, UtcDateTime
from microcred_events.topics import Topic

_CREDENTIAL_ID = "7e2b9d4c-5a1f-4c36-b8e0-6d3a2f9c1e47"
_LEARNER_ID = "1d6f8b3a-4c2e-4a97-b5d1-8e0c3f7a2b59"
_CREDENTIAL_DESCRIPTION = "The credential (the aggregate id and message key)."


class CredentialKind(StrEnum):
    """What a credential was earned for: one course, or a whole pathway."""

    COURSE = "course"
    PATHWAY = "pathway"


class StatusPurpose(StrEnum):
    """The Bitstring Status List purpose the credential's status was set under."""

    REVOCATION = "revocation"
    SUSPENSION = "suspension"


class CredentialIssued(Event):
    """A credential was minted, signed and recorded for a learner.

    Consumers may rely on: at most one course credential per enrollment. A `course` credential
    has `enrollment_id` and `course_id` and no `pathway_id`; a `pathway` credential has
    `pathway_id` and neither of the others. `credential_url` serves the signed credential.
    """

    TYPE: ClassVar[str] = "org.microcred.issuance.credential.issued.v1"
    TOPIC: ClassVar[Topic] = Topic.ISSUANCE_CREDENTIAL
    KEY: ClassVar[str] = "credential_id"

    credential_id: UUID = Field(description=_CREDENTIAL_DESCRIPTION, examples=[_CREDENTIAL_ID])
    kind: CredentialKind = Field(description="Whether it is for a course or a pathway.", examples=["course"])
    learner_id: UUID = Field(description="The holder.", examples=[_LEARNER_ID])
    enrollment_id: UUID | None = Field(
        default=None,
        description="The completed enrollment, for a course credential.",
        examples=["e2a7c4f1-3b9d-4e85-a6c0-7f1d2b8e9a34"],
    )
    course_id: UUID | None = Field(
        default=None,
        description="The course, for a course credential.",
        examples=["3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"],
    )
    pathway_id: UUID | None = Field(
        default=None,
        description="The pathway, for a pathway credential.",
        # A course credential comes first, and it has no pathway.
        examples=[None, "5b9e2d41-7a3c-4f08-b6e1-9c2d4a7f8e03"],
    )
    achievement_id: UUID = Field(
        description="The achievement attested, from the catalog.",
        examples=["c7e4b1a2-9d3f-4e6a-8b05-2a1f7c9d3e68"],
    )
    achievement_name: NonEmptyStr = Field(
        description="Name of the achievement, as on the credential.", examples=["Data Analysis Foundations"]
    )
    issued_at: UtcDateTime = Field(
        description="The credential's validFrom.", examples=["2025-05-02T16:46:03Z"]
    )
    valid_until: UtcDateTime | None = Field(
        default=None,
        description="The credential's validUntil, after `issued_at`; null if it does not expire.",
        examples=["2027-05-02T16:46:03Z"],
    )
    credential_url: HttpUrl = Field(
        description="Public URL of the signed credential, where anyone can fetch and verify it.",
        examples=["https://credentials.microcred.example/credentials/7e2b9d4c-5a1f-4c36-b8e0-6d3a2f9c1e47"],
    )

    @model_validator(mode="after")
    def _subject_matches_kind(self) -> Self:
        if self.kind is CredentialKind.COURSE:
            if self.course_id is None or self.enrollment_id is None or self.pathway_id is not None:
                raise ValueError("a course credential has course_id and enrollment_id, and no pathway_id")
        elif self.pathway_id is None or self.course_id is not None or self.enrollment_id is not None:
            raise ValueError("a pathway credential has pathway_id, and no course_id or enrollment_id")
        if self.valid_until is not None and self.valid_until <= self.issued_at:
            raise ValueError("valid_until must be after issued_at")
        return self


class CredentialRevoked(Event):
    """A credential's status was set in its status list: revoked for good, or suspended.

    Consumers may rely on: from `revoked_at` on, verification reports the credential as revoked
    or suspended (per `status_purpose`); the credential itself is unchanged.
    """

    TYPE: ClassVar[str] = "org.microcred.issuance.credential.revoked.v1"
    TOPIC: ClassVar[Topic] = Topic.ISSUANCE_CREDENTIAL
    KEY: ClassVar[str] = "credential_id"

    credential_id: UUID = Field(description=_CREDENTIAL_DESCRIPTION, examples=[_CREDENTIAL_ID])
    learner_id: UUID = Field(description="The holder.", examples=[_LEARNER_ID])
    status_purpose: StatusPurpose = Field(
        description="Revocation (permanent) or suspension (may be lifted).", examples=["revocation"]
    )
    reason: NonEmptyStr = Field(
        description="Why, as published with the status.", examples=["Completion was recorded in error."]
    )
    revoked_at: UtcDateTime = Field(
        description="When the status took effect.", examples=["2025-06-10T12:00:00Z"]
    )
    revoked_by: Actor | None = Field(
        default=None,
        description="Who revoked or suspended it (`<role>:<subject>`). Absent from older producers.",
        examples=[ACTOR_EXAMPLE],
    )


class CredentialReinstated(Event):
    """A suspension was lifted: the credential is in good standing again.

    Consumers may rely on: it follows a `CredentialRevoked` with status_purpose `suspension` for
    the same credential; revocations are permanent and are never reinstated.
    """

    TYPE: ClassVar[str] = "org.microcred.issuance.credential.reinstated.v1"
    TOPIC: ClassVar[Topic] = Topic.ISSUANCE_CREDENTIAL
    KEY: ClassVar[str] = "credential_id"

    credential_id: UUID = Field(description=_CREDENTIAL_DESCRIPTION, examples=[_CREDENTIAL_ID])
    learner_id: UUID = Field(description="The holder.", examples=[_LEARNER_ID])
    reinstated_at: UtcDateTime = Field(
        description="When the suspension was lifted.", examples=["2025-06-12T09:00:00Z"]
    )
    reinstated_by: Actor | None = Field(
        default=None,
        description="Who lifted the suspension (`<role>:<subject>`). Absent from older producers.",
        examples=[ACTOR_EXAMPLE],
    )


EVENTS: tuple[type[Event], ...] = (CredentialIssued, CredentialRevoked, CredentialReinstated)
