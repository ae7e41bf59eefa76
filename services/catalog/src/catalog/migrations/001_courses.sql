CREATE TABLE courses (
    course_id  uuid        PRIMARY KEY,
    version    integer     NOT NULL CHECK (version >= 1),
    status     text        NOT NULL CHECK (status IN ('draft', 'published', 'retired')),
    -- The staff-maintained description (catalog.domain.CourseDetails), validated by the domain model.
    details    jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE INDEX courses_published ON courses (created_at, course_id) WHERE status = 'published';
