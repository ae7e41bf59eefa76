"""The events issuance reacts to, and the use case each one drives.

Handlers are made per app, bound to its `Platform` (base URL and keys): the runtime hands a
handler only the connection and the event, and minting needs the keys. Completions come in
batches (a poll's consecutive ones together), minted with statements per batch, not per event.
"""

from collections.abc import Sequence

from microcred_events import CourseCompleted, CoursePublished, CourseUpdated, PathwayPublished
from microcred_runtime import Connection, Delivery, Subscriptions

from . import service
from .service import Platform


def subscriptions(platform: Platform) -> Subscriptions:
    subscribed = Subscriptions()

    @subscribed.on(CoursePublished, CourseUpdated)
    async def on_course_published(conn: Connection, event: CoursePublished | CourseUpdated) -> None:
        await service.record_course(conn, platform, event)

    @subscribed.on(PathwayPublished)
    async def on_pathway_published(conn: Connection, event: PathwayPublished) -> None:
        await service.record_pathway(conn, platform, event)

    @subscribed.on_batch(CourseCompleted)
    async def on_course_completed(conn: Connection, deliveries: Sequence[Delivery]) -> None:
        await service.issue_course_credentials(conn, platform, deliveries)

    return subscribed
