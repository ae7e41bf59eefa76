-- Every committed change of a course or pathway, whoever makes it (any replica, the seed, an
-- operator's SQL), tells each catalog process to drop the public answers it keeps
-- (catalog/public_cache.py). PostgreSQL delivers a notification at commit, once per transaction.
CREATE FUNCTION catalog_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('catalog_changed', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER courses_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON courses
    FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
CREATE TRIGGER pathways_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pathways
    FOR EACH STATEMENT EXECUTE FUNCTION catalog_changed();
