"""The events enrollment reacts to, and the use case each one drives."""

from microcred_events import (
    CoursePublished,
    CourseRetired,
    CourseUpdated,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
)
from microcred_runtime import Connection, Subscriptions

from . import service

subscriptions = Subscriptions()


@subscriptions.on(CoursePublished, CourseUpdated)
async def on_course_published(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    await service.record_course(conn, event)


@subscriptions.on(CourseRetired)
async def on_course_retired(conn: Connection, event: CourseRetired) -> None:
    await service.record_retirement(conn, event)


@subscriptions.on(PaymentSettled)
async def on_payment_settled(conn: Connection, event: PaymentSettled) -> None:
    await service.settle_payment(conn, event)


@subscriptions.on(PaymentFailed)
async def on_payment_failed(conn: Connection, event: PaymentFailed) -> None:
    await service.fail_payment(conn, event)


@subscriptions.on(RefundIssued)
async def on_refund_issued(conn: Connection, event: RefundIssued) -> None:
    await service.refund_payment(conn, event)
