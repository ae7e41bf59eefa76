-- Every provider webhook event billing has acted on, by the provider's event id. The primary key is
-- what refuses a replay: a second delivery of an event finds its row and changes nothing.
CREATE TABLE provider_events (
    provider    text        NOT NULL,
    event_id    text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('succeeded', 'failed')),
    payment_id  uuid,
    -- 'pending' only inside the transaction that inserts the row: the insert claims the event id,
    -- so a concurrent delivery of the same event waits for it and then finds the final outcome.
    outcome     text        NOT NULL CHECK (outcome IN ('pending', 'settled', 'failed', 'ignored', 'discrepancy')),
    detail      text        NOT NULL DEFAULT '',
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

-- Money the provider reports collected that could not settle a payment (wrong amount or currency,
-- a payment no longer due, an unknown reference): no PaymentSettled, and a person must resolve it,
-- usually by refunding at the provider.
CREATE TABLE payment_discrepancies (
    provider           text        NOT NULL,
    provider_event_id  text        NOT NULL,
    payment_id         uuid        REFERENCES payments (payment_id),
    reason             text        NOT NULL
                                   CHECK (reason IN ('amount_mismatch', 'currency_mismatch', 'not_due', 'unknown_payment')),
    detail             text        NOT NULL,
    reference          text        NOT NULL,
    charge_id          text,
    received_minor     bigint      NOT NULL,
    received_currency  text        NOT NULL,
    recorded_at        timestamptz NOT NULL,
    PRIMARY KEY (provider, provider_event_id),
    FOREIGN KEY (provider, provider_event_id) REFERENCES provider_events (provider, event_id)
);

CREATE INDEX payment_discrepancies_by_payment ON payment_discrepancies (payment_id);
