-- Settled payments that activated nothing: for an enrollment already cancelled, completed or
-- active through another payment, for one unknown here, or short of the price. The learner paid
-- for nothing, and no event of the contract says so to billing: this table (and a warning in the
-- log) is what staff reconcile from, refunding through billing where the money is owed back.
CREATE TABLE unapplied_payments (
    payment_id    uuid        PRIMARY KEY,
    enrollment_id uuid        NOT NULL,
    learner_id    uuid        NOT NULL,
    amount_minor  bigint      NOT NULL,
    currency      text        NOT NULL,
    reason        text        NOT NULL,
    settled_at    timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
