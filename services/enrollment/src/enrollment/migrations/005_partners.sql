-- The partner registry: institutions that teach courses and report their completions. Enrollment
-- owns it because a report changes an enrollment: checking the partner and completing the
-- enrollment happen in one transaction.
CREATE TABLE partners (
    partner_id        uuid        PRIMARY KEY,
    display_name      text        NOT NULL CHECK (display_name <> ''),
    status            text        NOT NULL CHECK (status IN ('active', 'suspended')),
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    suspended_at      timestamptz,
    suspension_reason text,
    CHECK ((status = 'suspended') = (suspended_at IS NOT NULL))
);

-- Staff list partners newest first (keyset pagination).
CREATE INDEX partners_by_creation ON partners (created_at DESC, partner_id DESC);

-- Courses the registry lets a partner report, besides those the catalog says it delivers. No
-- foreign key to courses: a course may be granted before its CoursePublished arrives here.
CREATE TABLE partner_courses (
    partner_id uuid NOT NULL REFERENCES partners (partner_id),
    course_id  uuid NOT NULL,
    PRIMARY KEY (partner_id, course_id)
);

-- How a partner signs. Several may be active at once, so a partner rotates without a gap: add a
-- credential, sign with both, revoke the old one. Revoked ones stay, to say what was valid when.
-- An HMAC secret is kept as issued: checking an HMAC needs the secret itself, not a hash of it.
CREATE TABLE partner_credentials (
    credential_id uuid        PRIMARY KEY,
    partner_id    uuid        NOT NULL REFERENCES partners (partner_id),
    kind          text        NOT NULL CHECK (kind IN ('hmac_sha256', 'ed25519')),
    secret        text,
    public_key    bytea,
    created_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    CHECK ((kind = 'hmac_sha256') = (secret IS NOT NULL)),
    CHECK ((kind = 'ed25519') = (public_key IS NOT NULL AND octet_length(public_key) = 32))
);

CREATE INDEX partner_credentials_by_partner ON partner_credentials (partner_id, created_at);

-- The webhook-id of every signed HTTP request taken: the same id again is a replay. Ids are kept
-- only a few minutes: an older request is refused by its timestamp anyway.
CREATE TABLE partner_webhook_ids (
    partner_id  uuid        NOT NULL REFERENCES partners (partner_id),
    webhook_id  text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partner_id, webhook_id)
);

-- A partner's completion names the partner and the report it came from.
ALTER TABLE enrollments
    ADD COLUMN partner_id        uuid,
    ADD COLUMN partner_report_id uuid,
    ADD CHECK (partner_id IS NULL OR completed_by = 'partner'),
    ADD CHECK (completed_by IS DISTINCT FROM 'partner' OR partner_id IS NOT NULL),
    ADD CHECK (partner_report_id IS NULL OR partner_id IS NOT NULL);

-- A report completes one enrollment at most, however often it is sent, by whichever way.
CREATE UNIQUE INDEX enrollments_one_per_partner_report ON enrollments (partner_id, partner_report_id)
    WHERE partner_report_id IS NOT NULL;

-- Partners that do not know our learner ids name the learner by email.
CREATE INDEX enrollments_by_email_and_course ON enrollments (lower(learner_email), course_id);
