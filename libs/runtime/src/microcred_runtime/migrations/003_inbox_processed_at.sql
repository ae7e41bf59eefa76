-- The inbox is forgotten after INBOX_RETENTION_HOURS: its purge finds old rows by this index
-- instead of reading the whole table every minute.
CREATE INDEX inbox_processed_at ON inbox (processed_at);
