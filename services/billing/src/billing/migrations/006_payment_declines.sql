-- A declined charge leaves the payment due, for the learner to check out again (another card),
-- until PAYMENT_MAX_DECLINES of them: this counts them, and names each new checkout session.
ALTER TABLE payments ADD COLUMN declines integer NOT NULL DEFAULT 0 CHECK (declines >= 0);
