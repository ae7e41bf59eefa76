"""Enrollment use cases: each runs in the caller's transaction and queues the events it causes."""

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from microcred_events import (
    CoursePublished,
    CourseRetired,
    CourseUpdated,
    Learner,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
)
from microcred_runtime import Connection, Principal, Problem, decode_cursor, encode_cursor, outbox

from . import domain, repository
from .domain import CourseStatus, Enrollment, EnrollmentStatus, Ignored, Transition
from .repository import StoredResponse

log = logging.getLogger(__name__)

# --- the course read model -------------------------------------------------------------------


async def record_course(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    if isinstance(event, CoursePublished):
        await repository.upsert_course(conn, event.course, CourseStatus.PUBLISHED, event.published_at)
    else:
        await repository.upsert_course(conn, event.course, None, event.updated_at)


async def record_retirement(conn: Connection, event: CourseRetired) -> None:
    """Store the retirement and cancel the enrollments still waiting for payment.

    A stale retirement (a version already superseded, e.g. by a republication) cancels nothing.
    """
    if not await repository.retire_course(conn, event.course_id, event.version, event.retired_at):
        return
    now = _now()
    for enrollment in await repository.pending_for_course(conn, event.course_id):
        await _apply(conn, domain.retire_course(enrollment, now))


# --- learners and staff ----------------------------------------------------------------------


async def enroll(
    conn: Connection,
    caller: Principal,
    course_id: UUID,
    idempotency_key: str,
    render: Callable[[Enrollment], dict[str, Any]],
) -> StoredResponse:
    """Enroll the caller in a course, once per idempotency key.

    `render` makes the response body; it is stored with the key, so a retry with the same key and
    request gets the very response the first request got, even after the enrollment has moved on.
    """
    learner = _learner(caller)
    fingerprint = _fingerprint({"course_id": str(course_id)})
    if not await repository.claim_idempotency_key(conn, caller.subject, idempotency_key, fingerprint):
        record = await repository.get_idempotency_record(conn, caller.subject, idempotency_key)
        if record.request_fingerprint != fingerprint:
            raise Problem(
                422,
                "idempotency-key-reused",
                "this Idempotency-Key was already used with a different request; use a new key",
            )
        return record.response

    course = await repository.get_course(conn, course_id)
    if course is None:
        # The catalog only publishes courses it opens to enrollment: unknown here means unknown,
        # not yet published, or published so recently that its event has not arrived.
        raise Problem(422, "course-not-found", f"no published course {course_id}", course_id=str(course_id))
    try:
        transition = domain.enroll(uuid.uuid4(), learner, course, _now())
    except domain.CourseNotOpen as exc:
        raise Problem(409, "course-not-open", str(exc), course_id=str(course_id)) from None
    if not await repository.insert_enrollment(conn, transition.enrollment):
        existing = await repository.live_enrollment_id(conn, learner.learner_id, course_id)
        raise Problem(
            409,
            "already-enrolled",
            f"you already have a live enrollment in course {course_id}",
            # None only if that enrollment ended in the instant since the insert was refused.
            enrollment_id=str(existing) if existing else None,
        )
    for event in transition.events:
        await outbox.add(conn, event)
    response = StoredResponse(201, render(transition.enrollment))
    await repository.store_response(conn, caller.subject, idempotency_key, response)
    return response


async def get_enrollment(conn: Connection, caller: Principal, enrollment_id: UUID) -> Enrollment:
    return await _visible(conn, caller, enrollment_id)


async def list_enrollments(
    conn: Connection, caller: Principal, *, status: EnrollmentStatus | None, limit: int, cursor: str | None
) -> tuple[list[Enrollment], str | None]:
    """The caller's own enrollments, newest first; returns a page and the cursor of the next one."""
    key = decode_cursor(cursor, 2)
    after = _sort_key(key) if key else None
    # One more than asked tells whether a next page exists.
    enrollments = await repository.list_for_learner(
        conn, caller.learner_id, status=status, after=after, limit=limit + 1
    )
    page = enrollments[:limit]
    if len(enrollments) <= limit:
        return page, None
    last = page[-1]
    return page, encode_cursor([last.created_at.isoformat(), str(last.enrollment_id)])


async def cancel_enrollment(
    conn: Connection, caller: Principal, enrollment_id: UUID, detail: str | None
) -> Enrollment:
    """The learner cancels their own enrollment; staff may cancel anyone's (reason staff_action)."""
    enrollment = await _visible(conn, caller, enrollment_id, for_update=True)
    by_staff = enrollment.learner.learner_id != caller.learner_id
    try:
        transition = domain.cancel(enrollment, by_staff=by_staff, detail=detail, now=_now())
    except domain.EnrollmentRuleViolated as exc:
        raise Problem(409, "enrollment-state", str(exc), enrollment_status=enrollment.status.value) from None
    await _apply(conn, transition)
    return transition.enrollment


async def complete_enrollment(
    conn: Connection,
    staff: Principal,
    enrollment_id: UUID,
    *,
    score: float | None,
    evidence_url: str | None,
) -> tuple[Enrollment, bool]:
    """Staff record a completion; returns the enrollment and whether this call completed it."""
    enrollment = await _visible(conn, staff, enrollment_id, for_update=True)
    try:
        transition = domain.complete(
            enrollment, score=score, evidence_url=evidence_url, recorded_by=staff.subject, now=_now()
        )
    except domain.EnrollmentRuleViolated as exc:
        raise Problem(409, "enrollment-state", str(exc), enrollment_status=enrollment.status.value) from None
    await _apply(conn, transition)
    return transition.enrollment, transition.changed


# --- billing ---------------------------------------------------------------------------------


async def settle_payment(conn: Connection, event: PaymentSettled) -> None:
    """Activate the enrollment the payment is for; record a payment that activates nothing."""
    enrollment = await repository.get_enrollment(conn, event.enrollment_id, for_update=True)
    if enrollment is None:
        reason = "enrollment_unknown"
    else:
        transition = domain.activate(enrollment, event.payment_id, event.amount, _now())
        await _apply(conn, transition)
        if transition.ignored in (None, Ignored.DUPLICATE):
            return
        reason = transition.ignored
    # Money was taken for nothing: keep it visible for reconciliation rather than drop it.
    log.warning(
        "settled payment not applied: %s",
        reason,
        extra={"payment_id": str(event.payment_id), "enrollment_id": str(event.enrollment_id)},
    )
    await repository.record_unapplied_payment(
        conn,
        payment_id=event.payment_id,
        enrollment_id=event.enrollment_id,
        learner_id=event.learner_id,
        amount=event.amount,
        reason=reason,
        settled_at=event.settled_at,
    )


async def fail_payment(conn: Connection, event: PaymentFailed) -> None:
    await _react(
        conn,
        event.enrollment_id,
        lambda enrollment: domain.fail_payment(enrollment, event.reason, _now()),
        payment_id=event.payment_id,
    )


async def refund_payment(conn: Connection, event: RefundIssued) -> None:
    await _react(
        conn,
        event.enrollment_id,
        lambda enrollment: domain.refund(
            enrollment, event.payment_id, event.reason, _now(), in_full=event.fully_refunded is not False
        ),
        payment_id=event.payment_id,
    )


# --- helpers ---------------------------------------------------------------------------------


async def _react(
    conn: Connection,
    enrollment_id: UUID,
    transition_of: Callable[[Enrollment], Transition],
    *,
    payment_id: UUID,
) -> None:
    """Apply another context's event to one enrollment; what does not apply is logged, not failed."""
    context = {"enrollment_id": str(enrollment_id), "payment_id": str(payment_id)}
    enrollment = await repository.get_enrollment(conn, enrollment_id, for_update=True)
    if enrollment is None:
        # Billing only charges for enrollments we published, so this one came from outside this
        # deployment (another environment on a shared cluster): nothing to change, now or later.
        log.warning("payment event for an unknown enrollment", extra=context)
        return
    transition = transition_of(enrollment)
    if not transition.changed:
        log.info("payment event changed nothing: %s", transition.ignored, extra=context)
    await _apply(conn, transition)


async def _apply(conn: Connection, transition: Transition) -> None:
    if not transition.changed:
        return
    await repository.save_enrollment(conn, transition.enrollment)
    for event in transition.events:
        await outbox.add(conn, event)


async def _visible(
    conn: Connection, caller: Principal, enrollment_id: UUID, *, for_update: bool = False
) -> Enrollment:
    """The enrollment if the caller may see it: their own, or any for staff; 404 otherwise, so
    nobody learns that someone else's enrollment exists."""
    enrollment = await repository.get_enrollment(conn, enrollment_id, for_update=for_update)
    if enrollment is None or not (caller.is_staff or enrollment.learner.learner_id == caller.learner_id):
        raise Problem(404, "enrollment-not-found", f"no enrollment {enrollment_id}")
    return enrollment


def _learner(caller: Principal) -> Learner:
    """The learner as other contexts will address them: the token must carry an email."""
    if not caller.email:
        raise Problem(
            403,
            "email-required",
            "enrolling needs the learner's email address: the token carries no `email` claim",
        )
    try:
        return Learner(
            learner_id=caller.learner_id, email=caller.email, display_name=caller.name or caller.email
        )
    except ValidationError:
        raise Problem(
            403,
            "email-required",
            "the token's `email` (or `name`) claim is not usable to address the learner",
        ) from None


def _sort_key(key: list[Any]) -> tuple[datetime, UUID]:
    created_at, enrollment_id = key
    try:
        if isinstance(created_at, str) and isinstance(enrollment_id, str):
            after = datetime.fromisoformat(created_at), UUID(enrollment_id)
            if after[0].tzinfo is not None:
                return after
    except ValueError:
        pass
    raise Problem(400, "invalid-cursor", "the cursor is not one this API returned")


def _fingerprint(request: dict[str, Any]) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)
