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


@subscriptions.on(EnrollmentActivated)
async def on_enrollment_activated(conn: Connection, event: EnrollmentActivated) -> None:
    await service.record_activation(conn, event)
