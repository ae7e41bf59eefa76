-- Issuance's own read model of the catalog, kept from catalog events (never by calling catalog).

-- Every version of every course: a credential is minted from exactly the version the learner
-- enrolled in (CourseCompleted.course_version), even after the course has changed since.
CREATE TABLE course_versions (
    course_id   uuid        NOT NULL,
    version     bigint      NOT NULL CHECK (version >= 1),
    snapshot    jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (course_id, version)
);

-- The latest version of each pathway; an event with a version not higher is stale.
CREATE TABLE pathways (
    pathway_id uuid        PRIMARY KEY,
    version    bigint      NOT NULL CHECK (version >= 1),
    course_ids uuid[]      NOT NULL,
    snapshot   jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Which pathways a course belongs to, when a credential for it is minted.
CREATE INDEX pathways_by_course ON pathways USING gin (course_ids);

-- The institutions seen in the catalog: each gets a did:web document listing the platform's keys.
CREATE TABLE issuers (
    issuer_id  uuid        PRIMARY KEY,
    name       text        NOT NULL,
    url        text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Completions whose course version has not arrived yet (the catalog topic is behind, e.g. a new
-- consumer group reading both topics from their start). Parked here in the completion's own
-- transaction and minted when that version arrives: retrying in place would hold up the very
-- consumer that has to read the catalog event.
CREATE TABLE awaiting_course_version (
    enrollment_id  uuid        PRIMARY KEY,
    course_id      uuid        NOT NULL,
    course_version bigint      NOT NULL,
    completion     jsonb       NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX awaiting_by_course_version ON awaiting_course_version (course_id, course_version);
