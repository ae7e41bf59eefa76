"""The events enrollment reacts to, and the use case each one drives."""

import asyncpg

from microcred_events import CoursePublished, CourseRetired, CourseUpdated
from microcred_runtime import Subscriptions

from . import service

subscriptions = Subscriptions()


@subscriptions.on(CoursePublished, CourseUpdated)
async def on_course_published(conn: asyncpg.Connection, event: CoursePublished | CourseUpdated) -> None:
    await service.record_course(conn, event)


@subscriptions.on(CourseRetired)
async def on_course_retired(conn: asyncpg.Connection, event: CourseRetired) -> None:
    await service.record_retirement(conn, event)
