-- What billing hears of the enrollment a payment is for, to find payments whose money and
-- enrollment disagree: when enrollment activated it for this payment, and when it was cancelled.
ALTER TABLE payments ADD COLUMN enrollment_activated_at timestamptz;
ALTER TABLE payments ADD COLUMN enrollment_cancelled_at timestamptz;
-- Billing's consumer read the activations of the payments settled before this migration without
-- keeping them, and will not read them again: those payments count as taken when they settled
-- (as enrollment does, within seconds), or every one of them would be listed for ever. What this
-- hides: one of them that enrollment never took, or whose enrollment was cancelled since.
UPDATE payments SET enrollment_activated_at = settled_at WHERE settled_at IS NOT NULL;

-- A discrepancy staff looked at and settled by hand (a refund at the provider, a decision to keep
-- the money): listed no more, and who did what kept for the audit trail. `subject` names the
-- discrepancy within its kind: a payment id, or `<provider>:<event id>` for money no payment took.
CREATE TABLE reconciliations (
    kind        text        NOT NULL
                            CHECK (kind IN ('unmatched_collection', 'settled_not_active', 'paid_enrollment_cancelled')),
    subject     text        NOT NULL,
    resolved_by text        NOT NULL,
    note        text        NOT NULL CHECK (length(note) BETWEEN 1 AND 2000),
    resolved_at timestamptz NOT NULL,
    PRIMARY KEY (kind, subject)
);

-- The discrepancy list's scans: the few rows of each kind, not every payment.
CREATE INDEX refunds_requested ON refunds (issued_at) WHERE status = 'requested';
CREATE INDEX payments_settled_not_taken ON payments (settled_at)
    WHERE status = 'settled' AND enrollment_activated_at IS NULL AND enrollment_cancelled_at IS NULL;
CREATE INDEX payments_kept_after_cancellation ON payments (enrollment_cancelled_at)
    WHERE status = 'settled' AND enrollment_cancelled_at IS NOT NULL;
