"""Notifications use cases: each runs in the caller's transaction.

The consumer's use case (`notify`) only records: in-app notifications (they are the inbox rows
themselves) and the emails and webhooks still to send. Sending is the delivery workers' job
(`delivery`), so nothing slow ever runs inside the consumer's transaction.
"""

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import ValidationError

from microcred_events import (
    REGISTRY,
    CourseCompleted,
    CoursePublished,
    CourseUpdated,
    CredentialIssued,
    CredentialReinstated,
    CredentialRevoked,
    EnrollmentActivated,
    EnrollmentCancelled,
    EnrollmentCreated,
    Event,
    Learner,
)
from microcred_runtime import Connection, Principal, Problem, consumers, decode_cursor, encode_cursor

from . import domain, egress, messages, repository
from .domain import Audience, Channel, DeliveryState, IPNetwork, Notice, Preferences, Scope, ScopeKind
from .repository import Attempt, Delivery, Notification, Subscription

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a subscription waits for its host to resolve before accepting it unchecked.
_RESOLVE_SECONDS = 5.0

# --- reacting to events ----------------------------------------------------------------------


async def record_course(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    course = event.course
    await repository.remember_course(
        conn,
        course.course_id,
        course.version,
        course.title,
        course.issuer.issuer_id,
        course.delivery_partner_id,
    )
    await release_waiting_webhooks(conn, course_id=course.course_id)


async def notify(conn: Connection, deliveries: Sequence[consumers.Delivery]) -> None:
    """Record what consecutive events cause: each learner's in-app notification and email, each
    subscriber's webhook. Each is recorded once per event and recipient, however often the event
    arrives. (The delivery workers are woken by the database as deliveries fall due: migration 004.)

    A subscriber hears only of events within its scope: about its issuer's or partner's courses,
    or its learner.

    A statement per table for the whole batch, not per event; yet each event is applied to the
    read models as the events before it left them (`_ReadModels`), so the batch records what its
    events applied one at a time record, whichever part of it the runtime gives."""
    events: list[Event] = [delivery.content for delivery in deliveries]
    notices = [domain.notice_for(event) for event in events]
    models = await _ReadModels.before(conn, events, [notice.learner_id for notice in notices])
    told = {notice.learner_id for notice in notices if notice.for_learner}
    preferences = await repository.preferences_of(conn, told) if told else {}
    subscriptions = await repository.active_subscriptions(conn)
    now = _now()
    in_app: dict[tuple[str, UUID], repository.NewNotification] = {}
    emails: dict[tuple[str, UUID], tuple[Event, Notice]] = {}
    webhooks: dict[tuple[str, UUID], repository.NewWebhook] = {}
    waiting: dict[str, repository.WaitingWebhook] = {}
    for event, notice in zip(events, notices, strict=True):
        models.record(event)
        channels = domain.learner_channels(notice, preferences.get(notice.learner_id, Preferences()), now)
        recipient = (notice.event_key, notice.learner_id)
        if Channel.IN_APP in channels and recipient not in in_app:
            message = messages.in_app(notice.kind, models.content(event))
            in_app[recipient] = repository.NewNotification(
                notice.learner_id,
                notice.event_key,
                notice.kind,
                message.title,
                message.body,
                message.link,
                notice.occurred_at,
            )
        if Channel.EMAIL in channels:
            emails.setdefault(recipient, (event, notice))
        body = domain.webhook_body(notice, event)
        enrollment_id = getattr(event, "enrollment_id", None)
        # The partner that attested a completion hears of it, whether or not it delivers the course.
        attested_by = event.partner_id if isinstance(event, CourseCompleted) else None
        course_id = models.course_of(event, by_credential=True)
        audience = domain.audience(notice.learner_id, models.course(course_id), attested_by)
        for webhook in _fan_out(subscriptions, notice.event_key, notice.event_type, body, audience):
            webhooks.setdefault((webhook.event_key, webhook.subscription_id), webhook)
        if audience.issuer_id is None and (course_id or enrollment_id):
            # Its course is not known yet: issuer and partner subscribers hear of it once it is.
            waiting.setdefault(
                notice.event_key,
                repository.WaitingWebhook(
                    notice.event_key,
                    notice.event_type,
                    body,
                    notice.learner_id,
                    course_id,
                    enrollment_id,
                    attested_by,
                ),
            )
    # What waits for an enrollment that a later event of the batch recorded goes now, as the
    # enrollment's event would have released it (a course that is not known stays so in a batch).
    ready = [(parked, course) for parked in waiting.values() if (course := models.waited_for(parked))]
    await models.save(conn)
    if models.new_enrollments:
        # And what waited, since earlier batches, for an enrollment this one recorded.
        ready += await repository.take_ready_webhooks(
            conn,
            enrollment_ids=models.new_enrollments,
            limit=_RELEASE_LIMIT * len(models.new_enrollments),
        )
    for parked, course in ready:
        waiting.pop(parked.event_key, None)
        audience = domain.audience(parked.learner_id, course, parked.attested_by)
        # Parked by an earlier batch, it goes to the subscriptions made before it was read; by
        # this one, to any (no subscription is newer than this transaction's reading of it).
        for released in _fan_out(
            subscriptions, parked.event_key, parked.event_type, parked.body, audience, before=parked.parked_at
        ):
            webhooks.setdefault((released.event_key, released.subscription_id), released)
    if models.new_learners:
        # Emails that waited for an address the batch gave.
        await repository.release_awaiting_address(conn, models.new_learners)
    if emails:
        traced: dict[str, consumers.Delivery] = {}
        for delivery, notice in zip(deliveries, notices, strict=True):
            traced.setdefault(notice.event_key, delivery)
        await _record_emails(conn, emails, models, traced)
    if in_app:
        await repository.insert_notifications(conn, list(in_app.values()))
    if webhooks:
        await repository.insert_webhooks(conn, list(webhooks.values()))
    if waiting:
        await repository.park_webhooks(conn, list(waiting.values()))


async def _record_emails(
    conn: Connection,
    emails: dict[tuple[str, UUID], tuple[Event, Notice]],
    models: "_ReadModels",
    traced: dict[str, consumers.Delivery],
) -> None:
    """Record the batch's emails (`traced`: the consumed event of each event key, for its logs).

    The address may not be known yet: payment and credential events carry only the learner id,
    and topics are read independently, so one may arrive before EnrollmentCreated. The email then
    waits (`awaiting_address`) and is released when the address arrives; when it arrives later in
    the same batch, the email does not wait at all."""
    waiting = await repository.insert_emails(
        conn,
        [
            repository.NewEmail(
                notice.event_key,
                notice.event_type,
                notice.learner_id,
                event.model_dump_json(),
                address_known=models.knows_address(notice.learner_id),
            )
            for event, notice in emails.values()
        ],
    )
    for email in waiting:
        with traced[email.event_key].current():
            log.info(
                "email waits for the learner's address",
                extra={"learner_id": str(email.learner_id), "event_key": email.event_key},
            )


_RELEASE_LIMIT = 500
"""How many waiting webhooks one course or enrollment releases in a transaction at most."""

WAITING_WEBHOOK_RETENTION = timedelta(days=7)
"""How long an event waits for its course before issuer and partner subscribers are given up on:
a course known from before migration 005 has no issuer until the catalog's next event for it."""


async def release_waiting_webhooks(
    conn: Connection, *, course_id: UUID | None = None, limit: int = _RELEASE_LIMIT
) -> int:
    """Fan out the webhooks that waited for their course (of `course_id` only, when given), now
    that it is known; how many. Subscriptions made since an event was read do not get it, as they
    would not have had it read in order."""
    ready = await repository.take_ready_webhooks(conn, course_id=course_id, limit=limit)
    if not ready:
        return 0
    subscriptions = await repository.active_subscriptions(conn)
    await repository.insert_webhooks(
        conn,
        [
            released
            for waiting, course in ready
            for released in _fan_out(
                subscriptions,
                waiting.event_key,
                waiting.event_type,
                waiting.body,
                domain.audience(waiting.learner_id, course, waiting.attested_by),
                before=waiting.parked_at,
            )
        ],
    )
    return len(ready)


async def drop_stale_waiting_webhooks(conn: Connection) -> int:
    dropped = await repository.drop_stale_waiting_webhooks(conn, WAITING_WEBHOOK_RETENTION)
    if dropped:
        log.warning(
            "%d webhooks waited %s for their course and are given up on for issuer and partner subscribers",
            dropped,
            WAITING_WEBHOOK_RETENTION,
        )
    return dropped


def _fan_out(
    subscriptions: Sequence[Subscription],
    event_key: str,
    event_type: str,
    body: str,
    audience: Audience,
    *,
    before: datetime | None = None,
) -> list[repository.NewWebhook]:
    """One webhook per subscription whose scope covers `audience` and which takes `event_type`
    (subscribed `before` then, when given)."""
    return [
        repository.NewWebhook(event_key, event_type, subscription.subscription_id, body)
        for subscription in subscriptions
        if subscription.scope is not None
        and subscription.scope.covers(audience)
        and domain.subscribed(subscription.event_types, event_type)
        and (before is None or subscription.created_at <= before)
    ]


@dataclass
class _ReadModels:
    """The read models (enrollments' courses, credentials, courses, learners' addresses) as each
    event of a batch finds them: as they were before the batch, with what the events before it,
    and the event itself, recorded (`record`). Courses come from the catalog's events, which are
    applied apart, so they do not change within a batch. `save` writes what the batch recorded."""

    learners: dict[UUID, Learner]
    enrollments: dict[UUID, UUID]
    credentials: dict[UUID, domain.Credential]
    courses: dict[UUID, domain.Course]
    # What the batch recorded: the learner and course of each enrollment; each credential; each
    # learner's newest address, with the time of the event that gave it.
    new_enrollments: dict[UUID, tuple[UUID, UUID]] = field(default_factory=dict)
    new_credentials: dict[UUID, domain.Credential] = field(default_factory=dict)
    new_learners: dict[UUID, tuple[Learner, datetime]] = field(default_factory=dict)

    @classmethod
    async def before(
        cls, conn: Connection, events: Sequence[Event], learner_ids: Sequence[UUID | None]
    ) -> "_ReadModels":
        """What the read models hold of what these events (of these learners) name, and of their
        courses: one statement."""
        known = await repository.known(
            conn,
            {
                repository.Named(
                    learner_id,
                    getattr(event, "course_id", None),
                    getattr(event, "enrollment_id", None),
                    getattr(event, "credential_id", None),
                )
                for event, learner_id in zip(events, learner_ids, strict=True)
            },
        )
        return cls(known.learners, known.enrollments, known.credentials, known.courses)

    def record(self, event: Event) -> None:
        """What `event` tells the read models: an enrollment's course and a credential are kept as
        first told, an address as told by the newest event."""
        match event:
            case EnrollmentActivated() | EnrollmentCancelled():
                self._enrollment(event.enrollment_id, event.learner_id, event.course_id)
            case EnrollmentCreated() | CourseCompleted():
                self._enrollment(event.enrollment_id, event.learner.learner_id, event.course_id)
                at = event.created_at if isinstance(event, EnrollmentCreated) else event.completed_at
                newest = self.new_learners.get(event.learner.learner_id)
                if newest is None or newest[1] <= at:
                    self.new_learners[event.learner.learner_id] = (event.learner, at)
            case CredentialIssued() if event.credential_id not in self.credentials:
                credential = domain.Credential(
                    event.achievement_name, str(event.credential_url), event.course_id
                )
                self.credentials[event.credential_id] = self.new_credentials[event.credential_id] = credential

    def knows_address(self, learner_id: UUID) -> bool:
        return learner_id in self.learners or learner_id in self.new_learners

    def waited_for(self, webhook: repository.WaitingWebhook) -> domain.Course | None:
        """The course a webhook parked for want of its enrollment's course has now, if its issuer
        is known."""
        if webhook.course_id is not None or webhook.enrollment_id is None:
            return None
        course = self.course(self.enrollments.get(webhook.enrollment_id))
        return course if course and course.issuer_id else None

    def _enrollment(self, enrollment_id: UUID, learner_id: UUID, course_id: UUID) -> None:
        self.new_enrollments.setdefault(enrollment_id, (learner_id, course_id))
        self.enrollments.setdefault(enrollment_id, course_id)

    def course_of(self, event: Event, *, by_credential: bool = False) -> UUID | None:
        """The course an event names, directly or through its enrollment (or, `by_credential`, its
        credential); None while that is not known."""
        course_id: UUID | None = getattr(event, "course_id", None)
        enrollment_id: UUID | None = getattr(event, "enrollment_id", None)
        credential_id: UUID | None = getattr(event, "credential_id", None)
        if course_id is None and enrollment_id is not None:
            course_id = self.enrollments.get(enrollment_id)
        if course_id is None and by_credential and credential_id in self.credentials:
            course_id = self.credentials[credential_id].course_id
        return course_id

    def course(self, course_id: UUID | None) -> domain.Course | None:
        return None if course_id is None else self.courses.get(course_id)

    def content(self, event: Event) -> messages.Content:
        """What a message about `event` says, with what the read models know (course title, credential)."""
        course = self.course(self.course_of(event))
        title = course.title if course else None
        if isinstance(event, CredentialIssued):
            return messages.Content(event, course=title, link=str(event.credential_url))
        if isinstance(event, CredentialRevoked | CredentialReinstated):
            credential = self.credentials.get(event.credential_id)
            if credential is None:
                return messages.Content(event)
            return messages.Content(
                event, achievement=credential.achievement_name, link=credential.credential_url
            )
        return messages.Content(event, course=title)

    async def save(self, conn: Connection) -> None:
        if self.new_enrollments:
            await repository.remember_enrollments(conn, self.new_enrollments)
        if self.new_learners:
            await repository.remember_learners(conn, list(self.new_learners.values()))
        if self.new_credentials:
            await repository.remember_credentials(conn, self.new_credentials)


@dataclass(frozen=True)
class Unreadable:
    """A delivery whose stored event no longer reads as one (e.g. its type is gone after an
    upgrade): it will never compose, whatever the retries."""

    detail: str


async def compose_emails(
    conn: Connection, deliveries: Sequence[Delivery]
) -> dict[UUID, tuple[messages.Email, str, str] | Unreadable | None]:
    """The email each delivery sends, with the learner's current name and address, read for all
    of them in one statement; None for one whose address is not known (which the consumer
    prevents by keeping such emails `awaiting_address`). One that cannot be read costs only
    itself."""
    composed: dict[UUID, tuple[messages.Email, str, str] | Unreadable | None] = {}
    readable: list[tuple[Delivery, Event]] = []
    for delivery in deliveries:
        try:
            readable.append((delivery, REGISTRY[delivery.event_type].model_validate_json(delivery.payload)))
        except (KeyError, ValidationError) as exc:
            composed[delivery.delivery_id] = Unreadable(f"{delivery.event_type}: {type(exc).__name__}: {exc}")
    models = await _ReadModels.before(
        conn, [event for _, event in readable], [delivery.learner_id for delivery, _ in readable]
    )
    for delivery, event in readable:
        learner = models.learners.get(delivery.learner_id) if delivery.learner_id else None
        if learner is None:
            composed[delivery.delivery_id] = None
            continue
        kind = domain.kind_of(delivery.event_type)
        email = messages.email(kind, models.content(event), learner.display_name)
        composed[delivery.delivery_id] = email, learner.email, learner.display_name
    return composed


# --- the learner's inbox and preferences -----------------------------------------------------


async def list_notifications(
    conn: Connection, caller: Principal, *, unread_only: bool, limit: int, cursor: str | None
) -> tuple[list[Notification], str | None]:
    key = decode_cursor(cursor, 2)
    items = await repository.notifications_page(
        conn,
        caller.learner_id,
        unread_only=unread_only,
        after=_sort_key(key) if key else None,
        limit=limit + 1,
    )
    return _paged(items, limit, lambda item: [item.created_at.isoformat(), str(item.notification_id)])


async def unread_count(conn: Connection, caller: Principal) -> int:
    return await repository.unread_count(conn, caller.learner_id)


async def mark_read(conn: Connection, caller: Principal, notification_id: UUID) -> Notification:
    notification = await repository.mark_read(conn, caller.learner_id, notification_id)
    if notification is None:
        # Someone else's notification is as unknown as one that does not exist.
        raise Problem(404, "notification-not-found", f"no notification {notification_id}")
    return notification


async def mark_all_read(conn: Connection, caller: Principal) -> int:
    return await repository.mark_all_read(conn, caller.learner_id)


async def get_preferences(conn: Connection, caller: Principal) -> Preferences:
    return await repository.preferences(conn, caller.learner_id)


async def set_preferences(conn: Connection, caller: Principal, preferences: Preferences) -> Preferences:
    await repository.save_preferences(conn, caller.learner_id, preferences)
    return preferences


# --- webhook subscriptions and deliveries (staff) --------------------------------------------


def may_subscribe(caller: Principal, scope: Scope) -> bool:
    """Who may subscribe whom: admins to any scope; staff to the events of an issuer they act for.

    A partner's or a learner's events span issuers, so only admins subscribe to them (partners
    are registered by admins too: enrollment's `POST /partners`), and to every event.
    """
    return caller.is_admin or (scope.kind is ScopeKind.ISSUER and caller.may_act_for(scope.id))


async def subscribe(
    conn: Connection,
    staff: Principal,
    *,
    url: str,
    scope: Scope,
    event_types: list[str],
    description: str | None,
    allowed_hosts: list[str],
    allowed_private: list[IPNetwork],
) -> Subscription:
    """Register a subscriber; the returned subscription holds the signing secret, shown this once."""
    if not may_subscribe(staff, scope):
        raise Problem(
            403, "scope-forbidden", f"you may not subscribe to the scope {scope.kind}", scope=scope.kind
        )
    await _check_destination(url, allowed_hosts, allowed_private)
    unknown = sorted(set(event_types) - domain.WEBHOOK_EVENT_TYPES)
    if unknown:
        raise Problem(
            422,
            "unknown-event-type",
            f"no webhooks are sent for {', '.join(unknown)}",
            known=sorted(domain.WEBHOOK_EVENT_TYPES),
        )
    subscription = Subscription(
        subscription_id=uuid.uuid4(),
        url=url,
        event_types=sorted(set(event_types)),
        description=description,
        secret=domain.new_secret(),
        created_by=staff.subject,
        created_at=_now(),
        disabled_at=None,
        scope=scope,
    )
    await repository.insert_subscription(conn, subscription)
    return subscription


async def _check_destination(url: str, allowed_hosts: list[str], allowed_private: list[IPNetwork]) -> None:
    """Refuse (422) a URL to a host that is not allowed, or that resolves to an address webhooks
    must not reach. A host that does not resolve (yet) is accepted: every delivery resolves and
    checks again, on the address it connects to."""
    try:
        domain.check_webhook_url(url, allowed_hosts)
        parts = urlsplit(url)
        assert parts.hostname is not None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        async with asyncio.timeout(_RESOLVE_SECONDS):
            await egress.checked_addresses(parts.hostname, port, allowed_private)
    except (domain.WebhookUrlRefused, egress.AddressRefused) as exc:
        raise Problem(422, "webhook-url-refused", str(exc), url=url) from None
    except (OSError, UnicodeError, TimeoutError) as exc:
        log.info("a webhook host does not resolve (yet): %s", exc, extra={"url": url})


def _managed_issuers(caller: Principal) -> list[UUID] | None:
    """The issuers whose subscriptions `caller` manages: None for an admin (every subscription)."""
    return None if caller.is_admin else sorted(caller.issuers)


def _manages(caller: Principal, subscription: Subscription) -> bool:
    # A subscription made before scopes (no scope) is an admin's to look after.
    return caller.is_admin or (subscription.scope is not None and may_subscribe(caller, subscription.scope))


async def list_subscriptions(
    conn: Connection, caller: Principal, *, include_disabled: bool, limit: int, cursor: str | None
) -> tuple[list[Subscription], str | None]:
    """Staff see the subscriptions to their issuers' events; admins every one."""
    key = decode_cursor(cursor, 2)
    items = await repository.subscriptions_page(
        conn,
        include_disabled=include_disabled,
        issuers=_managed_issuers(caller),
        after=_sort_key(key) if key else None,
        limit=limit + 1,
    )
    return _paged(items, limit, lambda item: [item.created_at.isoformat(), str(item.subscription_id)])


async def get_subscription(
    conn: Connection, caller: Principal, subscription_id: UUID, *, for_update: bool = False
) -> Subscription:
    subscription = await repository.subscription(conn, subscription_id, for_update=for_update)
    # Another institution's subscription is as unknown as one that does not exist, as in listings.
    if subscription is None or not _manages(caller, subscription):
        raise Problem(404, "subscription-not-found", f"no webhook subscription {subscription_id}")
    return subscription


async def disable_subscription(conn: Connection, caller: Principal, subscription_id: UUID) -> Subscription:
    await get_subscription(conn, caller, subscription_id, for_update=True)
    subscription = await repository.disable_subscription(conn, subscription_id)
    assert subscription is not None  # locked above
    return subscription


async def list_deliveries(
    conn: Connection,
    caller: Principal,
    *,
    state: DeliveryState | None,
    subscription_id: UUID | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Delivery], str | None]:
    key = decode_cursor(cursor, 2)
    items = await repository.deliveries_page(
        conn,
        Channel.WEBHOOK,
        state=state,
        subscription_id=subscription_id,
        issuers=_managed_issuers(caller),
        after=_sort_key(key) if key else None,
        limit=limit + 1,
    )
    return _paged(items, limit, lambda item: [item.created_at.isoformat(), str(item.delivery_id)])


async def get_delivery(
    conn: Connection, caller: Principal, delivery_id: UUID
) -> tuple[Delivery, list[Attempt]]:
    delivery = await repository.delivery(conn, delivery_id, Channel.WEBHOOK)
    subscription = None
    if delivery is not None and delivery.subscription_id is not None:
        subscription = await repository.subscription(conn, delivery.subscription_id)
    if delivery is None or subscription is None or not _manages(caller, subscription):
        raise Problem(404, "delivery-not-found", f"no webhook delivery {delivery_id}")
    return delivery, await repository.attempts(conn, delivery_id)


async def replay_delivery(conn: Connection, caller: Principal, delivery_id: UUID) -> Delivery:
    """Send a dead webhook again, with a fresh budget of attempts (same `webhook-id` and body)."""
    delivery, _ = await get_delivery(conn, caller, delivery_id)
    assert delivery.subscription_id is not None
    subscription = await repository.subscription(conn, delivery.subscription_id, for_update=True)
    if subscription is None or subscription.disabled_at is not None:
        raise Problem(409, "subscription-disabled", "the subscription of this delivery is disabled")
    replayed = await repository.replay(conn, delivery_id)
    if replayed is None:
        raise Problem(
            409, "delivery-not-dead", f"only dead deliveries are replayed; this one is {delivery.state}"
        )
    return replayed


# --- helpers ---------------------------------------------------------------------------------


def _paged(items: list[T], limit: int, key: Callable[[T], list[Any]]) -> tuple[list[T], str | None]:
    """A page and the cursor of the next one; the repository was asked for one more than `limit`."""
    page = items[:limit]
    return page, encode_cursor(key(page[-1])) if len(items) > limit else None


def _sort_key(key: list[Any]) -> tuple[datetime, UUID]:
    created_at, item_id = key
    try:
        if isinstance(created_at, str) and isinstance(item_id, str):
            after = datetime.fromisoformat(created_at), UUID(item_id)
            if after[0].tzinfo is not None:
                return after
    except ValueError:
        pass
    raise Problem(400, "invalid-cursor", "the cursor is not one this API returned")


def _now() -> datetime:
    return datetime.now(UTC)
