"""The payment's life: due -> settled | failed | voided; settled -> refunded; never more than paid."""

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from billing import domain
from billing.domain import DiscrepancyReason, Payment, PaymentRuleViolated, PaymentStatus, SettlementRefused
from microcred_events import (
    EnrollmentCreated,
    Money,
    PaymentDeclined,
    PaymentFailed,
    PaymentSettled,
    example_data,
)

NOW = datetime(2025, 3, 20, 10, 15, tzinfo=UTC)
LATER = NOW + timedelta(minutes=2)
PRICE = Money(amount_minor=4900, currency="EUR")


def enrollment(**changes: object) -> EnrollmentCreated:
    return EnrollmentCreated.model_validate(
        {**example_data(EnrollmentCreated), "price": PRICE.model_dump(), **changes}
    )


def due() -> Payment:
    payment = domain.payment_for(enrollment(), uuid.uuid4(), NOW)
    assert payment is not None
    return payment


def settled(amount: Money = PRICE) -> Payment:
    result = domain.settle(due(), amount, provider="simulator", charge_id="ch_1", settled_at=LATER)
    assert result is not None
    return result[0]


def eur(minor: int) -> Money:
    return Money(amount_minor=minor, currency="EUR")


def test_a_paid_enrollment_makes_its_price_due() -> None:
    event = enrollment()
    payment = domain.payment_for(event, uuid.uuid4(), NOW)

    assert payment is not None
    assert payment.status is PaymentStatus.DUE
    assert payment.amount == PRICE
    assert (payment.enrollment_id, payment.learner_id) == (event.enrollment_id, event.learner.learner_id)
    assert payment.refunded == eur(0)


def test_a_free_enrollment_makes_nothing_due() -> None:
    assert domain.payment_for(enrollment(requires_payment=False), uuid.uuid4(), NOW) is None


def test_an_enrollment_requiring_payment_of_nothing_is_refused() -> None:
    with pytest.raises(PaymentRuleViolated) as refused:
        domain.payment_for(enrollment(price={"amount_minor": 0, "currency": "EUR"}), uuid.uuid4(), NOW)
    assert refused.value.code == "zero-amount"


def test_the_exact_amount_settles_a_due_payment() -> None:
    payment = due()
    result = domain.settle(payment, PRICE, provider="simulator", charge_id="ch_1", settled_at=LATER)

    assert result is not None
    settled_payment, event = result
    assert settled_payment.status is PaymentStatus.SETTLED
    assert settled_payment.provider_reference == "ch_1"
    assert settled_payment.settled_at == LATER
    assert event == PaymentSettled(
        payment_id=payment.payment_id,
        enrollment_id=payment.enrollment_id,
        learner_id=payment.learner_id,
        amount=PRICE,
        provider="simulator",
        provider_reference="ch_1",
        settled_at=LATER,
    )


@pytest.mark.parametrize(
    ("received", "reason"),
    [
        (eur(4899), DiscrepancyReason.AMOUNT_MISMATCH),
        (eur(4901), DiscrepancyReason.AMOUNT_MISMATCH),
        (eur(0), DiscrepancyReason.AMOUNT_MISMATCH),
        (Money(amount_minor=4900, currency="USD"), DiscrepancyReason.CURRENCY_MISMATCH),
        (Money(amount_minor=5300, currency="USD"), DiscrepancyReason.CURRENCY_MISMATCH),
    ],
)
def test_other_money_than_is_due_does_not_settle(received: Money, reason: DiscrepancyReason) -> None:
    with pytest.raises(SettlementRefused) as refused:
        domain.settle(due(), received, provider="simulator", charge_id="ch_1", settled_at=LATER)
    assert refused.value.reason is reason


@pytest.mark.parametrize("status", [PaymentStatus.VOIDED, PaymentStatus.FAILED])
def test_money_for_a_payment_no_longer_due_is_a_discrepancy(status: PaymentStatus) -> None:
    with pytest.raises(SettlementRefused) as refused:
        domain.settle(
            replace(due(), status=status), PRICE, provider="simulator", charge_id="ch_1", settled_at=LATER
        )
    assert refused.value.reason is DiscrepancyReason.NOT_DUE


def test_the_same_charge_settling_again_changes_nothing() -> None:
    assert domain.settle(settled(), PRICE, provider="simulator", charge_id="ch_1", settled_at=LATER) is None


def test_a_second_charge_for_a_settled_payment_is_a_discrepancy() -> None:
    with pytest.raises(SettlementRefused) as refused:
        domain.settle(settled(), PRICE, provider="simulator", charge_id="ch_2", settled_at=LATER)
    assert refused.value.reason is DiscrepancyReason.NOT_DUE


def decline(
    payment: Payment, session_id: str = "cs_1", max_declines: int = 3
) -> tuple[Payment, PaymentDeclined | PaymentFailed]:
    return domain.fail(
        payment,
        provider="simulator",
        session_id=session_id,
        reason_code="card_declined",
        reason="Declined.",
        failed_at=LATER,
        max_declines=max_declines,
    )


def checked_out(payment: Payment, session_id: str = "cs_1") -> Payment:
    return domain.attach_checkout(payment, session_id, f"http://provider/{session_id}", LATER)


def test_a_decline_leaves_the_payment_due_for_another_checkout() -> None:
    payment = checked_out(due())
    declined, event = decline(payment)

    assert declined.status is PaymentStatus.DUE
    assert (declined.declines, declined.checkout_session_id, declined.checkout_url) == (1, None, None)
    assert isinstance(event, PaymentDeclined)
    assert (event.payment_id, event.amount, event.reason_code) == (payment.payment_id, PRICE, "card_declined")
    assert (event.attempt, event.attempts_left) == (1, 2)
    # The next checkout is a new session at the provider, not the declined one again.
    assert domain.checkout_key(declined) != domain.checkout_key(payment)


def test_the_last_decline_allowed_fails_the_payment_for_good() -> None:
    payment = due()
    for attempt in range(1, 3):
        payment, event = decline(checked_out(payment, f"cs_{attempt}"), f"cs_{attempt}")
        assert payment.status is PaymentStatus.DUE
        assert isinstance(event, PaymentDeclined)
        assert (event.attempt, event.attempts_left) == (attempt, 3 - attempt)
    failed, event = decline(checked_out(payment, "cs_3"), "cs_3")

    assert (failed.status, failed.declines) == (PaymentStatus.FAILED, 3)
    assert isinstance(event, PaymentFailed)
    assert (event.payment_id, event.reason_code) == (payment.payment_id, "card_declined")
    with pytest.raises(PaymentRuleViolated):
        checked_out(failed, "cs_4")


def test_with_one_decline_allowed_the_first_is_final() -> None:
    failed, event = decline(checked_out(due()), max_declines=1)
    assert failed.status is PaymentStatus.FAILED
    assert isinstance(event, PaymentFailed)


def test_a_decline_of_an_earlier_checkout_changes_nothing() -> None:
    payment, _ = decline(checked_out(due(), "cs_1"), "cs_1")
    with pytest.raises(PaymentRuleViolated) as refused:
        decline(payment, "cs_1")  # told again, after the payment lost that session
    assert refused.value.code == "stale-checkout"
    with pytest.raises(PaymentRuleViolated):
        decline(checked_out(payment, "cs_2"), "cs_1")


@pytest.mark.parametrize("status", [PaymentStatus.SETTLED, PaymentStatus.VOIDED, PaymentStatus.FAILED])
def test_only_a_due_payment_can_fail(status: PaymentStatus) -> None:
    with pytest.raises(PaymentRuleViolated):
        decline(replace(checked_out(due()), status=status))


def test_a_due_payment_is_voided_and_then_cannot_be_checked_out() -> None:
    voided = domain.void(due(), LATER)

    assert voided.status is PaymentStatus.VOIDED
    with pytest.raises(PaymentRuleViolated):
        domain.attach_checkout(voided, "cs_1", "http://provider/cs_1", LATER)


def test_a_settled_payment_is_not_voided() -> None:
    with pytest.raises(PaymentRuleViolated):
        domain.void(settled(), LATER)


def test_a_full_refund_refunds_the_payment() -> None:
    payment = settled()
    refund_id = uuid.uuid4()
    refunded, event = domain.refund(payment, refund_id=refund_id, amount=None, reason="r", issued_at=LATER)

    assert refunded.status is PaymentStatus.REFUNDED
    assert refunded.refunded == PRICE
    assert refunded.refundable == eur(0)
    assert (event.refund_id, event.payment_id, event.amount) == (refund_id, payment.payment_id, PRICE)
    assert event.fully_refunded is True


def test_partial_refunds_add_up_to_at_most_what_was_paid() -> None:
    first, event = domain.refund(
        settled(), refund_id=uuid.uuid4(), amount=eur(1500), reason="r", issued_at=LATER
    )
    assert (first.status, first.refunded, first.refundable) == (PaymentStatus.SETTLED, eur(1500), eur(3400))
    assert event.amount == eur(1500)
    assert event.fully_refunded is False

    with pytest.raises(PaymentRuleViolated) as too_much:
        domain.refund(first, refund_id=uuid.uuid4(), amount=eur(3401), reason="r", issued_at=LATER)
    assert too_much.value.code == "refund-exceeds-payment"

    rest, event = domain.refund(first, refund_id=uuid.uuid4(), amount=None, reason="r", issued_at=LATER)
    assert (rest.status, rest.refunded) == (PaymentStatus.REFUNDED, PRICE)
    assert event.amount == eur(3400)
    assert event.fully_refunded is True


def test_refunds_requested_and_not_answered_yet_are_not_left_to_refund() -> None:
    with pytest.raises(PaymentRuleViolated) as too_much:
        domain.refund(
            settled(),
            refund_id=uuid.uuid4(),
            amount=eur(3401),
            reason="r",
            issued_at=LATER,
            requested_minor=1500,
        )
    assert too_much.value.code == "refund-exceeds-payment"

    _, event = domain.refund(
        settled(), refund_id=uuid.uuid4(), amount=None, reason="r", issued_at=LATER, requested_minor=1500
    )
    assert event.amount == eur(3400)


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        (eur(4901), "refund-exceeds-payment"),
        (eur(0), "refund-exceeds-payment"),
        (Money(amount_minor=100, currency="USD"), "refund-currency-mismatch"),
    ],
)
def test_a_refund_of_other_money_is_refused(amount: Money, code: str) -> None:
    with pytest.raises(PaymentRuleViolated) as refused:
        domain.refund(settled(), refund_id=uuid.uuid4(), amount=amount, reason="r", issued_at=LATER)
    assert refused.value.code == code


@pytest.mark.parametrize("status", [PaymentStatus.DUE, PaymentStatus.FAILED, PaymentStatus.VOIDED])
def test_an_unsettled_payment_is_not_refunded(status: PaymentStatus) -> None:
    with pytest.raises(PaymentRuleViolated) as refused:
        domain.refund(
            replace(due(), status=status), refund_id=uuid.uuid4(), amount=None, reason="r", issued_at=LATER
        )
    assert refused.value.code == "payment-not-settled"


def test_a_fully_refunded_payment_is_not_refunded_again() -> None:
    refunded, _ = domain.refund(settled(), refund_id=uuid.uuid4(), amount=None, reason="r", issued_at=LATER)
    with pytest.raises(PaymentRuleViolated) as refused:
        domain.refund(refunded, refund_id=uuid.uuid4(), amount=None, reason="r", issued_at=LATER)
    assert refused.value.code == "payment-already-refunded"
