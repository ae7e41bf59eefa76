"""The events enrollment reacts to, and the use case each one drives."""

from microcred_events import CoursePublished, CourseRetired, CourseUpdated
from microcred_runtime import Connection, Subscriptions

from . import service

subscriptions = Subscriptions()


@subscriptions.on(CoursePublished, CourseUpdated)
async def on_course_published(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
    await service.record_course(conn, event)


@subscriptions.on(CourseRetired)
async def on_course_retired(conn: Connection, event: CourseRetired) -> None:
    await service.record_retirement(conn, event)
