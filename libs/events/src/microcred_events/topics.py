"""The topic map: every Kafka topic of the contract, and the dead-letter naming rule.

Naming: `<context>.<aggregate>.v<major>`, one topic per producing aggregate, keyed by the
aggregate id, so every event of one course, enrollment or payment is on one partition and
consumers see them in the order they were produced. All event types of an aggregate share its
topic (consumers pick the types they handle by `ce_type`), and so do the old and new major
version of an event type while both are published. The topic's own major changes only when its
keying or partitioning does, never because an event type got a new major.
"""

import re
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from uuid import UUID


class Topic(StrEnum):
    """The topics events are published to; the value is the Kafka topic name."""

    CATALOG_COURSE = "catalog.course.v1"
    CATALOG_PATHWAY = "catalog.pathway.v1"
    ENROLLMENT = "enrollment.enrollment.v1"
    BILLING_PAYMENT = "billing.payment.v1"
    ISSUANCE_CREDENTIAL = "issuance.credential.v1"
    PARTNER_COMPLETION = "partner.completion.v1"


DESCRIPTIONS: Mapping[Topic, str] = MappingProxyType(
    {
        Topic.CATALOG_COURSE: "Course lifecycle, by catalog; keyed by course id.",
        Topic.CATALOG_PATHWAY: "Pathways (stackable groups of courses), by catalog; keyed by pathway id.",
        Topic.ENROLLMENT: "Enrollment lifecycle, by enrollment; keyed by enrollment id.",
        Topic.BILLING_PAYMENT: "Payments and their refunds, by billing; keyed by payment id.",
        Topic.ISSUANCE_CREDENTIAL: "Credentials issued and revoked, by issuance; keyed by credential id.",
        Topic.PARTNER_COMPLETION: (
            "Course completions that partner institutions report, directly or through the signed HTTP "
            "endpoint that publishes the same event; keyed by report id."
        ),
    }
)

CONFIGS: Mapping[Topic, Mapping[str, str]] = MappingProxyType(
    {
        # The broker stamps each record with the time it appended it, which no sender can set and
        # no consumer lag ages: enrollment judges a partner message's `ce_time` against it.
        Topic.PARTNER_COMPLETION: MappingProxyType({"message.timestamp.type": "LogAppendTime"}),
    }
)
"""Topic-level settings a topic is created with, beyond partitions and replicas."""

_KAFKA_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]+")
_KAFKA_TOPIC_MAX_LENGTH = 249


def dead_letter_topic(consumer_group: str) -> str:
    """The dead-letter topic of a consumer group: `<consumer-group>.dlq`.

    One per consumer group rather than per source topic: a message is dead to the consumer that
    failed on it, not to every subscriber of its topic, so each service inspects and replays its
    own dead letters without redelivering them to others. The record keeps its original key,
    value and headers; where it came from is said in headers added by the consumer runtime.
    """
    topic = f"{consumer_group}.dlq"
    if not _KAFKA_TOPIC_NAME.fullmatch(consumer_group) or len(topic) > _KAFKA_TOPIC_MAX_LENGTH:
        raise ValueError(f"consumer group {consumer_group!r} does not make a legal Kafka topic name")
    return topic


def partner_rejection_topic(partner_id: UUID) -> str:
    """A partner's own rejection topic: `partner.<partner_id>.rejections.v1`.

    One per partner rather than one shared topic, so that Kafka ACLs can let each partner read its
    own refusals (which name its learners) and nobody else's. Enrollment creates it when the
    partner is registered.
    """
    return f"partner.{partner_id}.rejections.v1"
