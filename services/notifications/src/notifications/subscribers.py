"""The events notifications reacts to, and the use case each one drives."""

from microcred_events import CoursePublished, CourseUpdated, Event
from microcred_runtime import Connection, Subscriptions

from . import service
from .domain import NOTIFIED_EVENTS

subscriptions = Subscriptions()


@subscriptions.on(CoursePublished, CourseUpdated)
async def on_course_published(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    await service.record_course(conn, event)


# Enrollment created, activated and cancelled; payment settled and failed; refund issued; course
# completed; credential issued and revoked: the list lives in the domain, next to the rules.
@subscriptions.on(*NOTIFIED_EVENTS)
async def on_notified_event(conn: Connection, event: Event) -> None:
    await service.notify(conn, event)
