-- The trace a learner's journey started in, per aggregate (an enrollment, a payment), so that a
-- later step that arrives on its own request (a provider's webhook, staff recording a completion)
-- continues that one trace instead of starting another.
CREATE TABLE journeys (
    aggregate_id text        PRIMARY KEY,
    traceparent  text        NOT NULL,
    tracestate   text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
