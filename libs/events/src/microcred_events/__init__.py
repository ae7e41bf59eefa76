"""The microcred event contract: event models, topics, and the CloudEvents Kafka binding.

Producers build an event model and `encode` it into a `KafkaRecord` (topic, key, value,
headers); consumers `decode` a record's headers and value into an `Envelope` holding the
validated event, or get an `InvalidEvent` to dead-letter.
"""

from microcred_events.base import ContractModel, Event, Money, example_data
from microcred_events.billing import PaymentDeclined, PaymentFailed, PaymentSettled, RefundIssued
from microcred_events.catalog import (
    Achievement,
    CourseFormat,
    CoursePublished,
    CourseRetired,
    CourseSnapshot,
    CourseUpdated,
    Duration,
    DurationUnit,
    Issuer,
    PathwayPublished,
    PathwaySnapshot,
    SkillAlignment,
)
from microcred_events.codec import Envelope, InvalidEvent, InvalidReason, KafkaRecord, decode, encode
from microcred_events.enrollment import (
    CancellationReason,
    CompletedBy,
    CourseCompleted,
    EnrollmentActivated,
    EnrollmentCancelled,
    EnrollmentCreated,
    Learner,
)
from microcred_events.issuance import (
    CredentialIssued,
    CredentialKind,
    CredentialReinstated,
    CredentialRevoked,
    StatusPurpose,
)
from microcred_events.partner import CompletionReported
from microcred_events.registry import REGISTRY
from microcred_events.topics import Topic, dead_letter_topic

__all__ = [
    "REGISTRY",
    "Achievement",
    "CancellationReason",
    "CompletedBy",
    "CompletionReported",
    "ContractModel",
    "CourseCompleted",
    "CourseFormat",
    "CoursePublished",
    "CourseRetired",
    "CourseSnapshot",
    "CourseUpdated",
    "CredentialIssued",
    "CredentialKind",
    "CredentialReinstated",
    "CredentialRevoked",
    "Duration",
    "DurationUnit",
    "EnrollmentActivated",
    "EnrollmentCancelled",
    "EnrollmentCreated",
    "Envelope",
    "Event",
    "InvalidEvent",
    "InvalidReason",
    "Issuer",
    "KafkaRecord",
    "Learner",
    "Money",
    "PathwayPublished",
    "PathwaySnapshot",
    "PaymentDeclined",
    "PaymentFailed",
    "PaymentSettled",
    "RefundIssued",
    "SkillAlignment",
    "StatusPurpose",
    "Topic",
    "dead_letter_topic",
    "decode",
    "encode",
    "example_data",
]
