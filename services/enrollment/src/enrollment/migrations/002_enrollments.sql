-- The contract allows versions up to 2^63 - 1; integer would refuse a valid event for good.
ALTER TABLE courses ALTER COLUMN version TYPE bigint;

-- Learners' enrollments. The learner's email and name are kept as they were at enrollment, since
-- CourseCompleted (and so the credential) names the learner as enrolled.
CREATE TABLE enrollments (
    enrollment_id          uuid             PRIMARY KEY,
    learner_id             uuid             NOT NULL,
    learner_email          text             NOT NULL,
    learner_display_name   text             NOT NULL,
    course_id              uuid             NOT NULL REFERENCES courses (course_id),
    course_version         bigint           NOT NULL CHECK (course_version >= 1),
    price_minor            bigint           NOT NULL CHECK (price_minor >= 0),
    currency               text             NOT NULL,
    status                 text             NOT NULL
        CHECK (status IN ('pending_payment', 'active', 'completed', 'cancelled')),
    created_at             timestamptz      NOT NULL,
    updated_at             timestamptz      NOT NULL,
    activated_at           timestamptz,
    payment_id             uuid,
    cancelled_at           timestamptz,
    cancellation_reason    text
        CHECK (cancellation_reason IN
               ('learner_request', 'payment_failed', 'refunded', 'course_retired', 'staff_action')),
    cancellation_detail    text,
    completed_at           timestamptz,
    completed_by           text             CHECK (completed_by IN ('staff', 'partner')),
    score                  double precision CHECK (score BETWEEN 0 AND 100),
    evidence_url           text,
    completion_recorded_by text,
    -- The state machine lives in enrollment.domain; these keep the columns consistent with it.
    CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL AND cancellation_reason IS NOT NULL)),
    CHECK ((status = 'completed') = (completed_at IS NOT NULL AND completed_by IS NOT NULL)),
    CHECK (status NOT IN ('active', 'completed') OR activated_at IS NOT NULL)
);

-- One live enrollment per learner and course; completed or cancelled ones do not block a new one.
CREATE UNIQUE INDEX enrollments_one_live ON enrollments (learner_id, course_id)
    WHERE status IN ('pending_payment', 'active');

-- A learner's enrollments, newest first (keyset pagination).
CREATE INDEX enrollments_by_learner ON enrollments (learner_id, created_at DESC, enrollment_id DESC);

-- What a course retirement cancels.
CREATE INDEX enrollments_pending_by_course ON enrollments (course_id) WHERE status = 'pending_payment';
