"""Events published by the billing context: the payment for an enrollment, and its refunds.

The aggregate is the payment: its settlement or failure and any refund share the payment topic
and key, so a refund is never seen before the settlement it returns. Different payments of one
enrollment may be on different partitions; consumers must not rely on order between them.
"""

from typing import ClassVar
from uuid import UUID

from pydantic import Field

from microcred_events.base import ACTOR_EXAMPLE, Actor, Event, Money, NonEmptyStr, UtcDateTime, example_data
from microcred_events.topics import Topic

_PAYMENT_ID = "9c3e5a7b-1d2f-4b8a-9e64-0f7c2d1a3b85"
_ENROLLMENT_ID = "e2a7c4f1-3b9d-4e85-a6c0-7f1d2b8e9a34"
_LEARNER_ID = "1d6f8b3a-4c2e-4a97-b5d1-8e0c3f7a2b59"
_PAYMENT_DESCRIPTION = "The payment (the aggregate id and message key)."


class PaymentSettled(Event):
    """The payment provider confirmed the money was received.

    Consumers may rely on: `amount` is what was actually collected; enrollment activates the
    enrollment in response. Emitted at most once per payment.
    """

    TYPE: ClassVar[str] = "org.microcred.billing.payment.settled.v1"
    TOPIC: ClassVar[Topic] = Topic.BILLING_PAYMENT
    KEY: ClassVar[str] = "payment_id"

    payment_id: UUID = Field(description=_PAYMENT_DESCRIPTION, examples=[_PAYMENT_ID])
    enrollment_id: UUID = Field(description="The enrollment paid for.", examples=[_ENROLLMENT_ID])
    learner_id: UUID = Field(description="The learner who paid.", examples=[_LEARNER_ID])
    amount: Money = Field(description="The amount collected.", examples=[example_data(Money)])
    provider: NonEmptyStr = Field(description="Payment provider that settled it.", examples=["stripe"])
    provider_reference: NonEmptyStr = Field(
        description="The provider's id of the charge, for reconciliation and support.",
        examples=["pi_3OqX2bLkdIwHu7ix0n9ZqVfK"],
    )
    settled_at: UtcDateTime = Field(
        description="When the provider settled it.", examples=["2025-03-20T10:17:12Z"]
    )


class PaymentDeclined(Event):
    """A charge of the payment was declined, and the payment is still due: the learner may check
    out again (another card). Once as many are declined as billing allows, `PaymentFailed` follows
    instead of this.

    Consumers may rely on: one per declined charge at the payment's current checkout (a decline
    told late, of a checkout the learner has since left, is none), `attempt` counting them from 1;
    the enrollment waits for payment as before. A consumer built before this type dead-letters it
    (an unknown type): roll enrollment and notifications out before billing. `reason_code` is
    stable to branch on, `reason` is for people.
    """

    TYPE: ClassVar[str] = "org.microcred.billing.payment.declined.v1"
    TOPIC: ClassVar[Topic] = Topic.BILLING_PAYMENT
    KEY: ClassVar[str] = "payment_id"

    payment_id: UUID = Field(description=_PAYMENT_DESCRIPTION, examples=[_PAYMENT_ID])
    enrollment_id: UUID = Field(description="The enrollment it is for.", examples=[_ENROLLMENT_ID])
    learner_id: UUID = Field(description="The learner who was charged.", examples=[_LEARNER_ID])
    amount: Money = Field(description="The amount still due.", examples=[example_data(Money)])
    provider: NonEmptyStr = Field(description="Payment provider that declined it.", examples=["stripe"])
    reason_code: str = Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Machine-readable reason in snake_case, e.g. card_declined, insufficient_funds, expired.",
        examples=["card_declined"],
    )
    reason: NonEmptyStr = Field(description="Explanation for people.", examples=["The card was declined."])
    attempt: int = Field(
        ge=1, description="Which declined charge of the payment this is, from 1.", examples=[1]
    )
    attempts_left: int = Field(
        ge=1,
        description="Checkouts the learner has left; a decline of the last fails the payment.",
        examples=[2],
    )
    declined_at: UtcDateTime = Field(description="When it was declined.", examples=["2025-03-20T10:17:12Z"])


class PaymentFailed(Event):
    """The payment could not be collected. Terminal for this payment.

    Consumers may rely on: `reason_code` is a stable, provider-independent code to branch on;
    `reason` is for people. Enrollment cancels the enrollment with reason `payment_failed`.
    """

    TYPE: ClassVar[str] = "org.microcred.billing.payment.failed.v1"
    TOPIC: ClassVar[Topic] = Topic.BILLING_PAYMENT
    KEY: ClassVar[str] = "payment_id"

    payment_id: UUID = Field(description=_PAYMENT_DESCRIPTION, examples=[_PAYMENT_ID])
    enrollment_id: UUID = Field(description="The enrollment it was for.", examples=[_ENROLLMENT_ID])
    learner_id: UUID = Field(description="The learner who was charged.", examples=[_LEARNER_ID])
    amount: Money = Field(description="The amount that was to be collected.", examples=[example_data(Money)])
    provider: NonEmptyStr = Field(description="Payment provider that refused it.", examples=["stripe"])
    reason_code: str = Field(
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Machine-readable reason in snake_case, e.g. card_declined, insufficient_funds, expired.",
        examples=["card_declined"],
    )
    reason: NonEmptyStr = Field(description="Explanation for people.", examples=["The card was declined."])
    failed_at: UtcDateTime = Field(description="When it failed.", examples=["2025-03-20T10:17:12Z"])


class RefundIssued(Event):
    """Money from a settled payment was returned to the learner, in full or in part.

    Consumers may rely on: it follows the payment's `PaymentSettled`; `amount` is at most the
    settled amount, in the same currency. Enrollment cancels an active enrollment with reason
    `refunded` when the payment that activated it is refunded in full; a partial refund, or a
    refund after completion, leaves the enrollment as it is.
    """

    TYPE: ClassVar[str] = "org.microcred.billing.refund.issued.v1"
    TOPIC: ClassVar[Topic] = Topic.BILLING_PAYMENT
    KEY: ClassVar[str] = "payment_id"

    refund_id: UUID = Field(
        description="Stable id of the refund.", examples=["4a8c1e3d-6b2f-4d79-8a15-3c9e7b0d2f61"]
    )
    payment_id: UUID = Field(description=_PAYMENT_DESCRIPTION, examples=[_PAYMENT_ID])
    enrollment_id: UUID = Field(description="The enrollment the payment was for.", examples=[_ENROLLMENT_ID])
    learner_id: UUID = Field(description="The learner refunded.", examples=[_LEARNER_ID])
    amount: Money = Field(description="The amount returned.", examples=[example_data(Money)])
    reason: NonEmptyStr = Field(
        description="Why, for people.", examples=["Cancelled by the learner before the start."]
    )
    issued_at: UtcDateTime = Field(
        description="When the refund was issued.", examples=["2025-03-22T08:05:00Z"]
    )
    fully_refunded: bool | None = Field(
        default=None,
        description=(
            "True when, with this refund, everything paid has been returned; false for a partial "
            "refund. Absent from producers older than this field: read absent as true."
        ),
        examples=[True],
    )
    issued_by: Actor | None = Field(
        default=None,
        description="Who refunded (`<role>:<subject>`). Absent from older producers.",
        examples=[ACTOR_EXAMPLE],
    )


EVENTS: tuple[type[Event], ...] = (PaymentSettled, PaymentDeclined, PaymentFailed, RefundIssued)
