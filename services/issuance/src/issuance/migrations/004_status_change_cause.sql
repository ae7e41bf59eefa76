-- The course credential whose revocation or suspension changed a pathway credential's status
-- (the cascade), so reinstating that course credential lifts exactly the suspensions it caused.
ALTER TABLE credential_status_changes ADD COLUMN caused_by uuid REFERENCES credentials (credential_id);
