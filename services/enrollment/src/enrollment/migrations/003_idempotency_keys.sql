-- Idempotency-Key of POST /enrollments: a retried request gets the response the first one got.
-- Keys are scoped per caller (the token's subject), so two callers never see each other's keys.
-- Only successful requests are remembered: a refused one changed nothing, so a retry is simply
-- evaluated again. A row is inserted first to claim the key (a concurrent request with the same
-- key waits on the primary key), and filled with the response in the same transaction, so no
-- other transaction ever sees it without its response.
CREATE TABLE idempotency_keys (
    caller              text        NOT NULL,
    key                 text        NOT NULL,
    -- SHA-256 of the canonical request: the same key with another request is refused.
    request_fingerprint text        NOT NULL,
    response_status     integer,
    response_body       jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);
