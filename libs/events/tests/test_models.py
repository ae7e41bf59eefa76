from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel, ValidationError

from microcred_events import (
    REGISTRY,
    CompletionReported,
    CourseCompleted,
    CoursePublished,
    CredentialIssued,
    Event,
    Money,
    PathwaySnapshot,
    example_data,
)

EVENT_CLASSES = list(REGISTRY.values())
M = TypeVar("M", bound=BaseModel)


def example(cls: type[M], **changes: Any) -> M:
    return cls.model_validate({**example_data(cls), **changes})


def nested_models(model: type[BaseModel]) -> set[type[BaseModel]]:
    """`model` and every model its fields contain, however deep."""
    found = {model}
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and candidate not in found:
                found |= nested_models(candidate)
    return found


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_every_field_is_documented_with_an_example(cls: type[Event]) -> None:
    for model in nested_models(cls):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert field.examples, f"{model.__name__}.{name} has no examples"


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_examples_make_a_valid_event_with_a_docstring(cls: type[Event]) -> None:
    event = example(cls)
    key: Any = event.model_dump(mode="json")
    for name in cls.KEY.split("."):
        key = key[name]

    assert cls.model_validate_json(event.model_dump_json()) == event
    assert event.aggregate_id() == key
    assert "Consumers may rely on" in (cls.__doc__ or "")


def test_events_are_immutable_and_refuse_unknown_fields() -> None:
    event = example(CoursePublished)

    with pytest.raises(ValidationError):
        event.published_at = datetime.now(UTC)  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        CoursePublished.model_validate({**example_data(CoursePublished), "unexpected": 1})


def test_nested_key_is_the_snapshot_id() -> None:
    event = example(CoursePublished)

    assert event.aggregate_id() == str(event.course.course_id)


class TestMoney:
    def test_free_is_zero(self) -> None:
        assert Money(amount_minor=0, currency="EUR").amount_minor == 0

    @pytest.mark.parametrize(
        "amount",
        [-1, 49.0, 49.5, "4900", True, 2**63],
        ids=["negative", "float", "fraction", "string", "bool", "past-bigint"],
    )
    def test_amount_is_a_non_negative_integer(self, amount: object) -> None:
        with pytest.raises(ValidationError):
            Money.model_validate({"amount_minor": amount, "currency": "EUR"})

    def test_float_amount_is_refused_in_json_too(self) -> None:
        with pytest.raises(ValidationError):
            Money.model_validate_json('{"amount_minor": 4900.0, "currency": "EUR"}')

    @pytest.mark.parametrize("currency", ["eur", "EU", "EURO", "€", "E1R", "EUR\n", ""])
    def test_currency_is_three_upper_case_letters(self, currency: str) -> None:
        with pytest.raises(ValidationError):
            Money(amount_minor=100, currency=currency)


class TestTimes:
    def test_are_normalised_to_utc(self) -> None:
        event = example(CoursePublished, published_at="2025-03-01T10:30:00+01:00")

        assert event.published_at == datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
        assert event.published_at.utcoffset() == timedelta(0)
        assert '"published_at":"2025-03-01T09:30:00Z"' in event.model_dump_json()

    def test_naive_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="timezone"):
            example(CoursePublished, published_at="2025-03-01T10:30:00")

    def test_out_of_range_in_utc_is_a_validation_error(self) -> None:
        late = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))

        with pytest.raises(ValidationError, match="out of range"):
            example(CoursePublished, published_at=late)


class TestCourseCompleted:
    def test_by_staff_has_no_partner(self) -> None:
        event = example(CourseCompleted, completed_by="staff", partner_id=None, partner_report_id=None)

        assert event.partner_id is None

    @pytest.mark.parametrize(
        "changes",
        [
            {"completed_by": "staff"},
            {"completed_by": "staff", "partner_id": None},
            {"completed_by": "partner", "partner_id": None, "partner_report_id": None},
        ],
    )
    def test_partner_fields_follow_who_attested(self, changes: dict[str, Any]) -> None:
        with pytest.raises(ValidationError, match="partner"):
            example(CourseCompleted, **changes)

    @pytest.mark.parametrize("score", [-0.1, 100.1, float("nan"), float("inf")])
    def test_score_is_a_percentage(self, score: float) -> None:
        with pytest.raises(ValidationError):
            example(CourseCompleted, score=score)


class TestCredentialIssued:
    def test_pathway_credential(self) -> None:
        event = example(
            CredentialIssued,
            kind="pathway",
            pathway_id="5b9e2d41-7a3c-4f08-b6e1-9c2d4a7f8e03",
            course_id=None,
            enrollment_id=None,
        )

        assert event.pathway_id is not None

    @pytest.mark.parametrize(
        "changes",
        [
            {"course_id": None},
            {"enrollment_id": None},
            {"pathway_id": "5b9e2d41-7a3c-4f08-b6e1-9c2d4a7f8e03"},
            {"kind": "pathway"},
            {"valid_until": "2025-05-02T16:46:03Z"},
        ],
    )
    def test_refuses_inconsistent_subjects_and_dates(self, changes: dict[str, Any]) -> None:
        with pytest.raises(ValidationError):
            example(CredentialIssued, **changes)


def test_partner_report_names_the_learner_somehow() -> None:
    assert example(CompletionReported, learner_id=None).learner_email == "ada@example.org"
    assert example(CompletionReported, learner_email=None).learner_id is not None
    with pytest.raises(ValidationError, match="learner_id or learner_email"):
        example(CompletionReported, learner_id=None, learner_email=None)


@pytest.mark.parametrize("email", ["ada", "ada@", "@example.org", "ada lovelace@example.org", "ada@example"])
def test_partner_report_refuses_malformed_email(email: str) -> None:
    with pytest.raises(ValidationError):
        example(CompletionReported, learner_email=email)


@pytest.mark.parametrize(
    "course_ids",
    [
        ["3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"],
        ["3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15", "3f1c2a9e-5b7d-4c8e-9a21-6d0f4b8e7c15"],
    ],
    ids=["one-course", "repeated-course"],
)
def test_pathway_has_at_least_two_distinct_courses(course_ids: list[str]) -> None:
    with pytest.raises(ValidationError):
        example(PathwaySnapshot, course_ids=course_ids)
