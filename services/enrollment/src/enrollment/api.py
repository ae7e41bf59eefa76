"""Enrollment's HTTP API: parse, call the use case in a transaction, answer."""

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Body, Header, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from microcred_events import CancellationReason, CompletedBy, Learner, Money, example_data
from microcred_runtime import Caller, Cursor, Db, Limit, Page, Problem, Staff, problem_doc

from . import service
from .domain import Enrollment, EnrollmentStatus

router = APIRouter(prefix="/enrollments", tags=["enrollments"])

_ENROLLMENT_ID = "e2a7c4f1-3b9d-4e85-a6c0-7f1d2b8e9a34"
_COURSE_ID = "3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"


def _problems(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers a route may give."""
    return {status: problem_doc(description) for status, description in described.items()}


class EnrollmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    course_id: UUID = Field(description="The course to enroll in.", examples=[_COURSE_ID])


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
            409: "The course is retired (`course-not-open`), or the caller already has a live "
            "enrollment in it (`already-enrolled`, naming it in `enrollment_id`).",
            422: "No published course with that id (`course-not-found`), the key was used with "
            "another request (`idempotency-key-reused`), or the request is malformed.",
        }
    ),
)
async def enroll(
    request: EnrollmentRequest, caller: Caller, db: Db, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    if idempotency_key is None:
        raise Problem(
            400, "idempotency-key-required", "send an Idempotency-Key header (a new UUID per enrollment)"
        )
    async with db.acquire() as conn, conn.transaction():
        response = await service.enroll(conn, caller, request.course_id, idempotency_key, _render)
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
        "staff may cancel anyone's (`staff_action`). Cancelling a cancelled enrollment changes nothing."
    ),
    responses=_problems(
        {404: "No such enrollment, or it is someone else's.", 409: "The enrollment is completed."}
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
        "Staff attest that the learner completed the course; issuance then issues the credential. "
        "Only an active enrollment can be completed. Recording it again answers 200 with the "
        "existing completion and changes nothing."
    ),
    responses={
        200: {"model": CompletionOut, "description": "Already completed: the existing completion."},
        **_problems(
            {
                403: "The caller is not staff.",
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
