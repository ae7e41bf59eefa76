CREATE TABLE pathways (
    pathway_id uuid        PRIMARY KEY,
    version    integer     NOT NULL CHECK (version >= 1),
    status     text        NOT NULL CHECK (status IN ('draft', 'published')),
    -- The staff-maintained description (catalog.domain.PathwayDetails), validated by the domain model.
    details    jsonb       NOT NULL,
    title      text        GENERATED ALWAYS AS (details->>'title') STORED,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE INDEX pathways_listing ON pathways (status, title, pathway_id);
