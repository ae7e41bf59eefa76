-- Enrollment's own read model of the catalog, kept from catalog events (never by calling catalog).
-- `version` is the catalog's: an event with a version not higher than the stored one is stale.
CREATE TABLE courses (
    course_id    uuid        PRIMARY KEY,
    version      integer     NOT NULL,
    status       text        NOT NULL CHECK (status IN ('published', 'retired')),
    title        text,
    price_minor  bigint,
    currency     text,
    snapshot     jsonb,
    updated_at   timestamptz NOT NULL
);
