-- Every status change of a credential (revoked, suspended, reinstated) with who made it, written
-- in the transaction that makes it: `credentials` holds only the current status (a reinstatement
-- clears the suspension), this holds how it got there, for the audit trail
-- (GET /credentials/{id}/audit).
CREATE TABLE credential_status_changes (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    credential_id uuid        NOT NULL REFERENCES credentials (credential_id),
    change        text        NOT NULL CHECK (change IN ('revoked', 'suspended', 'reinstated')),
    reason        text,
    actor         text        NOT NULL,
    changed_at    timestamptz NOT NULL
);

CREATE INDEX credential_status_changes_by_credential ON credential_status_changes (credential_id, id);
