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
- A partner's completion report that the rules refuse returns a `Refusal` with a reason the
  partner can act on; it is told back to the partner, not raised.
"""

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from uuid import UUID

from microcred_events import (
    CancellationReason,
    CompletedBy,
    CompletionReported,
    CourseCompleted,
    EnrollmentActivated,
    EnrollmentCancelled,
    EnrollmentCreated,
    Event,
    Learner,
    Money,
)
from microcred_events.partner import RejectionReason
from microcred_runtime import AuditEntry


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
    # The partner institution the catalog says delivers the course; it may report completions.
    delivery_partner_id: UUID | None = None
    # The institution that issues its credential; its staff act on the course's enrollments.
    issuer_id: UUID | None = None


@dataclass(frozen=True)
class Completion:
    completed_at: datetime
    completed_by: CompletedBy
    score: float | None
    evidence_url: str | None
    # Who attested it (a staff subject, or the partner's URN): who to ask when a credential is
    # disputed.
    recorded_by: str
    # Set for a partner's completion: the partner and, when it came from one, its report.
    partner_id: UUID | None = None
    partner_report_id: UUID | None = None


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
    # Who cancelled it (an actor: `learner:<subject>`, `staff:<subject>`, the refund's issuer) or
    # the context whose event did (`billing`, `catalog`); None for cancellations recorded before.
    cancelled_by: str | None = None
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
        issuer_id=course.issuer_id,
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
    """A payment failed for good (`PaymentDeclined`, a decline the learner may retry, is not
    this): an enrollment still waiting for payment is cancelled; one past that stays as it is.
    """
    if enrollment.status is not EnrollmentStatus.PENDING_PAYMENT:
        return _unchanged(enrollment, _settled_state(enrollment.status))
    return _cancelled(enrollment, CancellationReason.PAYMENT_FAILED, reason, now, by="billing")


def refund(
    enrollment: Enrollment,
    payment_id: UUID,
    reason: str,
    now: datetime,
    *,
    in_full: bool = True,
    issued_by: str | None = None,
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
    return _cancelled(enrollment, CancellationReason.REFUNDED, reason, now, by=issued_by or "billing")


def retire_course(enrollment: Enrollment, now: datetime) -> Transition:
    """The course was retired: an enrollment still waiting for payment will not be taken up.

    Active learners keep their place: retirement stops new enrollments, not teaching.
    """
    if enrollment.status is not EnrollmentStatus.PENDING_PAYMENT:
        return _unchanged(enrollment, _settled_state(enrollment.status))
    return _cancelled(enrollment, CancellationReason.COURSE_RETIRED, None, now, by="catalog")


def cancel(
    enrollment: Enrollment, *, by_staff: bool, detail: str | None, now: datetime, actor: str
) -> Transition:
    """The learner (or staff) cancels an enrollment not yet completed; cancelling twice is a no-op."""
    if enrollment.status is EnrollmentStatus.COMPLETED:
        raise EnrollmentRuleViolated("a completed enrollment cannot be cancelled")
    if enrollment.status is EnrollmentStatus.CANCELLED:
        return _unchanged(enrollment, Ignored.ALREADY_CANCELLED)
    reason = CancellationReason.STAFF_ACTION if by_staff else CancellationReason.LEARNER_REQUEST
    return _cancelled(enrollment, reason, detail, now, by=actor)


def _cancelled(
    enrollment: Enrollment, reason: CancellationReason, detail: str | None, now: datetime, *, by: str
) -> Transition:
    cancelled = replace(
        enrollment,
        status=EnrollmentStatus.CANCELLED,
        cancelled_at=now,
        cancellation_reason=reason,
        cancellation_detail=detail,
        cancelled_by=by,
        updated_at=now,
    )
    event = EnrollmentCancelled(
        enrollment_id=enrollment.enrollment_id,
        learner_id=enrollment.learner.learner_id,
        course_id=enrollment.course_id,
        reason=reason,
        detail=detail,
        cancelled_at=now,
        cancelled_by=by,
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
    return _completed(enrollment, completion, now)


def _completed(enrollment: Enrollment, completion: Completion, now: datetime) -> Transition:
    completed = replace(enrollment, status=EnrollmentStatus.COMPLETED, completion=completion, updated_at=now)
    event = CourseCompleted(
        enrollment_id=enrollment.enrollment_id,
        learner=enrollment.learner,
        course_id=enrollment.course_id,
        course_version=enrollment.course_version,
        completed_at=completion.completed_at,
        score=completion.score,
        evidence_url=completion.evidence_url,
        completed_by=completion.completed_by,
        partner_id=completion.partner_id,
        partner_report_id=completion.partner_report_id,
        recorded_by=completion.recorded_by,
    )
    return Transition(completed, (event,))


_CANCELLATION_SOURCES = {
    CancellationReason.LEARNER_REQUEST: "enrollment",
    CancellationReason.STAFF_ACTION: "enrollment",
    CancellationReason.PAYMENT_FAILED: "billing",
    CancellationReason.REFUNDED: "billing",
    CancellationReason.COURSE_RETIRED: "catalog",
}


def audit_trail(enrollment: Enrollment) -> list[AuditEntry]:
    """The enrollment's changes in order, from what the enrollment itself records."""
    learner = f"learner:{enrollment.learner.learner_id}"
    entries = [AuditEntry(change="created", at=enrollment.created_at, actor=learner, source="enrollment")]
    if enrollment.activated_at is not None:
        paid = enrollment.payment_id is not None
        entries.append(
            AuditEntry(
                change="activated",
                at=enrollment.activated_at,
                actor=f"payment:{enrollment.payment_id}" if paid else learner,
                source="billing" if paid else "enrollment",
            )
        )
    if enrollment.cancelled_at is not None and enrollment.cancellation_reason is not None:
        entries.append(
            AuditEntry(
                change="cancelled",
                at=enrollment.cancelled_at,
                actor=enrollment.cancelled_by,
                source=_CANCELLATION_SOURCES[enrollment.cancellation_reason],
            )
        )
    if (completion := enrollment.completion) is not None:
        entries.append(
            AuditEntry(
                change="completed",
                at=completion.completed_at,
                actor=completion.recorded_by,
                source=partner_source(completion.partner_id) if completion.partner_id else "enrollment",
            )
        )
    return entries


def _settled_state(status: EnrollmentStatus) -> Ignored:
    """Why an event meant for a pending enrollment finds it past that state."""
    return {
        EnrollmentStatus.ACTIVE: Ignored.ALREADY_ACTIVE,
        EnrollmentStatus.COMPLETED: Ignored.ALREADY_COMPLETED,
        EnrollmentStatus.CANCELLED: Ignored.ALREADY_CANCELLED,
    }[status]


# --- partners --------------------------------------------------------------------------------


class PartnerStatus(enum.StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"


class CredentialKind(enum.StrEnum):
    """How a partner signs: a shared HMAC-SHA256 secret, or an Ed25519 key pair (we hold the public key)."""

    HMAC_SHA256 = "hmac_sha256"
    ED25519 = "ed25519"


@dataclass(frozen=True)
class Credential:
    credential_id: UUID
    kind: CredentialKind
    created_at: datetime
    # The HMAC secret as issued, or the raw 32-byte Ed25519 public key; the other one is None.
    secret: str | None = None
    public_key: bytes | None = None
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


PARTNER_SOURCE_PREFIX = "urn:microcred:partner:"


@dataclass(frozen=True)
class Partner:
    """A partner institution that teaches courses and reports their completions."""

    partner_id: UUID
    display_name: str
    status: PartnerStatus
    # Courses granted in the registry; those the catalog says it delivers are allowed besides.
    course_ids: frozenset[UUID]
    credentials: tuple[Credential, ...]
    created_at: datetime
    updated_at: datetime
    suspended_at: datetime | None = None
    suspension_reason: str | None = None

    @property
    def source(self) -> str:
        return partner_source(self.partner_id)

    def may_report(self, course: Course) -> bool:
        return course.course_id in self.course_ids or course.delivery_partner_id == self.partner_id


def partner_source(partner_id: UUID) -> str:
    """The CloudEvents source a partner's messages carry: `urn:microcred:partner:<partner_id>`."""
    return f"{PARTNER_SOURCE_PREFIX}{partner_id}"


def partner_of_source(source: str) -> UUID | None:
    """The partner a CloudEvents source names, or None when it names no partner."""
    if not source.startswith(PARTNER_SOURCE_PREFIX):
        return None
    try:
        return UUID(source.removeprefix(PARTNER_SOURCE_PREFIX))
    except ValueError:
        return None


@dataclass(frozen=True)
class Refusal:
    """Why a partner's report completes nothing; told back to the partner."""

    reason: RejectionReason
    detail: str


# Partners' clocks are not ours: a completion a few minutes "in the future" is skew, not fiction.
CLOCK_SKEW = timedelta(minutes=5)
TIMESTAMP_TOLERANCE = timedelta(minutes=5)
"""How far a partner's message time (`ce_time`, `webhook-timestamp`) may be from when it reached us."""


def check_message_time(sent_at: datetime, appended_at: datetime) -> Refusal | None:
    """Why a message whose `ce_time` is `sent_at` is refused, if it reached the topic more than the
    tolerance after or before that. A replay inside the window is caught by the inbox, which
    remembers a message longer (INBOX_RETENTION_HOURS, an hour at least); one after it, here."""
    if abs(appended_at - sent_at) <= TIMESTAMP_TOLERANCE:
        return None
    return Refusal(
        RejectionReason.STALE_MESSAGE,
        f"ce_time {sent_at.isoformat()} is more than {TIMESTAMP_TOLERANCE.seconds // 60} minutes from "
        f"when the message reached the topic ({appended_at.isoformat()}); sign it again with the "
        "current time under a new ce_id",
    )


_LIVE = (EnrollmentStatus.PENDING_PAYMENT, EnrollmentStatus.ACTIVE)


def check_report(
    partner: Partner, report: CompletionReported, course: Course | None, now: datetime
) -> Refusal | None:
    """What refuses a report before any enrollment is looked at: None when it may go on.

    The partner must speak for itself (a signed message names its sender, the report must name the
    same partner), and may report only courses it delivers or was granted.
    """
    if report.partner_id != partner.partner_id:
        return Refusal(
            RejectionReason.PARTNER_MISMATCH,
            f"the report names partner {report.partner_id}, but partner {partner.partner_id} sent it",
        )
    if report.completed_at > now + CLOCK_SKEW:
        return Refusal(RejectionReason.MALFORMED_REPORT, "completed_at is in the future")
    if course is None or not partner.may_report(course):
        return Refusal(
            RejectionReason.COURSE_NOT_ALLOWED,
            f"partner {partner.partner_id} may not report completions of course {report.course_id}",
        )
    return None


def complete_for_partner(
    partner: Partner, report: CompletionReported, candidates: Sequence[Enrollment], now: datetime
) -> Transition | Refusal:
    """A partner reports that a learner completed the course: the learner's active enrollment
    completes, attested by the partner, with the report's time, score and evidence.

    `candidates` are the enrollments the report may mean: the one it names by id, or the learner's
    (by id, else by email) in the course. The same report again is a no-op (`Ignored.DUPLICATE`).
    """
    chosen = _reported_enrollment(report, candidates)
    if isinstance(chosen, Refusal):
        return chosen
    if chosen.status is EnrollmentStatus.COMPLETED:
        assert chosen.completion is not None
        if _by_report(chosen, partner.partner_id, report.report_id):
            return _unchanged(chosen, Ignored.DUPLICATE)
        return Refusal(
            RejectionReason.ALREADY_COMPLETED,
            f"enrollment {chosen.enrollment_id} was already completed"
            f" ({chosen.completion.completed_by.value}, {chosen.completion.completed_at.isoformat()})",
        )
    if chosen.status is EnrollmentStatus.PENDING_PAYMENT:
        return Refusal(
            RejectionReason.NO_ACTIVE_ENROLLMENT,
            f"enrollment {chosen.enrollment_id} is not active yet: it is waiting for payment",
        )
    if chosen.status is EnrollmentStatus.CANCELLED:
        return Refusal(
            RejectionReason.NO_ACTIVE_ENROLLMENT, f"enrollment {chosen.enrollment_id} was cancelled"
        )
    if report.completed_at < chosen.created_at - CLOCK_SKEW:
        # A course cannot be completed before it was enrolled in: a mistyped or forged date.
        return Refusal(
            RejectionReason.MALFORMED_REPORT,
            f"completed_at {report.completed_at.isoformat()} is before enrollment"
            f" {chosen.enrollment_id} was created ({chosen.created_at.isoformat()})",
        )
    completion = Completion(
        completed_at=report.completed_at,
        completed_by=CompletedBy.PARTNER,
        score=report.score,
        evidence_url=str(report.evidence_url) if report.evidence_url else None,
        recorded_by=partner.source,
        partner_id=partner.partner_id,
        partner_report_id=report.report_id,
    )
    return _completed(chosen, completion, now)


def _reported_enrollment(
    report: CompletionReported, candidates: Sequence[Enrollment]
) -> Enrollment | Refusal:
    in_course = [enrollment for enrollment in candidates if enrollment.course_id == report.course_id]
    if not in_course:
        return Refusal(
            RejectionReason.NO_ACTIVE_ENROLLMENT,
            f"the learner has no enrollment in course {report.course_id}",
        )
    named = [enrollment for enrollment in in_course if _names(report, enrollment)]
    if not named:
        return Refusal(
            RejectionReason.LEARNER_MISMATCH,
            "the report's enrollment_id, learner_id and learner_email do not name one learner",
        )
    if len({enrollment.learner.learner_id for enrollment in named if enrollment.status in _LIVE}) > 1:
        # Two accounts enrolled with one email address: guessing would complete the wrong one.
        return Refusal(
            RejectionReason.LEARNER_MISMATCH,
            "several learners are enrolled with this email; name the learner by learner_id or enrollment_id",
        )
    # The live enrollment if there is one (at most one per learner and course), else the one this
    # report completed, else the latest completed one, else the latest.
    return max(
        named,
        key=lambda enrollment: (
            enrollment.status in _LIVE,
            _by_report(enrollment, report.partner_id, report.report_id),
            enrollment.status is EnrollmentStatus.COMPLETED,
            enrollment.created_at,
        ),
    )


def _names(report: CompletionReported, enrollment: Enrollment) -> bool:
    """Whether every way the report names the learner agrees with the enrollment."""
    return (
        report.enrollment_id in (None, enrollment.enrollment_id)
        and report.learner_id in (None, enrollment.learner.learner_id)
        and (report.learner_email is None or report.learner_email.lower() == enrollment.learner.email.lower())
    )


def _by_report(enrollment: Enrollment, partner_id: UUID, report_id: UUID) -> bool:
    completion = enrollment.completion
    return (
        completion is not None
        and completion.partner_id == partner_id
        and completion.partner_report_id == report_id
    )
