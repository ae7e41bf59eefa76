-- What the catalog filters and searches on, derived by PostgreSQL from the course's `details`
-- document: the application writes only `details`, so these columns can never disagree with it,
-- and adding them fills them in for the courses already stored.

-- Audience and skill labels are matched whole and case-insensitively ("Career changers" finds
-- "career changers"), so they are kept lower-cased for the filter.
CREATE FUNCTION catalog_label_keys(labels jsonb) RETURNS text[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN ARRAY(SELECT lower(label) FROM jsonb_array_elements_text(labels) AS label);

ALTER TABLE courses
    ADD COLUMN title         text   GENERATED ALWAYS AS (details->>'title') STORED,
    ADD COLUMN format        text   GENERATED ALWAYS AS (details->>'format') STORED,
    ADD COLUMN price_minor   bigint GENERATED ALWAYS AS ((details->'price'->>'amount_minor')::bigint) STORED,
    ADD COLUMN currency      text   GENERATED ALWAYS AS (details->'price'->>'currency') STORED,
    ADD COLUMN audience_keys text[] GENERATED ALWAYS AS (catalog_label_keys(details->'audiences')) STORED,
    ADD COLUMN skill_keys    text[] GENERATED ALWAYS AS (catalog_label_keys(details->'skills')) STORED,
    -- Full-text search over title, skills and overview: English stemming lets "communicating"
    -- find "Communication", and the GIN index below serves `search @@ query`.
    ADD COLUMN search        tsvector GENERATED ALWAYS AS (
        to_tsvector('english', details->>'title')
        || to_tsvector('english', details->'skills')
        || to_tsvector('english', details->>'overview')
    ) STORED;

-- Lists are ordered by title then id (a stable keyset for cursor pagination), within a status.
DROP INDEX courses_published;
CREATE INDEX courses_listing ON courses (status, title, course_id);
CREATE INDEX courses_search ON courses USING gin (search);
CREATE INDEX courses_audiences ON courses USING gin (audience_keys);
CREATE INDEX courses_skills ON courses USING gin (skill_keys);
