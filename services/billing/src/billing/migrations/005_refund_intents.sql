-- A refund is recorded as requested, and committed, before the provider is asked; it becomes issued
-- when the provider's answer is applied. No row lock is held while the provider is called: the
-- requested row is what reserves its amount meanwhile, so concurrent refunds never exceed the payment.
-- A row left requested (billing stopped, or the provider's answer was lost) keeps its amount reserved;
-- asking the provider again with its idempotency key `<payment_id>:refund:<refund_id>` is safe.
ALTER TABLE refunds ADD COLUMN status text NOT NULL DEFAULT 'issued' CHECK (status IN ('requested', 'issued'));
ALTER TABLE refunds ALTER COLUMN status DROP DEFAULT;
ALTER TABLE refunds ALTER COLUMN provider_refund_id DROP NOT NULL;
ALTER TABLE refunds ADD CHECK ((status = 'issued') = (provider_refund_id IS NOT NULL));
