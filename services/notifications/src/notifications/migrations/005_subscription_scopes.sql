-- Webhook subscriptions are scoped (issue 13): each receives only the events about one issuer's
-- courses, one partner's courses or one learner, or (admins only) every event. Before this, every
-- subscription received every learner's events.

-- What the fan-out needs to tell whose an event is: a course's issuer and delivering partner, and
-- the course a credential was issued for (its revocation names only the credential). Rows kept
-- before this migration have them null until the next catalog event of the course; an event whose
-- issuer or partner is unknown reaches no issuer- or partner-scoped subscription.
ALTER TABLE courses ADD COLUMN issuer_id uuid, ADD COLUMN delivery_partner_id uuid;
ALTER TABLE credentials ADD COLUMN course_id uuid;

-- 'all': every event (admins only); otherwise the issuer, partner or learner in `scope_id`.
ALTER TABLE webhook_subscriptions
    ADD COLUMN scope_kind text CHECK (scope_kind IN ('all', 'issuer', 'partner', 'learner')),
    ADD COLUMN scope_id uuid;

-- Subscriptions made before scopes existed took every event, and who made them says nothing of
-- whose events they should get: they are disabled, and what they still had to receive (other
-- learners' events among it) is cancelled. Their owners subscribe again with a scope.
UPDATE deliveries SET state = 'cancelled', claimed_by = NULL, updated_at = now()
WHERE state IN ('pending', 'sending')
    AND subscription_id IN (SELECT subscription_id FROM webhook_subscriptions WHERE scope_kind IS NULL);
UPDATE webhook_subscriptions SET disabled_at = coalesce(disabled_at, now()) WHERE scope_kind IS NULL;

-- No scope only on a disabled subscription of before this migration; 'all' needs no id, the others one.
ALTER TABLE webhook_subscriptions ADD CONSTRAINT webhook_subscriptions_scoped CHECK (
    (scope_kind IS NULL AND scope_id IS NULL AND disabled_at IS NOT NULL)
    OR (scope_kind = 'all' AND scope_id IS NULL)
    OR (scope_kind IN ('issuer', 'partner', 'learner') AND scope_id IS NOT NULL)
);
