"""Notifications use cases: each runs in the caller's transaction.

The consumer's use case (`notify`) only records: in-app notifications (they are the inbox rows
themselves) and the emails and webhooks still to send. Sending is the delivery workers' job
(`delivery`), so nothing slow ever runs inside the consumer's transaction.
"""

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit
from uuid import UUID

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
)
from microcred_runtime import Connection, Principal, Problem, decode_cursor, encode_cursor

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


async def notify(conn: Connection, event: Event) -> None:
    """Record what `event` causes: the learner's in-app notification and email, each subscriber's
    webhook. Each is recorded once per event and recipient, however often the event arrives.
    (The delivery workers are woken by the database as deliveries fall due: migration 004.)

    A subscriber hears only of events within its scope: about its issuer's or partner's courses,
    or its learner."""
    await _update_read_models(conn, event)
    notice = domain.notice_for(event)
    if notice.for_learner:
        await _notify_learner(conn, notice, event)
    body = domain.webhook_body(notice, event)
    enrollment_id = getattr(event, "enrollment_id", None)
    # The partner that attested a completion hears of it, whether or not it delivers the course.
    attested_by = event.partner_id if isinstance(event, CourseCompleted) else None
    audience, course_id = await repository.audience(
        conn,
        notice.learner_id,
        course_id=getattr(event, "course_id", None),
        enrollment_id=enrollment_id,
        credential_id=getattr(event, "credential_id", None),
        attested_by=attested_by,
    )
    await _fan_out(conn, notice.event_key, notice.event_type, body, audience)
    if audience.issuer_id is None and (course_id or enrollment_id):
        # Its course is not known yet: issuer and partner subscribers hear of it once it is.
        await repository.park_webhook(
            conn,
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


WAITING_WEBHOOK_RETENTION = timedelta(days=7)
"""How long an event waits for its course before issuer and partner subscribers are given up on:
a course known from before migration 005 has no issuer until the catalog's next event for it."""


async def release_waiting_webhooks(
    conn: Connection, *, course_id: UUID | None = None, enrollment_id: UUID | None = None, limit: int = 500
) -> int:
    """Fan out the webhooks that waited for their course (of `course_id` or `enrollment_id` only,
    when given), now that it is known; how many. Subscriptions made since an event was read do
    not get it, as they would not have had it read in order."""
    ready = await repository.take_ready_webhooks(
        conn, course_id=course_id, enrollment_id=enrollment_id, limit=limit
    )
    for waiting in ready:
        audience, _ = await repository.audience(
            conn,
            waiting.learner_id,
            course_id=waiting.course_id,
            enrollment_id=waiting.enrollment_id,
            credential_id=None,
            attested_by=waiting.attested_by,
        )
        await _fan_out(
            conn, waiting.event_key, waiting.event_type, waiting.body, audience, before=waiting.parked_at
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


async def _fan_out(
    conn: Connection,
    event_key: str,
    event_type: str,
    body: str,
    audience: Audience,
    *,
    before: datetime | None = None,
) -> None:
    """One webhook per subscription whose scope covers `audience` and which takes `event_type`
    (subscribed `before` then, when given); one that was recorded already is not recorded again."""
    for subscription in await repository.active_subscriptions(conn):
        if (
            subscription.scope is not None
            and subscription.scope.covers(audience)
            and domain.subscribed(subscription.event_types, event_type)
            and (before is None or subscription.created_at <= before)
        ):
            await repository.insert_webhook(
                conn,
                event_key=event_key,
                event_type=event_type,
                subscription_id=subscription.subscription_id,
                body=body,
            )


async def _update_read_models(conn: Connection, event: Event) -> None:
    if isinstance(event, EnrollmentActivated | EnrollmentCancelled):
        await repository.remember_enrollment(conn, event.enrollment_id, event.learner_id, event.course_id)
        await release_waiting_webhooks(conn, enrollment_id=event.enrollment_id)
    elif isinstance(event, EnrollmentCreated | CourseCompleted):
        await repository.remember_enrollment(
            conn, event.enrollment_id, event.learner.learner_id, event.course_id
        )
        await release_waiting_webhooks(conn, enrollment_id=event.enrollment_id)
        at = event.created_at if isinstance(event, EnrollmentCreated) else event.completed_at
        await repository.remember_learner(conn, event.learner, at)
        # Emails of billing or issuance events read before the learner's address was known.
        await repository.release_awaiting_address(conn, event.learner.learner_id)
    elif isinstance(event, CredentialIssued):
        await repository.remember_credential(
            conn, event.credential_id, event.achievement_name, str(event.credential_url), event.course_id
        )


async def _notify_learner(conn: Connection, notice: Notice, event: Event) -> None:
    preferences = await repository.preferences(conn, notice.learner_id)
    channels = domain.learner_channels(notice, preferences, _now())
    if Channel.IN_APP in channels:
        message = messages.in_app(notice.kind, await content(conn, event))
        await repository.insert_notification(
            conn,
            learner_id=notice.learner_id,
            event_key=notice.event_key,
            kind=notice.kind,
            title=message.title,
            body=message.body,
            link=message.link,
            occurred_at=notice.occurred_at,
        )
    if Channel.EMAIL in channels:
        # The address may not be known yet: payment and credential events carry only the learner
        # id, and topics are read independently, so one may arrive before EnrollmentCreated. The
        # email then waits (`awaiting_address`) and is released when the address arrives.
        known = await repository.learner(conn, notice.learner_id) is not None
        if (
            await repository.insert_email(
                conn,
                event_key=notice.event_key,
                event_type=notice.event_type,
                learner_id=notice.learner_id,
                payload=event.model_dump_json(),
                address_known=known,
            )
            and not known
        ):
            log.info(
                "email waits for the learner's address",
                extra={"learner_id": str(notice.learner_id), "event_key": notice.event_key},
            )


async def content(conn: Connection, event: Event) -> messages.Content:
    """What a message about `event` says, with what the read models know (course title, credential)."""
    course_id = getattr(event, "course_id", None)
    enrollment_id = getattr(event, "enrollment_id", None)
    course = None
    if course_id is not None or enrollment_id is not None:
        course = await repository.course_title(conn, course_id=course_id, enrollment_id=enrollment_id)
    if isinstance(event, CredentialIssued):
        return messages.Content(event, course=course, link=str(event.credential_url))
    if isinstance(event, CredentialRevoked | CredentialReinstated):
        known = await repository.credential(conn, event.credential_id)
        achievement, link = known or (None, None)
        return messages.Content(event, achievement=achievement, link=link)
    return messages.Content(event, course=course)


async def compose_emails(
    conn: Connection, deliveries: Sequence[Delivery]
) -> list[tuple[messages.Email, str, str] | None]:
    """`compose_email` of each claimed delivery, on one connection."""
    return [await compose_email(conn, delivery) for delivery in deliveries]


async def compose_email(conn: Connection, delivery: Delivery) -> tuple[messages.Email, str, str] | None:
    """The email a delivery sends, with the learner's current name and address; None when the
    address is not known (which the consumer prevents by keeping such emails `awaiting_address`)."""
    assert delivery.learner_id is not None
    learner = await repository.learner(conn, delivery.learner_id)
    if learner is None:
        return None
    event = REGISTRY[delivery.event_type].model_validate_json(delivery.payload)
    email = messages.email(
        domain.kind_of(delivery.event_type), await content(conn, event), learner.display_name
    )
    return email, learner.email, learner.display_name


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
