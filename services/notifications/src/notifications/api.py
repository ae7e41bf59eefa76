"""Notifications' HTTP API: parse, call the use case in a transaction, answer.

- `/me/...`: the caller's own in-app inbox and notification preferences.
- `/webhooks/...`: staff manage webhook subscriptions and look after their deliveries.
"""

from datetime import datetime
from typing import Annotated, Any, Self
from uuid import UUID

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from microcred_runtime import Caller, Cursor, Db, Limit, Page, RuntimeDep, Staff, problem_doc

from . import domain, service
from .domain import ChannelPreference, DeliveryState, Kind, Preferences, Scope, ScopeKind
from .repository import Attempt, Delivery, Notification, Subscription

_BEARER: dict[int | str, dict[str, Any]] = {401: problem_doc("No bearer token, or one that is not valid.")}
inbox = APIRouter(prefix="/me", tags=["inbox"], responses=_BEARER)
webhooks = APIRouter(prefix="/webhooks", tags=["webhooks"], responses=_BEARER)

_CREDENTIAL_URL = "https://credentials.microcred.example/credentials/7e2b9d4c-5a1f-4c36-b8e0-6d3a2f9c1e47"
_EVENT_TYPE = "org.microcred.issuance.credential.issued.v1"


def _problems(described: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers a route may give."""
    return {status: problem_doc(description) for status, description in described.items()}


# --- the inbox -------------------------------------------------------------------------------


class NotificationOut(BaseModel):
    notification_id: UUID
    kind: Kind = Field(description="What it is about.", examples=["credential.issued"])
    title: str = Field(examples=['Your credential "Data Analysis Foundations" is ready'])
    body: str = Field(description="Plain text.")
    link: str | None = Field(description="Where to go from it, if anywhere.", examples=[_CREDENTIAL_URL])
    occurred_at: datetime = Field(description="When what it tells of happened.")
    created_at: datetime
    read_at: datetime | None = Field(description="When the learner marked it read; null while unread.")

    @classmethod
    def of(cls, notification: Notification) -> "NotificationOut":
        return cls(
            notification_id=notification.notification_id,
            kind=notification.kind,
            title=notification.title,
            body=notification.body,
            link=notification.link,
            occurred_at=notification.occurred_at,
            created_at=notification.created_at,
            read_at=notification.read_at,
        )


class UnreadCount(BaseModel):
    unread: int = Field(examples=[3])


class MarkedRead(BaseModel):
    marked: int = Field(description="How many notifications this marked read.", examples=[3])


@inbox.get(
    "/notifications",
    summary="My notifications",
    description="The caller's in-app notifications, newest first, a page at a time; `unread=true` "
    "for the unread ones only.",
    responses=_problems({400: "The cursor is not one this API returned."}),
)
async def list_notifications(
    caller: Caller, db: Db, unread: bool = False, limit: Limit = 20, cursor: Cursor = None
) -> Page[NotificationOut]:
    async with db.acquire() as conn:
        items, next_cursor = await service.list_notifications(
            conn, caller, unread_only=unread, limit=limit, cursor=cursor
        )
    return Page(items=[NotificationOut.of(item) for item in items], next_cursor=next_cursor)


@inbox.get("/notifications/unread-count", summary="How many of my notifications are unread")
async def unread_count(caller: Caller, db: Db) -> UnreadCount:
    """For a badge: the number of the caller's unread notifications."""
    async with db.acquire() as conn:
        return UnreadCount(unread=await service.unread_count(conn, caller))


@inbox.post(
    "/notifications/read-all",
    summary="Mark all my notifications read",
    description="Marks every unread notification of the caller read; answers how many that was.",
)
async def mark_all_read(caller: Caller, db: Db) -> MarkedRead:
    async with db.acquire() as conn, conn.transaction():
        return MarkedRead(marked=await service.mark_all_read(conn, caller))


@inbox.post(
    "/notifications/{notification_id}/read",
    summary="Mark one of my notifications read",
    description="Idempotent: marking it again keeps the first time it was read.",
    responses=_problems({404: "No such notification, or it is someone else's."}),
)
async def mark_read(notification_id: UUID, caller: Caller, db: Db) -> NotificationOut:
    async with db.acquire() as conn, conn.transaction():
        return NotificationOut.of(await service.mark_read(conn, caller, notification_id))


class ChannelPreferenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="False: nothing on this channel.")
    muted: list[Kind] = Field(
        default_factory=list,
        max_length=len(Kind),
        description="Kinds of notification not wanted on this channel.",
        examples=[["payment.settled"]],
    )

    @classmethod
    def of(cls, preference: ChannelPreference) -> "ChannelPreferenceBody":
        return cls(enabled=preference.enabled, muted=sorted(preference.muted))

    def preference(self) -> ChannelPreference:
        return ChannelPreference(enabled=self.enabled, muted=frozenset(self.muted))


class PreferencesBody(BaseModel):
    """What the learner hears of, per channel. Webhooks go to subscribers, not learners."""

    model_config = ConfigDict(extra="forbid")

    email: ChannelPreferenceBody = Field(default_factory=ChannelPreferenceBody)
    in_app: ChannelPreferenceBody = Field(default_factory=ChannelPreferenceBody)

    @classmethod
    def of(cls, preferences: Preferences) -> "PreferencesBody":
        return cls(
            email=ChannelPreferenceBody.of(preferences.email),
            in_app=ChannelPreferenceBody.of(preferences.in_app),
        )

    def preferences(self) -> Preferences:
        return Preferences(email=self.email.preference(), in_app=self.in_app.preference())


@inbox.get("/preferences", summary="My notification preferences")
async def get_preferences(caller: Caller, db: Db) -> PreferencesBody:
    """The caller's preferences; everything is on until they change it."""
    async with db.acquire() as conn:
        return PreferencesBody.of(await service.get_preferences(conn, caller))


@inbox.put(
    "/preferences",
    summary="Set my notification preferences",
    description="Replaces the caller's preferences. They apply to events that happen from now on; "
    "what was already recorded is still delivered.",
)
async def set_preferences(body: PreferencesBody, caller: Caller, db: Db) -> PreferencesBody:
    async with db.acquire() as conn, conn.transaction():
        return PreferencesBody.of(await service.set_preferences(conn, caller, body.preferences()))


# --- webhook subscriptions -------------------------------------------------------------------


class ScopeBody(BaseModel):
    """Whose events a subscription receives."""

    model_config = ConfigDict(extra="forbid")

    kind: ScopeKind = Field(
        description="`issuer`: events about the issuer's courses; `partner`: about the courses the "
        "partner delivers, or whose completion it attested; `learner`: about one learner; `all`: "
        "every event (admins only).",
        examples=["partner"],
    )
    id: UUID | None = Field(
        default=None,
        description="The issuer, partner or learner; none for `all`.",
        examples=["b3d5f7a9-2c4e-4e61-9a83-5f1b7d3c9e20"],
    )

    @model_validator(mode="after")
    def _id_matches_kind(self) -> Self:
        self.scope()  # a ValueError when they do not match: a 422
        return self

    @classmethod
    def of(cls, scope: Scope) -> "ScopeBody":
        return cls(kind=scope.kind, id=scope.id)

    def scope(self) -> Scope:
        return Scope(self.kind, self.id)


class SubscriptionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="Where deliveries are POSTed: http(s), to a host allowed by WEBHOOK_ALLOWED_HOSTS "
        "that resolves to public addresses only.",
        examples=["https://hooks.northwind.example.edu/microcred"],
    )
    scope: ScopeBody = Field(description="Whose events it receives; see who may subscribe to which.")
    event_types: list[str] = Field(
        default_factory=list,
        max_length=len(domain.WEBHOOK_EVENT_TYPES),
        description="The event types to receive; empty for all of them.",
        examples=[[_EVENT_TYPE]],
    )
    description: str | None = Field(
        default=None, max_length=500, description="Who this is, for staff.", examples=["Northwind LMS"]
    )


class SubscriptionOut(BaseModel):
    subscription_id: UUID
    url: str = Field(examples=["https://hooks.northwind.example.edu/microcred"])
    scope: ScopeBody | None = Field(
        description="Whose events it receives; null only for a subscription made before scopes "
        "existed, which was disabled then."
    )
    event_types: list[str] = Field(description="Empty: every event type.", examples=[[_EVENT_TYPE]])
    description: str | None = Field(examples=["Northwind LMS"])
    created_by: str
    created_at: datetime
    disabled_at: datetime | None = Field(description="Set once disabled; nothing is delivered after.")

    @classmethod
    def of(cls, subscription: Subscription) -> "SubscriptionOut":
        return cls(
            subscription_id=subscription.subscription_id,
            url=subscription.url,
            scope=ScopeBody.of(subscription.scope) if subscription.scope else None,
            event_types=subscription.event_types,
            description=subscription.description,
            created_by=subscription.created_by,
            created_at=subscription.created_at,
            disabled_at=subscription.disabled_at,
        )


class SubscriptionCreated(SubscriptionOut):
    secret: str = Field(
        description="The signing secret (Standard Webhooks). Shown only in this answer: store it now.",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


@webhooks.post(
    "/subscriptions",
    status_code=201,
    summary="Register a webhook subscriber (staff)",
    description=(
        "Deliveries are `POST`s of `{type, timestamp, data}` (the event), signed as Standard Webhooks "
        "do: headers `webhook-id` (the same on every retry of one delivery), `webhook-timestamp` and "
        "`webhook-signature: v1,<base64 HMAC-SHA256 of '<id>.<timestamp>.<body>'>`, keyed with the "
        "base64-decoded part of the secret after `whsec_`. Any 2xx answer is success; anything else "
        "is retried with exponential backoff and jitter, then parked as `dead`.\n\n"
        "A subscription receives only the events within its `scope`. Admins may subscribe to any "
        "scope; staff to an issuer's events only."
    ),
    responses=_problems(
        {
            403: "The caller is not staff, or may not subscribe to this scope (`scope-forbidden`).",
            422: "The URL is not http(s), its host is not allowed or resolves to a loopback, private, "
            "link-local, multicast, reserved or cloud metadata address (`webhook-url-refused`), an "
            "event type is unknown (`unknown-event-type`), or the request is malformed.",
        }
    ),
)
async def create_subscription(
    body: SubscriptionRequest, staff: Staff, db: Db, runtime: RuntimeDep
) -> SubscriptionCreated:
    async with db.acquire() as conn, conn.transaction():
        subscription = await service.subscribe(
            conn,
            staff,
            url=body.url,
            scope=body.scope.scope(),
            event_types=body.event_types,
            description=body.description,
            allowed_hosts=runtime.settings.webhook_allowed_hosts,
            allowed_private=runtime.settings.webhook_allowed_private_networks,
        )
    return SubscriptionCreated(**SubscriptionOut.of(subscription).model_dump(), secret=subscription.secret)


@webhooks.get(
    "/subscriptions",
    summary="Webhook subscribers (staff)",
    description="Newest first; disabled ones only with `include_disabled=true`. Secrets are not shown. "
    "Staff see the subscriptions to the events of issuers they act for; admins every one.",
    responses=_problems({400: "The cursor is not one this API returned.", 403: "The caller is not staff."}),
)
async def list_subscriptions(
    staff: Staff, db: Db, include_disabled: bool = False, limit: Limit = 20, cursor: Cursor = None
) -> Page[SubscriptionOut]:
    async with db.acquire() as conn:
        items, next_cursor = await service.list_subscriptions(
            conn, staff, include_disabled=include_disabled, limit=limit, cursor=cursor
        )
    return Page(items=[SubscriptionOut.of(item) for item in items], next_cursor=next_cursor)


@webhooks.get(
    "/subscriptions/{subscription_id}",
    summary="One webhook subscriber (staff)",
    responses=_problems(
        {
            403: "The caller is not staff.",
            404: "No such subscription, or not one to an issuer the caller acts for.",
        }
    ),
)
async def get_subscription(subscription_id: UUID, staff: Staff, db: Db) -> SubscriptionOut:
    """The subscription, without its secret."""
    async with db.acquire() as conn:
        return SubscriptionOut.of(await service.get_subscription(conn, staff, subscription_id))


@webhooks.delete(
    "/subscriptions/{subscription_id}",
    summary="Disable a webhook subscriber (staff)",
    description="Nothing more is delivered to it, and what it still had to receive is cancelled. "
    "The subscription and its deliveries stay on record; disabling it again changes nothing.",
    responses=_problems(
        {
            403: "The caller is not staff.",
            404: "No such subscription, or not one to an issuer the caller acts for.",
        }
    ),
)
async def disable_subscription(subscription_id: UUID, staff: Staff, db: Db) -> SubscriptionOut:
    async with db.acquire() as conn, conn.transaction():
        return SubscriptionOut.of(await service.disable_subscription(conn, staff, subscription_id))


# --- webhook deliveries ----------------------------------------------------------------------


class DeliveryOut(BaseModel):
    delivery_id: UUID
    webhook_id: str = Field(description="The `webhook-id` header it is sent with.", examples=["msg_3f2a"])
    subscription_id: UUID
    event_type: str = Field(examples=[_EVENT_TYPE])
    event_key: str = Field(description="The occurrence it tells of; one delivery per subscriber and key.")
    state: DeliveryState = Field(
        description="pending -> sending -> delivered, or back to pending to retry, or dead after the "
        "last attempt; cancelled when its subscription was disabled.",
        examples=["dead"],
    )
    attempts: int = Field(description="Attempts since it was recorded or last replayed.", examples=[8])
    next_attempt_at: datetime | None = Field(description="When it is tried next, while pending.")
    last_error: str | None = Field(examples=["HTTP 503: Service Unavailable"])
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, delivery: Delivery) -> "DeliveryOut":
        assert delivery.subscription_id is not None
        return cls(
            delivery_id=delivery.delivery_id,
            webhook_id=domain.message_id(delivery.delivery_id),
            subscription_id=delivery.subscription_id,
            event_type=delivery.event_type,
            event_key=delivery.event_key,
            state=delivery.state,
            attempts=delivery.attempts,
            next_attempt_at=delivery.next_attempt_at
            if delivery.state in (DeliveryState.PENDING, DeliveryState.SENDING)
            else None,
            last_error=delivery.last_error,
            created_at=delivery.created_at,
            delivered_at=delivery.delivered_at,
        )


class AttemptOut(BaseModel):
    attempt: int = Field(examples=[1])
    started_at: datetime
    duration_ms: int = Field(examples=[182])
    outcome: str = Field(
        description="delivered, failed, timed_out, refused (not worth retrying) or interrupted (shutdown).",
        examples=["failed"],
    )
    status_code: int | None = Field(description="The receiver's HTTP status, if it answered.", examples=[503])
    error: str | None = Field(examples=["HTTP 503: Service Unavailable"])

    @classmethod
    def of(cls, attempt: Attempt) -> "AttemptOut":
        return cls(**attempt.__dict__)


class DeliveryDetail(DeliveryOut):
    attempt_log: list[AttemptOut] = Field(description="Every attempt, oldest first.")


@webhooks.get(
    "/deliveries",
    summary="Webhook deliveries (staff)",
    description="Newest first; `state=dead` lists those that ran out of attempts, to replay. Staff see "
    "the deliveries to subscriptions to the events of issuers they act for; admins every one.",
    responses=_problems({400: "The cursor is not one this API returned.", 403: "The caller is not staff."}),
)
async def list_deliveries(
    staff: Staff,
    db: Db,
    state: DeliveryState | None = None,
    subscription_id: Annotated[UUID | None, Query(description="Only this subscriber's.")] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Page[DeliveryOut]:
    async with db.acquire() as conn:
        items, next_cursor = await service.list_deliveries(
            conn, staff, state=state, subscription_id=subscription_id, limit=limit, cursor=cursor
        )
    return Page(items=[DeliveryOut.of(item) for item in items], next_cursor=next_cursor)


@webhooks.get(
    "/deliveries/{delivery_id}",
    summary="One webhook delivery and its attempts (staff)",
    responses=_problems(
        {
            403: "The caller is not staff.",
            404: "No such delivery, or not one to an issuer the caller acts for.",
        }
    ),
)
async def get_delivery(delivery_id: UUID, staff: Staff, db: Db) -> DeliveryDetail:
    """The delivery, with every attempt made: when, how long, the outcome and the receiver's answer."""
    async with db.acquire() as conn:
        delivery, attempts = await service.get_delivery(conn, staff, delivery_id)
    return DeliveryDetail(
        **DeliveryOut.of(delivery).model_dump(), attempt_log=[AttemptOut.of(item) for item in attempts]
    )


@webhooks.post(
    "/deliveries/{delivery_id}/replay",
    summary="Replay a dead webhook delivery (staff)",
    description="Sends it again with a fresh budget of attempts: same `webhook-id` and body, new "
    "timestamp and signature.",
    responses=_problems(
        {
            403: "The caller is not staff.",
            404: "No such delivery, or not one to an issuer the caller acts for.",
            409: "It is not dead (`delivery-not-dead`), or its subscription is disabled.",
        }
    ),
)
async def replay_delivery(delivery_id: UUID, staff: Staff, db: Db) -> DeliveryOut:
    async with db.acquire() as conn, conn.transaction():
        return DeliveryOut.of(await service.replay_delivery(conn, staff, delivery_id))
