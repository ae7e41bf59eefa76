"""Enrollment's rules: an enrollment's lifecycle as a guarded state machine. No I/O here.

    pending_payment --payment settled--> active --completion--> completed
          |            (free: active at once)  |
          +--------------> cancelled <----------+
    (learner or staff; payment failed or course retired while pending; refund while active)

Completed and cancelled are terminal. Every transition checks the state it starts from.
- Requests from people that the rules refuse raise `EnrollmentRuleViolated` (the API answers 409).
- Events from other contexts arrive at least once and, across topics, in any order: a transition
  that no longer applies returns the enrollment unchanged with the reason (`Ignored`), so a late
  or repeated event changes nothing and never fails the consumer.
"""

import enum
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

from microcred_events import (
    CancellationReason,
    CompletedBy,
    CourseCompleted,
    EnrollmentActivated,
    EnrollmentCancelled,
    EnrollmentCreated,
    Event,
    Learner,
    Money,
)


class EnrollmentStatus(enum.StrEnum):
    PENDING_PAYMENT = "pending_payment"
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class CourseStatus(enum.StrEnum):
    PUBLISHED = "published"
    RETIRED = "retired"


@dataclass(frozen=True)
class Course:
    """A course as enrollment's read model holds it (from catalog events)."""

    course_id: UUID
    version: int
    status: CourseStatus
    # None for a tombstone: a retirement seen before (or without) the course's publication.
    price: Money | None


@dataclass(frozen=True)
class Completion:
    completed_at: datetime
    completed_by: CompletedBy
    score: float | None
    evidence_url: str | None
    # The staff subject who attested it: who to ask when a credential is disputed.
    recorded_by: str


@dataclass(frozen=True)
class Enrollment:
    enrollment_id: UUID
    learner: Learner
    course_id: UUID
    # Fixed at enrollment: a later course update changes neither what is owed nor what is earned.
    course_version: int
    price: Money
    status: EnrollmentStatus
    created_at: datetime
    updated_at: datetime
    activated_at: datetime | None = None
    # The settled payment that activated it; None while pending and for free courses.
    payment_id: UUID | None = None
    cancelled_at: datetime | None = None
    cancellation_reason: CancellationReason | None = None
    cancellation_detail: str | None = None
    completion: Completion | None = None

    @property
    def requires_payment(self) -> bool:
        return self.price.amount_minor > 0


class EnrollmentRuleViolated(Exception):
    """The rules refuse what a person asked for; the message says why."""


class CourseNotOpen(EnrollmentRuleViolated):
    """The course does not take enrollments (now)."""


class Ignored(enum.StrEnum):
    """Why an event from another context changed nothing."""

    DUPLICATE = "duplicate"
    ALREADY_ACTIVE = "already_active"
    ALREADY_CANCELLED = "already_cancelled"
    ALREADY_COMPLETED = "already_completed"
    AMOUNT_SHORT = "amount_short"
    NOT_ACTIVATING_PAYMENT = "not_activating_payment"
    PARTIAL_REFUND = "partial_refund"


@dataclass(frozen=True)
class Transition:
    """The enrollment after a change and the events the change causes, or why nothing changed."""

    enrollment: Enrollment
    events: tuple[Event, ...] = ()
    ignored: Ignored | None = None

    @property
    def changed(self) -> bool:
        return self.ignored is None


def _unchanged(enrollment: Enrollment, why: Ignored) -> Transition:
    return Transition(enrollment, ignored=why)


def enroll(enrollment_id: UUID, learner: Learner, course: Course, now: datetime) -> Transition:
    """A new enrollment at the course's current version and price; free courses are active at once."""
    if course.status is not CourseStatus.PUBLISHED or course.price is None:
        raise CourseNotOpen(f"the course {course.course_id} is retired and takes no enrollments")
    enrollment = Enrollment(
        enrollment_id=enrollment_id,
        learner=learner,
        course_id=course.course_id,
        course_version=course.version,
        price=course.price,
        status=EnrollmentStatus.PENDING_PAYMENT,
        created_at=now,
        updated_at=now,
    )
    created = EnrollmentCreated(
        enrollment_id=enrollment_id,
        learner=learner,
        course_id=course.course_id,
        course_version=course.version,
        price=course.price,
        requires_payment=enrollment.requires_payment,
        created_at=now,
    )
    if enrollment.requires_payment:
        return Transition(enrollment, (created,))
    activated = _activated(enrollment, payment_id=None, now=now)
    return Transition(activated.enrollment, (created, *activated.events))


def activate(enrollment: Enrollment, payment_id: UUID, amount: Money, now: datetime) -> Transition:
    """A payment settled: a pending enrollment it fully pays for becomes active."""
    if enrollment.payment_id == payment_id:
        return _unchanged(enrollment, Ignored.DUPLICATE)
    if enrollment.status is EnrollmentStatus.CANCELLED:
        return _unchanged(enrollment, Ignored.ALREADY_CANCELLED)
    if enrollment.status is EnrollmentStatus.COMPLETED:
        return _unchanged(enrollment, Ignored.ALREADY_COMPLETED)
    if enrollment.status is EnrollmentStatus.ACTIVE:
        # Paid twice, or paid for a free course: the money is not applied to anything.
        return _unchanged(enrollment, Ignored.ALREADY_ACTIVE)
    if amount.currency != enrollment.price.currency or amount.amount_minor < enrollment.price.amount_minor:
        return _unchanged(enrollment, Ignored.AMOUNT_SHORT)
    return _activated(enrollment, payment_id, now)


def _activated(enrollment: Enrollment, payment_id: UUID | None, now: datetime) -> Transition:
    active = replace(
        enrollment, status=EnrollmentStatus.ACTIVE, activated_at=now, payment_id=payment_id, updated_at=now
    )
    event = EnrollmentActivated(
        enrollment_id=enrollment.enrollment_id,
        learner_id=enrollment.learner.learner_id,
        course_id=enrollment.course_id,
        payment_id=payment_id,
        activated_at=now,
    )
    return Transition(active, (event,))


def fail_payment(enrollment: Enrollment, reason: str, now: datetime) -> Transition:
    """A payment failed: an enrollment still waiting for payment is cancelled.

    A failure after activation is of another attempt (the learner retried with another card, and
    that one settled): the enrollment is paid and stays active.
    """
    if enrollment.status is not EnrollmentStatus.PENDING_PAYMENT:
        return _unchanged(enrollment, _settled_state(enrollment.status))
    return _cancelled(enrollment, CancellationReason.PAYMENT_FAILED, reason, now)


def refund(
    enrollment: Enrollment, payment_id: UUID, reason: str, now: datetime, *, in_full: bool = True
) -> Transition:
    """The payment that activated the enrollment was refunded in full: the enrollment is cancelled.

    A partial refund (a discount after the fact, a goodwill gesture) keeps the learner enrolled.

    After completion a refund changes nothing here: the learner did the work and the credential
    attests it; a refund then is a commercial gesture (goodwill, a dispute settled), and revoking
    the credential is a separate, deliberate decision for staff in issuance. A refund of any other
    payment (a double payment, one too small to activate) returns money that never paid for this
    enrollment, so the enrollment stays as it is.
    """
    if enrollment.status is EnrollmentStatus.CANCELLED:
        return _unchanged(enrollment, Ignored.ALREADY_CANCELLED)
    if enrollment.status is EnrollmentStatus.COMPLETED:
        return _unchanged(enrollment, Ignored.ALREADY_COMPLETED)
    if enrollment.payment_id != payment_id:
        return _unchanged(enrollment, Ignored.NOT_ACTIVATING_PAYMENT)
    if not in_full:
        return _unchanged(enrollment, Ignored.PARTIAL_REFUND)
    return _cancelled(enrollment, CancellationReason.REFUNDED, reason, now)


def retire_course(enrollment: Enrollment, now: datetime) -> Transition:
    """The course was retired: an enrollment still waiting for payment will not be taken up.

    Active learners keep their place: retirement stops new enrollments, not teaching.
    """
    if enrollment.status is not EnrollmentStatus.PENDING_PAYMENT:
        return _unchanged(enrollment, _settled_state(enrollment.status))
    return _cancelled(enrollment, CancellationReason.COURSE_RETIRED, None, now)


def cancel(enrollment: Enrollment, *, by_staff: bool, detail: str | None, now: datetime) -> Transition:
    """The learner (or staff) cancels an enrollment not yet completed; cancelling twice is a no-op."""
    if enrollment.status is EnrollmentStatus.COMPLETED:
        raise EnrollmentRuleViolated("a completed enrollment cannot be cancelled")
    if enrollment.status is EnrollmentStatus.CANCELLED:
        return _unchanged(enrollment, Ignored.ALREADY_CANCELLED)
    reason = CancellationReason.STAFF_ACTION if by_staff else CancellationReason.LEARNER_REQUEST
    return _cancelled(enrollment, reason, detail, now)


def _cancelled(
    enrollment: Enrollment, reason: CancellationReason, detail: str | None, now: datetime
) -> Transition:
    cancelled = replace(
        enrollment,
        status=EnrollmentStatus.CANCELLED,
        cancelled_at=now,
        cancellation_reason=reason,
        cancellation_detail=detail,
        updated_at=now,
    )
    event = EnrollmentCancelled(
        enrollment_id=enrollment.enrollment_id,
        learner_id=enrollment.learner.learner_id,
        course_id=enrollment.course_id,
        reason=reason,
        detail=detail,
        cancelled_at=now,
    )
    return Transition(cancelled, (event,))


def complete(
    enrollment: Enrollment,
    *,
    score: float | None,
    evidence_url: str | None,
    recorded_by: str,
    now: datetime,
) -> Transition:
    """Staff attest that the learner completed the course; a second attestation is a no-op."""
    if enrollment.status is EnrollmentStatus.COMPLETED:
        return _unchanged(enrollment, Ignored.ALREADY_COMPLETED)
    if enrollment.status is EnrollmentStatus.PENDING_PAYMENT:
        raise EnrollmentRuleViolated("the enrollment is not active yet: it is waiting for payment")
    if enrollment.status is EnrollmentStatus.CANCELLED:
        raise EnrollmentRuleViolated("the enrollment was cancelled")
    completion = Completion(
        completed_at=now,
        completed_by=CompletedBy.STAFF,
        score=score,
        evidence_url=evidence_url,
        recorded_by=recorded_by,
    )
    completed = replace(enrollment, status=EnrollmentStatus.COMPLETED, completion=completion, updated_at=now)
    event = CourseCompleted(
        enrollment_id=enrollment.enrollment_id,
        learner=enrollment.learner,
        course_id=enrollment.course_id,
        course_version=enrollment.course_version,
        completed_at=now,
        score=score,
        evidence_url=evidence_url,
        completed_by=CompletedBy.STAFF,
    )
    return Transition(completed, (event,))


def _settled_state(status: EnrollmentStatus) -> Ignored:
    """Why an event meant for a pending enrollment finds it past that state."""
    return {
        EnrollmentStatus.ACTIVE: Ignored.ALREADY_ACTIVE,
        EnrollmentStatus.COMPLETED: Ignored.ALREADY_COMPLETED,
        EnrollmentStatus.CANCELLED: Ignored.ALREADY_CANCELLED,
    }[status]
