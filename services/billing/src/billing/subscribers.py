"""The events billing reacts to, and the use case each one drives."""

from collections.abc import Sequence

from microcred_events import EnrollmentActivated, EnrollmentCancelled, EnrollmentCreated
from microcred_runtime import Connection, Delivery, Rejected, Subscriptions

from . import service
from .domain import PaymentRuleViolated

subscriptions = Subscriptions()


@subscriptions.on_batch(EnrollmentCreated)
async def on_enrollments_created(conn: Connection, deliveries: Sequence[Delivery]) -> None:
    try:
        await service.open_payments(conn, deliveries)
    except PaymentRuleViolated as exc:
        # No retry can make this event payable: once the runtime has it alone, it is parked on
        # the dead-letter topic at once.
        raise Rejected(exc.code, str(exc)) from None


@subscriptions.on(EnrollmentCancelled)
async def on_enrollment_cancelled(conn: Connection, event: EnrollmentCancelled) -> None:
    await service.void_payment(conn, event)


# One with every enrollment activated: a poll's are noted in one statement.
@subscriptions.on_batch(EnrollmentActivated)
async def on_enrollments_activated(conn: Connection, deliveries: Sequence[Delivery]) -> None:
    await service.record_activations(conn, [delivery.content for delivery in deliveries])
