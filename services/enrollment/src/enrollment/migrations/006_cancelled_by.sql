-- Who cancelled an enrollment, for the audit trail (GET /enrollments/{id}/audit): the learner or
-- staff member (`<role>:<subject>`), the refund's issuer, or the context whose event cancelled it
-- (`billing`, `catalog`). Null for cancellations recorded before this column.
ALTER TABLE enrollments ADD COLUMN cancelled_by text;
