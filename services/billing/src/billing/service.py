"""Billing use cases: each runs in its entrypoint's transaction and queues the events it causes.

Checkout and refund call the payment provider, and no transaction is open and no row locked while
they wait for it: a slow provider would otherwise hold the payment (and its webhook) hostage. They
run their own short transactions around the call instead: the first checks the rules and records
what is asked of the provider; the call goes out with an idempotency key, so asking again can never
open a second session or return money twice; the second applies the answer, re-reading the payment,
which may have changed meanwhile.

A checkout needs no record of its intent: its key, `<payment_id>:checkout` (then
`<payment_id>:checkout:<n>` after the n-th declined charge, for a new session), gets the same
session however often it is asked, so a checkout interrupted before its session was stored is
finished by asking again. A refund is recorded `requested` first, which reserves its amount against concurrent
refunds, and becomes issued with the provider's answer; a definite refusal deletes it. One left
`requested` (billing stopped mid-call, or the provider's answer was lost) keeps its amount reserved
until someone asks the provider again with its key, `<payment_id>:refund:<refund_id>`, which is safe.
"""

import logging
import re
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from uuid import UUID

import asyncpg

from microcred_events import EnrollmentActivated, EnrollmentCancelled, Money, RefundIssued
from microcred_runtime import (
    Connection,
    Delivery,
    Principal,
    Problem,
    decode_cursor,
    encode_cursor,
    journeys,
    outbox,
)

from . import domain, repository
from .domain import (
    Discrepancy,
    DiscrepancyKind,
    DiscrepancyReason,
    NoticeOutcome,
    Payment,
    PaymentRuleViolated,
    SettlementRefused,
)
from .provider import (
    ChargeFailed,
    ChargeSucceeded,
    CheckoutSession,
    PaymentProvider,
    ProviderError,
    ProviderNotice,
    ProviderRefused,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_REFUND_REASON = "Refunded by staff."


async def open_payments(conn: Connection, deliveries: Sequence[Delivery]) -> None:
    """Make each enrollment's price due, once, when it requires payment (each delivery's content
    an `EnrollmentCreated`); raises `PaymentRuleViolated` for an event no retry makes payable."""
    now = datetime.now(UTC)
    opened: list[Payment] = []
    # The provider's webhook arrives on a request of its own: it continues the enrollment's trace.
    traces: list[journeys.Journey | None] = []
    for delivery in deliveries:
        payment = domain.payment_for(delivery.content, uuid.uuid4(), now)
        if payment is not None:
            opened.append(payment)
            with delivery.current():
                traces.append(journeys.here(payment.payment_id))
    await repository.insert_all(conn, opened)
    await journeys.remember_all(conn, traces)


async def void_payment(conn: Connection, event: EnrollmentCancelled) -> None:
    """Nothing is owed for a cancelled enrollment that was not paid yet."""
    payment = await repository.get_by_enrollment(conn, event.enrollment_id)
    if payment is None:
        return
    await repository.record_enrollment_cancelled(conn, event.enrollment_id, event.cancelled_at)
    try:
        voided = domain.void(payment, datetime.now(UTC))
    except PaymentRuleViolated:
        # Settled, failed or voided already: a refund of a settled one is staff's decision, and
        # staff's discrepancy list shows it (`paid_enrollment_cancelled`) until they make it.
        return
    await repository.save(conn, voided)


async def record_activations(conn: Connection, events: Sequence[EnrollmentActivated]) -> None:
    """Enrollment took these payments (a free enrollment names none): money and enrollment agree."""
    await repository.record_enrollments_activated(
        conn, [(event.payment_id, event.activated_at) for event in events if event.payment_id is not None]
    )


async def get_payment(conn: Connection, caller: Principal, payment_id: UUID) -> Payment:
    payment = await repository.get(conn, payment_id)
    # Another learner's payment is reported missing, not forbidden: its existence is not theirs to know.
    if payment is None or not (caller.is_staff or payment.learner_id == caller.learner_id):
        raise _not_found(payment_id)
    return payment


async def list_payments(
    conn: Connection, caller: Principal, *, limit: int, cursor: str | None
) -> tuple[list[Payment], str | None]:
    """A page of payments, newest first: the caller's own, or everyone's for staff."""
    payments = await repository.page(
        conn,
        learner_id=None if caller.is_staff else caller.learner_id,
        after=_after(cursor),
        limit=limit + 1,
    )
    if len(payments) <= limit:
        return payments, None
    last = payments[limit - 1]
    return payments[:limit], encode_cursor([last.created_at.isoformat(), str(last.payment_id)])


async def check_out(
    db: asyncpg.Pool, provider: PaymentProvider, learner: Principal, payment_id: UUID
) -> CheckoutSession:
    """Where the learner pays their due payment: the same session every time it is asked for,
    until a charge in it is declined; then a new one."""
    async with db.acquire() as conn:
        payment = await _due_for(conn, learner, payment_id)
    if payment.checkout_session_id is not None and payment.checkout_url is not None:
        return CheckoutSession(payment.checkout_session_id, payment.checkout_url)
    session = await _at_provider(
        provider.create_checkout(
            amount=payment.amount,
            reference=str(payment.payment_id),
            idempotency_key=domain.checkout_key(payment),
        )
    )
    async with db.acquire() as conn, conn.transaction():
        # Voided meanwhile: 409. Checked out concurrently: the same key made the same session.
        current = await _due_for(conn, learner, payment_id, for_update=True)
        if current.checkout_session_id is not None and current.checkout_url is not None:
            # Attached meanwhile, for the attempt the payment is at now.
            return CheckoutSession(current.checkout_session_id, current.checkout_url)
        if current.declines != payment.declines:
            # A concurrent checkout handed out this session and a charge in it was declined: the
            # session is spent, and storing it would hand it out again for ever.
            raise Problem(
                409, "payment-declined-meanwhile", "a charge was declined meanwhile: check out again"
            )
        await repository.save(
            conn, domain.attach_checkout(current, session.session_id, session.checkout_url, datetime.now(UTC))
        )
    return session


async def _due_for(
    conn: Connection, learner: Principal, payment_id: UUID, *, for_update: bool = False
) -> Payment:
    payment = await repository.get(conn, payment_id, for_update=for_update)
    if payment is None or payment.learner_id != learner.learner_id:
        raise _not_found(payment_id)
    try:
        domain.require_due(payment)
    except PaymentRuleViolated as exc:
        raise _conflict(exc) from None
    return payment


async def refund_payment(
    db: asyncpg.Pool,
    provider: PaymentProvider,
    staff: Principal,
    payment_id: UUID,
    *,
    amount: Money | None,
    reason: str | None,
) -> tuple[Payment, RefundIssued]:
    """Return money of a settled payment to the learner at the provider: all that is left, or
    `amount`. Staff refund payments for what their issuer issues; admins any."""
    async with db.acquire() as conn, conn.transaction():
        charge_id, requested = await _request_refund(conn, provider, staff, payment_id, amount, reason)
    return await _refund_at_provider(db, provider, payment_id, charge_id, requested)


async def retry_refund(
    db: asyncpg.Pool,
    provider: PaymentProvider,
    staff: Principal,
    payment_id: UUID,
    refund_id: UUID,
    *,
    unanswered_after: timedelta,
) -> tuple[Payment, RefundIssued]:
    """Ask the provider again for a refund whose answer was lost (it stays requested, its amount
    reserved), once it has waited `unanswered_after`: with the same idempotency key, within the
    provider's idempotency window (Stripe keeps a key 24 hours), the money is returned once."""
    async with db.acquire() as conn:
        payment = await repository.get(conn, payment_id)
        if payment is None:
            raise _not_found(payment_id)
        staff.require_issuer(payment.issuer_id)
        requested = await repository.requested_refund(conn, payment, refund_id)
    if requested is None:
        raise Problem(404, "refund-not-requested", f"payment {payment_id} has no refund {refund_id} waiting")
    if requested.issued_at > datetime.now(UTC) - unanswered_after:
        # Its first request may still be at the provider, whose answer to a second one with the
        # same key could be a refusal ("key in use") that is not the refund's.
        raise Problem(
            409,
            "refund-in-flight",
            f"the refund was asked for at {requested.issued_at.isoformat()}: "
            "retry it once it is listed unanswered",
        )
    if payment.provider != provider.name or payment.provider_reference is None:
        raise Problem(409, "refund-at-other-provider", f"the payment was settled through {payment.provider}")
    return await _refund_at_provider(
        db, provider, payment_id, payment.provider_reference, requested, retrying=True
    )


async def _refund_at_provider(
    db: asyncpg.Pool,
    provider: PaymentProvider,
    payment_id: UUID,
    charge_id: str,
    requested: RefundIssued,
    *,
    retrying: bool = False,
) -> tuple[Payment, RefundIssued]:
    """Ask the provider for a refund recorded requested, and apply its answer. A refusal of the
    first request frees its amount; of a retry, it proves nothing (the first may have gone through,
    the key may have expired), so the refund stays requested for staff to check at the provider."""
    try:
        provider_refund_id = await provider.refund(
            charge_id=charge_id,
            amount=requested.amount,
            idempotency_key=f"{payment_id}:refund:{requested.refund_id}",
        )
    except ProviderRefused as exc:
        if retrying:
            log.warning("refund %s retried and refused; it stays requested: %s", requested.refund_id, exc)
            raise Problem(502, "payment-provider-error", f"{exc}; the refund stays requested") from None
        async with db.acquire() as conn:
            await repository.delete_requested_refund(conn, requested.refund_id)
        raise Problem(502, "payment-provider-error", str(exc)) from None
    except ProviderError as exc:
        # Whether the provider returned the money is unknown: the refund stays requested, reserved.
        log.warning("refund %s left requested: %s", requested.refund_id, exc)
        raise Problem(502, "payment-provider-error", str(exc)) from None
    async with db.acquire() as conn, conn.transaction():
        payment = await repository.get(conn, payment_id, for_update=True)
        assert payment is not None, "payments are never deleted"
        if not await repository.mark_refund_issued(
            conn, requested.refund_id, provider_refund_id=provider_refund_id
        ):
            if await repository.refund_issued(conn, requested.refund_id):
                # Applied by someone who asked the provider again with the same key.
                return payment, requested
            # Forgotten meanwhile (a refusal of another request with its key): the money went back
            # all the same, and only a person can put that on the books.
            log.error(
                "refund %s made at the provider (%s) but no longer on record",
                requested.refund_id,
                provider_refund_id,
                extra={"payment_id": str(payment_id)},
            )
            raise Problem(
                409,
                "refund-not-on-record",
                f"the provider made refund {provider_refund_id}, but it was dropped here meanwhile: "
                "reconcile it by hand",
            )
        # Against the payment as it is now (other refunds may have been issued meanwhile); the
        # reservation made sure this one still fits.
        refunded, event = domain.refund(
            payment,
            refund_id=requested.refund_id,
            amount=requested.amount,
            reason=requested.reason,
            issued_at=requested.issued_at,
            issued_by=requested.issued_by,
        )
        await repository.save(conn, refunded)
        await outbox.add(conn, event)
    return refunded, event


async def _request_refund(
    conn: Connection,
    provider: PaymentProvider,
    staff: Principal,
    payment_id: UUID,
    amount: Money | None,
    reason: str | None,
) -> tuple[str, RefundIssued]:
    """Check the refund and record it requested; the charge to refund, and the refund."""
    payment = await repository.get(conn, payment_id, for_update=True)
    if payment is None:
        raise _not_found(payment_id)
    staff.require_issuer(payment.issuer_id)
    try:
        _, requested = domain.refund(
            payment,
            refund_id=uuid.uuid4(),
            amount=amount,
            reason=reason or DEFAULT_REFUND_REASON,
            issued_at=datetime.now(UTC),
            issued_by=staff.actor,
            requested_minor=await repository.requested_refunds_minor(conn, payment_id),
        )
    except PaymentRuleViolated as exc:
        raise _conflict(exc) from None
    assert payment.provider_reference is not None, "a settled payment always names its charge"
    if payment.provider != provider.name:
        raise Problem(
            409,
            "refund-at-other-provider",
            f"the payment was settled through {payment.provider}; refund it there",
        )
    await repository.insert_requested_refund(conn, requested, issued_by=staff.actor)
    return payment.provider_reference, requested


async def list_discrepancies(
    conn: Connection, staff: Principal, *, overdue_after: timedelta, limit: int, cursor: str | None = None
) -> tuple[list[Discrepancy], str | None]:
    """What the caller's issuers (every issuer's, for admins) have to reconcile, oldest first, each
    once `overdue_after` has passed since it began (a settled payment or a refund has then had the
    time for what should follow it)."""
    found = await repository.discrepancies(
        conn,
        issuers=None if staff.is_admin else staff.issuers,
        overdue_before=datetime.now(UTC) - overdue_after,
        after=_discrepancy_after(cursor),
        limit=limit + 1,
    )
    if len(found) <= limit:
        return found, None
    last = found[limit - 1]
    return found[:limit], encode_cursor([last.since.isoformat(), last.kind.value, last.subject])


async def reconcile(
    conn: Connection,
    staff: Principal,
    kind: DiscrepancyKind,
    subject: str,
    note: str,
    *,
    overdue_after: timedelta,
) -> None:
    """Record a discrepancy the caller may see as reconciled by hand, with what was done."""
    if kind not in domain.RESOLVED_BY_HAND:
        raise Problem(
            409, "reconciled-at-provider", "an unanswered refund is reconciled by asking the provider again"
        )
    if not await repository.is_open(
        conn,
        kind,
        subject,
        issuers=None if staff.is_admin else staff.issuers,
        overdue_before=datetime.now(UTC) - overdue_after,
    ):
        raise Problem(404, "discrepancy-not-found", f"no open {kind} discrepancy {subject} of yours")
    if not await repository.reconcile(
        conn, kind, subject, resolved_by=staff.actor, note=note, at=datetime.now(UTC)
    ):
        raise Problem(409, "discrepancy-reconciled", f"{kind} {subject} was reconciled meanwhile")
    log.info("discrepancy reconciled", extra={"kind": kind.value, "subject": subject, "by": staff.actor})


@dataclass(frozen=True)
class NoticeResult:
    outcome: NoticeOutcome
    detail: str
    duplicate: bool


async def apply_notice(
    conn: Connection, provider: str, notice: ProviderNotice, *, max_declines: int
) -> NoticeResult:
    """Act on a provider's webhook once: a second delivery of the same event gets the first outcome.
    A payment fails for good at its `max_declines`th declined charge."""
    kind = "succeeded" if isinstance(notice, ChargeSucceeded) else "failed"
    if not await repository.claim_provider_event(conn, provider, notice.event_id, kind):
        outcome, detail = await repository.provider_event_outcome(conn, provider, notice.event_id)
        return NoticeResult(outcome, detail, duplicate=True)
    payment = await _referenced(conn, notice.reference)
    async with journeys.resume(conn, payment.payment_id if payment else None, "provider notice"):
        if isinstance(notice, ChargeSucceeded):
            outcome, detail = await _settle(conn, provider, notice, payment)
        else:
            outcome, detail = await _fail(conn, provider, notice, payment, max_declines)
    await repository.record_provider_event_outcome(
        conn,
        provider,
        notice.event_id,
        payment_id=payment.payment_id if payment else None,
        outcome=outcome,
        detail=detail,
    )
    return NoticeResult(outcome, detail, duplicate=False)


async def _settle(
    conn: Connection, provider: str, notice: ChargeSucceeded, payment: Payment | None
) -> tuple[NoticeOutcome, str]:
    try:
        if payment is None:
            raise SettlementRefused(DiscrepancyReason.UNKNOWN_PAYMENT, f"no payment {notice.reference}")
        settlement = domain.settle(
            payment,
            notice.amount,
            provider=provider,
            charge_id=notice.charge_id,
            settled_at=notice.succeeded_at,
        )
    except SettlementRefused as exc:
        # The money was collected all the same: keep it on record for a person to resolve.
        log.warning(
            "payment discrepancy: %s",
            exc,
            extra={
                "reference": notice.reference,
                "provider_event_id": notice.event_id,
                "provider_session_id": notice.session_id,
            },
        )
        await repository.insert_discrepancy(
            conn,
            provider=provider,
            provider_event_id=notice.event_id,
            payment_id=payment.payment_id if payment else None,
            reason=exc.reason,
            detail=str(exc),
            reference=notice.reference,
            charge_id=notice.charge_id,
            received=notice.amount,
            recorded_at=datetime.now(UTC),
        )
        return NoticeOutcome.DISCREPANCY, f"{exc.reason}: {exc}"
    if settlement is None:
        return NoticeOutcome.IGNORED, f"charge {notice.charge_id} already settled the payment"
    settled, event = settlement
    await repository.save(conn, settled)
    await outbox.add(conn, event)
    return NoticeOutcome.SETTLED, ""


async def _fail(
    conn: Connection, provider: str, notice: ChargeFailed, payment: Payment | None, max_declines: int
) -> tuple[NoticeOutcome, str]:
    if payment is None:
        return NoticeOutcome.IGNORED, f"no payment {notice.reference}"
    try:
        failed, event = domain.fail(
            payment,
            provider=provider,
            session_id=notice.session_id,
            reason_code=notice.reason_code,
            reason=notice.reason,
            failed_at=notice.failed_at,
            max_declines=max_declines,
        )
    except PaymentRuleViolated as exc:
        # A late decline of a payment settled or voided meanwhile, or of a checkout the learner
        # has since replaced, changes nothing.
        return NoticeOutcome.IGNORED, str(exc)
    await repository.save(conn, failed)
    await outbox.add(conn, event)
    return NoticeOutcome.FAILED, ""


async def _referenced(conn: Connection, reference: str) -> Payment | None:
    try:
        payment_id = UUID(reference)
    except ValueError:
        return None
    return await repository.get(conn, payment_id, for_update=True)


def _after(cursor: str | None) -> tuple[datetime, UUID] | None:
    key = decode_cursor(cursor, 2)
    if key is None:
        return None
    invalid = Problem(400, "invalid-cursor", "the cursor is not one this API returned")
    try:
        created_at, payment_id = datetime.fromisoformat(key[0]), UUID(key[1])
    except (TypeError, ValueError):
        raise invalid from None
    if created_at.tzinfo is None:
        raise invalid
    return created_at, payment_id


# A discrepancy's subject as this API makes them: an id, or `<provider>:<event id>`.
_SUBJECT = re.compile(r"[A-Za-z0-9_.:-]{1,300}")


def _discrepancy_after(cursor: str | None) -> tuple[datetime, str, str] | None:
    key = decode_cursor(cursor, 3)
    if key is None:
        return None
    invalid = Problem(400, "invalid-cursor", "the cursor is not one this API returned")
    try:
        since, kind, subject = datetime.fromisoformat(key[0]), DiscrepancyKind(key[1]), key[2]
    except (TypeError, ValueError):
        raise invalid from None
    if since.tzinfo is None or not (isinstance(subject, str) and _SUBJECT.fullmatch(subject)):
        raise invalid
    return since, kind.value, subject


def _conflict(exc: PaymentRuleViolated) -> Problem:
    return Problem(409, exc.code, str(exc))


async def _at_provider(call: Awaitable[T]) -> T:
    try:
        return await call
    except ProviderError as exc:
        raise Problem(502, "payment-provider-error", str(exc)) from None


def _not_found(payment_id: UUID) -> Problem:
    return Problem(404, "payment-not-found", f"no payment {payment_id}")
