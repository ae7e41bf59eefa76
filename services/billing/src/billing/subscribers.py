"""The events billing reacts to, and the use case each one drives."""

from microcred_events import EnrollmentCancelled, EnrollmentCreated
from microcred_runtime import Connection, Rejected, Subscriptions

from . import service
from .domain import PaymentRuleViolated

subscriptions = Subscriptions()


@subscriptions.on(EnrollmentCreated)
async def on_enrollment_created(conn: Connection, event: EnrollmentCreated) -> None:
    try:
        await service.open_payment(conn, event)
    except PaymentRuleViolated as exc:
        # No retry can make this event payable: park it on the dead-letter topic at once.
        raise Rejected(exc.code, str(exc)) from None


@subscriptions.on(EnrollmentCancelled)
async def on_enrollment_cancelled(conn: Connection, event: EnrollmentCancelled) -> None:
    await service.void_payment(conn, event)
