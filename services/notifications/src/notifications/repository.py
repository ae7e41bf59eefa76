"""Notifications' tables, as plain SQL."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

import asyncpg

from microcred_events import Learner
from microcred_runtime import Connection

from .domain import (
    AttemptResult,
    Audience,
    ChannelPreference,
    DeliveryState,
    Kind,
    Preferences,
    Scope,
    ScopeKind,
)

# Where the database tells the workers that deliveries fell due (migration 004: a trigger).
WAKE_CHANNEL = "notifications_delivery"
"""The NOTIFY channel that wakes the delivery workers; the payload is the delivery channel."""

# --- read models -----------------------------------------------------------------------------


async def remember_learner(conn: Connection, learner: Learner, as_of: datetime) -> None:
    """Keep the learner's address and name, unless a newer event already gave them."""
    await conn.execute(
        "INSERT INTO learners (learner_id, email, display_name, as_of) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (learner_id) DO UPDATE SET"
        " email = EXCLUDED.email, display_name = EXCLUDED.display_name, as_of = EXCLUDED.as_of"
        " WHERE learners.as_of <= EXCLUDED.as_of",
        learner.learner_id,
        learner.email,
        learner.display_name,
        as_of,
    )


async def learner(conn: Connection, learner_id: UUID) -> Learner | None:
    row = await conn.fetchrow(
        "SELECT learner_id, email, display_name FROM learners WHERE learner_id = $1", learner_id
    )
    return Learner(**dict(row)) if row else None


async def remember_enrollment(
    conn: Connection, enrollment_id: UUID, learner_id: UUID, course_id: UUID
) -> None:
    await conn.execute(
        "INSERT INTO enrollments (enrollment_id, learner_id, course_id) VALUES ($1, $2, $3)"
        " ON CONFLICT (enrollment_id) DO NOTHING",
        enrollment_id,
        learner_id,
        course_id,
    )


async def remember_course(
    conn: Connection,
    course_id: UUID,
    version: int,
    title: str,
    issuer_id: UUID,
    delivery_partner_id: UUID | None,
) -> None:
    # A snapshot of the version already held still fills in an issuer kept before migration 005.
    await conn.execute(
        "INSERT INTO courses (course_id, version, title, issuer_id, delivery_partner_id)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (course_id) DO UPDATE SET version = EXCLUDED.version, title = EXCLUDED.title,"
        " issuer_id = EXCLUDED.issuer_id, delivery_partner_id = EXCLUDED.delivery_partner_id"
        " WHERE courses.version < EXCLUDED.version"
        " OR (courses.version = EXCLUDED.version AND courses.issuer_id IS NULL)",
        course_id,
        version,
        title,
        issuer_id,
        delivery_partner_id,
    )


async def course_title(
    conn: Connection, *, course_id: UUID | None = None, enrollment_id: UUID | None = None
) -> str | None:
    """The title of a course, named directly or through one of its enrollments; None if unknown."""
    title: str | None = await conn.fetchval(
        "SELECT c.title FROM courses c"
        " WHERE c.course_id = coalesce($1, (SELECT course_id FROM enrollments WHERE enrollment_id = $2))",
        course_id,
        enrollment_id,
    )
    return title


async def remember_credential(
    conn: Connection, credential_id: UUID, achievement_name: str, credential_url: str, course_id: UUID | None
) -> None:
    await conn.execute(
        "INSERT INTO credentials (credential_id, achievement_name, credential_url, course_id)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (credential_id) DO NOTHING",
        credential_id,
        achievement_name,
        credential_url,
        course_id,
    )


async def credential(conn: Connection, credential_id: UUID) -> tuple[str, str] | None:
    """The achievement name and page URL of a credential, if its issuance was seen."""
    row = await conn.fetchrow(
        "SELECT achievement_name, credential_url FROM credentials WHERE credential_id = $1", credential_id
    )
    return (row["achievement_name"], row["credential_url"]) if row else None


async def audience(
    conn: Connection,
    learner_id: UUID,
    *,
    course_id: UUID | None,
    enrollment_id: UUID | None,
    credential_id: UUID | None,
    attested_by: UUID | None = None,
) -> tuple[Audience, UUID | None]:
    """Whom an event is about, from the course it names directly, through its enrollment or
    through its credential, and that course; the issuer and the course's partner stay unknown
    while the course is (and the course too, while the enrollment is)."""
    row = await conn.fetchrow(
        "SELECT ref.course_id, c.issuer_id, c.delivery_partner_id FROM (SELECT coalesce($1::uuid,"
        " (SELECT course_id FROM enrollments WHERE enrollment_id = $2),"
        " (SELECT course_id FROM credentials WHERE credential_id = $3)) AS course_id) ref"
        " LEFT JOIN courses c ON c.course_id = ref.course_id",
        course_id,
        enrollment_id,
        credential_id,
    )
    assert row is not None  # the subquery always gives one row
    partners = frozenset({row["delivery_partner_id"], attested_by} - {None})
    return Audience(learner_id, row["issuer_id"], partners), row["course_id"]


@dataclass(frozen=True)
class WaitingWebhook:
    """An event's webhook body that waits for its course to reach issuer and partner subscribers."""

    event_key: str
    event_type: str
    body: str
    learner_id: UUID
    course_id: UUID | None
    enrollment_id: UUID | None
    attested_by: UUID | None
    parked_at: datetime | None = None


async def park_webhook(conn: Connection, waiting: WaitingWebhook) -> None:
    await conn.execute(
        "INSERT INTO webhooks_awaiting_course"
        " (event_key, event_type, body, learner_id, course_id, enrollment_id, attested_by)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_key) DO NOTHING",
        waiting.event_key,
        waiting.event_type,
        waiting.body,
        waiting.learner_id,
        waiting.course_id,
        waiting.enrollment_id,
        waiting.attested_by,
    )


async def take_ready_webhooks(
    conn: Connection, *, course_id: UUID | None = None, enrollment_id: UUID | None = None, limit: int
) -> list[WaitingWebhook]:
    """Remove and return waiting webhooks whose course and issuer are known now (those of
    `course_id` or `enrollment_id` only, when given). Rows another transaction is taking are
    skipped."""
    rows = await conn.fetch(
        "DELETE FROM webhooks_awaiting_course WHERE event_key IN ("
        "  SELECT w.event_key FROM webhooks_awaiting_course w JOIN courses c ON c.course_id = coalesce("
        "  w.course_id, (SELECT course_id FROM enrollments e WHERE e.enrollment_id = w.enrollment_id))"
        "  WHERE c.issuer_id IS NOT NULL AND ($1::uuid IS NULL OR c.course_id = $1)"
        "  AND ($2::uuid IS NULL OR w.enrollment_id = $2)"
        "  ORDER BY w.parked_at LIMIT $3 FOR UPDATE OF w SKIP LOCKED)"
        " RETURNING event_key, event_type, body, learner_id, course_id, enrollment_id, attested_by,"
        " parked_at",
        course_id,
        enrollment_id,
        limit,
    )
    return [WaitingWebhook(**dict(row)) for row in rows]


async def drop_stale_waiting_webhooks(conn: Connection, older_than: timedelta) -> int:
    """Forget webhooks that waited longer than `older_than` for their course; how many."""
    dropped = await conn.fetch(
        "DELETE FROM webhooks_awaiting_course WHERE parked_at < now() - $1::interval RETURNING 1",
        older_than,
    )
    return len(dropped)


# --- preferences -----------------------------------------------------------------------------


async def preferences(conn: Connection, learner_id: UUID) -> Preferences:
    row = await conn.fetchrow(
        "SELECT email_enabled, email_muted, in_app_enabled, in_app_muted FROM preferences"
        " WHERE learner_id = $1",
        learner_id,
    )
    if row is None:
        return Preferences()
    return Preferences(
        email=ChannelPreference(row["email_enabled"], frozenset(Kind(kind) for kind in row["email_muted"])),
        in_app=ChannelPreference(
            row["in_app_enabled"], frozenset(Kind(kind) for kind in row["in_app_muted"])
        ),
    )


async def save_preferences(conn: Connection, learner_id: UUID, preferences: Preferences) -> None:
    await conn.execute(
        "INSERT INTO preferences"
        " (learner_id, email_enabled, email_muted, in_app_enabled, in_app_muted, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, now())"
        " ON CONFLICT (learner_id) DO UPDATE SET email_enabled = EXCLUDED.email_enabled,"
        " email_muted = EXCLUDED.email_muted, in_app_enabled = EXCLUDED.in_app_enabled,"
        " in_app_muted = EXCLUDED.in_app_muted, updated_at = EXCLUDED.updated_at",
        learner_id,
        preferences.email.enabled,
        sorted(preferences.email.muted),
        preferences.in_app.enabled,
        sorted(preferences.in_app.muted),
    )


# --- the in-app inbox ------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    notification_id: UUID
    learner_id: UUID
    kind: Kind
    title: str
    body: str
    link: str | None
    occurred_at: datetime
    created_at: datetime
    read_at: datetime | None


_NOTIFICATION_COLUMNS = (
    "notification_id, learner_id, kind, title, body, link, occurred_at, created_at, read_at"
)


def _notification(row: asyncpg.Record) -> Notification:
    return Notification(**{**dict(row), "kind": Kind(row["kind"])})


async def insert_notification(
    conn: Connection,
    *,
    learner_id: UUID,
    event_key: str,
    kind: Kind,
    title: str,
    body: str,
    link: str | None,
    occurred_at: datetime,
) -> bool:
    """Add an in-app notification; False when this learner already has one for this event."""
    inserted = await conn.fetchval(
        "INSERT INTO notifications"
        " (notification_id, learner_id, event_key, kind, title, body, link, occurred_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        " ON CONFLICT (event_key, learner_id) DO NOTHING RETURNING true",
        uuid.uuid4(),
        learner_id,
        event_key,
        kind,
        title,
        body,
        link,
        occurred_at,
    )
    return bool(inserted)


async def notifications_page(
    conn: Connection,
    learner_id: UUID,
    *,
    unread_only: bool,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Notification]:
    """Newest first; `after` is the sort key of the last item of the previous page."""
    after_created, after_id = after or (None, None)
    rows = await conn.fetch(
        f"SELECT {_NOTIFICATION_COLUMNS} FROM notifications WHERE learner_id = $1"
        " AND (NOT $2 OR read_at IS NULL)"
        " AND ($3::timestamptz IS NULL OR (created_at, notification_id) < ($3, $4::uuid))"
        " ORDER BY created_at DESC, notification_id DESC LIMIT $5",
        learner_id,
        unread_only,
        after_created,
        after_id,
        limit,
    )
    return [_notification(row) for row in rows]


async def unread_count(conn: Connection, learner_id: UUID) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM notifications WHERE learner_id = $1 AND read_at IS NULL", learner_id
    )
    return count


async def mark_read(conn: Connection, learner_id: UUID, notification_id: UUID) -> Notification | None:
    """Mark one of the learner's notifications read (keeping the first read time); None if not theirs."""
    row = await conn.fetchrow(
        "UPDATE notifications SET read_at = coalesce(read_at, now())"
        f" WHERE notification_id = $1 AND learner_id = $2 RETURNING {_NOTIFICATION_COLUMNS}",
        notification_id,
        learner_id,
    )
    return _notification(row) if row else None


async def mark_all_read(conn: Connection, learner_id: UUID) -> int:
    marked = await conn.fetch(
        "UPDATE notifications SET read_at = now() WHERE learner_id = $1 AND read_at IS NULL"
        " RETURNING notification_id",
        learner_id,
    )
    return len(marked)


# --- webhook subscriptions -------------------------------------------------------------------


@dataclass(frozen=True)
class Subscription:
    subscription_id: UUID
    url: str
    event_types: list[str]
    description: str | None
    secret: str
    created_by: str
    created_at: datetime
    disabled_at: datetime | None
    # None only for a subscription of before scopes, which migration 005 disabled.
    scope: Scope | None


_SUBSCRIPTION_COLUMNS = (
    "subscription_id, url, event_types, description, secret, created_by, created_at, disabled_at,"
    " scope_kind, scope_id"
)


def _subscription(row: asyncpg.Record) -> Subscription:
    values = dict(row)
    kind, scope_id = values.pop("scope_kind"), values.pop("scope_id")
    return Subscription(**values, scope=Scope(ScopeKind(kind), scope_id) if kind else None)


async def insert_subscription(conn: Connection, subscription: Subscription) -> None:
    await conn.execute(
        f"INSERT INTO webhook_subscriptions ({_SUBSCRIPTION_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        subscription.subscription_id,
        subscription.url,
        subscription.event_types,
        subscription.description,
        subscription.secret,
        subscription.created_by,
        subscription.created_at,
        subscription.disabled_at,
        subscription.scope.kind if subscription.scope else None,
        subscription.scope.id if subscription.scope else None,
    )


async def subscription(
    conn: Connection, subscription_id: UUID, *, for_update: bool = False
) -> Subscription | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE subscription_id = $1{lock}",
        subscription_id,
    )
    return _subscription(row) if row else None


async def subscriptions(conn: Connection, subscription_ids: Sequence[UUID]) -> dict[UUID, Subscription]:
    """The subscriptions of these ids that exist, by id; one query."""
    rows = await conn.fetch(
        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE subscription_id = ANY($1::uuid[])",
        list(set(subscription_ids)),
    )
    return {row["subscription_id"]: _subscription(row) for row in rows}


async def subscriptions_page(
    conn: Connection,
    *,
    include_disabled: bool,
    issuers: Sequence[UUID] | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Subscription]:
    """Newest first; only those scoped to one of `issuers`, unless it is None (every one)."""
    after_created, after_id = after or (None, None)
    rows = await conn.fetch(
        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions"
        " WHERE ($1 OR disabled_at IS NULL)"
        " AND ($2::timestamptz IS NULL OR (created_at, subscription_id) < ($2, $3::uuid))"
        " AND ($5::uuid[] IS NULL OR (scope_kind = 'issuer' AND scope_id = ANY($5::uuid[])))"
        " ORDER BY created_at DESC, subscription_id DESC LIMIT $4",
        include_disabled,
        after_created,
        after_id,
        limit,
        None if issuers is None else list(issuers),
    )
    return [_subscription(row) for row in rows]


async def active_subscriptions(conn: Connection) -> list[Subscription]:
    # Share-locked so a subscription being disabled concurrently either gets this event's delivery
    # before its pending deliveries are cancelled, or is seen disabled here.
    rows = await conn.fetch(
        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE disabled_at IS NULL FOR SHARE"
    )
    return [_subscription(row) for row in rows]


async def disable_subscription(conn: Connection, subscription_id: UUID) -> Subscription | None:
    """Disable it (keeping the first time) and cancel what it still had to receive."""
    row = await conn.fetchrow(
        "UPDATE webhook_subscriptions SET disabled_at = coalesce(disabled_at, now())"
        f" WHERE subscription_id = $1 RETURNING {_SUBSCRIPTION_COLUMNS}",
        subscription_id,
    )
    if row is None:
        return None
    await conn.execute(
        "UPDATE deliveries SET state = 'cancelled', claimed_by = NULL, updated_at = now()"
        " WHERE subscription_id = $1 AND state IN ('pending', 'sending')",
        subscription_id,
    )
    return _subscription(row)


# --- deliveries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    delivery_id: UUID
    channel: str
    event_key: str
    event_type: str
    learner_id: UUID | None
    subscription_id: UUID | None
    payload: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class Attempt:
    attempt: int
    started_at: datetime
    duration_ms: int
    outcome: str
    status_code: int | None
    error: str | None


_DELIVERY_COLUMNS = (
    "delivery_id, channel, event_key, event_type, learner_id, subscription_id, payload, state,"
    " attempts, next_attempt_at, last_error, created_at, updated_at, delivered_at"
)


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(**{**dict(row), "state": DeliveryState(row["state"])})


async def insert_email(
    conn: Connection, *, event_key: str, event_type: str, learner_id: UUID, payload: str, address_known: bool
) -> bool:
    """Record an email to send; False when this learner already has one for this event."""
    state = DeliveryState.PENDING if address_known else DeliveryState.AWAITING_ADDRESS
    inserted = await conn.fetchval(
        "INSERT INTO deliveries (delivery_id, channel, event_key, event_type, learner_id, payload, state,"
        " next_attempt_at) VALUES ($1, 'email', $2, $3, $4, $5, $6, CASE WHEN $6 = 'pending' THEN now() END)"
        " ON CONFLICT (event_key, learner_id) WHERE channel = 'email' DO NOTHING RETURNING true",
        uuid.uuid4(),
        event_key,
        event_type,
        learner_id,
        payload,
        state,
    )
    return bool(inserted)


async def insert_webhook(
    conn: Connection, *, event_key: str, event_type: str, subscription_id: UUID, body: str
) -> bool:
    """Record a webhook to send; False when this subscription already has one for this event."""
    inserted = await conn.fetchval(
        "INSERT INTO deliveries (delivery_id, channel, event_key, event_type, subscription_id, payload,"
        " state, next_attempt_at) VALUES ($1, 'webhook', $2, $3, $4, $5, 'pending', now())"
        " ON CONFLICT (event_key, subscription_id) WHERE channel = 'webhook' DO NOTHING RETURNING true",
        uuid.uuid4(),
        event_key,
        event_type,
        subscription_id,
        body,
    )
    return bool(inserted)


async def release_awaiting_address(conn: Connection, learner_id: UUID) -> int:
    """Emails that waited for this learner's address become due."""
    released = await conn.fetch(
        "UPDATE deliveries SET state = 'pending', next_attempt_at = now(), updated_at = now()"
        " WHERE learner_id = $1 AND state = 'awaiting_address' RETURNING delivery_id",
        learner_id,
    )
    return len(released)


async def claim(
    conn: Connection, channel: str, worker: UUID, *, limit: int, lease_seconds: float
) -> list[Delivery]:
    """Take up to `limit` due deliveries of `channel` for `worker`, for `lease_seconds`.

    SKIP LOCKED lets replicas claim side by side without waiting for or taking each other's rows;
    a row whose lease ran out (its worker died mid-attempt) is due again.
    """
    rows = await conn.fetch(
        "UPDATE deliveries d SET state = 'sending', attempts = d.attempts + 1, claimed_by = $2,"
        " next_attempt_at = now() + make_interval(secs => $4), updated_at = now()"
        " FROM (SELECT delivery_id FROM deliveries"
        "       WHERE channel = $1 AND state IN ('pending', 'sending') AND next_attempt_at <= now()"
        "       ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) due"
        " WHERE d.delivery_id = due.delivery_id"
        f" RETURNING {', '.join('d.' + column.strip() for column in _DELIVERY_COLUMNS.split(','))}",
        channel,
        worker,
        limit,
        lease_seconds,
    )
    return [_delivery(row) for row in rows]


async def next_due(conn: Connection, channel: str) -> datetime | None:
    due: datetime | None = await conn.fetchval(
        "SELECT min(next_attempt_at) FROM deliveries WHERE channel = $1 AND state IN ('pending', 'sending')",
        channel,
    )
    return due


@dataclass(frozen=True)
class FinishedAttempt:
    """How one attempt at a claimed delivery went, and where it moves the delivery."""

    delivery: Delivery
    started_at: datetime
    duration_ms: int
    result: AttemptResult
    state: DeliveryState
    retry_in: float | None


async def record_attempts(conn: Connection, worker: UUID, attempts: Sequence[FinishedAttempt]) -> set[UUID]:
    """Record attempts and move their deliveries on; returns the deliveries moved. One not moved
    had its claim lost meanwhile (the lease ran out, or the subscription was disabled): it is left
    as it is.

    One statement, so atomic without a transaction of its own: the attempts are recorded either way.
    """
    if not attempts:
        return set()
    rows = await conn.fetch(
        "WITH attempt AS ("
        "  SELECT * FROM unnest($2::uuid[], $3::int[], $4::timestamptz[], $5::int[], $6::text[],"
        "  $7::int[], $8::text[], $9::text[], $10::float8[])"
        "  AS a (delivery_id, attempt, started_at, duration_ms, outcome, status_code, error, state, retry_in)"
        "), recorded AS ("
        "  INSERT INTO delivery_attempts (delivery_id, attempt, started_at, duration_ms, outcome,"
        "  status_code, error) SELECT delivery_id, attempt, started_at, duration_ms, outcome, status_code,"
        "  error FROM attempt"
        "), moved AS ("
        "  UPDATE deliveries d SET state = a.state, claimed_by = NULL, updated_at = now(),"
        "  next_attempt_at = now() + make_interval(secs => a.retry_in),"
        "  last_error = CASE WHEN a.state = 'delivered' THEN d.last_error ELSE a.error END,"
        "  delivered_at = CASE WHEN a.state = 'delivered' THEN now() END"
        "  FROM attempt a WHERE d.delivery_id = a.delivery_id AND d.claimed_by = $1 AND d.state = 'sending'"
        "  RETURNING d.delivery_id"
        ") SELECT delivery_id FROM moved",
        worker,
        [attempt.delivery.delivery_id for attempt in attempts],
        [attempt.delivery.attempts for attempt in attempts],
        [attempt.started_at for attempt in attempts],
        [attempt.duration_ms for attempt in attempts],
        [attempt.result.outcome for attempt in attempts],
        [attempt.result.status_code for attempt in attempts],
        [attempt.result.error for attempt in attempts],
        [attempt.state for attempt in attempts],
        [attempt.retry_in for attempt in attempts],
    )
    return {row["delivery_id"] for row in rows}


async def hand_back(conn: Connection, worker: UUID, delivery_ids: Sequence[UUID], reason: str) -> None:
    """Give back attempts interrupted by a shutdown: due again at once, for any replica.

    Only rows this worker still holds: an attempt whose outcome was recorded just before it was
    interrupted stays as recorded.
    """
    await conn.execute(
        "WITH released AS ("
        "  UPDATE deliveries SET state = 'pending', claimed_by = NULL, next_attempt_at = now(),"
        "  updated_at = now() WHERE delivery_id = ANY($2::uuid[]) AND claimed_by = $1 AND state = 'sending'"
        "  RETURNING delivery_id, attempts)"
        " INSERT INTO delivery_attempts (delivery_id, attempt, started_at, duration_ms, outcome, error)"
        " SELECT delivery_id, attempts, now(), 0, 'interrupted', $3 FROM released",
        worker,
        list(delivery_ids),
        reason,
    )


async def delivery(conn: Connection, delivery_id: UUID, channel: str) -> Delivery | None:
    row = await conn.fetchrow(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE delivery_id = $1 AND channel = $2",
        delivery_id,
        channel,
    )
    return _delivery(row) if row else None


async def attempts(conn: Connection, delivery_id: UUID) -> list[Attempt]:
    rows = await conn.fetch(
        "SELECT attempt, started_at, duration_ms, outcome, status_code, error FROM delivery_attempts"
        " WHERE delivery_id = $1 ORDER BY id",
        delivery_id,
    )
    return [Attempt(**dict(row)) for row in rows]


async def deliveries_page(
    conn: Connection,
    channel: str,
    *,
    state: DeliveryState | None,
    subscription_id: UUID | None,
    issuers: Sequence[UUID] | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Delivery]:
    """Newest first; only those to subscriptions scoped to one of `issuers`, unless it is None."""
    after_created, after_id = after or (None, None)
    rows = await conn.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE channel = $1"
        " AND ($2::text IS NULL OR state = $2) AND ($3::uuid IS NULL OR subscription_id = $3)"
        " AND ($4::timestamptz IS NULL OR (created_at, delivery_id) < ($4, $5::uuid))"
        " AND ($7::uuid[] IS NULL OR subscription_id IN (SELECT subscription_id FROM webhook_subscriptions"
        "  WHERE scope_kind = 'issuer' AND scope_id = ANY($7::uuid[])))"
        " ORDER BY created_at DESC, delivery_id DESC LIMIT $6",
        channel,
        state,
        subscription_id,
        after_created,
        after_id,
        limit,
        None if issuers is None else list(issuers),
    )
    return [_delivery(row) for row in rows]


async def replay(conn: Connection, delivery_id: UUID) -> Delivery | None:
    """A dead delivery becomes due at once, with a fresh budget of attempts; None if it is not dead."""
    row = await conn.fetchrow(
        "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()"
        f" WHERE delivery_id = $1 AND state = 'dead' RETURNING {_DELIVERY_COLUMNS}",
        delivery_id,
    )
    return _delivery(row) if row else None
