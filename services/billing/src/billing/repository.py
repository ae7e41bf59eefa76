"""Billing's tables, as plain SQL."""

from collections.abc import Collection, Sequence
from datetime import datetime
from uuid import UUID

import asyncpg

from microcred_events import Money, RefundIssued
from microcred_runtime import Connection

from .domain import Discrepancy, DiscrepancyKind, DiscrepancyReason, NoticeOutcome, Payment, PaymentStatus

_COLUMNS = (
    "payment_id, enrollment_id, learner_id, amount_minor, currency, status, refunded_minor,"
    " checkout_session_id, checkout_url, provider, provider_reference, created_at, updated_at, settled_at,"
    " issuer_id, declines"
)


def _payment(row: asyncpg.Record) -> Payment:
    return Payment(
        payment_id=row["payment_id"],
        enrollment_id=row["enrollment_id"],
        learner_id=row["learner_id"],
        amount=Money(amount_minor=row["amount_minor"], currency=row["currency"]),
        status=PaymentStatus(row["status"]),
        refunded_minor=row["refunded_minor"],
        checkout_session_id=row["checkout_session_id"],
        checkout_url=row["checkout_url"],
        provider=row["provider"],
        provider_reference=row["provider_reference"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        settled_at=row["settled_at"],
        issuer_id=row["issuer_id"],
        declines=row["declines"],
    )


async def insert_all(conn: Connection, payments: Sequence[Payment]) -> None:
    """Store new payments, in one round trip; one whose enrollment already has one is not stored."""
    await conn.executemany(
        f"INSERT INTO payments ({_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        " ON CONFLICT (enrollment_id) DO NOTHING",
        [
            (
                payment.payment_id,
                payment.enrollment_id,
                payment.learner_id,
                payment.amount.amount_minor,
                payment.amount.currency,
                payment.status,
                payment.refunded_minor,
                payment.checkout_session_id,
                payment.checkout_url,
                payment.provider,
                payment.provider_reference,
                payment.created_at,
                payment.updated_at,
                payment.settled_at,
                payment.issuer_id,
                payment.declines,
            )
            for payment in payments
        ],
    )


async def get(conn: Connection, payment_id: UUID, *, for_update: bool = False) -> Payment | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM payments WHERE payment_id = $1{lock}", payment_id)
    return _payment(row) if row else None


async def get_by_enrollment(conn: Connection, enrollment_id: UUID) -> Payment | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM payments WHERE enrollment_id = $1 FOR UPDATE", enrollment_id
    )
    return _payment(row) if row else None


async def save(conn: Connection, payment: Payment) -> None:
    """Store the mutable part of a payment; amount, enrollment and learner never change."""
    await conn.execute(
        "UPDATE payments SET status = $2, refunded_minor = $3, checkout_session_id = $4, checkout_url = $5,"
        " provider = $6, provider_reference = $7, updated_at = $8, settled_at = $9, declines = $10"
        " WHERE payment_id = $1",
        payment.payment_id,
        payment.status,
        payment.refunded_minor,
        payment.checkout_session_id,
        payment.checkout_url,
        payment.provider,
        payment.provider_reference,
        payment.updated_at,
        payment.settled_at,
        payment.declines,
    )


async def page(
    conn: Connection, *, learner_id: UUID | None, after: tuple[datetime, UUID] | None, limit: int
) -> list[Payment]:
    """Newest first; `learner_id` None means everyone's; `after` is the last key of the previous page."""
    after_created, after_id = after or (None, None)
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM payments"
        " WHERE ($1::uuid IS NULL OR learner_id = $1)"
        " AND ($2::timestamptz IS NULL OR (created_at, payment_id) < ($2, $3::uuid))"
        " ORDER BY created_at DESC, payment_id DESC LIMIT $4",
        learner_id,
        after_created,
        after_id,
        limit,
    )
    return [_payment(row) for row in rows]


async def insert_requested_refund(conn: Connection, refund: RefundIssued, *, issued_by: str) -> None:
    """Record a refund about to be asked of the provider; its amount is reserved from now on."""
    await conn.execute(
        "INSERT INTO refunds (refund_id, payment_id, amount_minor, currency, reason, issued_by, issued_at,"
        " status) VALUES ($1, $2, $3, $4, $5, $6, $7, 'requested')",
        refund.refund_id,
        refund.payment_id,
        refund.amount.amount_minor,
        refund.amount.currency,
        refund.reason,
        issued_by,
        refund.issued_at,
    )


async def requested_refunds_minor(conn: Connection, payment_id: UUID) -> int:
    """What the payment's refunds requested at the provider, and not answered yet, will return."""
    total = await conn.fetchval(
        "SELECT coalesce(sum(amount_minor), 0) FROM refunds WHERE payment_id = $1 AND status = 'requested'",
        payment_id,
    )
    return int(total)


async def mark_refund_issued(conn: Connection, refund_id: UUID, *, provider_refund_id: str) -> bool:
    """The provider made the requested refund; False when it was no longer requested."""
    issued = await conn.fetchval(
        "UPDATE refunds SET status = 'issued', provider_refund_id = $2"
        " WHERE refund_id = $1 AND status = 'requested' RETURNING true",
        refund_id,
        provider_refund_id,
    )
    return bool(issued)


async def refund_issued(conn: Connection, refund_id: UUID) -> bool:
    return bool(
        await conn.fetchval("SELECT true FROM refunds WHERE refund_id = $1 AND status = 'issued'", refund_id)
    )


async def delete_requested_refund(conn: Connection, refund_id: UUID) -> None:
    """The provider refused the refund: nothing was returned, its amount is free again."""
    await conn.execute("DELETE FROM refunds WHERE refund_id = $1 AND status = 'requested'", refund_id)


async def claim_provider_event(conn: Connection, provider: str, event_id: str, kind: str) -> bool:
    """Claim a provider event for this transaction; False when it was already handled.

    A concurrent claim of the same event waits here until the first transaction ends.
    """
    claimed = await conn.fetchval(
        "INSERT INTO provider_events (provider, event_id, kind, outcome) VALUES ($1, $2, $3, 'pending')"
        " ON CONFLICT DO NOTHING RETURNING true",
        provider,
        event_id,
        kind,
    )
    return bool(claimed)


async def provider_event_outcome(conn: Connection, provider: str, event_id: str) -> tuple[NoticeOutcome, str]:
    row = await conn.fetchrow(
        "SELECT outcome, detail FROM provider_events WHERE provider = $1 AND event_id = $2",
        provider,
        event_id,
    )
    assert row is not None, "asked only for events already claimed"
    return NoticeOutcome(row["outcome"]), row["detail"]


async def record_provider_event_outcome(
    conn: Connection,
    provider: str,
    event_id: str,
    *,
    payment_id: UUID | None,
    outcome: NoticeOutcome,
    detail: str,
) -> None:
    await conn.execute(
        "UPDATE provider_events SET payment_id = $3, outcome = $4, detail = $5"
        " WHERE provider = $1 AND event_id = $2",
        provider,
        event_id,
        payment_id,
        outcome,
        detail,
    )


async def insert_discrepancy(
    conn: Connection,
    *,
    provider: str,
    provider_event_id: str,
    payment_id: UUID | None,
    reason: DiscrepancyReason,
    detail: str,
    reference: str,
    charge_id: str | None,
    received: Money,
    recorded_at: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO payment_discrepancies (provider, provider_event_id, payment_id, reason, detail,"
        " reference, charge_id, received_minor, received_currency, recorded_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        provider,
        provider_event_id,
        payment_id,
        reason,
        detail,
        reference,
        charge_id,
        received.amount_minor,
        received.currency,
        recorded_at,
    )


async def record_enrollments_activated(conn: Connection, activated: Sequence[tuple[UUID, datetime]]) -> None:
    """Enrollment activated enrollments for these payments: (payment id, when) each."""
    if not activated:
        return
    await conn.execute(
        "UPDATE payments SET enrollment_activated_at = a.at"
        " FROM unnest($1::uuid[], $2::timestamptz[]) AS a (payment_id, at)"
        " WHERE payments.payment_id = a.payment_id AND payments.enrollment_activated_at IS NULL",
        [payment_id for payment_id, _ in activated],
        [at for _, at in activated],
    )


async def record_enrollment_cancelled(conn: Connection, enrollment_id: UUID, cancelled_at: datetime) -> None:
    await conn.execute(
        "UPDATE payments SET enrollment_cancelled_at = $2"
        " WHERE enrollment_id = $1 AND enrollment_cancelled_at IS NULL",
        enrollment_id,
        cancelled_at,
    )


# Each kind's open discrepancies, oldest first, of the issuers in $1 (NULL: every issuer's, and the
# money no payment took, which only admins see), begun before $2: what should have followed (an
# activation, a provider's answer) has had its time. Reconciled ones are left out.
_UNRESOLVED = "NOT EXISTS (SELECT 1 FROM reconciliations r WHERE r.kind = {kind} AND r.subject = {subject})"
_DISCREPANCIES = {
    DiscrepancyKind.UNMATCHED_COLLECTION: (
        "SELECT d.provider || ':' || d.provider_event_id AS subject, d.recorded_at AS since,"
        " d.reason || ': ' || d.detail AS detail, d.received_minor AS amount_minor,"
        " d.received_currency AS currency, d.payment_id, NULL::uuid AS refund_id"
        " FROM payment_discrepancies d LEFT JOIN payments p ON p.payment_id = d.payment_id"
        " WHERE d.recorded_at < $2 AND ($1::uuid[] IS NULL OR p.issuer_id = ANY($1)) AND "
        + _UNRESOLVED.format(
            kind="'unmatched_collection'", subject="d.provider || ':' || d.provider_event_id"
        )
    ),
    DiscrepancyKind.SETTLED_NOT_ACTIVE: (
        "SELECT payment_id::text AS subject, settled_at AS since,"
        " 'settled, and enrollment has not activated the enrollment' AS detail, amount_minor, currency,"
        " payment_id, NULL::uuid AS refund_id FROM payments p"
        " WHERE status = 'settled' AND enrollment_activated_at IS NULL AND enrollment_cancelled_at IS NULL"
        " AND settled_at < $2 AND ($1::uuid[] IS NULL OR issuer_id = ANY($1)) AND "
        + _UNRESOLVED.format(kind="'settled_not_active'", subject="p.payment_id::text")
    ),
    DiscrepancyKind.PAID_ENROLLMENT_CANCELLED: (
        "SELECT payment_id::text AS subject, enrollment_cancelled_at AS since,"
        " 'paid, and the enrollment was cancelled; not refunded in full (refunds asked for count)'"
        " AS detail,"
        " amount_minor - refunded_minor - (SELECT coalesce(sum(r.amount_minor), 0)::bigint FROM refunds r"
        " WHERE r.payment_id = p.payment_id AND r.status = 'requested') AS amount_minor,"
        " currency, payment_id, NULL::uuid AS refund_id"
        " FROM payments p WHERE status = 'settled' AND enrollment_cancelled_at < $2"
        " AND ($1::uuid[] IS NULL OR issuer_id = ANY($1)) AND "
        + _UNRESOLVED.format(kind="'paid_enrollment_cancelled'", subject="p.payment_id::text")
    ),
    DiscrepancyKind.REFUND_UNANSWERED: (
        "SELECT r.refund_id::text AS subject, r.issued_at AS since,"
        " 'the provider never answered this refund: ask it again' AS detail, r.amount_minor, r.currency,"
        " r.payment_id, r.refund_id FROM refunds r JOIN payments p ON p.payment_id = r.payment_id"
        " WHERE r.status = 'requested' AND r.issued_at < $2 AND ($1::uuid[] IS NULL OR p.issuer_id = ANY($1))"
    ),
}


async def discrepancies(
    conn: Connection,
    *,
    issuers: Collection[UUID] | None,
    overdue_before: datetime,
    after: tuple[datetime, str, str] | None,
    limit: int,
) -> list[Discrepancy]:
    """What staff acting for `issuers` (None: admins, for all) have to reconcile, oldest first (by
    since, kind, subject), after the key `after` of the previous page."""
    since, kind_after, subject = after or (None, None, None)
    found: list[Discrepancy] = []
    for kind, query in _DISCREPANCIES.items():
        # Subjects compared byte by byte, as Python sorts the merged page, whatever the collation.
        rows = await conn.fetch(
            f"SELECT * FROM ({query}) AS listed WHERE $3::timestamptz IS NULL"
            ' OR (since, $4::text, subject COLLATE "C") > ($3, $5::text, $6::text COLLATE "C")'
            ' ORDER BY since, subject COLLATE "C" LIMIT $7',
            None if issuers is None else list(issuers),
            overdue_before,
            since,
            kind.value,
            kind_after,
            subject,
            limit,
        )
        found += [
            Discrepancy(
                kind=kind,
                subject=row["subject"],
                since=row["since"],
                detail=row["detail"],
                amount=Money(amount_minor=row["amount_minor"], currency=row["currency"]),
                payment_id=row["payment_id"],
                refund_id=row["refund_id"],
            )
            for row in rows
        ]
    return sorted(found, key=lambda item: (item.since, item.kind.value, item.subject))[:limit]


async def is_open(
    conn: Connection,
    kind: DiscrepancyKind,
    subject: str,
    *,
    issuers: Collection[UUID] | None,
    overdue_before: datetime,
) -> bool:
    """Whether `subject` is on the list of staff acting for `issuers` (see `discrepancies`)."""
    found = await conn.fetchval(
        f"SELECT true FROM ({_DISCREPANCIES[kind]}) AS listed WHERE subject = $3",
        None if issuers is None else list(issuers),
        overdue_before,
        subject,
    )
    return bool(found)


async def reconcile(
    conn: Connection, kind: DiscrepancyKind, subject: str, *, resolved_by: str, note: str, at: datetime
) -> bool:
    """Record a discrepancy reconciled by hand; False when someone did already."""
    recorded = await conn.fetchval(
        "INSERT INTO reconciliations (kind, subject, resolved_by, note, resolved_at)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT DO NOTHING RETURNING true",
        kind,
        subject,
        resolved_by,
        note,
        at,
    )
    return bool(recorded)


async def requested_refund(conn: Connection, payment: Payment, refund_id: UUID) -> RefundIssued | None:
    """The payment's refund `refund_id` while it is requested (its answer not applied yet)."""
    row = await conn.fetchrow(
        "SELECT amount_minor, currency, reason, issued_by, issued_at FROM refunds"
        " WHERE refund_id = $1 AND payment_id = $2 AND status = 'requested'",
        refund_id,
        payment.payment_id,
    )
    if row is None:
        return None
    return RefundIssued(
        refund_id=refund_id,
        payment_id=payment.payment_id,
        enrollment_id=payment.enrollment_id,
        learner_id=payment.learner_id,
        amount=Money(amount_minor=row["amount_minor"], currency=row["currency"]),
        reason=row["reason"],
        issued_at=row["issued_at"],
        issued_by=row["issued_by"],
    )
