-- Webhook subscribers (partners, employers), registered by staff. The signing secret is kept
-- because every delivery is signed with it (an HMAC needs the secret itself, not a hash of it);
-- the API shows it only once, when the subscription is created.
CREATE TABLE webhook_subscriptions (
    subscription_id uuid        PRIMARY KEY,
    url             text        NOT NULL,
    -- Event types delivered; empty means every type notifications publishes.
    event_types     text[]      NOT NULL,
    description     text,
    secret          text        NOT NULL,
    created_by      text        NOT NULL,
    created_at      timestamptz NOT NULL,
    disabled_at     timestamptz
);

CREATE INDEX webhook_subscriptions_active ON webhook_subscriptions (created_at) WHERE disabled_at IS NULL;

-- Email and webhook deliveries still to make, and made. The consumer only records them (one row
-- per event, recipient and channel); background workers claim due rows with FOR UPDATE SKIP
-- LOCKED, so a slow SMTP server or webhook endpoint never holds up the consumer, and several
-- replicas share the work.
--
--   pending --claim--> sending --2xx / 250--> delivered
--      ^                  |----failure--> pending (next_attempt_at = now + backoff)
--      |                  `---last attempt or permanent failure--> dead --replay--> pending
--   awaiting_address (email whose learner has no known address yet) --address known--> pending
--   pending / sending --subscription disabled--> cancelled
--
-- While `sending`, `next_attempt_at` is the end of the claim's lease: a replica that died
-- mid-attempt leaves the row to be claimed again once the lease runs out.
CREATE TABLE deliveries (
    delivery_id     uuid        PRIMARY KEY,
    channel         text        NOT NULL CHECK (channel IN ('email', 'webhook')),
    event_key       text        NOT NULL,
    event_type      text        NOT NULL,
    learner_id      uuid,
    subscription_id uuid        REFERENCES webhook_subscriptions (subscription_id),
    -- Email: the event, rendered at send time with the learner's current address and name.
    -- Webhook: the exact body, so every retry is signed over the same bytes.
    payload         text        NOT NULL,
    state           text        NOT NULL
        CHECK (state IN ('pending', 'sending', 'awaiting_address', 'delivered', 'dead', 'cancelled')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    claimed_by      uuid,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    CHECK ((channel = 'email') = (learner_id IS NOT NULL AND subscription_id IS NULL)),
    CHECK ((channel = 'webhook') = (subscription_id IS NOT NULL)),
    CHECK (state NOT IN ('pending', 'sending') OR next_attempt_at IS NOT NULL)
);

-- Exactly one delivery per event, recipient and channel, however often the event arrives.
CREATE UNIQUE INDEX deliveries_one_email ON deliveries (event_key, learner_id) WHERE channel = 'email';
CREATE UNIQUE INDEX deliveries_one_webhook ON deliveries (event_key, subscription_id) WHERE channel = 'webhook';

-- What the workers claim.
CREATE INDEX deliveries_due ON deliveries (channel, next_attempt_at) WHERE state IN ('pending', 'sending');
-- Emails released when a learner's address becomes known.
CREATE INDEX deliveries_awaiting_address ON deliveries (learner_id) WHERE state = 'awaiting_address';
-- Staff listings (e.g. the dead webhooks), newest first.
CREATE INDEX deliveries_listing ON deliveries (channel, state, created_at DESC, delivery_id DESC);

-- Every attempt, whatever its outcome.
CREATE TABLE delivery_attempts (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id uuid        NOT NULL REFERENCES deliveries (delivery_id),
    -- The delivery's attempt number; it starts again at 1 after a replay.
    attempt     integer     NOT NULL,
    started_at  timestamptz NOT NULL,
    duration_ms integer     NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('delivered', 'failed', 'timed_out', 'refused', 'interrupted')),
    -- The HTTP status, or the SMTP reply code.
    status_code integer,
    error       text
);

CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts (delivery_id, id);
