from typing import ClassVar
from uuid import UUID

import pytest
from pydantic import Field

import microcred_events
from microcred_events import REGISTRY, Event, Topic, dead_letter_topic
from microcred_events.registry import TYPE_PATTERN, build_registry


class Fine(Event):
    TYPE: ClassVar[str] = "org.microcred.billing.thing.happened.v1"
    TOPIC: ClassVar[Topic] = Topic.BILLING_PAYMENT
    KEY: ClassVar[str] = "thing_id"

    thing_id: UUID = Field(description="id", examples=["9c3e5a7b-1d2f-4b8a-9e64-0f7c2d1a3b85"])


def test_registry_holds_every_event_class_once() -> None:
    exported = {
        obj for obj in vars(microcred_events).values() if isinstance(obj, type) and issubclass(obj, Event)
    } - {Event}

    assert set(REGISTRY.values()) == exported
    assert len(REGISTRY) == len(exported) == 16
    assert all(TYPE_PATTERN.fullmatch(event_type) for event_type in REGISTRY)


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        REGISTRY["org.microcred.x.y.z.v1"] = Fine  # type: ignore[index]


def test_every_topic_carries_events() -> None:
    assert {cls.TOPIC for cls in REGISTRY.values()} == set(Topic)


def test_build_registry_accepts_a_well_formed_class() -> None:
    assert build_registry([Fine]) == {Fine.TYPE: Fine}


def test_build_registry_refuses_a_duplicate_type() -> None:
    class Twin(Fine):
        pass

    with pytest.raises(TypeError, match="declared by both Fine and Twin"):
        build_registry([Fine, Twin])


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"TYPE": "org.microcred.billing.thing.happened"}, "TYPE must look like"),
        ({"TYPE": "com.example.billing.thing.happened.v1"}, "TYPE must look like"),
        ({"TYPE": "org.microcred.billing.thing.happened.v0"}, "TYPE must look like"),
        ({"TOPIC": "billing.payment.v1"}, "TOPIC must be a Topic"),
        ({"TOPIC": Topic.ENROLLMENT}, "billing event but goes to enrollment.enrollment.v1"),
        ({"KEY": "nothing"}, "KEY must name a field"),
        ({"KEY": "thing_id.deeper"}, "thing_id is not a nested model"),
    ],
)
def test_build_registry_refuses_a_malformed_class(attributes: dict[str, object], message: str) -> None:
    broken = type("Broken", (Fine,), attributes)

    with pytest.raises(TypeError, match=message):
        build_registry([broken])


class TestDeadLetterTopic:
    def test_is_the_consumer_group_with_a_dlq_suffix(self) -> None:
        assert dead_letter_topic("enrollment") == "enrollment.dlq"
        assert dead_letter_topic("issuance-v2_workers") == "issuance-v2_workers.dlq"

    @pytest.mark.parametrize("group", ["", "has space", "slash/group", "ü", "x" * 246])
    def test_refuses_a_group_that_makes_an_illegal_topic(self, group: str) -> None:
        with pytest.raises(ValueError, match="legal Kafka topic name"):
            dead_letter_topic(group)
