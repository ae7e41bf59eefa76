"""Notifications' tables, as plain SQL."""

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from microcred_events import Learner
from microcred_runtime import Connection

from .domain import (
    AttemptResult,
    ChannelPreference,
    Course,
    Credential,
    DeliveryState,
    Kind,
    Preferences,
    Scope,
    ScopeKind,
)

# Where the database tells the workers that deliveries fell due (migration 004: a trigger).
WAKE_CHANNEL = "notifications_delivery"
"""The NOTIFY channel that wakes the delivery workers; the payload is the delivery channel."""


def _columns(rows: Sequence[object], *attributes: str) -> list[list[Any]]:
    """The rows as one list per attribute: what `unnest` makes rows of again, so that one
    statement writes any number of them."""
    return [[getattr(row, attribute) for row in rows] for attribute in attributes]


# --- read models -----------------------------------------------------------------------------


async def remember_learners(conn: Connection, learners: Sequence[tuple[Learner, datetime]]) -> None:
    """Keep each learner's address and name (given once a learner, with the time of the event that
    gave them), unless a newer event already gave them."""
    rows = sorted(learners, key=lambda row: row[0].learner_id)
    await conn.execute(
        "INSERT INTO learners (learner_id, email, display_name, as_of)"
        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])"
        " ON CONFLICT (learner_id) DO UPDATE SET"
        " email = EXCLUDED.email, display_name = EXCLUDED.display_name, as_of = EXCLUDED.as_of"
        " WHERE learners.as_of <= EXCLUDED.as_of",
        [learner.learner_id for learner, _ in rows],
        [learner.email for learner, _ in rows],
        [learner.display_name for learner, _ in rows],
        [as_of for _, as_of in rows],
    )


async def remember_enrollments(conn: Connection, enrollments: Mapping[UUID, tuple[UUID, UUID]]) -> None:
    """Keep the learner and course of each enrollment (`enrollment_id: (learner_id, course_id)`);
    one known already stays as it is."""
    rows = sorted(enrollments.items())
    await conn.execute(
        "INSERT INTO enrollments (enrollment_id, learner_id, course_id)"
        " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) ON CONFLICT (enrollment_id) DO NOTHING",
        [enrollment_id for enrollment_id, _ in rows],
        [learner_id for _, (learner_id, _) in rows],
        [course_id for _, (_, course_id) in rows],
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


async def remember_credentials(conn: Connection, credentials: Mapping[UUID, Credential]) -> None:
    """Keep what each credential was for; one known already stays as it is."""
    rows = sorted(credentials.items())
    await conn.execute(
        "INSERT INTO credentials (credential_id, achievement_name, credential_url, course_id)"
        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[])"
        " ON CONFLICT (credential_id) DO NOTHING",
        [credential_id for credential_id, _ in rows],
        *_columns([credential for _, credential in rows], "achievement_name", "credential_url", "course_id"),
    )


@dataclass(frozen=True)
class Named:
    """What an event names that the read models may know: its learner, course, enrollment and
    credential (None where it names none)."""

    learner_id: UUID | None
    course_id: UUID | None
    enrollment_id: UUID | None
    credential_id: UUID | None


@dataclass
class Known:
    """What the read models know of some events: the learners' addresses, the enrollments'
    courses, the credentials, and the courses the events name directly or through those."""

    learners: dict[UUID, Learner] = field(default_factory=dict)
    enrollments: dict[UUID, UUID] = field(default_factory=dict)
    credentials: dict[UUID, Credential] = field(default_factory=dict)
    courses: dict[UUID, Course] = field(default_factory=dict)


async def known(conn: Connection, named: Collection[Named]) -> Known:
    """What the read models know of what these events name, in one statement."""
    rows = await conn.fetch(
        "SELECT named.learner_id, l.email, l.display_name, named.enrollment_id, e.course_id AS enrolled_in,"
        " named.credential_id, cr.achievement_name, cr.credential_url, cr.course_id AS credential_for,"
        " c.course_id, c.title, c.issuer_id, c.delivery_partner_id"
        " FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[])"
        " AS named(learner_id, course_id, enrollment_id, credential_id)"
        " LEFT JOIN learners l ON l.learner_id = named.learner_id"
        " LEFT JOIN enrollments e ON e.enrollment_id = named.enrollment_id"
        " LEFT JOIN credentials cr ON cr.credential_id = named.credential_id"
        " LEFT JOIN courses c ON c.course_id = coalesce(named.course_id, e.course_id, cr.course_id)",
        *_columns(sorted(named, key=repr), "learner_id", "course_id", "enrollment_id", "credential_id"),
    )
    found = Known()
    for row in rows:
        if row["email"] is not None:
            found.learners[row["learner_id"]] = Learner(
                learner_id=row["learner_id"], email=row["email"], display_name=row["display_name"]
            )
        if row["enrolled_in"] is not None:
            found.enrollments[row["enrollment_id"]] = row["enrolled_in"]
        if row["achievement_name"] is not None:
            found.credentials[row["credential_id"]] = Credential(
                row["achievement_name"], row["credential_url"], row["credential_for"]
            )
        if row["course_id"] is not None:
            found.courses[row["course_id"]] = Course(
                row["title"], row["issuer_id"], row["delivery_partner_id"]
            )
    return found


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


async def park_webhooks(conn: Connection, waiting: Sequence[WaitingWebhook]) -> None:
    """Keep these until their course is known; an event waiting already stays as it is."""
    rows = sorted(waiting, key=lambda row: row.event_key)
    await conn.execute(
        "INSERT INTO webhooks_awaiting_course"
        " (event_key, event_type, body, learner_id, course_id, enrollment_id, attested_by)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::uuid[],"
        " $7::uuid[]) ON CONFLICT (event_key) DO NOTHING",
        *_columns(
            rows, "event_key", "event_type", "body", "learner_id", "course_id", "enrollment_id", "attested_by"
        ),
    )


async def take_ready_webhooks(
    conn: Connection,
    *,
    course_id: UUID | None = None,
    enrollment_ids: Collection[UUID] | None = None,
    limit: int,
) -> list[tuple[WaitingWebhook, Course]]:
    """Remove and return waiting webhooks whose course and issuer are known now, with that course
    (those of `course_id` or of `enrollment_ids` only, when given). Rows another transaction is
    taking are skipped."""
    rows = await conn.fetch(
        "DELETE FROM webhooks_awaiting_course w USING ("
        "  SELECT waiting.event_key, c.title, c.issuer_id, c.delivery_partner_id"
        "  FROM webhooks_awaiting_course waiting JOIN courses c ON c.course_id = coalesce(waiting.course_id,"
        "  (SELECT course_id FROM enrollments e WHERE e.enrollment_id = waiting.enrollment_id))"
        "  WHERE c.issuer_id IS NOT NULL AND ($1::uuid IS NULL OR c.course_id = $1)"
        "  AND ($2::uuid[] IS NULL OR waiting.enrollment_id = ANY($2::uuid[]))"
        "  ORDER BY waiting.parked_at LIMIT $3 FOR UPDATE OF waiting SKIP LOCKED) ready"
        " WHERE w.event_key = ready.event_key"
        " RETURNING w.event_key, w.event_type, w.body, w.learner_id, w.course_id, w.enrollment_id,"
        " w.attested_by, w.parked_at, ready.title, ready.issuer_id, ready.delivery_partner_id",
        course_id,
        None if enrollment_ids is None else list(enrollment_ids),
        limit,
    )
    return [
        (
            WaitingWebhook(
                row["event_key"],
                row["event_type"],
                row["body"],
                row["learner_id"],
                row["course_id"],
                row["enrollment_id"],
                row["attested_by"],
                row["parked_at"],
            ),
            Course(row["title"], row["issuer_id"], row["delivery_partner_id"]),
        )
        for row in rows
    ]


async def drop_stale_waiting_webhooks(conn: Connection, older_than: timedelta) -> int:
    """Forget webhooks that waited longer than `older_than` for their course; how many."""
    dropped = await conn.fetch(
        "DELETE FROM webhooks_awaiting_course WHERE parked_at < now() - $1::interval RETURNING 1",
        older_than,
    )
    return len(dropped)


# --- preferences -----------------------------------------------------------------------------


async def preferences(conn: Connection, learner_id: UUID) -> Preferences:
    return (await preferences_of(conn, [learner_id])).get(learner_id, Preferences())


async def preferences_of(conn: Connection, learner_ids: Collection[UUID]) -> dict[UUID, Preferences]:
    """The preferences of those of these learners who set any (the others have the defaults)."""
    rows = await conn.fetch(
        "SELECT learner_id, email_enabled, email_muted, in_app_enabled, in_app_muted FROM preferences"
        " WHERE learner_id = ANY($1::uuid[])",
        list(learner_ids),
    )
    return {
        row["learner_id"]: Preferences(
            email=ChannelPreference(
                row["email_enabled"], frozenset(Kind(kind) for kind in row["email_muted"])
            ),
            in_app=ChannelPreference(
                row["in_app_enabled"], frozenset(Kind(kind) for kind in row["in_app_muted"])
            ),
        )
        for row in rows
    }


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


@dataclass(frozen=True)
class NewNotification:
    learner_id: UUID
    event_key: str
    kind: Kind
    title: str
    body: str
    link: str | None
    occurred_at: datetime


async def insert_notifications(conn: Connection, notifications: Sequence[NewNotification]) -> None:
    """Add in-app notifications; one for an event the learner already has one for is not added."""
    rows = sorted(notifications, key=lambda row: (row.event_key, row.learner_id))
    await conn.execute(
        "INSERT INTO notifications"
        " (notification_id, learner_id, event_key, kind, title, body, link, occurred_at)"
        " SELECT gen_random_uuid(), * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],"
        " $5::text[], $6::text[], $7::timestamptz[])"
        " ON CONFLICT (event_key, learner_id) DO NOTHING",
        *_columns(rows, "learner_id", "event_key", "kind", "title", "body", "link", "occurred_at"),
    )


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


async def subscriptions(conn: Connection, subscription_ids: Collection[UUID]) -> dict[UUID, Subscription]:
    rows = await conn.fetch(
        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE subscription_id = ANY($1::uuid[])",
        list(subscription_ids),
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


@dataclass(frozen=True)
class NewEmail:
    event_key: str
    event_type: str
    learner_id: UUID
    payload: str
    address_known: bool


async def insert_emails(conn: Connection, emails: Sequence[NewEmail]) -> list[NewEmail]:
    """Record emails to send, due at once, or waiting for the learner's address where it is not
    known; returns the waiting ones recorded. One for an event the learner already has one for is
    not recorded."""
    rows = sorted(emails, key=lambda row: (row.event_key, row.learner_id))
    inserted = await conn.fetch(
        "INSERT INTO deliveries (delivery_id, channel, event_key, event_type, learner_id, payload, state,"
        " next_attempt_at) SELECT gen_random_uuid(), 'email', email.event_key, email.event_type,"
        " email.learner_id, email.payload, CASE WHEN email.known THEN 'pending' ELSE 'awaiting_address' END,"
        " CASE WHEN email.known THEN now() END"
        " FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::boolean[])"
        " AS email(event_key, event_type, learner_id, payload, known)"
        " ON CONFLICT (event_key, learner_id) WHERE channel = 'email' DO NOTHING"
        " RETURNING event_key, learner_id, state",
        *_columns(rows, "event_key", "event_type", "learner_id", "payload", "address_known"),
    )
    waiting = {
        (row["event_key"], row["learner_id"]) for row in inserted if row["state"] == "awaiting_address"
    }
    return [row for row in rows if (row.event_key, row.learner_id) in waiting]


@dataclass(frozen=True)
class NewWebhook:
    event_key: str
    event_type: str
    subscription_id: UUID
    body: str


async def insert_webhooks(conn: Connection, webhooks: Sequence[NewWebhook]) -> None:
    """Record webhooks to send, due at once; one for an event its subscription already has one for
    is not recorded."""
    rows = sorted(webhooks, key=lambda row: (row.event_key, row.subscription_id))
    await conn.execute(
        "INSERT INTO deliveries (delivery_id, channel, event_key, event_type, subscription_id, payload,"
        " state, next_attempt_at) SELECT gen_random_uuid(), 'webhook', webhook.*, 'pending', now()"
        " FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[])"
        " AS webhook(event_key, event_type, subscription_id, payload)"
        " ON CONFLICT (event_key, subscription_id) WHERE channel = 'webhook' DO NOTHING",
        *_columns(rows, "event_key", "event_type", "subscription_id", "body"),
    )


async def release_awaiting_address(conn: Connection, learner_ids: Collection[UUID]) -> None:
    """Emails that waited for these learners' addresses become due."""
    await conn.execute(
        "UPDATE deliveries SET state = 'pending', next_attempt_at = now(), updated_at = now()"
        " WHERE learner_id = ANY($1::uuid[]) AND state = 'awaiting_address'",
        sorted(learner_ids),
    )


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
class Tried:
    """An attempt made at a claimed delivery: what to record of it, and the state it moves the
    delivery to (`retry_in`: seconds until the next attempt, for `pending`)."""

    delivery_id: UUID
    attempt: int
    started_at: datetime
    duration_ms: int
    result: AttemptResult
    state: DeliveryState
    retry_in: float | None


async def record_attempts(conn: Connection, worker: UUID, tried: Sequence[Tried]) -> set[UUID]:
    """Record attempts and move their deliveries on; returns those moved. One is not moved when
    its claim was lost meanwhile (the lease ran out, or the subscription was disabled), which
    leaves the delivery as it is.

    One statement, so atomic without a transaction of its own: the attempts are recorded either way.
    """
    rows = sorted(tried, key=lambda row: row.delivery_id)
    moved = await conn.fetch(
        "WITH tried AS ("
        "  SELECT * FROM unnest($2::uuid[], $3::integer[], $4::timestamptz[], $5::integer[], $6::text[],"
        "  $7::integer[], $8::text[], $9::text[], $10::float8[]) AS tried(delivery_id, attempt, started_at,"
        "  duration_ms, outcome, status_code, error, state, retry_in)"
        "), attempt AS ("
        "  INSERT INTO delivery_attempts (delivery_id, attempt, started_at, duration_ms, outcome,"
        "  status_code, error) SELECT delivery_id, attempt, started_at, duration_ms, outcome, status_code,"
        "  error FROM tried"
        ") UPDATE deliveries d SET state = tried.state, claimed_by = NULL, updated_at = now(),"
        " next_attempt_at = now() + make_interval(secs => tried.retry_in),"
        " last_error = CASE WHEN tried.state = 'delivered' THEN d.last_error ELSE tried.error END,"
        " delivered_at = CASE WHEN tried.state = 'delivered' THEN now() END"
        " FROM tried WHERE d.delivery_id = tried.delivery_id AND d.claimed_by = $1 AND d.state = 'sending'"
        " RETURNING d.delivery_id",
        worker,
        *_columns(rows, "delivery_id", "attempt", "started_at", "duration_ms"),
        *_columns([row.result for row in rows], "outcome", "status_code", "error"),
        *_columns(rows, "state", "retry_in"),
    )
    return {row["delivery_id"] for row in moved}


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
