"""The enrollment state machine, without I/O: every transition, every refusal, every repeat."""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from enrollment import domain
from enrollment.domain import Course, CourseStatus, Enrollment, EnrollmentStatus, Ignored
from microcred_events import (
    CancellationReason,
    CompletedBy,
    CourseCompleted,
    EnrollmentActivated,
    EnrollmentCancelled,
    EnrollmentCreated,
    Learner,
    Money,
)

T0 = datetime(2025, 3, 20, 10, 0, tzinfo=UTC)
LATER = T0 + timedelta(hours=1)
LEARNER = Learner(learner_id=uuid.uuid4(), email="ada@example.org", display_name="Ada Lovelace")
PRICE = Money(amount_minor=4900, currency="EUR")
PAYMENT = uuid.uuid4()

State = Callable[[], Enrollment]
"""Makes an enrollment in one state."""


def course(price: Money | None = PRICE, status: CourseStatus = CourseStatus.PUBLISHED) -> Course:
    return Course(uuid.uuid4(), 3, status, price)


def pending() -> Enrollment:
    return domain.enroll(uuid.uuid4(), LEARNER, course(), T0).enrollment


def active() -> Enrollment:
    return domain.activate(pending(), PAYMENT, PRICE, T0).enrollment


def completed() -> Enrollment:
    return domain.complete(active(), score=90, evidence_url=None, recorded_by="staff-1", now=T0).enrollment


def cancelled() -> Enrollment:
    return domain.cancel(pending(), by_staff=False, detail=None, now=T0, actor="learner:ada").enrollment


def free_active() -> Enrollment:
    return domain.enroll(uuid.uuid4(), LEARNER, course(Money(amount_minor=0, currency="EUR")), T0).enrollment


def assert_unchanged(transition: domain.Transition, before: Enrollment, why: Ignored) -> None:
    assert transition.ignored is why
    assert not transition.changed
    assert transition.enrollment == before
    assert transition.events == ()


# --- enroll ----------------------------------------------------------------------------------


def test_paid_course_enrollment_waits_for_payment() -> None:
    paid = course()
    enrollment_id = uuid.uuid4()
    transition = domain.enroll(enrollment_id, LEARNER, paid, T0)
    enrollment = transition.enrollment
    assert enrollment.status is EnrollmentStatus.PENDING_PAYMENT
    assert (enrollment.course_version, enrollment.price) == (3, PRICE)
    assert enrollment.requires_payment
    assert enrollment.activated_at is None
    (created,) = transition.events
    assert created == EnrollmentCreated(
        enrollment_id=enrollment_id,
        learner=LEARNER,
        course_id=paid.course_id,
        course_version=3,
        price=PRICE,
        requires_payment=True,
        created_at=T0,
    )


def test_free_course_enrollment_is_active_at_once() -> None:
    transition = domain.enroll(uuid.uuid4(), LEARNER, course(Money(amount_minor=0, currency="EUR")), T0)
    assert transition.enrollment.status is EnrollmentStatus.ACTIVE
    assert transition.enrollment.activated_at == T0
    assert transition.enrollment.payment_id is None
    created, activated = transition.events
    assert isinstance(created, EnrollmentCreated)
    assert created.requires_payment is False
    assert isinstance(activated, EnrollmentActivated)
    assert activated.payment_id is None
    assert activated.enrollment_id == created.enrollment_id


@pytest.mark.parametrize(
    "closed", [course(status=CourseStatus.RETIRED), course(price=None, status=CourseStatus.RETIRED)]
)
def test_retired_course_takes_no_enrollment(closed: Course) -> None:
    with pytest.raises(domain.CourseNotOpen, match="retired"):
        domain.enroll(uuid.uuid4(), LEARNER, closed, T0)


# --- payment settled -------------------------------------------------------------------------


def test_settled_payment_activates_a_pending_enrollment() -> None:
    before = pending()
    transition = domain.activate(before, PAYMENT, PRICE, LATER)
    assert transition.changed
    assert transition.enrollment.status is EnrollmentStatus.ACTIVE
    assert (transition.enrollment.payment_id, transition.enrollment.activated_at) == (PAYMENT, LATER)
    assert transition.events == (
        EnrollmentActivated(
            enrollment_id=before.enrollment_id,
            learner_id=LEARNER.learner_id,
            course_id=before.course_id,
            payment_id=PAYMENT,
            activated_at=LATER,
        ),
    )


def test_more_than_the_price_activates_too() -> None:
    transition = domain.activate(pending(), PAYMENT, Money(amount_minor=5000, currency="EUR"), LATER)
    assert transition.enrollment.status is EnrollmentStatus.ACTIVE


@pytest.mark.parametrize(
    "amount", [Money(amount_minor=4899, currency="EUR"), Money(amount_minor=4900, currency="USD")]
)
def test_short_or_foreign_payment_does_not_activate(amount: Money) -> None:
    before = pending()
    assert_unchanged(domain.activate(before, PAYMENT, amount, LATER), before, Ignored.AMOUNT_SHORT)


def test_the_same_settlement_again_changes_nothing() -> None:
    before = active()
    assert_unchanged(domain.activate(before, PAYMENT, PRICE, LATER), before, Ignored.DUPLICATE)


def test_the_same_settlement_after_completion_or_refund_is_still_a_duplicate() -> None:
    for before in (completed(), domain.refund(active(), PAYMENT, "refund", T0).enrollment):
        assert_unchanged(domain.activate(before, PAYMENT, PRICE, LATER), before, Ignored.DUPLICATE)


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (active, Ignored.ALREADY_ACTIVE),
        (free_active, Ignored.ALREADY_ACTIVE),
        (completed, Ignored.ALREADY_COMPLETED),
        (cancelled, Ignored.ALREADY_CANCELLED),
    ],
)
def test_another_settlement_after_pending_changes_nothing(state: State, why: Ignored) -> None:
    before = state()
    assert_unchanged(domain.activate(before, uuid.uuid4(), PRICE, LATER), before, why)


# --- payment failed --------------------------------------------------------------------------


def test_failed_payment_cancels_a_pending_enrollment() -> None:
    before = pending()
    transition = domain.fail_payment(before, "The card was declined.", LATER)
    enrollment = transition.enrollment
    assert enrollment.status is EnrollmentStatus.CANCELLED
    assert enrollment.cancellation_reason is CancellationReason.PAYMENT_FAILED
    assert enrollment.cancelled_at == LATER
    (event,) = transition.events
    assert isinstance(event, EnrollmentCancelled)
    assert (event.reason, event.detail, event.cancelled_at) == (
        CancellationReason.PAYMENT_FAILED,
        "The card was declined.",
        LATER,
    )
    assert event.enrollment_id == before.enrollment_id


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (active, Ignored.ALREADY_ACTIVE),
        (completed, Ignored.ALREADY_COMPLETED),
        (cancelled, Ignored.ALREADY_CANCELLED),
    ],
)
def test_failed_payment_after_pending_changes_nothing(state: State, why: Ignored) -> None:
    before = state()
    assert_unchanged(domain.fail_payment(before, "declined", LATER), before, why)


def test_the_same_failure_twice_cancels_once() -> None:
    once = domain.fail_payment(pending(), "declined", LATER).enrollment
    assert_unchanged(domain.fail_payment(once, "declined", LATER), once, Ignored.ALREADY_CANCELLED)


# --- refund ----------------------------------------------------------------------------------


def test_refund_of_the_activating_payment_cancels() -> None:
    before = active()
    transition = domain.refund(before, PAYMENT, "Cancelled before the start.", LATER)
    assert transition.enrollment.status is EnrollmentStatus.CANCELLED
    assert transition.enrollment.cancellation_reason is CancellationReason.REFUNDED
    (event,) = transition.events
    assert isinstance(event, EnrollmentCancelled)
    assert (event.reason, event.detail) == (CancellationReason.REFUNDED, "Cancelled before the start.")


def test_a_partial_refund_keeps_the_learner_enrolled() -> None:
    before = active()
    assert_unchanged(
        domain.refund(before, PAYMENT, "discount", LATER, in_full=False), before, Ignored.PARTIAL_REFUND
    )


def test_the_same_refund_twice_cancels_once() -> None:
    once = domain.refund(active(), PAYMENT, "r", LATER).enrollment
    assert_unchanged(domain.refund(once, PAYMENT, "r", LATER), once, Ignored.ALREADY_CANCELLED)


def test_refund_after_completion_leaves_the_completion_standing() -> None:
    before = completed()
    assert_unchanged(domain.refund(before, PAYMENT, "goodwill", LATER), before, Ignored.ALREADY_COMPLETED)


@pytest.mark.parametrize("state", [pending, free_active])
def test_refund_of_money_that_never_paid_for_the_enrollment_changes_nothing(state: State) -> None:
    before = state()
    assert_unchanged(domain.refund(before, PAYMENT, "r", LATER), before, Ignored.NOT_ACTIVATING_PAYMENT)


def test_refund_of_a_second_payment_keeps_the_enrollment_active() -> None:
    before = active()
    assert_unchanged(
        domain.refund(before, uuid.uuid4(), "paid twice", LATER), before, Ignored.NOT_ACTIVATING_PAYMENT
    )


# --- course retired --------------------------------------------------------------------------


def test_retirement_cancels_a_pending_enrollment() -> None:
    transition = domain.retire_course(pending(), LATER)
    assert transition.enrollment.status is EnrollmentStatus.CANCELLED
    (event,) = transition.events
    assert isinstance(event, EnrollmentCancelled)
    assert event.reason is CancellationReason.COURSE_RETIRED


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (active, Ignored.ALREADY_ACTIVE),
        (completed, Ignored.ALREADY_COMPLETED),
        (cancelled, Ignored.ALREADY_CANCELLED),
    ],
)
def test_retirement_leaves_other_enrollments_alone(state: State, why: Ignored) -> None:
    before = state()
    assert_unchanged(domain.retire_course(before, LATER), before, why)


# --- cancel by a person ----------------------------------------------------------------------


@pytest.mark.parametrize("state", [pending, active])
def test_learner_cancels_before_completion(state: State) -> None:
    before = state()
    transition = domain.cancel(
        before, by_staff=False, detail="Schedule conflict.", now=LATER, actor="learner:ada"
    )
    assert transition.enrollment.status is EnrollmentStatus.CANCELLED
    assert transition.enrollment.cancellation_detail == "Schedule conflict."
    (event,) = transition.events
    assert isinstance(event, EnrollmentCancelled)
    assert (event.reason, event.detail) == (CancellationReason.LEARNER_REQUEST, "Schedule conflict.")


def test_staff_cancellation_says_so() -> None:
    (event,) = domain.cancel(active(), by_staff=True, detail=None, now=LATER, actor="learner:ada").events
    assert isinstance(event, EnrollmentCancelled)
    assert event.reason is CancellationReason.STAFF_ACTION


def test_cancelling_twice_changes_nothing() -> None:
    before = cancelled()
    assert_unchanged(
        domain.cancel(before, by_staff=False, detail=None, now=LATER, actor="learner:ada"),
        before,
        Ignored.ALREADY_CANCELLED,
    )


def test_a_completed_enrollment_cannot_be_cancelled() -> None:
    with pytest.raises(domain.EnrollmentRuleViolated, match="completed"):
        domain.cancel(completed(), by_staff=True, detail=None, now=LATER, actor="learner:ada")


# --- completion ------------------------------------------------------------------------------


def test_staff_complete_an_active_enrollment() -> None:
    before = active()
    transition = domain.complete(
        before, score=87.5, evidence_url="https://example.org/work", recorded_by="staff-1", now=LATER
    )
    enrollment = transition.enrollment
    assert enrollment.status is EnrollmentStatus.COMPLETED
    assert enrollment.completion == domain.Completion(
        completed_at=LATER,
        completed_by=CompletedBy.STAFF,
        score=87.5,
        evidence_url="https://example.org/work",
        recorded_by="staff-1",
    )
    (event,) = transition.events
    assert isinstance(event, CourseCompleted)
    assert event.learner == LEARNER
    assert (event.course_id, event.course_version) == (before.course_id, before.course_version)
    assert (event.completed_by, event.partner_id, event.score) == (CompletedBy.STAFF, None, 87.5)
    assert str(event.evidence_url) == "https://example.org/work"


def test_a_second_completion_is_a_no_op_keeping_the_first() -> None:
    before = completed()
    transition = domain.complete(before, score=10, evidence_url=None, recorded_by="staff-2", now=LATER)
    assert_unchanged(transition, before, Ignored.ALREADY_COMPLETED)
    assert transition.enrollment.completion is not None
    assert transition.enrollment.completion.score == 90


@pytest.mark.parametrize(("state", "message"), [(pending, "waiting for payment"), (cancelled, "cancelled")])
def test_only_an_active_enrollment_can_complete(state: State, message: str) -> None:
    with pytest.raises(domain.EnrollmentRuleViolated, match=message):
        domain.complete(state(), score=None, evidence_url=None, recorded_by="staff-1", now=LATER)
