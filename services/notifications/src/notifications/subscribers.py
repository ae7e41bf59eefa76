"""The events notifications reacts to, and the use case each one drives."""

from collections.abc import Sequence

from microcred_events import CoursePublished, CourseUpdated
from microcred_runtime import Connection, Delivery, Subscriptions

from . import service
from .domain import NOTIFIED_EVENTS

subscriptions = Subscriptions()


@subscriptions.on(CoursePublished, CourseUpdated)
async def on_course_published(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    await service.record_course(conn, event)


# Enrollment created, activated and cancelled; payment settled and failed; refund issued; course
# completed; credential issued and revoked: the list lives in the domain, next to the rules.
# Consecutive ones of a poll come together: one statement per table for them all.
@subscriptions.on_batch(*NOTIFIED_EVENTS)
async def on_notified_events(conn: Connection, deliveries: Sequence[Delivery]) -> None:
    await service.notify(conn, deliveries)
