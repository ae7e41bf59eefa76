-- The institution that issues the course an enrollment's payment is for (from EnrollmentCreated):
-- its staff may refund the payment. Null for payments opened before enrollment named it; only
-- admins refund those.
ALTER TABLE payments ADD COLUMN issuer_id uuid;
