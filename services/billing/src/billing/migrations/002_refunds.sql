CREATE TABLE refunds (
    refund_id          uuid        PRIMARY KEY,
    payment_id         uuid        NOT NULL REFERENCES payments (payment_id),
    amount_minor       bigint      NOT NULL CHECK (amount_minor > 0),
    currency           text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    reason             text        NOT NULL,
    provider_refund_id text        NOT NULL,
    -- The staff member's token subject, for the audit trail.
    issued_by          text        NOT NULL,
    issued_at          timestamptz NOT NULL
);

CREATE INDEX refunds_by_payment ON refunds (payment_id);
