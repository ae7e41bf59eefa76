"""Billing's HTTP API: parse, call the use case in a transaction, answer.

Checkout and refund call the payment provider: their use cases run short transactions of their own.
"""

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from microcred_events import Money, RefundIssued, example_data
from microcred_runtime import (
    Caller,
    Cursor,
    Db,
    Limit,
    LimitedCaller,
    Page,
    Problem,
    RuntimeDep,
    Staff,
    max_body_bytes,
    problem_doc,
)

from . import service
from .domain import Discrepancy, DiscrepancyKind, NoticeOutcome, Payment, PaymentStatus
from .provider import PaymentProvider
from .webhooks import SIGNATURE_HEADER, InvalidWebhook

_PAYMENT_ID = "9c3e5a7b-1d2f-4b8a-9e64-0f7c2d1a3b85"
_MONEY = example_data(Money)

payments = APIRouter(
    prefix="/payments",
    tags=["payments"],
    responses={401: problem_doc("No bearer token, or one that is not valid.")},
)
webhooks = APIRouter(prefix="/webhooks", tags=["webhooks"])
reconciliation = APIRouter(
    prefix="/reconciliation",
    tags=["reconciliation"],
    responses={
        401: problem_doc("No bearer token, or one that is not valid."),
        403: problem_doc("Only staff and admins reconcile."),
    },
)


async def payment_provider(request: Request, _started: RuntimeDep) -> PaymentProvider:
    """The provider the service opened at its start (a 503 until it has started); a dependency, so
    tests can put an in-process simulator in its place."""
    provider: PaymentProvider = request.app.state.payment_provider
    return provider


Provider = Annotated[PaymentProvider, Depends(payment_provider)]


def _reconcile_after(runtime: RuntimeDep) -> timedelta:
    return timedelta(seconds=runtime.settings.reconcile_after_seconds)


ReconcileAfter = Annotated[timedelta, Depends(_reconcile_after)]
"""RECONCILE_AFTER_SECONDS: how old a discrepancy is before it is listed, or a refund retried."""


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {}}}


class PaymentOut(BaseModel):
    payment_id: UUID = Field(examples=[_PAYMENT_ID])
    enrollment_id: UUID = Field(examples=["e2a7c4f1-3b9d-4e85-a6c0-7f1d2b8e9a34"])
    learner_id: UUID = Field(examples=["1d6f8b3a-4c2e-4a97-b5d1-8e0c3f7a2b59"])
    amount: Money = Field(description="What is due for the enrollment.", examples=[_MONEY])
    refunded: Money = Field(
        description="What has been returned so far.", examples=[{"amount_minor": 0, "currency": "EUR"}]
    )
    status: PaymentStatus = Field(
        description=(
            "due -> settled | failed | voided; settled -> refunded once all of it is returned. A declined "
            "charge leaves it due (check out again) until the last decline allowed fails it."
        ),
        examples=["due"],
    )
    declines: int = Field(description="Charges of it declined so far.", examples=[0])
    checkout_url: str | None = Field(
        description="Where the learner pays, once they have checked out.", examples=[None]
    )
    created_at: datetime
    updated_at: datetime
    settled_at: datetime | None = Field(examples=[None])

    @classmethod
    def of(cls, payment: Payment) -> "PaymentOut":
        return cls(
            payment_id=payment.payment_id,
            enrollment_id=payment.enrollment_id,
            learner_id=payment.learner_id,
            amount=payment.amount,
            refunded=payment.refunded,
            status=payment.status,
            declines=payment.declines,
            checkout_url=payment.checkout_url,
            created_at=payment.created_at,
            updated_at=payment.updated_at,
            settled_at=payment.settled_at,
        )


class CheckoutOut(BaseModel):
    payment_id: UUID = Field(examples=[_PAYMENT_ID])
    session_id: str = Field(description="The provider's checkout session.", examples=["cs_5f0c2a9e41d7b3a8"])
    checkout_url: str = Field(
        description="Send the learner here to pay.",
        examples=["http://127.0.0.1:8090/sessions/cs_5f0c2a9e41d7b3a8"],
    )


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: Money | None = Field(
        default=None,
        description="How much to return; all that has not been refunded yet when omitted.",
        examples=[{"amount_minor": 1500, "currency": "EUR"}],
    )
    reason: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Why, for the learner and the records.",
        examples=["Cancelled by the learner before the start."],
    )


class RefundOut(BaseModel):
    refund_id: UUID
    amount: Money = Field(examples=[_MONEY])
    reason: str
    issued_at: datetime
    issued_by: str | None = Field(
        description="Who refunded: `<role>:<token subject>`.", examples=["staff:auth0|5f2b8c1e"]
    )
    payment: PaymentOut

    @classmethod
    def of(cls, payment: Payment, refund: RefundIssued) -> "RefundOut":
        return cls(
            refund_id=refund.refund_id,
            amount=refund.amount,
            reason=refund.reason,
            issued_at=refund.issued_at,
            issued_by=refund.issued_by,
            payment=PaymentOut.of(payment),
        )


class DiscrepancyOut(BaseModel):
    kind: DiscrepancyKind = Field(
        description=(
            "`unmatched_collection`: the provider collected money that settled no payment; "
            "`settled_not_active`: settled, and enrollment has not activated the enrollment; "
            "`paid_enrollment_cancelled`: settled, not refunded in full, for an enrollment since cancelled; "
            "`refund_unanswered`: a refund the provider never answered (retry it)."
        ),
        examples=["paid_enrollment_cancelled"],
    )
    subject: str = Field(
        description="Names it within its kind: a payment id, a refund id, or `<provider>:<event id>`.",
        examples=[_PAYMENT_ID],
    )
    since: datetime = Field(description="When it began: the collection, settlement, cancellation or request.")
    detail: str = Field(examples=["paid, and the enrollment was cancelled; not refunded in full"])
    amount: Money = Field(
        description="The money in question: collected, paid, not refunded yet, or being refunded.",
        examples=[_MONEY],
    )
    payment_id: UUID | None = Field(description="The payment, when there is one.", examples=[_PAYMENT_ID])
    refund_id: UUID | None = Field(description="The refund, for `refund_unanswered`.", examples=[None])

    @classmethod
    def of(cls, discrepancy: Discrepancy) -> "DiscrepancyOut":
        return cls(**dataclasses.asdict(discrepancy))


class ReconciliationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field(
        min_length=1,
        max_length=2000,
        description="What was done, for the audit trail (e.g. refunded at the provider as re_123).",
        examples=["Refunded the charge at the provider (re_3OqX2b); the learner was told."],
    )


class WebhookReceipt(BaseModel):
    outcome: NoticeOutcome = Field(
        description="settled, failed, or ignored (nothing to change, e.g. a decline after settlement).",
        examples=["settled"],
    )
    duplicate: bool = Field(
        description="True when this event was delivered before: acknowledged, and nothing changed.",
        examples=[False],
    )


@payments.get(
    "",
    summary="Payments, newest first: your own, or everyone's for staff",
    responses={400: _problem("The cursor is not one this API returned.")},
)
async def list_payments(db: Db, caller: Caller, limit: Limit = 20, cursor: Cursor = None) -> Page[PaymentOut]:
    async with db.acquire() as conn:
        found, next_cursor = await service.list_payments(conn, caller, limit=limit, cursor=cursor)
    return Page[PaymentOut](items=[PaymentOut.of(payment) for payment in found], next_cursor=next_cursor)


@payments.get(
    "/{payment_id}",
    summary="One payment: your own, or any for staff",
    responses={404: _problem("No such payment, or not yours.")},
)
async def get_payment(payment_id: UUID, db: Db, caller: Caller) -> PaymentOut:
    async with db.acquire() as conn:
        return PaymentOut.of(await service.get_payment(conn, caller, payment_id))


@payments.post(
    "/{payment_id}/checkout",
    summary="Check out a due payment: where to pay it",
    description=(
        "Asking again returns the same checkout session, until a charge in it is declined: then the "
        "payment stays due (up to PAYMENT_MAX_DECLINES declines) and the next checkout is a new session."
    ),
    responses={
        404: _problem("No such payment, or not yours."),
        409: _problem(
            "The payment is not due (settled, failed, voided or refunded), or a charge was declined "
            "while this checkout was being opened (check out again)."
        ),
        502: _problem("The payment provider could not be reached or refused."),
    },
)
async def check_out(payment_id: UUID, db: Db, learner: LimitedCaller, provider: Provider) -> CheckoutOut:
    # Not in a transaction of ours: the use case must not hold one while the provider is called.
    session = await service.check_out(db, provider, learner, payment_id)
    return CheckoutOut(
        payment_id=payment_id, session_id=session.session_id, checkout_url=session.checkout_url
    )


@payments.post(
    "/{payment_id}/refunds",
    status_code=201,
    summary="Refund a settled payment, in full or in part (staff)",
    responses={
        403: _problem("Only staff of the course's issuer, and admins, refund."),
        404: _problem("No such payment."),
        409: _problem("Not settled, already refunded in full, or more than is left to refund."),
        502: _problem("The payment provider could not be reached or refused."),
    },
)
async def refund_payment(
    payment_id: UUID, db: Db, staff: Staff, provider: Provider, refund: RefundIn | None = None
) -> RefundOut:
    refund = refund or RefundIn()
    payment, issued = await service.refund_payment(
        db, provider, staff, payment_id, amount=refund.amount, reason=refund.reason
    )
    return RefundOut.of(payment, issued)


@payments.post(
    "/{payment_id}/refunds/{refund_id}/retry",
    summary="Ask the provider again for a refund whose answer was lost (staff)",
    description=(
        "A refund stays `requested`, its amount reserved, when the provider's answer never came. Once it "
        "has waited RECONCILE_AFTER_SECONDS, this asks again with the same idempotency key: within the "
        "provider's idempotency window (Stripe: 24 hours) the money is returned once, however often asked."
    ),
    responses={
        403: _problem("Only staff of the course's issuer, and admins, refund."),
        404: _problem("No such payment, or no refund of it waiting for an answer."),
        409: _problem(
            "Asked for less than RECONCILE_AFTER_SECONDS ago (its answer may still come), settled at "
            "another provider, or made at the provider but dropped here meanwhile (reconcile it by hand)."
        ),
        502: _problem("The payment provider could not be reached or refused (the refund stays requested)."),
    },
)
async def retry_refund(
    payment_id: UUID, refund_id: UUID, db: Db, staff: Staff, provider: Provider, overdue: ReconcileAfter
) -> RefundOut:
    payment, issued = await service.retry_refund(
        db,
        provider,
        staff,
        payment_id,
        refund_id,
        unanswered_after=overdue,
    )
    return RefundOut.of(payment, issued)


@reconciliation.get(
    "/discrepancies",
    summary="Payments whose money and enrollment disagree, for your issuers (staff; admins: all)",
    description=(
        "Money collected that settled nothing, payments settled but not taken by enrollment, payments "
        "kept for cancelled enrollments, refunds never answered; each once RECONCILE_AFTER_SECONDS have "
        "passed since it began."
    ),
    responses={400: _problem("The cursor is not one this API returned.")},
)
async def list_discrepancies(
    db: Db, staff: Staff, overdue: ReconcileAfter, limit: Limit = 50, cursor: Cursor = None
) -> Page[DiscrepancyOut]:
    async with db.acquire() as conn:
        found, next_cursor = await service.list_discrepancies(
            conn, staff, overdue_after=overdue, limit=limit, cursor=cursor
        )
    return Page[DiscrepancyOut](items=[DiscrepancyOut.of(item) for item in found], next_cursor=next_cursor)


@reconciliation.post(
    "/discrepancies/{kind}/{subject}/resolution",
    status_code=204,
    summary="Record a discrepancy reconciled by hand, with what was done (staff)",
    responses={
        404: _problem("No such open discrepancy of your issuers."),
        409: _problem("Reconciled already, or an unanswered refund (retry it instead)."),
    },
)
async def reconcile(
    kind: DiscrepancyKind,
    subject: Annotated[str, Path(max_length=300)],
    body: ReconciliationIn,
    db: Db,
    staff: Staff,
    overdue: ReconcileAfter,
) -> None:
    async with db.acquire() as conn, conn.transaction():
        await service.reconcile(conn, staff, kind, subject, body.note, overdue_after=overdue)


# A provider event is a few KiB; a generous bound on what is read before the signature is checked.
MAX_WEBHOOK_BYTES = 256 * 1024
_WEBHOOK_EXAMPLE = {
    "id": "evt_7d1c9e2a4b6f8035c1e2",
    "type": "payment.succeeded",
    "created": 1742465832,
    "data": {
        "session_id": "cs_5f0c2a9e41d7b3a8",
        "reference": _PAYMENT_ID,
        "amount": 4900,
        "currency": "EUR",
        "charge_id": "ch_0b8e3f61a2c94d7e",
    },
}


@webhooks.post(
    "/provider",
    summary="Notifications from the payment provider (signed)",
    description=(
        f"Signed with the shared secret: `{SIGNATURE_HEADER}: t=<unix seconds>,v1=<hex HMAC-SHA256 of "
        '"{t}.{raw body}">`, accepted within 5 minutes either way. A repeated delivery of an event '
        "gets the first answer again and changes nothing."
    ),
    responses={
        400: _problem("Unsigned, wrongly signed, outside the time tolerance, or not a provider event."),
        413: _problem(f"The body is larger than {MAX_WEBHOOK_BYTES} bytes."),
        422: _problem("Money collected that does not settle the payment; recorded for staff, not settled."),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"example": _WEBHOOK_EXAMPLE}},
        }
    },
)
@max_body_bytes(MAX_WEBHOOK_BYTES)
async def receive_provider_webhook(
    request: Request, db: Db, provider: Provider, runtime: RuntimeDep
) -> WebhookReceipt:
    # The signature covers the exact bytes sent: verify them before anything parses them.
    body = await request.body()
    try:
        notice = provider.parse_webhook(request.headers, body, now=datetime.now(UTC))
    except InvalidWebhook as exc:
        raise Problem(400, exc.kind, exc.detail) from None
    if notice is None:
        return WebhookReceipt(outcome=NoticeOutcome.IGNORED, duplicate=False)
    async with db.acquire() as conn, conn.transaction():
        result = await service.apply_notice(
            conn, provider.name, notice, max_declines=runtime.settings.payment_max_declines
        )
    if result.outcome is NoticeOutcome.DISCREPANCY:
        # Committed above: the discrepancy is on record even though the settlement is refused.
        raise Problem(422, "payment-discrepancy", result.detail, duplicate=result.duplicate)
    return WebhookReceipt(outcome=result.outcome, duplicate=result.duplicate)
