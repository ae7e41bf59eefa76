"""Billing's rules: a payment's life, due -> settled | failed | voided, settled -> refunded. No I/O.

Money is `Money` (integer minor units and a currency) throughout; the functions return the changed
payment and the event the change causes, or raise when a rule refuses the change.
"""

import enum
from dataclasses import dataclass, replace
from datetime import datetime
from uuid import UUID

from microcred_events import (
    EnrollmentCreated,
    Money,
    PaymentDeclined,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
)


class PaymentStatus(enum.StrEnum):
    DUE = "due"
    SETTLED = "settled"
    FAILED = "failed"
    VOIDED = "voided"
    REFUNDED = "refunded"


class PaymentRuleViolated(Exception):
    """A rule refuses the change; `code` is stable to branch on, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DiscrepancyReason(enum.StrEnum):
    """Why money the provider reports collected cannot settle the payment."""

    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    NOT_DUE = "not_due"
    UNKNOWN_PAYMENT = "unknown_payment"


class DiscrepancyKind(enum.StrEnum):
    """Why a payment's money and its enrollment disagree, for staff to reconcile."""

    # The provider collected money that settled no payment (`DiscrepancyReason` says why).
    UNMATCHED_COLLECTION = "unmatched_collection"
    # Settled, but enrollment has not activated the enrollment for it (nor cancelled it).
    SETTLED_NOT_ACTIVE = "settled_not_active"
    # Settled and not refunded in full, for an enrollment since cancelled.
    PAID_ENROLLMENT_CANCELLED = "paid_enrollment_cancelled"
    # A refund asked of the provider whose answer never came: it stays reserved until asked again.
    REFUND_UNANSWERED = "refund_unanswered"


# Resolved by asking the provider again (`POST /payments/{id}/refunds/{refund_id}/retry`), not by hand.
RESOLVED_BY_HAND = frozenset(DiscrepancyKind) - {DiscrepancyKind.REFUND_UNANSWERED}


@dataclass(frozen=True)
class Discrepancy:
    """One thing for staff to reconcile; `subject` names it within its kind (see RESOLVED_BY_HAND)."""

    kind: DiscrepancyKind
    subject: str
    since: datetime
    detail: str
    amount: Money
    payment_id: UUID | None = None
    refund_id: UUID | None = None


class NoticeOutcome(enum.StrEnum):
    """What became of a provider's notice about a payment."""

    SETTLED = "settled"
    FAILED = "failed"
    IGNORED = "ignored"
    DISCREPANCY = "discrepancy"


class SettlementRefused(Exception):
    """The provider collected money that does not settle the payment: a person must look at it."""

    def __init__(self, reason: DiscrepancyReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Payment:
    payment_id: UUID
    enrollment_id: UUID
    learner_id: UUID
    amount: Money
    status: PaymentStatus
    refunded_minor: int
    created_at: datetime
    updated_at: datetime
    checkout_session_id: str | None = None
    checkout_url: str | None = None
    provider: str | None = None
    # The provider's id of the charge that settled the payment; refunds are made against it.
    provider_reference: str | None = None
    settled_at: datetime | None = None
    # The institution that issues the course paid for: its staff may refund. None for payments
    # opened before enrollment named it (admins refund those).
    issuer_id: UUID | None = None
    # Charges declined so far; the payment stays due (a new checkout) until the last one allowed.
    declines: int = 0

    @property
    def refunded(self) -> Money:
        return Money(amount_minor=self.refunded_minor, currency=self.amount.currency)

    @property
    def refundable(self) -> Money:
        remaining = (
            self.amount.amount_minor - self.refunded_minor if self.status is PaymentStatus.SETTLED else 0
        )
        return Money(amount_minor=remaining, currency=self.amount.currency)


def payment_for(event: EnrollmentCreated, payment_id: UUID, now: datetime) -> Payment | None:
    """The payment an enrollment makes due; None when nothing is to be collected."""
    if not event.requires_payment:
        return None
    if event.price.amount_minor == 0:
        # No provider charges nothing; a paid enrollment at price 0 is a producer's bug, not a payment.
        raise PaymentRuleViolated("zero-amount", "an enrollment requiring payment has a price of 0")
    return Payment(
        payment_id=payment_id,
        enrollment_id=event.enrollment_id,
        learner_id=event.learner.learner_id,
        amount=event.price,
        status=PaymentStatus.DUE,
        refunded_minor=0,
        created_at=now,
        updated_at=now,
        issuer_id=event.issuer_id,
    )


def require_due(payment: Payment) -> None:
    if payment.status is not PaymentStatus.DUE:
        raise PaymentRuleViolated("payment-not-due", f"the payment is {payment.status}, not due")


def attach_checkout(payment: Payment, session_id: str, checkout_url: str, now: datetime) -> Payment:
    """Remember where the learner pays, so a second checkout returns the same session."""
    require_due(payment)
    return replace(payment, checkout_session_id=session_id, checkout_url=checkout_url, updated_at=now)


def settle(
    payment: Payment, received: Money, *, provider: str, charge_id: str, settled_at: datetime
) -> tuple[Payment, PaymentSettled] | None:
    """Settle a due payment with exactly the money it was due; None when `charge_id` already settled it.

    Raises `SettlementRefused` when the money does not match, or the payment is no longer due
    (voided or failed, or settled by another charge): collected money is never silently dropped.
    """
    if payment.status in (PaymentStatus.SETTLED, PaymentStatus.REFUNDED):
        if payment.provider == provider and payment.provider_reference == charge_id:
            return None
        raise SettlementRefused(
            DiscrepancyReason.NOT_DUE,
            f"the payment was already settled by charge {payment.provider_reference}",
        )
    if payment.status is not PaymentStatus.DUE:
        raise SettlementRefused(DiscrepancyReason.NOT_DUE, f"the payment is {payment.status}, not due")
    if received.currency != payment.amount.currency:
        raise SettlementRefused(
            DiscrepancyReason.CURRENCY_MISMATCH,
            f"{received.currency} was collected, {payment.amount.currency} is due",
        )
    if received.amount_minor != payment.amount.amount_minor:
        raise SettlementRefused(
            DiscrepancyReason.AMOUNT_MISMATCH,
            f"{received.amount_minor} {received.currency} was collected, "
            f"{payment.amount.amount_minor} {payment.amount.currency} is due",
        )
    settled = replace(
        payment,
        status=PaymentStatus.SETTLED,
        provider=provider,
        provider_reference=charge_id,
        settled_at=settled_at,
        updated_at=settled_at,
    )
    return settled, PaymentSettled(
        payment_id=payment.payment_id,
        enrollment_id=payment.enrollment_id,
        learner_id=payment.learner_id,
        amount=received,
        provider=provider,
        provider_reference=charge_id,
        settled_at=settled_at,
    )


def fail(
    payment: Payment,
    *,
    provider: str,
    session_id: str,
    reason_code: str,
    reason: str,
    failed_at: datetime,
    max_declines: int,
) -> tuple[Payment, PaymentDeclined | PaymentFailed]:
    """The provider could not collect a due payment at its checkout session `session_id`.

    Below `max_declines` declines the payment stays due, without a checkout session, so that the
    learner's next checkout opens a new one (another card): `PaymentDeclined`. The
    `max_declines`th fails it for good: `PaymentFailed`. A failure at any other session than the
    current one (an earlier checkout's, told late or again) changes nothing: `PaymentRuleViolated`,
    as for a payment no longer due.
    """
    require_due(payment)
    if session_id != payment.checkout_session_id:
        raise PaymentRuleViolated(
            "stale-checkout", f"checkout session {session_id} is not the payment's current one"
        )
    declines = payment.declines + 1
    retry_allowed = declines < max_declines
    failed = replace(
        payment,
        status=PaymentStatus.DUE if retry_allowed else PaymentStatus.FAILED,
        declines=declines,
        checkout_session_id=None,
        checkout_url=None,
        provider=provider,
        updated_at=failed_at,
    )
    if retry_allowed:
        return failed, PaymentDeclined(
            payment_id=payment.payment_id,
            enrollment_id=payment.enrollment_id,
            learner_id=payment.learner_id,
            amount=payment.amount,
            provider=provider,
            reason_code=reason_code,
            reason=reason,
            attempt=declines,
            attempts_left=max_declines - declines,
            declined_at=failed_at,
        )
    return failed, PaymentFailed(
        payment_id=payment.payment_id,
        enrollment_id=payment.enrollment_id,
        learner_id=payment.learner_id,
        amount=payment.amount,
        provider=provider,
        reason_code=reason_code,
        reason=reason,
        failed_at=failed_at,
    )


def checkout_key(payment: Payment) -> str:
    """The idempotency key of the payment's checkout at the provider: one session per attempt."""
    return f"{payment.payment_id}:checkout" + (f":{payment.declines}" if payment.declines else "")


def void(payment: Payment, now: datetime) -> Payment:
    """Nothing is owed any more (the enrollment was cancelled before it was paid)."""
    require_due(payment)
    return replace(payment, status=PaymentStatus.VOIDED, updated_at=now)


def refund(
    payment: Payment,
    *,
    refund_id: UUID,
    amount: Money | None,
    reason: str,
    issued_at: datetime,
    issued_by: str | None = None,
    requested_minor: int = 0,
) -> tuple[Payment, RefundIssued]:
    """Return `amount` (all that is left when None) of a settled payment, never more than was paid.

    `requested_minor` is what refunds already requested at the provider, and not answered yet, will
    return: it is not left to refund.
    """
    if payment.status is PaymentStatus.REFUNDED:
        raise PaymentRuleViolated("payment-already-refunded", "the payment has been refunded in full")
    if payment.status is not PaymentStatus.SETTLED:
        raise PaymentRuleViolated(
            "payment-not-settled", f"the payment is {payment.status}; only a settled one is refunded"
        )
    remaining = Money(
        amount_minor=payment.refundable.amount_minor - requested_minor, currency=payment.amount.currency
    )
    amount = amount or remaining
    if amount.currency != remaining.currency:
        raise PaymentRuleViolated(
            "refund-currency-mismatch", f"the payment is in {remaining.currency}, not {amount.currency}"
        )
    if not 0 < amount.amount_minor <= remaining.amount_minor:
        raise PaymentRuleViolated(
            "refund-exceeds-payment",
            f"a refund is more than 0 and at most the {remaining.amount_minor} {remaining.currency}"
            " not refunded yet",
        )
    refunded_minor = payment.refunded_minor + amount.amount_minor
    status = (
        PaymentStatus.REFUNDED if refunded_minor == payment.amount.amount_minor else PaymentStatus.SETTLED
    )
    refunded = replace(payment, status=status, refunded_minor=refunded_minor, updated_at=issued_at)
    return refunded, RefundIssued(
        refund_id=refund_id,
        payment_id=payment.payment_id,
        enrollment_id=payment.enrollment_id,
        learner_id=payment.learner_id,
        amount=amount,
        reason=reason,
        issued_at=issued_at,
        fully_refunded=status is PaymentStatus.REFUNDED,
        issued_by=issued_by,
    )
