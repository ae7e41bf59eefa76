-- An event whose course notifications does not know yet reaches its learner's and `all`
-- subscriptions at once, and waits here for the issuer's and partner's: topics are read
-- independently, so a payment may be read before the enrollment that names its course (after an
-- outage, say), or an enrollment before its course. It is fanned out when the enrollment or the
-- course arrives (in that event's transaction), and by the delivery workers' sweep, which finds
-- what two replicas reading those events side by side left behind. `course_id` is the course the
-- event names, `enrollment_id` the enrollment it names when it names no course.
CREATE TABLE webhooks_awaiting_course (
    event_key     text        PRIMARY KEY,
    event_type    text        NOT NULL,
    body          text        NOT NULL,
    learner_id    uuid        NOT NULL,
    course_id     uuid,
    enrollment_id uuid,
    -- The partner that attested a completion: it hears of it whatever the course.
    attested_by   uuid,
    parked_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (course_id IS NOT NULL OR enrollment_id IS NOT NULL)
);

CREATE INDEX webhooks_awaiting_course_by_course ON webhooks_awaiting_course (course_id);
CREATE INDEX webhooks_awaiting_course_by_enrollment ON webhooks_awaiting_course (enrollment_id);
