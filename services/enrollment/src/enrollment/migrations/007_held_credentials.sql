-- The course credentials learners hold, as issuance announces them: a learner who holds a valid
-- one is told so before enrolling in (and paying for) the course again.
CREATE TABLE held_credentials (
    credential_id uuid        PRIMARY KEY,
    learner_id    uuid        NOT NULL,
    course_id     uuid        NOT NULL,
    valid_until   timestamptz,
    revoked_at    timestamptz,
    suspended_at  timestamptz
);

CREATE INDEX held_credentials_by_learner ON held_credentials (learner_id, course_id);
