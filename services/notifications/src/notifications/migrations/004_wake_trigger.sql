-- The delivery workers are woken by the database as deliveries fall due: one NOTIFY per channel
-- and statement (sent at commit; PostgreSQL folds repeats within a transaction) rather than a
-- round trip from every transaction that records, releases, hands back or replays deliveries.
-- The channel name is repository.WAKE_CHANNEL; the payload is the delivery channel.
CREATE FUNCTION wake_delivery_workers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notifications_delivery', due.channel)
    FROM (
        SELECT DISTINCT channel FROM changed WHERE state = 'pending' AND next_attempt_at <= now()
    ) AS due;
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_wake_on_insert AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION wake_delivery_workers();
CREATE TRIGGER deliveries_wake_on_update AFTER UPDATE ON deliveries
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION wake_delivery_workers();
