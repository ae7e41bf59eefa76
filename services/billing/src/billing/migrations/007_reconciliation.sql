-- What billing hears of the enrollment a payment is for, to find payments whose money and
-- enrollment disagree: when enrollment activated it for this payment, and when it was cancelled.
ALTER TABLE payments ADD COLUMN enrollment_activated_at timestamptz;
ALTER TABLE payments ADD COLUMN enrollment_cancelled_at timestamptz;

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

CREATE INDEX refunds_requested ON refunds (issued_at) WHERE status = 'requested';
