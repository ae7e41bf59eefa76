"""The catalog's rules, without I/O: lifecycle, versions, events, pathways and search filters."""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from catalog import domain
from catalog.domain import (
    CourseDetails,
    CourseFilter,
    CourseRuleViolated,
    CourseStatus,
    InvalidFilter,
    PathwayDetails,
    PathwayRuleViolated,
    PathwayStatus,
    UnknownCourses,
)
from catalog.seed import COURSES, PATHWAYS
from microcred_events import (
    CourseFormat,
    CoursePublished,
    CourseRetired,
    CourseSnapshot,
    CourseUpdated,
    PathwayPublished,
    PathwaySnapshot,
    example_data,
)

T0 = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
T1 = T0 + timedelta(hours=1)
DETAILS = CourseDetails.model_validate(
    {
        name: value
        for name, value in example_data(CourseSnapshot).items()
        if name not in ("course_id", "version")
    }
)


def _draft() -> domain.Course:
    return domain.draft_course(uuid.uuid4(), DETAILS, T0)


def _published() -> domain.Course:
    course, _ = domain.publish(_draft(), T0)
    return course


def _pathway_details(*course_ids: uuid.UUID) -> PathwayDetails:
    example = example_data(PathwaySnapshot)
    return PathwayDetails.model_validate(
        {**{k: v for k, v in example.items() if k not in ("pathway_id", "version")}, "course_ids": course_ids}
    )


def test_a_new_course_is_a_draft_at_version_1() -> None:
    course = _draft()
    assert (course.status, course.version, course.created_at, course.updated_at) == (
        CourseStatus.DRAFT,
        1,
        T0,
        T0,
    )


def test_publishing_a_draft_bumps_the_version_and_announces_the_whole_course() -> None:
    draft = _draft()
    published, event = domain.publish(draft, T1)
    assert (published.status, published.version, published.updated_at) == (CourseStatus.PUBLISHED, 2, T1)
    assert isinstance(event, CoursePublished)
    assert event.published_at == T1
    assert event.course == published.snapshot()
    assert event.course.course_id == draft.course_id
    assert event.course.version == 2
    assert event.course.title == DETAILS.title


def test_publishing_a_published_course_is_refused() -> None:
    with pytest.raises(CourseRuleViolated, match="already published"):
        domain.publish(_published(), T1)


def test_a_retired_course_can_be_published_again() -> None:
    retired, _ = domain.retire(_published(), None, T1)
    again, event = domain.publish(retired, T1)
    assert (again.status, again.version) == (CourseStatus.PUBLISHED, 4)
    assert event.course.version == 4


def test_retiring_announces_the_version_and_reason() -> None:
    published = _published()
    retired, event = domain.retire(published, "Replaced by a new edition.", T1)
    assert (retired.status, retired.version) == (CourseStatus.RETIRED, published.version + 1)
    assert event == CourseRetired(
        course_id=published.course_id,
        version=retired.version,
        retired_at=T1,
        reason="Replaced by a new edition.",
    )


@pytest.mark.parametrize("status", [CourseStatus.DRAFT, CourseStatus.RETIRED])
def test_only_a_published_course_can_be_retired(status: CourseStatus) -> None:
    course = _draft() if status is CourseStatus.DRAFT else domain.retire(_published(), None, T0)[0]
    with pytest.raises(CourseRuleViolated, match="only a published course"):
        domain.retire(course, None, T1)


def test_updating_a_published_course_announces_the_new_details() -> None:
    published = _published()
    changed = DETAILS.model_copy(update={"title": "Data Analysis with Python, 2nd edition"})
    updated, event = domain.update(published, changed, T1)
    assert (updated.version, updated.details, updated.status) == (
        published.version + 1,
        changed,
        CourseStatus.PUBLISHED,
    )
    assert isinstance(event, CourseUpdated)
    assert event.course.title == "Data Analysis with Python, 2nd edition"
    assert event.course.version == updated.version
    assert event.updated_at == T1


@pytest.mark.parametrize("status", [CourseStatus.DRAFT, CourseStatus.RETIRED])
def test_updating_an_unpublished_course_bumps_the_version_silently(status: CourseStatus) -> None:
    course = _draft() if status is CourseStatus.DRAFT else domain.retire(_published(), None, T0)[0]
    updated, event = domain.update(course, DETAILS.model_copy(update={"overview": "New."}), T1)
    assert event is None
    assert (updated.version, updated.status, updated.details.overview) == (course.version + 1, status, "New.")


def test_the_same_details_again_are_no_change() -> None:
    published = _published()
    same, event = domain.update(published, CourseDetails.model_validate(DETAILS.model_dump()), T1)
    assert same is published
    assert event is None


def test_the_image_stays_out_of_the_event_contract() -> None:
    with_image = DETAILS.model_copy(update={"image_url": "https://example.org/course.png"})
    _, event = domain.publish(domain.draft_course(uuid.uuid4(), with_image, T0), T1)
    assert "image_url" not in event.model_dump()


def test_text_is_trimmed_and_must_not_be_blank() -> None:
    details = CourseDetails.model_validate(
        {**DETAILS.model_dump(), "title": " Pandas ", "skills": ["  pandas "]}
    )
    assert (details.title, details.skills) == ("Pandas", ("pandas",))
    with pytest.raises(ValidationError):
        CourseDetails.model_validate({**DETAILS.model_dump(), "title": "   "})
    with pytest.raises(ValidationError):
        CourseDetails.model_validate({**DETAILS.model_dump(), "audiences": ["   "]})


def test_course_details_refuse_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        CourseDetails.model_validate({**DETAILS.model_dump(), "discount": 10})


def test_a_pathway_needs_two_distinct_courses() -> None:
    course_id = uuid.uuid4()
    with pytest.raises(ValidationError, match="at least 2"):
        _pathway_details(course_id)
    with pytest.raises(ValidationError, match="more than once"):
        _pathway_details(course_id, course_id)


def test_a_pathway_of_unknown_courses_is_refused() -> None:
    known, unknown = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(UnknownCourses) as refused:
        domain.draft_pathway(uuid.uuid4(), _pathway_details(known, unknown), {known}, T0)
    assert refused.value.course_ids == [unknown]


def test_publishing_a_pathway_announces_it_once_its_courses_are_published() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    draft = domain.draft_pathway(uuid.uuid4(), _pathway_details(first, second), {first, second}, T0)
    assert (draft.status, draft.version) == (PathwayStatus.DRAFT, 1)
    with pytest.raises(PathwayRuleViolated, match=str(second)):
        domain.publish_pathway(draft, {first: CourseStatus.PUBLISHED, second: CourseStatus.DRAFT}, T1)

    published, event = domain.publish_pathway(
        draft, {first: CourseStatus.PUBLISHED, second: CourseStatus.PUBLISHED}, T1
    )
    assert (published.status, published.version) == (PathwayStatus.PUBLISHED, 2)
    assert isinstance(event, PathwayPublished)
    assert event.pathway.course_ids == (first, second)
    assert event.pathway.version == 2
    with pytest.raises(PathwayRuleViolated, match="already published"):
        domain.publish_pathway(published, {first: CourseStatus.PUBLISHED, second: CourseStatus.PUBLISHED}, T1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"min_price": 500, "max_price": 100, "currency": "USD"}, "greater than"),
        ({"min_price": 100}, "need a currency"),
        ({"max_price": 0}, "need a currency"),
    ],
)
def test_a_filter_that_cannot_mean_anything_is_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidFilter, match=message):
        CourseFilter(**arguments)


def test_a_filter_shows_published_courses_unless_asked_otherwise() -> None:
    assert not CourseFilter().shows_unpublished
    assert not CourseFilter(
        formats=frozenset({CourseFormat.ONLINE}), min_price=0, max_price=0, currency="EUR"
    ).shows_unpublished
    assert CourseFilter(statuses=frozenset({CourseStatus.DRAFT})).shows_unpublished
    assert CourseFilter(statuses=frozenset(CourseStatus)).shows_unpublished


def test_the_launch_catalog_is_consistent() -> None:
    assert len(COURSES) == 6
    assert {details.price.amount_minor for details in COURSES.values()} == {10000, 15000, 1000, 9900, 35000}
    assert all(details.price.currency == "USD" for details in COURSES.values())
    assert all(details.achievement.alignments for details in COURSES.values())
    assert len({details.achievement.achievement_id for details in COURSES.values()}) == 6
    (durable_skills,) = PATHWAYS.values()
    assert set(durable_skills.course_ids) <= set(COURSES)
    # Every launch course and the pathway make valid events.
    for course_id, details in COURSES.items():
        domain.publish(domain.draft_course(course_id, details, T0), T1)
    pathway = domain.draft_pathway(uuid.uuid4(), durable_skills, set(COURSES), T0)
    domain.publish_pathway(pathway, dict.fromkeys(COURSES, CourseStatus.PUBLISHED), T1)


def test_text_postgresql_cannot_store_is_refused_anywhere_in_the_details() -> None:
    for bad in (
        {**DETAILS.model_dump(), "title": "a\x00b"},
        {**DETAILS.model_dump(), "skills": ["\x00"]},
        {
            **DETAILS.model_dump(),
            "achievement": {**DETAILS.achievement.model_dump(), "criteria_narrative": "\x00"},
        },
    ):
        with pytest.raises(ValidationError, match="NUL"):
            CourseDetails.model_validate(bad)
