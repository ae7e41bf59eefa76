"""Notifications' consumer use case on a batch of events, against a real PostgreSQL: what a mixed
batch records (in-app rows, emails, webhooks, waiting webhooks, read models), written out by
hand, so that any way of applying the events must give exactly these rows."""

import asyncio
import contextlib
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import pytest
from opentelemetry import trace
from pydantic import BaseModel

import notifications.main
from microcred_events import (
    CourseCompleted,
    CoursePublished,
    CourseSnapshot,
    CredentialIssued,
    CredentialRevoked,
    EnrollmentCreated,
    Event,
    PaymentFailed,
    PaymentSettled,
    example_data,
)
from microcred_runtime import Connection
from microcred_runtime.consumers import Delivery
from microcred_runtime.migrations import migrate
from notifications import delivery, domain, repository, service
from notifications.domain import (
    AttemptOutcome,
    AttemptResult,
    ChannelPreference,
    DeliveryState,
    Preferences,
    Scope,
    ScopeKind,
)

M = TypeVar("M", bound=BaseModel)

COURSE_TITLE = "Data Analysis with Python"
ACHIEVEMENT = "Data Analysis Foundations"


class Names:
    """Ids by name, so that the rows a test expects read as names rather than UUIDs."""

    def __init__(self) -> None:
        self._ids: dict[str, uuid.UUID] = {}

    def __getitem__(self, name: str) -> uuid.UUID:
        return self._ids.setdefault(name, uuid.uuid4())

    def of(self, value: object) -> str | None:
        """The name of an id, or of the ids in a text (an event key)."""
        if value is None:
            return None
        names = {str(id_): name for name, id_ in self._ids.items()}
        return re.sub(r"[0-9a-f-]{36}", lambda found: names.get(found[0], "?"), str(value))


def made(model: type[M], **fields: Any) -> M:
    """An event (or part of one) like the contract's example, with `fields` in place of the example's."""
    return model.model_validate({**example_data(model), **fields})


async def apply(conn: Connection, events: Sequence[Event]) -> None:
    """As the consumer applies consecutive events of a poll: together, in one transaction."""
    async with conn.transaction():
        await service.notify(conn, [Delivery(event, trace.INVALID_SPAN) for event in events])


@pytest.fixture
async def connect(new_database: Callable[[], Any]) -> AsyncIterator[Callable[[], Any]]:
    """Connections to fresh, migrated notifications databases; closed at the end."""
    opened: list[asyncpg.Connection] = []

    async def open_one() -> asyncpg.Connection:
        conn = await asyncpg.connect(await new_database())
        opened.append(conn)
        await migrate(conn, "notifications", Path(notifications.main.__file__).parent / "migrations")
        return conn

    yield open_one
    for conn in opened:
        await conn.close()


class Scenario:
    """A course of one issuer, subscribers in and out of its scope, five learners, and a batch that
    mixes them: Ada enrolls, completes (attested by a partner), is issued a credential (published
    twice) that is then revoked; Cy's payment comes before the enrollment that gives his address and
    names the course; Bea turned email off; Dan's course is unknown; Eve's enrollment never comes."""

    def __init__(self) -> None:
        self.names = Names()
        self.now = datetime.now(UTC)

    def learner(self, name: str) -> dict[str, Any]:
        return {
            "learner_id": self.names[name],
            "email": f"{name}@example.org",
            "display_name": name.title(),
        }

    def enrollment(self, learner: str, course: str = "course") -> EnrollmentCreated:
        return made(
            EnrollmentCreated,
            enrollment_id=self.names[f"{learner}-enrollment"],
            learner=self.learner(learner),
            course_id=self.names[course],
            created_at=self.now,
        )

    def payment(self, learner: str, event_type: type[PaymentSettled] | type[PaymentFailed]) -> Event:
        at = "settled_at" if event_type is PaymentSettled else "failed_at"
        return made(
            event_type,
            payment_id=self.names[f"{learner}-{event_type.__name__}"],
            enrollment_id=self.names[f"{learner}-enrollment"],
            learner_id=self.names[learner],
            **{at: self.now},
        )

    def credential(self, learner: str) -> CredentialIssued:
        credential_id = self.names[f"{learner}-credential"]
        return made(
            CredentialIssued,
            credential_id=credential_id,
            learner_id=self.names[learner],
            enrollment_id=self.names[f"{learner}-enrollment"],
            course_id=self.names["course"],
            achievement_name=ACHIEVEMENT,
            issued_at=self.now,
            credential_url=f"https://credentials.microcred.example/credentials/{credential_id}",
        )

    def batch(self) -> list[Event]:
        return [
            self.enrollment("ada"),
            self.payment("cy", PaymentSettled),
            self.enrollment("cy"),
            made(
                CourseCompleted,
                enrollment_id=self.names["ada-enrollment"],
                learner=self.learner("ada"),
                course_id=self.names["course"],
                completed_at=self.now,
                partner_id=self.names["partner"],
            ),
            self.credential("ada"),
            self.credential("ada"),  # the same occurrence published again
            self.enrollment("bea"),
            self.credential("bea"),
            self.enrollment("dan", course="unknown-course"),
            made(
                CredentialRevoked,
                credential_id=self.names["ada-credential"],
                learner_id=self.names["ada"],
                revoked_at=self.now,
            ),
            self.payment("eve", PaymentSettled),
        ]

    async def prepare(self, conn: Connection) -> None:
        """What is known before the batch: the course, the subscriptions, Bea's preferences, and
        Cy's failed payment (read before his enrollment, in an earlier batch)."""
        course = made(
            CourseSnapshot,
            course_id=self.names["course"],
            issuer={**example_data(CourseSnapshot)["issuer"], "issuer_id": self.names["issuer"]},
            delivery_partner_id=None,
        )
        await service.record_course(conn, CoursePublished(course=course, published_at=self.now))
        for name, scope, event_types in (
            ("issuer", Scope(ScopeKind.ISSUER, self.names["issuer"]), []),
            ("other-issuer", Scope(ScopeKind.ISSUER, self.names["other-issuer"]), []),
            ("partner", Scope(ScopeKind.PARTNER, self.names["partner"]), []),
            ("ada", Scope(ScopeKind.LEARNER, self.names["ada"]), []),
            ("credentials", Scope(ScopeKind.ALL), [CredentialIssued.TYPE]),
        ):
            await repository.insert_subscription(
                conn,
                repository.Subscription(
                    subscription_id=self.names[f"{name}-subscription"],
                    url="https://hooks.partner.example/",
                    event_types=event_types,
                    description=None,
                    secret=domain.new_secret(),
                    created_by="admin-1",
                    created_at=self.now,
                    disabled_at=None,
                    scope=scope,
                ),
            )
        await repository.save_preferences(
            conn, self.names["bea"], Preferences(email=ChannelPreference(enabled=False))
        )
        await apply(conn, [self.payment("cy", PaymentFailed)])

    async def rows(self, conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
        """Every row the consumer writes, as names; sorted, as no order is promised."""
        of = self.names.of
        queries = {
            "notifications": "SELECT learner_id, kind, title, event_key, link IS NOT NULL FROM notifications",
            "emails": "SELECT learner_id, event_type, state, next_attempt_at IS NOT NULL, event_key"
            " FROM deliveries WHERE channel = 'email'",
            "webhooks": "SELECT subscription_id, event_type, state, event_key FROM deliveries"
            " WHERE channel = 'webhook'",
            "waiting": "SELECT event_key, course_id, enrollment_id, attested_by"
            " FROM webhooks_awaiting_course",
            "learners": "SELECT learner_id, email, display_name FROM learners",
            "enrollments": "SELECT enrollment_id, learner_id, course_id FROM enrollments",
            "credentials": "SELECT credential_id, achievement_name, course_id FROM credentials",
        }
        named: dict[str, list[tuple[Any, ...]]] = {}
        for table, query in queries.items():
            rows = [
                tuple(
                    of(value)
                    if isinstance(value, uuid.UUID) or (isinstance(value, str) and value.startswith("org."))
                    else value
                    for value in row
                )
                for row in await conn.fetch(query)
            ]
            named[table] = sorted(rows, key=repr)
        return named

    async def contents(self, conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
        """What the rows say (bodies, payloads), by their keys: the same, however the batch is applied."""
        rows = await conn.fetch(
            "SELECT 'in_app', event_key, learner_id::text, body FROM notifications UNION ALL"
            " SELECT channel, event_key, coalesce(learner_id, subscription_id)::text, payload FROM deliveries"
            " UNION ALL SELECT 'waiting', event_key, learner_id::text, body FROM webhooks_awaiting_course"
        )
        return sorted(tuple(row) for row in rows)


def expected(names: Names) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of `Scenario`, reasoned out from the rules, not read off a run."""
    key = {
        name: f"{event_type.TYPE}:{occurrence}"
        for name, event_type, occurrence in (
            ("ada-enrolled", EnrollmentCreated, "ada-enrollment"),
            ("ada-completed", CourseCompleted, "ada-enrollment"),
            ("ada-issued", CredentialIssued, "ada-credential"),
            ("bea-enrolled", EnrollmentCreated, "bea-enrollment"),
            ("bea-issued", CredentialIssued, "bea-credential"),
            ("cy-failed", PaymentFailed, "cy-PaymentFailed"),
            ("cy-paid", PaymentSettled, "cy-PaymentSettled"),
            ("cy-enrolled", EnrollmentCreated, "cy-enrollment"),
            ("dan-enrolled", EnrollmentCreated, "dan-enrollment"),
            ("eve-paid", PaymentSettled, "eve-PaymentSettled"),
        )
    }
    revoked = f"{CredentialRevoked.TYPE}:ada-credential:revocation:"
    type_of = {name: value.split(":")[0] for name, value in key.items()}
    learner_of = {name: name.split("-")[0] for name in key}
    enrolled = f"Your enrollment in {COURSE_TITLE}"
    in_app = [
        ("ada", "enrollment.created", enrolled, key["ada-enrolled"], False),
        ("ada", "credential.issued", f'Your credential "{ACHIEVEMENT}" is ready', key["ada-issued"], True),
        # The credential was recorded by its issuance earlier in the batch: its name and page are known.
        ("ada", "credential.revoked", f'Your credential "{ACHIEVEMENT}" was revoked', revoked, True),
        ("bea", "enrollment.created", enrolled, key["bea-enrolled"], False),
        ("bea", "credential.issued", f'Your credential "{ACHIEVEMENT}" is ready', key["bea-issued"], True),
        # Read before the enrollment that names the course.
        ("cy", "payment.failed", "Your payment for your course did not go through", key["cy-failed"], False),
        ("cy", "payment.settled", "Payment received: 49.00 EUR", key["cy-paid"], False),
        ("cy", "enrollment.created", enrolled, key["cy-enrolled"], False),
        ("dan", "enrollment.created", "Your enrollment in your course", key["dan-enrolled"], False),
        ("eve", "payment.settled", "Payment received: 49.00 EUR", key["eve-paid"], False),
    ]
    # Bea gets no email; Cy's wait for his address until his enrollment; Eve's still waits.
    emails = [
        (learner_of[name], type_of[name], "pending", True, key[name])
        for name in ("ada-enrolled", "ada-issued", "cy-failed", "cy-paid", "cy-enrolled", "dan-enrolled")
    ]
    emails += [("ada", CredentialRevoked.TYPE, "pending", True, revoked)]
    emails += [("eve", PaymentSettled.TYPE, "awaiting_address", False, key["eve-paid"])]
    webhooks = [
        (f"{subscription}-subscription", type_of[name], "pending", key[name])
        for subscription, names in (
            # The issuer hears of everything about its course, Cy's payments once his enrollment
            # named the course; of Dan's enrollment and Eve's payment not yet.
            (
                "issuer",
                (
                    "ada-enrolled",
                    "ada-completed",
                    "ada-issued",
                    "bea-enrolled",
                    "bea-issued",
                    "cy-failed",
                    "cy-paid",
                    "cy-enrolled",
                ),
            ),
            # The partner attested Ada's completion, and delivers no course.
            ("partner", ("ada-completed",)),
            ("ada", ("ada-enrolled", "ada-completed", "ada-issued")),
            ("credentials", ("ada-issued", "bea-issued")),
        )
        for name in names
    ]
    webhooks += [
        (f"{subscription}-subscription", CredentialRevoked.TYPE, "pending", revoked)
        for subscription in ("issuer", "ada")
    ]
    return {
        "notifications": in_app,
        "emails": emails,
        "webhooks": webhooks,
        "waiting": [
            (key["dan-enrolled"], "unknown-course", "dan-enrollment", None),
            (key["eve-paid"], None, "eve-enrollment", None),
        ],
        "learners": [(name, f"{name}@example.org", name.title()) for name in ("ada", "bea", "cy", "dan")],
        "enrollments": [(f"{name}-enrollment", name, "course") for name in ("ada", "bea", "cy")]
        + [("dan-enrollment", "dan", "unknown-course")],
        "credentials": [(f"{name}-credential", ACHIEVEMENT, "course") for name in ("ada", "bea")],
    }


def without_times(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """The revocation's key ends with its time, which the expectation leaves out."""
    cut = re.compile(r"(:revocation:).*")
    return {
        table: sorted(
            (
                tuple(cut.sub(r"\1", value) if isinstance(value, str) else value for value in row)
                for row in items
            ),
            key=repr,
        )
        for table, items in rows.items()
    }


async def test_a_mixed_batch_records_what_each_of_its_events_causes(connect: Callable[[], Any]) -> None:
    scenario = Scenario()
    conn = await connect()
    await scenario.prepare(conn)

    await apply(conn, scenario.batch())

    assert without_times(await scenario.rows(conn)) == without_times(expected(scenario.names))


async def test_a_batch_gives_the_rows_its_events_give_one_at_a_time(connect: Callable[[], Any]) -> None:
    """The runtime gives a failing batch to the handler in halves, down to single events: any
    split of a batch must record the same."""
    scenario = Scenario()
    together, one_by_one = await connect(), await connect()
    for conn in (together, one_by_one):
        await scenario.prepare(conn)

    await apply(together, scenario.batch())
    for event in scenario.batch():
        await apply(one_by_one, [event])

    assert await scenario.rows(together) == await scenario.rows(one_by_one)
    assert await scenario.contents(together) == await scenario.contents(one_by_one)


async def test_a_batch_applied_again_records_nothing_more(connect: Callable[[], Any]) -> None:
    """Once per event and recipient, however often an occurrence arrives (under new event ids)."""
    scenario = Scenario()
    conn = await connect()
    await scenario.prepare(conn)
    await apply(conn, scenario.batch())
    first = await scenario.rows(conn), await scenario.contents(conn)

    await apply(conn, scenario.batch())

    assert (await scenario.rows(conn), await scenario.contents(conn)) == first


class Counting:
    """A connection that counts the statements sent through it: each is a round trip."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.statements: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._conn, name)
        if name not in ("execute", "executemany", "fetch", "fetchrow", "fetchval", "copy_records_to_table"):
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.statements.append(str(args[0]))
            return await attribute(*args, **kwargs)

        return counted


@pytest.mark.parametrize("learners", [1, 40])
async def test_a_batch_costs_the_same_few_statements_whatever_its_size(
    connect: Callable[[], Any], learners: int
) -> None:
    """Every table is read and written once per batch, not once per event: a cohort's enrollments,
    completions and credentials, with the mixed batch's other cases among them."""
    scenario = Scenario()
    conn = await connect()
    await scenario.prepare(conn)
    cohort = [f"learner{number}" for number in range(learners)]
    batch = [scenario.enrollment(name) for name in cohort] + scenario.batch()
    batch += [
        made(
            CourseCompleted,
            enrollment_id=scenario.names[f"{name}-enrollment"],
            learner=scenario.learner(name),
            course_id=scenario.names["course"],
            completed_at=scenario.now,
            partner_id=scenario.names["partner"],
        )
        for name in cohort
    ]
    batch += [scenario.credential(name) for name in cohort]
    counting = Counting(conn)

    async with conn.transaction():
        await service.notify(
            cast(asyncpg.Connection, counting), [Delivery(event, trace.INVALID_SPAN) for event in batch]
        )

    # Reads: what the read models know of the batch, preferences, subscriptions. Writes:
    # enrollments, learners, credentials, awaiting emails released, waiting webhooks released,
    # in-app notifications, emails, webhooks, webhooks parked.
    assert len(counting.statements) == 12, counting.statements
    assert await conn.fetchval("SELECT count(*) FROM notifications") == 10 + 2 * learners


# --- the delivery workers --------------------------------------------------------------------


async def test_the_emails_of_a_claimed_batch_are_composed_with_one_statement(
    connect: Callable[[], Any],
) -> None:
    scenario = Scenario()
    conn = await connect()
    await scenario.prepare(conn)
    cohort = [f"learner{number}" for number in range(30)]
    await apply(
        conn,
        [scenario.enrollment(name) for name in cohort]
        + scenario.batch()
        + [scenario.credential(name) for name in cohort],
    )
    claimed = await repository.claim(conn, "email", uuid.uuid4(), limit=100, lease_seconds=60)
    counting = Counting(conn)

    composed = await service.compose_emails(cast(asyncpg.Connection, counting), claimed)

    # Learners and what the read models know of their events: one, for any number of emails.
    assert len(counting.statements) == 1, counting.statements
    assert len(composed) == len(claimed) == 2 * len(cohort) + 7
    emails = {
        (scenario.names.of(item.learner_id), domain.kind_of(item.event_type)): composed[item.delivery_id]
        for item in claimed
    }
    revoked = emails["ada", domain.Kind.CREDENTIAL_REVOKED]
    assert isinstance(revoked, tuple)
    email, address, name = revoked
    assert (email.subject, address, name) == (
        f'Your credential "{ACHIEVEMENT}" was revoked',
        "ada@example.org",
        "Ada",
    )
    # Sent after the enrollment that names the course: the email names it, though the inbox could not.
    failed = emails["cy", domain.Kind.PAYMENT_FAILED]
    assert isinstance(failed, tuple)
    assert failed[0].subject == f"Your payment for {COURSE_TITLE} did not go through"
    issued = emails["learner7", domain.Kind.CREDENTIAL_ISSUED]
    assert isinstance(issued, tuple)
    assert issued[1:] == ("learner7@example.org", "Learner7")
    assert str(scenario.names["learner7-credential"]) in issued[0].text
    # An address that is not known gives no email.
    eve = await conn.fetchval(
        "SELECT delivery_id FROM deliveries WHERE learner_id = $1", scenario.names["eve"]
    )
    waiting = await repository.delivery(conn, eve, "email")
    assert waiting is not None
    assert await service.compose_emails(conn, [waiting]) == {eve: None}


@contextlib.asynccontextmanager
async def claimed_webhooks(
    database: str, scenario: "Scenario", worker: uuid.UUID
) -> AsyncIterator[tuple[asyncpg.Pool, Connection, list[repository.Delivery]]]:
    """The scenario's batch applied to a new database, and its webhooks claimed by `worker`."""
    async with asyncpg.create_pool(database, min_size=1, max_size=2) as pool, pool.acquire() as conn:
        await migrate(conn, "notifications", Path(notifications.main.__file__).parent / "migrations")
        await scenario.prepare(conn)
        await apply(conn, scenario.batch())
        yield pool, conn, await repository.claim(conn, "webhook", worker, limit=100, lease_seconds=60)


async def test_attempts_that_finish_together_are_recorded_together(
    new_database: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = Scenario()
    worker = uuid.uuid4()
    async with claimed_webhooks(await new_database(), scenario, worker) as (pool, conn, claimed):
        # One whose claim was lost meanwhile (its lease ran out and another worker took it).
        lost = claimed[0]
        await conn.execute(
            "UPDATE deliveries SET claimed_by = $2 WHERE delivery_id = $1", lost.delivery_id, uuid.uuid4()
        )
        writes: list[int] = []
        record_attempts = repository.record_attempts

        async def counted(conn: Any, worker: uuid.UUID, tried: Sequence[repository.Tried]) -> set[uuid.UUID]:
            writes.append(len(tried))
            return await record_attempts(conn, worker, tried)

        monkeypatch.setattr(repository, "record_attempts", counted)
        recorder = delivery.Recorder(pool, worker)
        delivered = AttemptResult(AttemptOutcome.DELIVERED, status_code=204)
        failed = AttemptResult(AttemptOutcome.FAILED, status_code=503, error="HTTP 503")

        moved = await asyncio.gather(
            *(
                recorder.record(
                    repository.Tried(
                        item.delivery_id,
                        item.attempts,
                        scenario.now,
                        12,
                        failed if number % 2 else delivered,
                        DeliveryState.PENDING if number % 2 else DeliveryState.DELIVERED,
                        1.5 if number % 2 else None,
                    )
                )
                for number, item in enumerate(claimed)
            )
        )
        lone = await recorder.record(
            repository.Tried(
                lost.delivery_id, lost.attempts, scenario.now, 3, delivered, DeliveryState.DELIVERED, None
            )
        )

        assert writes == [len(claimed), 1]
        assert moved == [item is not lost for item in claimed]
        assert lone is False
        rows = await conn.fetch(
            "SELECT d.delivery_id, d.state, d.last_error, d.claimed_by, d.next_attempt_at > now() AS later,"
            " count(a.id) AS attempts FROM deliveries d JOIN delivery_attempts a USING (delivery_id)"
            " GROUP BY d.delivery_id"
        )
        states = {row["delivery_id"]: row for row in rows}
        for number, item in enumerate(claimed):
            row = states[item.delivery_id]
            if item is lost:
                # Its attempts are recorded; the delivery stays as the other worker holds it.
                assert (row["state"], row["attempts"]) == ("sending", 2)
            elif number % 2:
                assert (row["state"], row["last_error"], row["claimed_by"], row["later"]) == (
                    "pending",
                    "HTTP 503",
                    None,
                    True,
                )
            else:
                assert (row["state"], row["claimed_by"], row["later"]) == ("delivered", None, None)


async def test_a_row_postgresql_refuses_costs_only_its_own_attempt_record(
    new_database: Callable[[], Any],
) -> None:
    scenario = Scenario()
    worker = uuid.uuid4()
    async with claimed_webhooks(await new_database(), scenario, worker) as (pool, conn, claimed):
        recorder = delivery.Recorder(pool, worker)
        # Text with a NUL, which PostgreSQL refuses (the worker replaces it; the recorder must
        # hold even so).
        refused = AttemptResult(AttemptOutcome.FAILED, status_code=500, error="HTTP 500: \x00")
        delivered = AttemptResult(AttemptOutcome.DELIVERED, status_code=204)

        outcomes = await asyncio.gather(
            *(
                recorder.record(
                    repository.Tried(
                        item.delivery_id,
                        item.attempts,
                        scenario.now,
                        5,
                        refused if number == 0 else delivered,
                        DeliveryState.PENDING if number == 0 else DeliveryState.DELIVERED,
                        1.0 if number == 0 else None,
                    )
                )
                for number, item in enumerate(claimed)
            ),
            return_exceptions=True,
        )

        assert len(claimed) > 1
        assert isinstance(outcomes[0], asyncpg.PostgresError)
        assert outcomes[1:] == [True] * (len(claimed) - 1)
        states = {
            row["delivery_id"]: row["state"]
            for row in await conn.fetch("SELECT delivery_id, state FROM deliveries WHERE channel = 'webhook'")
        }
        assert [states[item.delivery_id] for item in claimed] == ["sending"] + ["delivered"] * (
            len(claimed) - 1
        )


async def test_an_email_whose_event_no_longer_reads_costs_only_itself(connect: Callable[[], Any]) -> None:
    scenario = Scenario()
    conn = await connect()
    await scenario.prepare(conn)
    await apply(conn, scenario.batch())
    claimed = await repository.claim(conn, "email", uuid.uuid4(), limit=100, lease_seconds=60)
    gone = claimed[0]
    await conn.execute(
        "UPDATE deliveries SET event_type = 'org.example.gone.v1' WHERE delivery_id = $1", gone.delivery_id
    )
    claimed[0] = dataclasses.replace(gone, event_type="org.example.gone.v1")

    composed = await service.compose_emails(conn, claimed)

    unreadable = composed[gone.delivery_id]
    assert isinstance(unreadable, service.Unreadable)
    assert "org.example.gone.v1" in unreadable.detail
    assert len(claimed) > 1
    assert not any(isinstance(composed[item.delivery_id], service.Unreadable) for item in claimed[1:])
