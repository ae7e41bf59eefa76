"""Enrollment use cases: each runs in the caller's transaction and queues the events it causes."""

import contextlib
import enum
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeGuard
from uuid import UUID

from pydantic import ValidationError

from microcred_events import (
    CompletionReported,
    CoursePublished,
    CourseRetired,
    CourseUpdated,
    Learner,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
)
from microcred_events.partner import CompletionRejected, RejectionReason
from microcred_events.topics import partner_rejection_topic
from microcred_runtime import (
    AuditEntry,
    Connection,
    Delivery,
    Principal,
    Problem,
    decode_cursor,
    encode_cursor,
    journeys,
    outbox,
)

from . import domain, repository, signatures
from .domain import (
    TIMESTAMP_TOLERANCE,
    CourseStatus,
    Credential,
    CredentialKind,
    Enrollment,
    EnrollmentStatus,
    Ignored,
    Partner,
    PartnerStatus,
    Refusal,
    Transition,
)
from .repository import StoredResponse

log = logging.getLogger(__name__)

# --- the course read model -------------------------------------------------------------------


async def record_course(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    if isinstance(event, CoursePublished):
        await repository.upsert_course(conn, event.course, CourseStatus.PUBLISHED, event.published_at)
    else:
        await repository.upsert_course(conn, event.course, None, event.updated_at)


async def record_retirement(conn: Connection, event: CourseRetired) -> None:
    """Store the retirement and cancel the enrollments still waiting for payment.

    A stale retirement (a version already superseded, e.g. by a republication) cancels nothing.
    """
    if not await repository.retire_course(conn, event.course_id, event.version, event.retired_at):
        return
    now = _now()
    for enrollment in await repository.pending_for_course(conn, event.course_id):
        await _apply(conn, domain.retire_course(enrollment, now))


# --- learners and staff ----------------------------------------------------------------------


async def enroll(
    conn: Connection,
    caller: Principal,
    course_id: UUID,
    idempotency_key: str,
    render: Callable[[Enrollment], dict[str, Any]],
    *,
    again: bool = False,
) -> StoredResponse:
    """Enroll the caller in a course, once per idempotency key.

    `render` makes the response body; it is stored with the key, so a retry with the same key and
    request gets the very response the first request got, even after the enrollment has moved on.
    A learner who holds a valid credential for the course is told so (409) unless `again`.
    """
    learner = _learner(caller)
    # `again` counts only when set: the keys stored before it existed keep their fingerprints.
    fingerprint = _fingerprint({"course_id": str(course_id)} | ({"again": True} if again else {}))
    if not await repository.claim_idempotency_key(conn, caller.subject, idempotency_key, fingerprint):
        record = await repository.get_idempotency_record(conn, caller.subject, idempotency_key)
        if record.request_fingerprint != fingerprint:
            raise Problem(
                422,
                "idempotency-key-reused",
                "this Idempotency-Key was already used with a different request; use a new key",
            )
        return record.response

    course = await repository.get_course(conn, course_id)
    if course is None:
        # The catalog only publishes courses it opens to enrollment: unknown here means unknown,
        # not yet published, or published so recently that its event has not arrived.
        raise Problem(422, "course-not-found", f"no published course {course_id}", course_id=str(course_id))
    held = (
        None if again else await repository.valid_credential_for(conn, learner.learner_id, course_id, _now())
    )
    if held is not None:
        raise Problem(
            409,
            "credential-held",
            f"you already hold a valid credential for course {course_id}; to enroll (and pay) again "
            'anyway, send "again": true',
            course_id=str(course_id),
            credential_id=str(held),
        )
    try:
        transition = domain.enroll(uuid.uuid4(), learner, course, _now())
    except domain.CourseNotOpen as exc:
        raise Problem(409, "course-not-open", str(exc), course_id=str(course_id)) from None
    if not await repository.insert_enrollment(conn, transition.enrollment):
        existing = await repository.live_enrollment_id(conn, learner.learner_id, course_id)
        raise Problem(
            409,
            "already-enrolled",
            f"you already have a live enrollment in course {course_id}",
            # None only if that enrollment ended in the instant since the insert was refused.
            enrollment_id=str(existing) if existing else None,
        )
    for event in transition.events:
        await outbox.add(conn, event)
    # Later steps on requests of their own (payment, completion) continue this request's trace.
    await journeys.remember(conn, transition.enrollment.enrollment_id)
    response = StoredResponse(201, render(transition.enrollment))
    await repository.store_response(conn, caller.subject, idempotency_key, response)
    return response


async def get_enrollment(conn: Connection, caller: Principal, enrollment_id: UUID) -> Enrollment:
    return await _visible(conn, caller, enrollment_id)


async def list_enrollments(
    conn: Connection, caller: Principal, *, status: EnrollmentStatus | None, limit: int, cursor: str | None
) -> tuple[list[Enrollment], str | None]:
    """The caller's own enrollments, newest first; returns a page and the cursor of the next one."""
    key = decode_cursor(cursor, 2)
    after = _sort_key(key) if key else None
    # One more than asked tells whether a next page exists.
    enrollments = await repository.list_for_learner(
        conn, caller.learner_id, status=status, after=after, limit=limit + 1
    )
    page = enrollments[:limit]
    if len(enrollments) <= limit:
        return page, None
    last = page[-1]
    return page, encode_cursor([last.created_at.isoformat(), str(last.enrollment_id)])


async def cancel_enrollment(
    conn: Connection, caller: Principal, enrollment_id: UUID, detail: str | None
) -> Enrollment:
    """The learner cancels their own enrollment; staff may cancel one of a course their issuer
    issues (reason staff_action)."""
    enrollment = await _visible(conn, caller, enrollment_id, for_update=True)
    by_staff = enrollment.learner.learner_id != caller.learner_id
    if by_staff:
        caller.require_issuer(await repository.course_issuer(conn, enrollment.course_id))
    try:
        transition = domain.cancel(
            enrollment, by_staff=by_staff, detail=detail, now=_now(), actor=caller.actor
        )
    except domain.EnrollmentRuleViolated as exc:
        raise Problem(409, "enrollment-state", str(exc), enrollment_status=enrollment.status.value) from None
    await _apply(conn, transition)
    return transition.enrollment


async def complete_enrollment(
    conn: Connection,
    staff: Principal,
    enrollment_id: UUID,
    *,
    score: float | None,
    evidence_url: str | None,
) -> tuple[Enrollment, bool]:
    """Staff of the course's issuer record a completion; returns the enrollment and whether this
    call completed it. Nobody completes their own enrollment: that would mint their own credential."""
    enrollment = await _visible(conn, staff, enrollment_id, for_update=True)
    if enrollment.learner.learner_id == staff.learner_id:
        raise Problem(403, "own-enrollment", "nobody records the completion of their own enrollment")
    staff.require_issuer(await repository.course_issuer(conn, enrollment.course_id))
    try:
        transition = domain.complete(
            enrollment, score=score, evidence_url=evidence_url, recorded_by=staff.actor, now=_now()
        )
    except domain.EnrollmentRuleViolated as exc:
        raise Problem(409, "enrollment-state", str(exc), enrollment_status=enrollment.status.value) from None
    async with journeys.resume(conn, enrollment_id, "enrollment completion"):
        await _apply(conn, transition)
    return transition.enrollment, transition.changed


async def audit_enrollment(conn: Connection, staff: Principal, enrollment_id: UUID) -> list[AuditEntry]:
    """Who did what to an enrollment, in order: for staff of the course's issuer and admins."""
    enrollment = await _visible(conn, staff, enrollment_id)
    staff.require_issuer(await repository.course_issuer(conn, enrollment.course_id))
    return domain.audit_trail(enrollment)


# --- billing ---------------------------------------------------------------------------------


async def settle_payment(conn: Connection, event: PaymentSettled) -> None:
    """Activate the enrollment the payment is for; record a payment that activates nothing."""
    enrollment = await repository.get_enrollment(conn, event.enrollment_id, for_update=True)
    if enrollment is None:
        reason = "enrollment_unknown"
    else:
        transition = domain.activate(enrollment, event.payment_id, event.amount, _now())
        await _apply(conn, transition)
        if transition.ignored in (None, Ignored.DUPLICATE):
            return
        reason = transition.ignored
    # Money was taken for nothing: keep it visible for reconciliation rather than drop it.
    log.warning(
        "settled payment not applied: %s",
        reason,
        extra={"payment_id": str(event.payment_id), "enrollment_id": str(event.enrollment_id)},
    )
    await repository.record_unapplied_payment(
        conn,
        payment_id=event.payment_id,
        enrollment_id=event.enrollment_id,
        learner_id=event.learner_id,
        amount=event.amount,
        reason=reason,
        settled_at=event.settled_at,
    )


async def fail_payment(conn: Connection, event: PaymentFailed) -> None:
    await _react(
        conn,
        event.enrollment_id,
        lambda enrollment: domain.fail_payment(enrollment, event.reason, _now()),
        payment_id=event.payment_id,
    )


async def refund_payment(conn: Connection, event: RefundIssued) -> None:
    await _react(
        conn,
        event.enrollment_id,
        lambda enrollment: domain.refund(
            enrollment,
            event.payment_id,
            event.reason,
            _now(),
            in_full=event.fully_refunded is not False,
            issued_by=event.issued_by,
        ),
        payment_id=event.payment_id,
    )


# --- the partner registry --------------------------------------------------------------------


@dataclass(frozen=True)
class NewCredential:
    """A credential to add: an HMAC secret we generate, or the partner's Ed25519 public key."""

    kind: CredentialKind
    public_key: bytes | None = None


async def register_partner(
    conn: Connection, *, display_name: str, course_ids: Iterable[UUID], credentials: Sequence[NewCredential]
) -> Partner:
    """A new, active partner. Its HMAC secrets are in the partner returned, and nowhere else later."""
    now = _now()
    partner = Partner(
        partner_id=uuid.uuid4(),
        display_name=display_name,
        status=PartnerStatus.ACTIVE,
        course_ids=frozenset(course_ids),
        credentials=tuple(_issue(credential, now) for credential in credentials),
        created_at=now,
        updated_at=now,
    )
    await repository.insert_partner(conn, partner)
    return partner


async def get_partner(conn: Connection, partner_id: UUID, *, for_update: bool = False) -> Partner:
    partner = await repository.get_partner(conn, partner_id, for_update=for_update)
    if partner is None:
        raise Problem(404, "partner-not-found", f"no partner {partner_id}")
    return partner


async def list_partners(
    conn: Connection, *, status: PartnerStatus | None, limit: int, cursor: str | None
) -> tuple[list[Partner], str | None]:
    """Partners, newest first; returns a page and the cursor of the next one."""
    key = decode_cursor(cursor, 2)
    after = _sort_key(key) if key else None
    partners = await repository.list_partners(conn, status=status, after=after, limit=limit + 1)
    page = partners[:limit]
    if len(partners) <= limit:
        return page, None
    last = page[-1]
    return page, encode_cursor([last.created_at.isoformat(), str(last.partner_id)])


async def update_partner(
    conn: Connection, partner_id: UUID, *, display_name: str | None, course_ids: Iterable[UUID] | None
) -> Partner:
    """Rename the partner and/or replace the courses the registry lets it report."""
    partner = await get_partner(conn, partner_id, for_update=True)
    updated = replace(
        partner,
        display_name=partner.display_name if display_name is None else display_name,
        course_ids=partner.course_ids if course_ids is None else frozenset(course_ids),
        updated_at=_now(),
    )
    await repository.save_partner(conn, updated)
    return updated


async def suspend_partner(conn: Connection, partner_id: UUID, reason: str | None) -> Partner:
    """Refuse the partner's reports from now on (`partner_suspended`); suspending again changes nothing."""
    partner = await get_partner(conn, partner_id, for_update=True)
    if partner.status is PartnerStatus.SUSPENDED:
        return partner
    now = _now()
    suspended = replace(
        partner, status=PartnerStatus.SUSPENDED, suspended_at=now, suspension_reason=reason, updated_at=now
    )
    await repository.save_partner(conn, suspended)
    return suspended


async def reactivate_partner(conn: Connection, partner_id: UUID) -> Partner:
    partner = await get_partner(conn, partner_id, for_update=True)
    if partner.status is PartnerStatus.ACTIVE:
        return partner
    active = replace(
        partner, status=PartnerStatus.ACTIVE, suspended_at=None, suspension_reason=None, updated_at=_now()
    )
    await repository.save_partner(conn, active)
    return active


async def add_credential(conn: Connection, partner_id: UUID, new: NewCredential) -> Credential:
    """Add a credential beside the active ones (to rotate: add, switch, then revoke the old one)."""
    await get_partner(conn, partner_id, for_update=True)
    credential = _issue(new, _now())
    await repository.insert_credential(conn, partner_id, credential)
    return credential


async def revoke_credential(conn: Connection, partner_id: UUID, credential_id: UUID) -> Credential:
    """Stop accepting signatures made with the credential; revoking it again changes nothing."""
    partner = await get_partner(conn, partner_id, for_update=True)
    credential = next((c for c in partner.credentials if c.credential_id == credential_id), None)
    if credential is None:
        raise Problem(404, "credential-not-found", f"partner {partner_id} has no credential {credential_id}")
    if not credential.active:
        return credential
    now = _now()
    await repository.revoke_credential(conn, partner_id, credential_id, now)
    return replace(credential, revoked_at=now)


def _issue(new: NewCredential, now: datetime) -> Credential:
    if new.kind is CredentialKind.HMAC_SHA256:
        return Credential(uuid.uuid4(), new.kind, now, secret=signatures.new_secret())
    return Credential(uuid.uuid4(), new.kind, now, public_key=new.public_key)


# --- partners' completion reports ------------------------------------------------------------


class ReportStatus(enum.StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REFUSED = "refused"


@dataclass(frozen=True)
class MalformedReport:
    """What a partner sent as a report that is not a valid `CompletionReported`, and why."""

    detail: str
    # Read from the body when it carries one, so the partner can tell which report was refused.
    report_id: UUID | None = None


Report = CompletionReported | MalformedReport


@dataclass(frozen=True)
class ReportOutcome:
    """What became of one report: accepted, the duplicate of an accepted one, or refused and why."""

    status: ReportStatus
    report_id: UUID | None
    enrollment_id: UUID | None = None
    refusal: Refusal | None = None


@dataclass(frozen=True)
class _Reported:
    """A report to apply, from whom, and what refuses it already, if anything (a late message:
    refused unless it repeats a report accepted before)."""

    partner: Partner
    report: Report
    late: Refusal | None = None
    # The consumed event's span, under which its events are queued (None: the current span).
    delivery: Delivery | None = None


async def _report_completions(
    conn: Connection, reported: Sequence[_Reported], now: datetime
) -> list[ReportOutcome]:
    """The one path of every partner report, whichever way it came in, once its sender is known
    to be the partner: an enrollment completes (and `CourseCompleted` is queued) exactly once per
    report; the same report again is a duplicate; anything else is refused with a reason.

    The reports are applied in order, as if one after the other, with a few statements for them
    all: what they look up is read at once (the enrollments locked), an earlier report's effect
    is seen by a later one, and the changed enrollments are written back together.
    """
    reports = [item.report for item in reported if isinstance(item.report, CompletionReported)]
    accepted = await repository.accepted_reports(
        conn,
        [
            (item.partner.partner_id, item.report.report_id)
            for item in reported
            if _own(item.report, item.partner)
        ],
    )
    courses = await repository.courses(conn, [report.course_id for report in reports])
    meant, enrollments = await repository.enrollments_for_reports(conn, reports)
    candidates = iter(meant)
    outcomes: list[ReportOutcome] = []
    applied: list[tuple[Transition, Delivery | None]] = []
    for item in reported:
        partner, report = item.partner, item.report
        ids = next(candidates) if isinstance(report, CompletionReported) else []
        if isinstance(report, MalformedReport):
            outcomes.append(
                _refused(report, item.late or Refusal(RejectionReason.MALFORMED_REPORT, report.detail))
            )
            continue
        # Looked up first: an accepted report sent again is still a duplicate after its course
        # grant or its enrollment moved on, or when it comes late (a resend, a replay the inbox
        # has forgotten).
        done = accepted.get((partner.partner_id, report.report_id)) if _own(report, partner) else None
        if done is not None:
            outcomes.append(ReportOutcome(ReportStatus.DUPLICATE, report.report_id, done))
            continue
        refusal = item.late or domain.check_report(partner, report, courses.get(report.course_id), now)
        if refusal is not None:
            outcomes.append(_refused(report, refusal))
            continue
        transition = domain.complete_for_partner(partner, report, [enrollments[id_] for id_ in ids], now)
        if isinstance(transition, Refusal):
            outcomes.append(_refused(report, transition))
            continue
        enrollment = transition.enrollment
        if transition.changed:
            enrollments[enrollment.enrollment_id] = enrollment
            accepted[(partner.partner_id, report.report_id)] = enrollment.enrollment_id
            applied.append((transition, item.delivery))
        status = ReportStatus.ACCEPTED if transition.changed else ReportStatus.DUPLICATE
        outcomes.append(ReportOutcome(status, report.report_id, enrollment.enrollment_id))
    await _apply_completions(conn, applied)
    return outcomes


async def _apply_completions(conn: Connection, applied: Sequence[tuple[Transition, Delivery | None]]) -> None:
    """Write the partners' completions back and queue their events, each in its enrollment's
    journey (and its consumed event's span, if any)."""
    if not applied:
        return
    found = await journeys.find(conn, [transition.enrollment.enrollment_id for transition, _ in applied])
    await repository.save_enrollments(conn, [transition.enrollment for transition, _ in applied])
    queued: list[outbox.Queued] = []
    for transition, delivery in applied:
        with delivery.current() if delivery else contextlib.nullcontext():
            journey = found.get(str(transition.enrollment.enrollment_id))
            with journeys.continued(journey, "partner completion"):
                queued.extend(outbox.prepare(event) for event in transition.events)
    await outbox.add_all(conn, queued)


def _own(report: Report, partner: Partner) -> TypeGuard[CompletionReported]:
    """Whether the report is one of the partner's own (a report naming another partner is none
    of its own: it is refused as such)."""
    return isinstance(report, CompletionReported) and report.partner_id == partner.partner_id


def _refused(report: Report, refusal: Refusal) -> ReportOutcome:
    return ReportOutcome(ReportStatus.REFUSED, report.report_id, refusal=refusal)


def _authenticate(partner: Partner, content: bytes, signature: str | None) -> Refusal | None:
    """Why the partner may not report now, if it may not: a bad signature, or a suspension
    (told only to a sender that proved to be the partner)."""
    try:
        signatures.verify(signature, content, partner.credentials)
    except signatures.BadSignature as exc:
        return Refusal(RejectionReason.BAD_SIGNATURE, str(exc))
    if partner.status is PartnerStatus.SUSPENDED:
        return Refusal(RejectionReason.PARTNER_SUSPENDED, f"partner {partner.partner_id} is suspended")
    return None


def loose_report_id(document: object) -> UUID | None:
    """The `report_id` of something that is not a valid report, if it has a readable one."""
    if isinstance(document, bytes):
        try:
            document = json.loads(document)
        except (ValueError, RecursionError):
            return None
    if not isinstance(document, dict) or not isinstance(document.get("report_id"), str):
        return None
    try:
        return UUID(document["report_id"])
    except ValueError:
        return None


# --- ... by Kafka ---


REJECTION_SOURCE = "urn:microcred:enrollment"


@dataclass(frozen=True)
class PartnerMessage:
    """A message from the partner topic: who it says it is from, what is signed, and the report."""

    partner_id: UUID
    message_id: str
    signed_content: bytes
    signature: str | None
    report: Report
    sent_at: datetime  # its `ce_time`
    # When the broker appended it (a topic with LogAppendTime); None: judged when it is applied.
    appended_at: datetime | None = None


async def take_partner_messages(
    conn: Connection, deliveries: Sequence[Delivery]
) -> list[ReportOutcome | None]:
    """Apply reports from the partner topic (each delivery's content a `PartnerMessage`), in
    order; a refusal is queued for the partner's rejection topic in this same transaction, so it
    is told exactly once.

    A message is rejected (`Delivery.reject`: dead-lettered; its outcome None) when there is no
    partner to tell: `ce_source` names a partner that is not registered, or the signature is not
    that partner's (anyone may name a partner; only what it signed is told on its topic).
    """
    messages: list[PartnerMessage] = [delivery.content for delivery in deliveries]
    partners = await repository.partners(conn, [message.partner_id for message in messages])
    now = _now()
    reported: list[_Reported] = []
    decided: dict[int, ReportOutcome | None] = {}
    for position, (message, delivery) in enumerate(zip(messages, deliveries, strict=True)):
        partner = partners.get(message.partner_id)
        if partner is None:
            delivery.reject(
                RejectionReason.UNKNOWN_PARTNER,
                f"ce_source names partner {message.partner_id}, which is not registered",
            )
            decided[position] = None
            continue
        refusal = _authenticate(partner, message.signed_content, message.signature)
        if refusal is not None and refusal.reason is RejectionReason.BAD_SIGNATURE:
            delivery.reject(refusal.reason, f"ce_source names partner {partner.partner_id}: {refusal.detail}")
            decided[position] = None
            continue
        if refusal is not None:
            decided[position] = _refused(message.report, refusal)
            continue
        # After the signature: the time is only worth judging once it is known to be the partner's.
        late = domain.check_message_time(message.sent_at, message.appended_at or now)
        reported.append(_Reported(partner, message.report, late, delivery))
    applied = iter(await _report_completions(conn, reported, now) if reported else [])
    outcomes = [
        decided[position] if position in decided else next(applied) for position in range(len(messages))
    ]
    rejections = []
    for message, delivery, outcome in zip(messages, deliveries, outcomes, strict=True):
        if outcome is None or outcome.refusal is None:
            continue
        with delivery.current():
            log.info(
                "partner report refused: %s",
                outcome.refusal.reason,
                extra={"partner_id": str(message.partner_id), "message_id": message.message_id},
            )
            rejected = CompletionRejected(
                message_id=message.message_id,
                partner_id=message.partner_id,
                report_id=outcome.report_id,
                reason=outcome.refusal.reason,
                detail=outcome.refusal.detail,
                rejected_at=now,
            )
            rejections.append(
                outbox.prepare(
                    rejected, source=REJECTION_SOURCE, topic=partner_rejection_topic(message.partner_id)
                )
            )
    await outbox.add_all(conn, rejections)
    return outcomes


# --- ... and by HTTP ---


_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class SignedRequest:
    """A partner's HTTP request, signed Standard-Webhooks style: its three headers and raw body."""

    webhook_id: str | None
    timestamp: str | None
    signature: str | None
    body: bytes


async def authenticate_request(conn: Connection, partner_id: UUID, request: SignedRequest) -> Partner:
    """The partner a signed request comes from, or a problem saying why the request is refused.

    The request's id is recorded here, in the caller's transaction: the same id again is a replay.
    """
    partner = await repository.get_partner(conn, partner_id)
    if partner is None:
        raise Problem(404, "unknown-partner", f"no partner {partner_id}")
    if not request.webhook_id or not request.timestamp or not request.signature:
        raise Problem(
            401, "bad-signature", "send the webhook-id, webhook-timestamp and webhook-signature headers"
        )
    if not _UNIX_SECONDS.fullmatch(request.timestamp):
        raise Problem(401, "bad-signature", "webhook-timestamp is not a time in Unix seconds")
    # Compared as numbers: a timestamp centuries away must be refused, not overflow a datetime.
    if abs(_now().timestamp() - int(request.timestamp)) > TIMESTAMP_TOLERANCE.total_seconds():
        raise Problem(
            401,
            "stale-timestamp",
            f"webhook-timestamp is more than {TIMESTAMP_TOLERANCE.seconds // 60} minutes from our clock",
        )
    content = signatures.signed_content(request.webhook_id, request.timestamp, request.body)
    refusal = _authenticate(partner, content, request.signature)
    if refusal is not None and refusal.reason is RejectionReason.BAD_SIGNATURE:
        raise Problem(401, "bad-signature", refusal.detail)
    if refusal is not None:
        raise Problem(403, "partner-suspended", refusal.detail)
    # Kept twice the tolerance: a request accepted with a timestamp up to 5 minutes ahead stays
    # recorded until its timestamp is too old to pass the check above.
    if not await repository.record_webhook_id(
        conn, partner_id, request.webhook_id, keep=2 * TIMESTAMP_TOLERANCE
    ):
        raise Problem(
            409,
            "replayed-request",
            f"the request {request.webhook_id} was taken already; to ask again, send under a new"
            " webhook-id (accepted reports then answer `duplicate`)",
        )
    return partner


async def report_completions(
    conn: Connection, partner: Partner, reports: Sequence[Report]
) -> list[ReportOutcome]:
    """Apply each report of a signed request, in order; one outcome per report."""
    return await _report_completions(conn, [_Reported(partner, report) for report in reports], _now())


# --- helpers ---------------------------------------------------------------------------------


async def _react(
    conn: Connection,
    enrollment_id: UUID,
    transition_of: Callable[[Enrollment], Transition],
    *,
    payment_id: UUID,
) -> None:
    """Apply another context's event to one enrollment; what does not apply is logged, not failed."""
    context = {"enrollment_id": str(enrollment_id), "payment_id": str(payment_id)}
    enrollment = await repository.get_enrollment(conn, enrollment_id, for_update=True)
    if enrollment is None:
        # Billing only charges for enrollments we published, so this one came from outside this
        # deployment (another environment on a shared cluster): nothing to change, now or later.
        log.warning("payment event for an unknown enrollment", extra=context)
        return
    transition = transition_of(enrollment)
    if not transition.changed:
        log.info("payment event changed nothing: %s", transition.ignored, extra=context)
    await _apply(conn, transition)


async def _apply(conn: Connection, transition: Transition) -> None:
    if not transition.changed:
        return
    await repository.save_enrollment(conn, transition.enrollment)
    for event in transition.events:
        await outbox.add(conn, event)


async def _visible(
    conn: Connection, caller: Principal, enrollment_id: UUID, *, for_update: bool = False
) -> Enrollment:
    """The enrollment if the caller may see it: their own, or any for staff; 404 otherwise, so
    nobody learns that someone else's enrollment exists."""
    enrollment = await repository.get_enrollment(conn, enrollment_id, for_update=for_update)
    if enrollment is None or not (caller.is_staff or enrollment.learner.learner_id == caller.learner_id):
        raise Problem(404, "enrollment-not-found", f"no enrollment {enrollment_id}")
    return enrollment


def _learner(caller: Principal) -> Learner:
    """The learner as other contexts will address them: the token must carry an email."""
    if not caller.email:
        raise Problem(
            403,
            "email-required",
            "enrolling needs the learner's email address: the token carries no `email` claim",
        )
    try:
        return Learner(
            learner_id=caller.learner_id, email=caller.email, display_name=caller.name or caller.email
        )
    except ValidationError:
        raise Problem(
            403,
            "email-required",
            "the token's `email` (or `name`) claim is not usable to address the learner",
        ) from None


def _sort_key(key: list[Any]) -> tuple[datetime, UUID]:
    created_at, enrollment_id = key
    try:
        if isinstance(created_at, str) and isinstance(enrollment_id, str):
            after = datetime.fromisoformat(created_at), UUID(enrollment_id)
            if after[0].tzinfo is not None:
                return after
    except ValueError:
        pass
    raise Problem(400, "invalid-cursor", "the cursor is not one this API returned")


def _fingerprint(request: dict[str, Any]) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)
