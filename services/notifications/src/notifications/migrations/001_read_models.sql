-- What notifications knows about people and courses, kept from other contexts' events (never by
-- calling them): billing and issuance events carry only a learner id, so the address and name
-- come from EnrollmentCreated and CourseCompleted; course titles make messages readable.

-- The learner directory. `as_of` is the time of the event that gave the address: an older event
-- read late never overwrites a newer address.
CREATE TABLE learners (
    learner_id   uuid        PRIMARY KEY,
    email        text        NOT NULL,
    display_name text        NOT NULL,
    as_of        timestamptz NOT NULL
);

-- Which course an enrollment is for: payment events name only the enrollment.
CREATE TABLE enrollments (
    enrollment_id uuid PRIMARY KEY,
    learner_id    uuid NOT NULL,
    course_id     uuid NOT NULL
);

-- Course titles from the catalog; `version` is the catalog's, so a stale snapshot is ignored.
CREATE TABLE courses (
    course_id uuid   PRIMARY KEY,
    version   bigint NOT NULL,
    title     text   NOT NULL
);

-- What a credential was for: CredentialRevoked names only the credential.
CREATE TABLE credentials (
    credential_id    uuid PRIMARY KEY,
    achievement_name text NOT NULL,
    credential_url   text NOT NULL
);
