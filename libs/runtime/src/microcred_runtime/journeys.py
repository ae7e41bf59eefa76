"""One trace per learner journey, across requests that do not carry it.

Kafka hops keep the trace on their own (the outbox stores the context with each event). But some
steps of a journey arrive on a request of their own: the payment provider's webhook, staff
recording a completion. `remember` stores the trace an aggregate (an enrollment, a payment) was
created in; `resume` continues it for such a later step: the step's span becomes a child of the
journey's trace, linked to the request's own span so that neither is lost.
"""

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from .db import Connection

tracer = trace.get_tracer("microcred.journeys")


@dataclass(frozen=True)
class Journey:
    """A trace to record as an aggregate's journey."""

    aggregate_id: str
    traceparent: str
    tracestate: str | None


def here(aggregate_id: object) -> Journey | None:
    """The current trace as the journey of `aggregate_id` (None outside a trace); no I/O."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if "traceparent" not in carrier:
        return None
    return Journey(str(aggregate_id), carrier["traceparent"], carrier.get("tracestate"))


async def remember(conn: Connection, aggregate_id: object) -> None:
    """Record the current trace as the journey of `aggregate_id`, unless one is recorded already."""
    await remember_all(conn, [here(aggregate_id)])


async def remember_all(conn: Connection, journeys: Iterable[Journey | None]) -> None:
    """Record each journey (`here`), unless its aggregate has one already; one statement."""
    known = [journey for journey in journeys if journey is not None]
    if not known:
        return
    await conn.execute(
        "INSERT INTO journeys (aggregate_id, traceparent, tracestate)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
        " ON CONFLICT (aggregate_id) DO NOTHING",
        [journey.aggregate_id for journey in known],
        [journey.traceparent for journey in known],
        [journey.tracestate for journey in known],
    )


@contextlib.asynccontextmanager
async def resume(conn: Connection, aggregate_id: object | None, step: str) -> AsyncIterator[None]:
    """Run the block in the journey's trace of `aggregate_id` (in the current one if none is known)."""
    known = await find(conn, [] if aggregate_id is None else [aggregate_id])
    with continued(known.get(str(aggregate_id)), step):
        yield


async def find(conn: Connection, aggregate_ids: Iterable[object]) -> dict[str, Context]:
    """The journeys recorded of these aggregates, by the aggregate's id as text; one query."""
    wanted = sorted({str(aggregate_id) for aggregate_id in aggregate_ids})
    if not wanted:
        return {}
    rows = await conn.fetch(
        "SELECT aggregate_id, traceparent, tracestate FROM journeys WHERE aggregate_id = ANY($1::text[])",
        wanted,
    )
    return {
        row["aggregate_id"]: propagate.extract(
            {
                "traceparent": row["traceparent"],
                **({"tracestate": row["tracestate"]} if row["tracestate"] else {}),
            }
        )
        for row in rows
    }


@contextlib.contextmanager
def continued(journey: Context | None, step: str) -> Iterator[None]:
    """Run the block as `step` of `journey` (found by `find`), linked to the current span; in the
    current trace when there is no journey."""
    if journey is None:
        yield
        return
    here = trace.get_current_span().get_span_context()
    links = [trace.Link(here)] if here.is_valid else []
    with tracer.start_as_current_span(step, context=journey, links=links):
        yield
