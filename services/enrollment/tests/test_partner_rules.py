"""What a partner's completion report completes, and every reason it is refused. No I/O."""

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from enrollment import domain
from enrollment.domain import (
    TIMESTAMP_TOLERANCE,
    Course,
    CourseStatus,
    Enrollment,
    EnrollmentStatus,
    Ignored,
    Partner,
    PartnerStatus,
    Refusal,
    Transition,
    check_message_time,
)
from microcred_events import CompletedBy, CompletionReported, CourseCompleted, Learner, Money
from microcred_events.partner import RejectionReason

T0 = datetime(2025, 5, 2, 16, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)
PRICE = Money(amount_minor=4900, currency="EUR")
ADA = Learner(learner_id=uuid.uuid4(), email="Ada@Example.org", display_name="Ada Lovelace")
BOB = Learner(learner_id=uuid.uuid4(), email="bob@example.org", display_name="Bob")
PARTNER = Partner(
    partner_id=uuid.uuid4(),
    display_name="Northwind University",
    status=PartnerStatus.ACTIVE,
    course_ids=frozenset(),
    credentials=(),
    created_at=T0,
    updated_at=T0,
)
COURSE = Course(uuid.uuid4(), 3, CourseStatus.PUBLISHED, PRICE, delivery_partner_id=PARTNER.partner_id)


def report(**changes: Any) -> CompletionReported:
    fields: dict[str, Any] = {
        "report_id": uuid.uuid4(),
        "partner_id": PARTNER.partner_id,
        "course_id": COURSE.course_id,
        "learner_id": ADA.learner_id,
        "completed_at": T0,
        "score": 91.0,
        "evidence_url": "https://northwind.example.edu/portfolio/ada",
        **changes,
    }
    return CompletionReported(**fields)


def pending(learner: Learner = ADA, course: Course = COURSE) -> Enrollment:
    return domain.enroll(uuid.uuid4(), learner, course, T0).enrollment


def active(learner: Learner = ADA, course: Course = COURSE) -> Enrollment:
    return domain.activate(pending(learner, course), uuid.uuid4(), PRICE, T0).enrollment


def refusal_of(result: Transition | Refusal) -> RejectionReason:
    assert isinstance(result, Refusal), result
    return result.reason


# --- who may report what ---------------------------------------------------------------------


def test_a_partner_reports_for_itself_only() -> None:
    other = report(partner_id=uuid.uuid4())

    refusal = domain.check_report(PARTNER, other, COURSE, NOW)

    assert refusal is not None
    assert refusal.reason is RejectionReason.PARTNER_MISMATCH
    assert str(other.partner_id) in refusal.detail


def test_a_partner_may_report_courses_it_delivers_or_was_granted() -> None:
    granted = Course(uuid.uuid4(), 1, CourseStatus.PUBLISHED, PRICE)
    elsewhere = Course(uuid.uuid4(), 1, CourseStatus.PUBLISHED, PRICE, delivery_partner_id=uuid.uuid4())
    with_grant = replace(PARTNER, course_ids=frozenset({granted.course_id}))

    assert domain.check_report(PARTNER, report(), COURSE, NOW) is None
    assert domain.check_report(with_grant, report(course_id=granted.course_id), granted, NOW) is None
    for partner, course in ((PARTNER, granted), (with_grant, elsewhere)):
        refusal = domain.check_report(partner, report(course_id=course.course_id), course, NOW)
        assert refusal is not None
        assert refusal.reason is RejectionReason.COURSE_NOT_ALLOWED


def test_a_course_unknown_here_is_not_allowed() -> None:
    refusal = domain.check_report(PARTNER, report(course_id=uuid.uuid4()), None, NOW)

    assert refusal is not None
    assert refusal.reason is RejectionReason.COURSE_NOT_ALLOWED


def test_a_completion_in_the_future_is_refused_beyond_clock_skew() -> None:
    skewed = report(completed_at=NOW + domain.CLOCK_SKEW)
    future = report(completed_at=NOW + domain.CLOCK_SKEW + timedelta(seconds=1))

    assert domain.check_report(PARTNER, skewed, COURSE, NOW) is None
    refusal = domain.check_report(PARTNER, future, COURSE, NOW)
    assert refusal is not None
    assert refusal.reason is RejectionReason.MALFORMED_REPORT


def test_a_partner_is_named_by_its_source() -> None:
    source = PARTNER.source

    assert source == f"urn:microcred:partner:{PARTNER.partner_id}"
    assert domain.partner_of_source(source) == PARTNER.partner_id
    for other in ("urn:microcred:enrollment", "urn:microcred:partner:northwind", "", f"x{source}"):
        assert domain.partner_of_source(other) is None


# --- completing ------------------------------------------------------------------------------


def test_an_active_enrollment_completes_as_the_partner_reports() -> None:
    enrollment = active()
    reported = report()

    result = domain.complete_for_partner(PARTNER, reported, [enrollment], NOW)

    assert isinstance(result, Transition)
    assert result.changed
    completed = result.enrollment
    assert completed.status is EnrollmentStatus.COMPLETED
    assert completed.completion == domain.Completion(
        completed_at=T0,
        completed_by=CompletedBy.PARTNER,
        score=91.0,
        evidence_url="https://northwind.example.edu/portfolio/ada",
        recorded_by=PARTNER.source,
        partner_id=PARTNER.partner_id,
        partner_report_id=reported.report_id,
    )
    (event,) = result.events
    assert event == CourseCompleted(
        enrollment_id=enrollment.enrollment_id,
        learner=ADA,
        course_id=COURSE.course_id,
        course_version=3,
        completed_at=T0,
        score=91.0,
        evidence_url="https://northwind.example.edu/portfolio/ada",
        completed_by=CompletedBy.PARTNER,
        partner_id=PARTNER.partner_id,
        partner_report_id=reported.report_id,
        recorded_by=PARTNER.source,
    )


def test_a_completion_dated_before_the_enrollment_is_refused_beyond_clock_skew() -> None:
    enrollment = active()  # created at T0
    within_skew = report(completed_at=T0 - timedelta(minutes=4))
    before = report(completed_at=T0 - timedelta(days=1))

    assert isinstance(domain.complete_for_partner(PARTNER, within_skew, [enrollment], NOW), Transition)
    refused = domain.complete_for_partner(PARTNER, before, [enrollment], NOW)

    assert refusal_of(refused) is RejectionReason.MALFORMED_REPORT
    assert isinstance(refused, Refusal)
    assert "before enrollment" in refused.detail


def test_the_same_report_again_changes_nothing() -> None:
    reported = report()
    first = domain.complete_for_partner(PARTNER, reported, [active()], NOW)
    assert isinstance(first, Transition)

    again = domain.complete_for_partner(PARTNER, reported, [first.enrollment], NOW)

    assert isinstance(again, Transition)
    assert again.ignored is Ignored.DUPLICATE
    assert again.events == ()


def test_another_report_for_a_completed_enrollment_is_refused() -> None:
    first = domain.complete_for_partner(PARTNER, report(), [active()], NOW)
    assert isinstance(first, Transition)
    by_staff = domain.complete(active(), score=None, evidence_url=None, recorded_by="staff-1", now=T0)

    for completed in (first.enrollment, by_staff.enrollment):
        assert refusal_of(domain.complete_for_partner(PARTNER, report(), [completed], NOW)) is (
            RejectionReason.ALREADY_COMPLETED
        )


@pytest.mark.parametrize(
    "candidates",
    [
        pytest.param(lambda: [], id="none"),
        pytest.param(lambda: [pending()], id="waiting-for-payment"),
        pytest.param(
            lambda: [
                domain.cancel(active(), by_staff=False, detail=None, now=T0, actor="learner:ada").enrollment
            ],
            id="cancelled",
        ),
        pytest.param(
            lambda: [active(course=Course(uuid.uuid4(), 1, CourseStatus.PUBLISHED, PRICE))], id="other-course"
        ),
    ],
)
def test_without_an_active_enrollment_in_the_course_nothing_completes(candidates: Any) -> None:
    result = domain.complete_for_partner(PARTNER, report(), candidates(), NOW)

    assert refusal_of(result) is RejectionReason.NO_ACTIVE_ENROLLMENT


def test_the_live_enrollment_is_preferred_to_an_earlier_cancelled_one() -> None:
    cancelled = domain.cancel(active(), by_staff=False, detail=None, now=T0, actor="learner:ada").enrollment
    current = replace(active(), created_at=T0 - timedelta(days=1))

    result = domain.complete_for_partner(PARTNER, report(), [cancelled, current], NOW)

    assert isinstance(result, Transition)
    assert result.enrollment.enrollment_id == current.enrollment_id


def test_the_learner_named_by_email_matches_whatever_the_case() -> None:
    result = domain.complete_for_partner(
        PARTNER, report(learner_id=None, learner_email="ada@EXAMPLE.org"), [active()], NOW
    )

    assert isinstance(result, Transition)
    assert result.changed


@pytest.mark.parametrize(
    "changes",
    [
        {"learner_email": "someone.else@example.org"},
        {"learner_id": BOB.learner_id},
        {"learner_id": None, "learner_email": "bob@example.org"},
    ],
    ids=["email-differs", "learner-id-differs", "enrollment-of-another-learner"],
)
def test_a_report_that_names_two_learners_is_refused(changes: dict[str, Any]) -> None:
    enrollment = active()

    result = domain.complete_for_partner(
        PARTNER, report(enrollment_id=enrollment.enrollment_id, **changes), [enrollment], NOW
    )

    assert refusal_of(result) is RejectionReason.LEARNER_MISMATCH
    assert enrollment.status is EnrollmentStatus.ACTIVE


def test_an_email_shared_by_two_enrolled_learners_is_not_guessed() -> None:
    twin = Learner(learner_id=uuid.uuid4(), email=ADA.email, display_name="Ada (work)")

    result = domain.complete_for_partner(
        PARTNER, report(learner_id=None, learner_email=ADA.email), [active(), active(twin)], NOW
    )

    assert refusal_of(result) is RejectionReason.LEARNER_MISMATCH
    assert "learner_id" in result.detail  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("offset", "refused"),
    [
        (timedelta(0), False),
        (TIMESTAMP_TOLERANCE, False),
        (-TIMESTAMP_TOLERANCE, False),
        (TIMESTAMP_TOLERANCE + timedelta(milliseconds=1), True),
        (-TIMESTAMP_TOLERANCE - timedelta(milliseconds=1), True),
    ],
    ids=["on-time", "at-the-limit-late", "at-the-limit-early", "late", "early"],
)
def test_a_message_is_taken_within_five_minutes_of_its_time_either_way(
    offset: timedelta, refused: bool
) -> None:
    sent_at = datetime(2026, 12, 6, 12, tzinfo=UTC)

    refusal = check_message_time(sent_at, sent_at + offset)

    assert timedelta(minutes=5) == TIMESTAMP_TOLERANCE
    assert (refusal is not None) == refused
    if refusal is not None:
        assert refusal.reason is RejectionReason.STALE_MESSAGE
        assert "new ce_id" in refusal.detail
