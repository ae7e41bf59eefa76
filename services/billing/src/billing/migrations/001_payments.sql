-- One payment per enrollment that requires one. Money is integer minor units plus the currency.
CREATE TABLE payments (
    payment_id          uuid        PRIMARY KEY,
    -- Unique: EnrollmentCreated delivered again (even under a new event id) makes no second payment.
    enrollment_id       uuid        NOT NULL UNIQUE,
    learner_id          uuid        NOT NULL,
    amount_minor        bigint      NOT NULL CHECK (amount_minor > 0),
    currency            text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status              text        NOT NULL CHECK (status IN ('due', 'settled', 'failed', 'voided', 'refunded')),
    refunded_minor      bigint      NOT NULL DEFAULT 0 CHECK (refunded_minor BETWEEN 0 AND amount_minor),
    checkout_session_id text        UNIQUE,
    checkout_url        text,
    provider            text,
    -- The provider's id of the charge that settled the payment.
    provider_reference  text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    settled_at          timestamptz,
    CHECK ((status IN ('settled', 'refunded')) = (settled_at IS NOT NULL AND provider_reference IS NOT NULL))
);

-- Listing pages, newest first: a learner's own, and all of them for staff.
CREATE INDEX payments_by_learner ON payments (learner_id, created_at DESC, payment_id DESC);
CREATE INDEX payments_by_creation ON payments (created_at DESC, payment_id DESC);
