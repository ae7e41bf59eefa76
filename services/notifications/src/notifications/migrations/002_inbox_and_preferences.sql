-- The in-app inbox: these rows are the in-app notifications themselves, written by the consumer
-- in the same transaction as its inbox row. `event_key` names the occurrence (e.g. the credential
-- issued), not the Kafka message, so the same event published twice under two CloudEvents ids
-- still gives one notification per learner.
CREATE TABLE notifications (
    notification_id uuid        PRIMARY KEY,
    learner_id      uuid        NOT NULL,
    event_key       text        NOT NULL,
    kind            text        NOT NULL,
    title           text        NOT NULL,
    body            text        NOT NULL,
    link            text,
    occurred_at     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    read_at         timestamptz,
    UNIQUE (event_key, learner_id)
);

-- A learner's inbox, newest first (keyset pagination), and its unread part.
CREATE INDEX notifications_by_learner ON notifications (learner_id, created_at DESC, notification_id DESC);
CREATE INDEX notifications_unread ON notifications (learner_id, created_at DESC, notification_id DESC)
    WHERE read_at IS NULL;

-- What a learner opted out of: a whole channel, or some kinds of notification on it.
-- No row means the defaults: everything on.
CREATE TABLE preferences (
    learner_id     uuid        PRIMARY KEY,
    email_enabled  boolean     NOT NULL,
    email_muted    text[]      NOT NULL,
    in_app_enabled boolean     NOT NULL,
    in_app_muted   text[]      NOT NULL,
    updated_at     timestamptz NOT NULL
);
