"""Enrollment's HTTP API: parse, call the use case in a transaction, answer."""

import base64
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Self, TypeVar
from uuid import UUID

import asyncpg
from fastapi import APIRouter, Body, Header, Request, Response
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    ValidationError,
    model_validator,
)

from microcred_events import CancellationReason, CompletedBy, CompletionReported, Learner, Money, example_data
from microcred_events.partner import RejectionReason
from microcred_events.topics import partner_rejection_topic
from microcred_runtime import (
    Admin,
    AuditEntry,
    Caller,
    Connection,
    Cursor,
    Db,
    Limit,
    LimitedCaller,
    Page,
    Problem,
    RateLimited,
    RuntimeDep,
    Staff,
    max_body_bytes,
    problem_doc,
)

from . import service, signatures, subscribers
from .domain import Credential, CredentialKind, Enrollment, EnrollmentStatus, Partner, PartnerStatus

# Every route but the partners' signed completions takes a bearer token (that one documents its own 401).
_BEARER: dict[int | str, dict[str, Any]] = {401: problem_doc("No bearer token, or one that is not valid.")}
router = APIRouter(prefix="/enrollments", tags=["enrollments"], responses=_BEARER)
partners = APIRouter(prefix="/partners", tags=["partners"], responses=_BEARER)

T = TypeVar("T")

_ENROLLMENT_ID = "e2a7c4f1-3b9d-4e85-a6c0-7f1d2b8e9a34"
_COURSE_ID = "3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"


def _problems(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers a route may give."""
    return {status: problem_doc(description) for status, description in described.items()}


class EnrollmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    course_id: UUID = Field(description="The course to enroll in.", examples=[_COURSE_ID])
    again: bool = Field(
        default=False,
        description=(
            "Enroll although the caller holds a valid credential for the course (otherwise refused "
            "with `credential-held`, so nobody pays twice by mistake)."
        ),
    )


class CancellationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detail: str | None = Field(
        default=None, max_length=500, description="Why, for people.", examples=["Schedule conflict."]
    )


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: float | None = Field(
        default=None,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="Final result in percent.",
        examples=[87.5],
    )
    evidence_url: HttpUrl | None = Field(
        default=None,
        description="Where the work that earned the completion can be seen; goes into the credential.",
        examples=["https://northwind.example.edu/portfolio/ada/final-project"],
    )


class CompletionOut(BaseModel):
    enrollment_id: UUID = Field(examples=[_ENROLLMENT_ID])
    learner_id: UUID
    course_id: UUID = Field(examples=[_COURSE_ID])
    course_version: int = Field(description="The course version the credential is for.", examples=[3])
    completed_at: datetime
    completed_by: CompletedBy = Field(examples=["staff"])
    score: float | None = Field(examples=[87.5])
    evidence_url: str | None = Field(examples=["https://northwind.example.edu/portfolio/ada/final-project"])

    @classmethod
    def of(cls, enrollment: Enrollment) -> "CompletionOut":
        completion = enrollment.completion
        assert completion is not None
        return cls(
            enrollment_id=enrollment.enrollment_id,
            learner_id=enrollment.learner.learner_id,
            course_id=enrollment.course_id,
            course_version=enrollment.course_version,
            completed_at=completion.completed_at,
            completed_by=completion.completed_by,
            score=completion.score,
            evidence_url=completion.evidence_url,
        )


class EnrollmentOut(BaseModel):
    enrollment_id: UUID = Field(examples=[_ENROLLMENT_ID])
    learner: Learner = Field(examples=[example_data(Learner)])
    course_id: UUID = Field(examples=[_COURSE_ID])
    course_version: int = Field(description="The course version enrolled in.", examples=[3])
    price: Money = Field(description="What this enrollment costs.", examples=[example_data(Money)])
    requires_payment: bool = Field(examples=[True])
    status: EnrollmentStatus = Field(
        description="pending_payment -> active -> completed, or cancelled before completion.",
        examples=["pending_payment"],
    )
    created_at: datetime
    updated_at: datetime
    activated_at: datetime | None = None
    payment_id: UUID | None = Field(default=None, description="The settled payment that activated it.")
    cancelled_at: datetime | None = None
    cancellation_reason: CancellationReason | None = None
    cancellation_detail: str | None = None
    completion: CompletionOut | None = None

    @classmethod
    def of(cls, enrollment: Enrollment) -> "EnrollmentOut":
        return cls(
            enrollment_id=enrollment.enrollment_id,
            learner=enrollment.learner,
            course_id=enrollment.course_id,
            course_version=enrollment.course_version,
            price=enrollment.price,
            requires_payment=enrollment.requires_payment,
            status=enrollment.status,
            created_at=enrollment.created_at,
            updated_at=enrollment.updated_at,
            activated_at=enrollment.activated_at,
            payment_id=enrollment.payment_id,
            cancelled_at=enrollment.cancelled_at,
            cancellation_reason=enrollment.cancellation_reason,
            cancellation_detail=enrollment.cancellation_detail,
            completion=CompletionOut.of(enrollment) if enrollment.completion else None,
        )


def _render(enrollment: Enrollment) -> dict[str, Any]:
    return EnrollmentOut.of(enrollment).model_dump(mode="json")


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description=(
            "Required. A unique value per enrollment attempt (a UUID); a retry with the same key and "
            "body gets the first response again, with the same key and another body a 422."
        ),
        examples=["6a1f3c9e-0d2b-4f7a-8e15-3b9c7d2e4a60"],
    ),
]


@router.post(
    "",
    status_code=201,
    response_model=EnrollmentOut,
    summary="Enroll in a course",
    description=(
        "Enrolls the caller. A paid course waits for payment (`pending_payment`); a free one is "
        "`active` at once. Idempotent per `Idempotency-Key` (scoped to the caller): a retry gets the "
        "first response, status and body, even if the enrollment has changed since. The token must "
        "carry an `email` claim (and should carry `name`)."
    ),
    responses=_problems(
        {
            400: "No `Idempotency-Key` header.",
            403: "The token carries no (valid) `email` claim.",
            409: "The course is retired (`course-not-open`), the caller already has a live "
            "enrollment in it (`already-enrolled`, naming it in `enrollment_id`), or holds a valid "
            "credential for it (`credential-held`, naming it in `credential_id`; send `again` to "
            "enroll anyway).",
            422: "No published course with that id (`course-not-found`), the key was used with "
            "another request (`idempotency-key-reused`), or the request is malformed.",
        }
    ),
)
async def enroll(
    request: EnrollmentRequest, caller: LimitedCaller, db: Db, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    if idempotency_key is None:
        raise Problem(
            400, "idempotency-key-required", "send an Idempotency-Key header (a new UUID per enrollment)"
        )
    async with db.acquire() as conn, conn.transaction():
        response = await service.enroll(
            conn, caller, request.course_id, idempotency_key, _render, again=request.again
        )
    return JSONResponse(response.body, status_code=response.status)


@router.get(
    "",
    summary="My enrollments",
    description="The caller's own enrollments, newest first, a page at a time.",
    responses=_problems({400: "The cursor is not one this API returned."}),
)
async def list_enrollments(
    caller: Caller, db: Db, status: EnrollmentStatus | None = None, limit: Limit = 20, cursor: Cursor = None
) -> Page[EnrollmentOut]:
    async with db.acquire() as conn:
        enrollments, next_cursor = await service.list_enrollments(
            conn, caller, status=status, limit=limit, cursor=cursor
        )
    return Page(items=[EnrollmentOut.of(enrollment) for enrollment in enrollments], next_cursor=next_cursor)


@router.get(
    "/{enrollment_id}",
    summary="One enrollment",
    description="The caller's own enrollment; staff may view any.",
    responses=_problems({404: "No such enrollment, or it is someone else's."}),
)
async def get_enrollment(enrollment_id: UUID, caller: Caller, db: Db) -> EnrollmentOut:
    async with db.acquire() as conn:
        return EnrollmentOut.of(await service.get_enrollment(conn, caller, enrollment_id))


@router.post(
    "/{enrollment_id}/cancellation",
    summary="Cancel an enrollment",
    description=(
        "The learner cancels their own enrollment before completion (reason `learner_request`); "
        "staff of the course's issuer (and admins) may cancel anyone's (`staff_action`). Cancelling a "
        "cancelled enrollment changes nothing."
    ),
    responses=_problems(
        {
            403: "Staff of another issuer (`issuer-scope`).",
            404: "No such enrollment, or it is someone else's.",
            409: "The enrollment is completed.",
        }
    ),
)
async def cancel_enrollment(
    enrollment_id: UUID,
    caller: Caller,
    db: Db,
    request: Annotated[CancellationRequest | None, Body()] = None,
) -> EnrollmentOut:
    detail = request.detail if request else None
    async with db.acquire() as conn, conn.transaction():
        return EnrollmentOut.of(await service.cancel_enrollment(conn, caller, enrollment_id, detail))


@router.post(
    "/{enrollment_id}/completion",
    status_code=201,
    summary="Record a completion (staff)",
    description=(
        "Staff of the course's issuer (or an admin) attest that the learner completed the course; "
        "issuance then issues the credential. Nobody records their own completion. "
        "Only an active enrollment can be completed. Recording it again answers 200 with the "
        "existing completion and changes nothing."
    ),
    responses={
        200: {"model": CompletionOut, "description": "Already completed: the existing completion."},
        **_problems(
            {
                403: "The caller is not staff, is staff of another issuer (`issuer-scope`), or is "
                "the enrolled learner (`own-enrollment`).",
                404: "No such enrollment.",
                409: "The enrollment is not active (waiting for payment, or cancelled).",
            }
        ),
    },
)
async def complete_enrollment(
    enrollment_id: UUID,
    staff: Staff,
    db: Db,
    response: Response,
    request: Annotated[CompletionRequest | None, Body()] = None,
) -> CompletionOut:
    request = request or CompletionRequest()
    evidence_url = str(request.evidence_url) if request.evidence_url else None
    async with db.acquire() as conn, conn.transaction():
        enrollment, completed_now = await service.complete_enrollment(
            conn, staff, enrollment_id, score=request.score, evidence_url=evidence_url
        )
    if not completed_now:
        response.status_code = 200
    return CompletionOut.of(enrollment)


@router.get(
    "/{enrollment_id}/audit",
    summary="Who did what to an enrollment (staff)",
    description=(
        "The enrollment's changes, oldest first: what, when, who (the actor) and through which "
        "context (the source). For staff of the issuer of the enrollment's course, and admins."
    ),
    responses=_problems({403: "Not staff, or staff of another issuer.", 404: "No such enrollment."}),
)
async def audit_enrollment(enrollment_id: UUID, staff: Staff, db: Db) -> list[AuditEntry]:
    async with db.acquire() as conn:
        return await service.audit_enrollment(conn, staff, enrollment_id)


# --- the partner registry (staff and admins) -------------------------------------------------

_PARTNER_ID = "b3d5f7a9-2c4e-4e61-9a83-5f1b7d3c9e20"
_CREDENTIAL_ID = "4c8e2a6f-1b3d-4f57-9a0c-7e5d3b1f9a22"
# A registry entry is read on every report; these bounds keep it (and its answers) small.
_MAX_COURSES = 1000
_MAX_CREDENTIALS = 10

DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class CredentialRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: CredentialKind = Field(
        description=(
            "`hmac_sha256`: we generate a secret and answer it once. `ed25519`: send your public key."
        ),
        examples=["hmac_sha256"],
    )
    public_key: str | None = Field(
        default=None,
        max_length=1000,
        description=(
            "For `ed25519` only: the public key, as PEM (`PUBLIC KEY`) or the base64 of its 32 bytes."
        ),
        examples=[None],
    )

    @model_validator(mode="after")
    def _key_matches_kind(self) -> Self:
        if (self.kind is CredentialKind.ED25519) != (self.public_key is not None):
            raise ValueError("send public_key exactly when kind is ed25519")
        if self.public_key is not None:
            signatures.public_key_bytes(self.public_key)  # ValueError says why it is no Ed25519 key
        return self

    def new(self) -> service.NewCredential:
        key = signatures.public_key_bytes(self.public_key) if self.public_key else None
        return service.NewCredential(self.kind, key)


class PartnerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    display_name: DisplayName = Field(examples=["Northwind University"])
    course_ids: list[UUID] = Field(
        default_factory=list,
        max_length=_MAX_COURSES,
        description=(
            "Courses the partner may report completions of, besides those the catalog names it the "
            "delivery partner of."
        ),
        examples=[[_COURSE_ID]],
    )
    credentials: list[CredentialRequest] = Field(
        default_factory=lambda: [CredentialRequest(kind=CredentialKind.HMAC_SHA256)],
        max_length=_MAX_CREDENTIALS,
        description="How the partner signs; by default one HMAC secret.",
    )


class PartnerUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    display_name: DisplayName | None = Field(default=None, examples=["Northwind University"])
    course_ids: list[UUID] | None = Field(
        default=None,
        max_length=_MAX_COURSES,
        description=(
            "Replaces the courses the registry grants (the catalog's delivery partner stays allowed)."
        ),
        examples=[[_COURSE_ID]],
    )

    @model_validator(mode="after")
    def _changes_something(self) -> Self:
        if self.display_name is None and self.course_ids is None:
            raise ValueError("send display_name, course_ids or both")
        return self


class SuspensionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(
        default=None, max_length=500, description="Why, for people.", examples=["Contract under review."]
    )


class CredentialOut(BaseModel):
    credential_id: UUID = Field(examples=[_CREDENTIAL_ID])
    kind: CredentialKind = Field(examples=["hmac_sha256"])
    active: bool = Field(description="Signatures made with it are accepted.", examples=[True])
    created_at: datetime
    revoked_at: datetime | None = None
    public_key: str | None = Field(
        default=None, description="For `ed25519`: the base64 of the 32-byte public key.", examples=[None]
    )

    @classmethod
    def of(cls, credential: Credential) -> Self:
        key = credential.public_key
        return cls(
            credential_id=credential.credential_id,
            kind=credential.kind,
            active=credential.active,
            created_at=credential.created_at,
            revoked_at=credential.revoked_at,
            public_key=base64.b64encode(key).decode() if key else None,
        )


class IssuedCredentialOut(CredentialOut):
    secret: str | None = Field(
        description="For `hmac_sha256`: the secret. Shown in this answer only; store it now.",
        examples=["q5d1O0VJ0-4a1hYb0yYk3Yw9mYx0Z7o2m0Tq0kLh5zQ"],
    )

    @classmethod
    def of(cls, credential: Credential) -> Self:
        return cls(**CredentialOut.of(credential).model_dump(), secret=credential.secret)


class PartnerOut(BaseModel):
    partner_id: UUID = Field(examples=[_PARTNER_ID])
    display_name: str = Field(examples=["Northwind University"])
    status: PartnerStatus = Field(
        description="A suspended partner's reports are refused (`partner_suspended`).", examples=["active"]
    )
    course_ids: list[UUID] = Field(
        description="Courses the registry lets it report, besides those the catalog says it delivers.",
        examples=[[_COURSE_ID]],
    )
    credentials: list[CredentialOut] = Field(
        description="Every credential, revoked ones too; never a secret."
    )
    kafka_source: str = Field(
        description="The `ce_source` its Kafka messages must carry.",
        examples=[f"urn:microcred:partner:{_PARTNER_ID}"],
    )
    rejection_topic: str = Field(
        description="The Kafka topic where its refused reports are told back.",
        examples=[f"partner.{_PARTNER_ID}.rejections.v1"],
    )
    created_at: datetime
    updated_at: datetime
    suspended_at: datetime | None = None
    suspension_reason: str | None = None

    @classmethod
    def of(cls, partner: Partner, topic_prefix: str) -> Self:
        return cls(
            partner_id=partner.partner_id,
            display_name=partner.display_name,
            status=partner.status,
            course_ids=sorted(partner.course_ids),
            credentials=[CredentialOut.of(credential) for credential in partner.credentials],
            kafka_source=partner.source,
            rejection_topic=topic_prefix + partner_rejection_topic(partner.partner_id),
            created_at=partner.created_at,
            updated_at=partner.updated_at,
            suspended_at=partner.suspended_at,
            suspension_reason=partner.suspension_reason,
        )


class IssuedSecret(BaseModel):
    credential_id: UUID = Field(examples=[_CREDENTIAL_ID])
    secret: str = Field(
        description="The HMAC secret. Shown in this answer only; store it now.",
        examples=["q5d1O0VJ0-4a1hYb0yYk3Yw9mYx0Z7o2m0Tq0kLh5zQ"],
    )


class PartnerCreatedOut(PartnerOut):
    secrets: list[IssuedSecret] = Field(description="The new HMAC secrets; never shown again.")


def _topic_prefix(runtime: RuntimeDep) -> str:
    prefix: str = runtime.settings.kafka_topic_prefix
    return prefix


@partners.post(
    "",
    status_code=201,
    summary="Register a partner (admin)",
    description=(
        "Registers an active partner institution with the courses it may report and its credentials, "
        "and creates its Kafka rejection topic. HMAC secrets are generated here and answered in "
        "`secrets` this once: store them now, they are never shown again."
    ),
    responses=_problems(
        {403: "The caller is not an admin.", 503: "Kafka did not create the rejection topic; try again."}
    ),
)
async def register_partner(
    request: PartnerRequest, admin: Admin, db: Db, runtime: RuntimeDep
) -> PartnerCreatedOut:
    async with db.acquire() as conn, conn.transaction():
        partner = await service.register_partner(
            conn,
            display_name=request.display_name,
            course_ids=request.course_ids,
            credentials=[credential.new() for credential in request.credentials],
        )
        # Before the commit: a partner exists only with a topic to tell its refusals on.
        try:
            await subscribers.ensure_partner_topics(runtime.settings, [partner.partner_id])
        except (OSError, RuntimeError) as exc:  # aiokafka's errors are RuntimeErrors
            raise Problem(503, "kafka-unavailable", f"the rejection topic was not created: {exc}") from None
    secrets = [
        IssuedSecret(credential_id=credential.credential_id, secret=credential.secret)
        for credential in partner.credentials
        if credential.secret is not None
    ]
    out = PartnerOut.of(partner, _topic_prefix(runtime))
    return PartnerCreatedOut(**out.model_dump(), secrets=secrets)


@partners.get(
    "",
    summary="Partners (staff)",
    description="Registered partners, newest first, a page at a time.",
    responses=_problems({400: "The cursor is not one this API returned.", 403: "The caller is not staff."}),
)
async def list_partners(
    staff: Staff,
    db: Db,
    runtime: RuntimeDep,
    status: PartnerStatus | None = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Page[PartnerOut]:
    async with db.acquire() as conn:
        found, next_cursor = await service.list_partners(conn, status=status, limit=limit, cursor=cursor)
    prefix = _topic_prefix(runtime)
    return Page(items=[PartnerOut.of(partner, prefix) for partner in found], next_cursor=next_cursor)


@partners.get(
    "/{partner_id}",
    summary="One partner (staff)",
    description="The partner, its courses and its credentials (never a secret).",
    responses=_problems({403: "The caller is not staff.", 404: "No such partner."}),
)
async def get_partner(partner_id: UUID, staff: Staff, db: Db, runtime: RuntimeDep) -> PartnerOut:
    async with db.acquire() as conn:
        return PartnerOut.of(await service.get_partner(conn, partner_id), _topic_prefix(runtime))


@partners.patch(
    "/{partner_id}",
    summary="Rename a partner or change its courses (admin)",
    description="`course_ids` replaces the courses the registry grants; reports already accepted stay.",
    responses=_problems({403: "The caller is not an admin.", 404: "No such partner."}),
)
async def update_partner(
    partner_id: UUID, request: PartnerUpdate, admin: Admin, db: Db, runtime: RuntimeDep
) -> PartnerOut:
    async with db.acquire() as conn, conn.transaction():
        partner = await service.update_partner(
            conn, partner_id, display_name=request.display_name, course_ids=request.course_ids
        )
    return PartnerOut.of(partner, _topic_prefix(runtime))


@partners.post(
    "/{partner_id}/suspension",
    summary="Suspend a partner (admin)",
    description="Its reports are refused with `partner_suspended` until it is reactivated. Idempotent.",
    responses=_problems({403: "The caller is not an admin.", 404: "No such partner."}),
)
async def suspend_partner(
    partner_id: UUID,
    admin: Admin,
    db: Db,
    runtime: RuntimeDep,
    request: Annotated[SuspensionRequest | None, Body()] = None,
) -> PartnerOut:
    async with db.acquire() as conn, conn.transaction():
        partner = await service.suspend_partner(conn, partner_id, request.reason if request else None)
    return PartnerOut.of(partner, _topic_prefix(runtime))


@partners.post(
    "/{partner_id}/reactivation",
    summary="Reactivate a partner (admin)",
    description="Its reports are taken again. Idempotent.",
    responses=_problems({403: "The caller is not an admin.", 404: "No such partner."}),
)
async def reactivate_partner(partner_id: UUID, admin: Admin, db: Db, runtime: RuntimeDep) -> PartnerOut:
    async with db.acquire() as conn, conn.transaction():
        partner = await service.reactivate_partner(conn, partner_id)
    return PartnerOut.of(partner, _topic_prefix(runtime))


@partners.post(
    "/{partner_id}/credentials",
    status_code=201,
    summary="Add a credential (admin)",
    description=(
        "Adds a credential beside the active ones: to rotate, add one, let the partner sign with it, "
        "then revoke the old one. An HMAC secret is answered in `secret` this once."
    ),
    responses=_problems({403: "The caller is not an admin.", 404: "No such partner."}),
)
async def add_credential(
    partner_id: UUID, request: CredentialRequest, admin: Admin, db: Db
) -> IssuedCredentialOut:
    async with db.acquire() as conn, conn.transaction():
        credential = await service.add_credential(conn, partner_id, request.new())
    return IssuedCredentialOut.of(credential)


@partners.delete(
    "/{partner_id}/credentials/{credential_id}",
    summary="Revoke a credential (admin)",
    description="Signatures made with it are refused from now on. Revoking it again changes nothing.",
    responses=_problems({403: "The caller is not an admin.", 404: "No such partner or credential."}),
)
async def revoke_credential(partner_id: UUID, credential_id: UUID, admin: Admin, db: Db) -> CredentialOut:
    async with db.acquire() as conn, conn.transaction():
        return CredentialOut.of(await service.revoke_credential(conn, partner_id, credential_id))


# --- partners' completion reports ------------------------------------------------------------

MAX_BATCH = 1000
# 1,000 reports of a generous 2 KiB each.
MAX_BODY_BYTES = 2 * 1024 * 1024
# A batch locks the enrollments it completes; two overlapping batches may deadlock, and one is
# then simply run again (the reports the other accepted answer `duplicate`).
_CONFLICTS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError, asyncpg.UniqueViolationError)
_ATTEMPTS = 3


class ReportResultOut(BaseModel):
    index: int = Field(description="The report's position in the request, from 0.", examples=[0])
    report_id: UUID | None = Field(
        description="The report's id; null when the item carried no readable one.",
        examples=["6f4a2c8e-9b1d-4a53-8c7e-2d0b5f9a1c36"],
    )
    status: service.ReportStatus = Field(
        description="`accepted`: the enrollment is completed now. `duplicate`: this report was accepted "
        "before, nothing changed. `refused`: see `reason`.",
        examples=["accepted"],
    )
    reason: RejectionReason | None = Field(
        default=None, description="Why it was refused, for branching on.", examples=[None]
    )
    detail: str | None = Field(default=None, description="What to fix, for people.", examples=[None])
    enrollment_id: UUID | None = Field(
        default=None,
        description="The completed enrollment (accepted or duplicate).",
        examples=[_ENROLLMENT_ID],
    )

    @classmethod
    def of(cls, index: int, outcome: service.ReportOutcome) -> Self:
        refusal = outcome.refusal
        return cls(
            index=index,
            report_id=outcome.report_id,
            status=outcome.status,
            reason=refusal.reason if refusal else None,
            detail=refusal.detail if refusal else None,
            enrollment_id=outcome.enrollment_id,
        )


class CompletionResults(BaseModel):
    results: list[ReportResultOut] = Field(description="One per report, in the order sent.")


_REPORT_SCHEMA = CompletionReported.model_json_schema()


@partners.post(
    "/{partner_id}/completions",
    tags=["partner completions"],
    dependencies=[RateLimited],
    summary="Report completions (partner, signed)",
    description=(
        "A partner reports one completion (a `CompletionReported` object) or a cohort (an array of "
        f"up to {MAX_BATCH}), signed Standard-Webhooks style: `webhook-signature` holds `v1,<base64 "
        "HMAC-SHA256>` (or `v1a,<base64 Ed25519>`) of `<webhook-id>.<webhook-timestamp>.<raw body>`; "
        "the timestamp (Unix seconds) must be within 5 minutes of ours, and a webhook-id is taken "
        "once. No bearer token: the signature is the authentication. Each report is answered in "
        "`results`, in order: `accepted`, `duplicate` (accepted before) or `refused` with a `reason`. "
        "A report is processed exactly as one from the partner topic. See docs/partners.md."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            _REPORT_SCHEMA,
                            {"type": "array", "items": _REPORT_SCHEMA, "minItems": 1, "maxItems": MAX_BATCH},
                        ]
                    }
                }
            },
        }
    },
    responses=_problems(
        {
            400: "The body is not JSON (`malformed-body`).",
            401: "A signature header is missing or wrong (`bad-signature`), or the timestamp is more "
            "than 5 minutes off (`stale-timestamp`).",
            403: "The partner is suspended (`partner-suspended`).",
            404: "No such partner (`unknown-partner`).",
            409: "This webhook-id was taken already (`replayed-request`).",
            413: f"More than {MAX_BATCH} reports (`batch-too-large`) or {MAX_BODY_BYTES} bytes "
            "(`body-too-large`).",
            422: "The batch is empty (`no-reports`).",
        }
    ),
)
@max_body_bytes(MAX_BODY_BYTES)
async def report_completions(
    partner_id: UUID,
    request: Request,
    db: Db,
    webhook_id: Annotated[str | None, Header(max_length=255)] = None,
    webhook_timestamp: Annotated[str | None, Header(max_length=32)] = None,
    webhook_signature: Annotated[str | None, Header(max_length=signatures.MAX_HEADER_LENGTH)] = None,
) -> CompletionResults:
    body = await request.body()  # raw: the signature covers these bytes
    signed = service.SignedRequest(webhook_id, webhook_timestamp, webhook_signature, body)

    async def take(conn: Connection) -> list[service.ReportOutcome]:
        partner = await service.authenticate_request(conn, partner_id, signed)
        return await service.report_completions(conn, partner, _reports(body))

    outcomes = await _in_transaction(db, take)
    return CompletionResults(
        results=[ReportResultOut.of(index, outcome) for index, outcome in enumerate(outcomes)]
    )


def _reports(body: bytes) -> list[service.Report]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise Problem(400, "malformed-body", "the body is not JSON") from None
    items = document if isinstance(document, list) else [document]
    if not items:
        raise Problem(422, "no-reports", "the batch holds no report")
    if len(items) > MAX_BATCH:
        raise Problem(
            413, "batch-too-large", f"at most {MAX_BATCH} reports per request; this one has {len(items)}"
        )
    return [_report(item) for item in items]


def _report(item: object) -> service.Report:
    try:
        # Unknown fields are ignored, as on the partner topic: a newer minor version still reads.
        return CompletionReported.model_validate(item, extra="ignore")
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        shown = "; ".join(
            f"{'.'.join(map(str, error['loc'])) or 'report'}: {error['msg']}" for error in errors[:3]
        )
        return service.MalformedReport(f"not a CompletionReported: {shown}", service.loose_report_id(item))


async def _in_transaction(db: asyncpg.Pool, work: Callable[[Connection], Awaitable[T]]) -> T:
    attempt = 0
    while True:
        attempt += 1
        try:
            async with db.acquire() as conn, conn.transaction():
                return await work(conn)
        except _CONFLICTS:
            if attempt >= _ATTEMPTS:
                raise
