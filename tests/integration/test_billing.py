"""Billing against real Kafka and PostgreSQL, with the payment provider simulator in-process.

Billing's adapter reaches the simulator over ASGI, and the simulator delivers its signed webhooks to
billing over ASGI: the same HTTP requests as between two processes, without ports to manage.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI

import billing.main
from billing import api, simulator
from billing.provider import CheckoutSession, ProviderError, ProviderRefused, SimulatorProvider
from billing.settings import Settings
from billing.webhooks import SIGNATURE_HEADER, signature
from microcred_events import (
    CancellationReason,
    EnrollmentActivated,
    EnrollmentCancelled,
    EnrollmentCreated,
    Event,
    Learner,
    Money,
    PaymentDeclined,
    PaymentFailed,
    PaymentSettled,
    RefundIssued,
    Topic,
    dead_letter_topic,
    decode,
    encode,
)

from .conftest import EXAMPLE_ISSUER_ID

SECRET = "whsec_integration_3f9a1c7e5b2d4f6a8c0e"
PRICE = Money(amount_minor=4900, currency="EUR")
PROBLEM_JSON = "application/problem+json"


@dataclass
class Billing:
    api: httpx.AsyncClient
    simulator: httpx.AsyncClient
    db: asyncpg.Connection
    producer: AIOKafkaProducer
    topic_prefix: str
    bearer: Callable[..., dict[str, str]]
    wait_for: Callable[..., Any]
    app: FastAPI
    provider: SimulatorProvider

    async def enroll(
        self,
        learner_id: uuid.UUID,
        *,
        requires_payment: bool = True,
        enrollment_id: uuid.UUID | None = None,
        event_id: str | None = None,
    ) -> EnrollmentCreated:
        event = EnrollmentCreated(
            enrollment_id=enrollment_id or uuid.uuid4(),
            learner=Learner(learner_id=learner_id, email="ada@example.org", display_name="Ada Lovelace"),
            course_id=uuid.uuid4(),
            course_version=1,
            price=PRICE if requires_payment else Money(amount_minor=0, currency="EUR"),
            requires_payment=requires_payment,
            created_at=datetime.now(UTC),
            issuer_id=uuid.UUID(EXAMPLE_ISSUER_ID),
        )
        await self.send(event, event_id)
        return event

    async def send(self, event: Event, event_id: str | None = None) -> None:
        record = encode(event, source="urn:microcred:enrollment", event_id=event_id)
        await self.producer.send_and_wait(
            self.topic_prefix + record.topic, record.value, key=record.key, headers=record.headers
        )

    def learner(self, learner_id: uuid.UUID) -> dict[str, str]:
        return self.bearer(str(learner_id), "learner", email="ada@example.org")

    def staff(self) -> dict[str, str]:
        return self.bearer("staff-1", "staff")

    async def payment_due(self, enrollment: EnrollmentCreated) -> dict[str, Any]:
        """The payment billing made due for `enrollment`, once the event has been consumed."""
        learner = enrollment.learner.learner_id

        async def find() -> dict[str, Any] | None:
            page = (await self.api.get("/payments", headers=self.learner(learner))).json()
            return next(
                (item for item in page["items"] if item["enrollment_id"] == str(enrollment.enrollment_id)),
                None,
            )

        payment: dict[str, Any] | None = await self.wait_for(find)
        assert payment is not None, "no payment became due for the enrollment"
        return payment

    async def check_out(self, payment: dict[str, Any], learner_id: uuid.UUID) -> dict[str, Any]:
        response = await self.api.post(
            f"/payments/{payment['payment_id']}/checkout", headers=self.learner(learner_id)
        )
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def pay(self, session_id: str, **params: str | int) -> dict[str, Any]:
        response = await self.simulator.post(f"/sessions/{session_id}/pay", params=params)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def outbox(self, payment_id: str) -> list[str]:
        """The event types billing committed for one payment, in order."""
        rows = await self.db.fetch(
            "SELECT event_type FROM outbox WHERE message_key = $1 ORDER BY id", payment_id.encode()
        )
        return [row["event_type"] for row in rows]


@pytest.fixture
async def system(
    request: pytest.FixtureRequest,
    new_database: Callable[[], Any],
    make_settings: Callable[..., Any],
    serve: Any,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    bearer: Callable[..., dict[str, str]],
    wait_for: Callable[..., Any],
) -> AsyncIterator[Billing]:
    database = await new_database()
    settings = make_settings(
        Settings,
        database,
        payment_provider_url="http://simulator",
        payment_webhook_secret=SECRET,
        # Discrepancies are listed at once, not after the production 10 minutes, unless a test
        # asks for another wait (indirect parametrization).
        reconcile_after_seconds=getattr(request, "param", 0),
    )
    app = billing.main.create_app(settings)
    simulator_app = simulator.create_app(
        simulator.SimulatorSettings(webhook_url="http://billing/webhooks/provider", webhook_secret=SECRET),
        webhook_transport=httpx.ASGITransport(app=app),
    )
    to_simulator = httpx.ASGITransport(app=simulator_app)
    provider = SimulatorProvider("http://simulator", SECRET, transport=to_simulator)
    app.dependency_overrides[api.payment_provider] = lambda: provider
    async with (
        serve(app) as client,
        httpx.AsyncClient(transport=to_simulator, base_url="http://simulator") as simulator_client,
    ):
        db = await asyncpg.connect(database)
        try:
            yield Billing(
                client, simulator_client, db, producer, topic_prefix, bearer, wait_for, app, provider
            )
        finally:
            await db.close()


async def billing_events(
    topic_reader: Callable[..., Any], topic_prefix: str, payment_id: str, count: int
) -> list[Event]:
    records = await topic_reader(topic_prefix + Topic.BILLING_PAYMENT, count)
    return [
        event
        for event in (decode(record.headers, record.value).event for record in records)
        if str(getattr(event, "payment_id", "")) == payment_id
    ]


def provider_event(payment: dict[str, Any], session_id: str, **data: object) -> bytes:
    """A webhook body as the simulator sends it, for tests that act as the provider (or an attacker)."""
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": "payment.succeeded",
        "created": int(time.time()),
        "data": {
            "session_id": session_id,
            "reference": payment["payment_id"],
            "amount": payment["amount"]["amount_minor"],
            "currency": payment["amount"]["currency"],
            "charge_id": f"ch_{uuid.uuid4().hex[:16]}",
            **data,
        },
    }
    return json.dumps(event).encode()


async def test_a_paid_enrollment_makes_one_payment_due_and_a_free_one_none(system: Billing) -> None:
    learner = uuid.uuid4()
    free = await system.enroll(learner, requires_payment=False, event_id="free-1")
    paid = await system.enroll(learner, event_id="paid-1")
    # The same enrollment again under another event id: the inbox lets it through, the use case must not.
    await system.enroll(learner, enrollment_id=paid.enrollment_id, event_id="paid-2")

    consumed = await system.wait_for(
        lambda: system.db.fetchval(
            "SELECT count(*) = 3 FROM inbox WHERE event_id = ANY($1::text[])", ["free-1", "paid-1", "paid-2"]
        )
    )
    assert consumed, "billing did not consume the enrollment events"

    page = (await system.api.get("/payments", headers=system.learner(learner))).json()
    assert page["next_cursor"] is None
    [payment] = page["items"]
    assert payment["enrollment_id"] == str(paid.enrollment_id)
    assert payment["learner_id"] == str(learner)
    assert payment["status"] == "due"
    assert payment["amount"] == {"amount_minor": 4900, "currency": "EUR"}
    assert payment["refunded"] == {"amount_minor": 0, "currency": "EUR"}
    assert (
        await system.db.fetchval("SELECT count(*) FROM payments WHERE enrollment_id = $1", free.enrollment_id)
        == 0
    )


async def test_enrollments_taken_together_each_get_their_payment_and_an_unpayable_one_is_dead_lettered(
    system: Billing, topic_reader: Callable[..., Any], topic_prefix: str
) -> None:
    learner = uuid.uuid4()
    first = await system.enroll(learner, event_id="batch-1")
    # Requires payment at a price of 0: no retry makes it payable.
    unpayable = first.model_copy(
        update={"enrollment_id": uuid.uuid4(), "price": Money(amount_minor=0, currency="EUR")}
    )
    await system.send(unpayable, "batch-2")
    last = await system.enroll(learner, event_id="batch-3")

    (letter,) = await topic_reader(topic_prefix + dead_letter_topic("billing"), 1)
    headers = dict(letter.headers)
    assert (headers["ce_id"], headers["dlq_reason"], headers["dlq_attempts"]) == (
        b"batch-2",
        b"zero-amount",
        b"1",
    )
    for enrollment in (first, last):
        assert (await system.payment_due(enrollment))["status"] == "due"
    assert (
        await system.db.fetchval(
            "SELECT count(*) FROM payments WHERE enrollment_id = $1", unpayable.enrollment_id
        )
        == 0
    )


async def test_checkout_then_pay_settles_the_payment_exactly_once(
    system: Billing, topic_reader: Callable[..., Any], topic_prefix: str
) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    payment_id = payment["payment_id"]

    checkout = await system.check_out(payment, learner)
    assert checkout["checkout_url"] == f"http://simulator/sessions/{checkout['session_id']}"
    assert (await system.check_out(payment, learner))["session_id"] == checkout["session_id"]
    page = await system.simulator.get(checkout["checkout_url"])
    assert ">Pay</button>" in page.text
    assert ">Decline</button>" in page.text

    paid = await system.pay(checkout["session_id"])
    assert paid["delivery"]["status_code"] == 200, paid["delivery"]
    assert json.loads(paid["delivery"]["answer"]) == {"outcome": "settled", "duplicate": False}

    resent = await system.simulator.post(f"/events/{paid['event']['id']}/resend")
    assert resent.json()["status_code"] == 200
    assert json.loads(resent.json()["answer"]) == {"outcome": "settled", "duplicate": True}
    assert await system.outbox(payment_id) == [PaymentSettled.TYPE], "the duplicate delivery had an effect"

    [settled] = await billing_events(topic_reader, topic_prefix, payment_id, 1)
    assert isinstance(settled, PaymentSettled)
    assert settled.amount == PRICE
    assert str(settled.enrollment_id) == payment["enrollment_id"]
    assert settled.provider == "simulator"
    assert settled.provider_reference == paid["session"]["charge_id"]

    view = (await system.api.get(f"/payments/{payment_id}", headers=system.learner(learner))).json()
    assert view["status"] == "settled"
    assert view["settled_at"] is not None
    again = await system.api.post(f"/payments/{payment_id}/checkout", headers=system.learner(learner))
    assert again.status_code == 409
    assert again.headers["content-type"] == PROBLEM_JSON
    assert again.json()["type"] == "urn:microcred:problem:payment-not-due"


async def test_after_a_declined_card_the_learner_checks_out_again_and_pays(
    system: Billing, topic_reader: Callable[..., Any], topic_prefix: str
) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    first = await system.check_out(payment, learner)

    declined = await system.pay(first["session_id"], outcome="declined")
    again = await system.check_out(payment, learner)
    told_again = await system.simulator.post(f"/events/{declined['event']['id']}/resend")
    paid = await system.pay(again["session_id"])

    assert json.loads(declined["delivery"]["answer"]) == {"outcome": "failed", "duplicate": False}
    assert again["session_id"] != first["session_id"], "the declined session was handed out again"
    assert json.loads(told_again.json()["answer"]) == {"outcome": "failed", "duplicate": True}
    assert json.loads(paid["delivery"]["answer"]) == {"outcome": "settled", "duplicate": False}
    declined_event, settled = await billing_events(topic_reader, topic_prefix, payment["payment_id"], 2)
    assert isinstance(declined_event, PaymentDeclined)
    assert (declined_event.reason_code, declined_event.amount, declined_event.attempt) == (
        "card_declined",
        PRICE,
        1,
    )
    assert isinstance(settled, PaymentSettled)
    view = (
        await system.api.get(f"/payments/{payment['payment_id']}", headers=system.learner(learner))
    ).json()
    assert (view["status"], view["declines"]) == ("settled", 1)


async def test_a_checkout_that_races_a_decline_does_not_keep_the_declined_session(system: Billing) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    provider = system.provider
    declined: list[str] = []

    class Racing:
        """The provider, as seen by a checkout that waits on it while another tab checks out the
        same payment and the card is declined there."""

        name = provider.name

        async def create_checkout(self, **request: Any) -> CheckoutSession:
            session = await provider.create_checkout(**request)
            system.app.dependency_overrides[api.payment_provider] = lambda: provider
            other = await system.check_out(payment, learner)
            await system.pay(other["session_id"], outcome="declined")
            declined.append(other["session_id"])
            return session

    system.app.dependency_overrides[api.payment_provider] = lambda: Racing()
    raced = await system.api.post(
        f"/payments/{payment['payment_id']}/checkout", headers=system.learner(learner)
    )
    again = await system.check_out(payment, learner)

    assert raced.status_code == 409, raced.text
    assert raced.json()["type"] == "urn:microcred:problem:payment-declined-meanwhile"
    assert declined, "the other tab's checkout did not happen"
    assert again["session_id"] != declined[0], "the declined session was kept and handed out again"


async def test_the_last_decline_allowed_fails_the_payment_for_good(
    system: Billing, topic_reader: Callable[..., Any], topic_prefix: str
) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    answers = []
    for _ in range(3):  # PAYMENT_MAX_DECLINES' default
        checkout = await system.check_out(payment, learner)
        answers.append(
            json.loads((await system.pay(checkout["session_id"], outcome="declined"))["delivery"]["answer"])
        )
    after = await system.api.post(
        f"/payments/{payment['payment_id']}/checkout", headers=system.learner(learner)
    )

    assert answers == [{"outcome": "failed", "duplicate": False}] * 3
    failures = await billing_events(topic_reader, topic_prefix, payment["payment_id"], 3)
    assert [type(event) for event in failures] == [PaymentDeclined, PaymentDeclined, PaymentFailed]
    view = (
        await system.api.get(f"/payments/{payment['payment_id']}", headers=system.learner(learner))
    ).json()
    assert (view["status"], view["declines"]) == ("failed", 3)
    assert after.status_code == 409
    assert after.json()["type"] == "urn:microcred:problem:payment-not-due"


async def test_tampered_forged_and_stale_webhooks_are_refused_and_change_nothing(system: Billing) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    session_id = (await system.check_out(payment, learner))["session_id"]
    body = provider_event(payment, session_id)
    now = int(time.time())

    async def deliver(content: bytes, header: str | None) -> httpx.Response:
        headers = {"content-type": "application/json", **({SIGNATURE_HEADER: header} if header else {})}
        return await system.api.post("/webhooks/provider", content=content, headers=headers)

    refusals = {
        "tampered": await deliver(body.replace(b"4900", b"100"), signature(SECRET, body, now)),
        "forged": await deliver(body, signature("whsec_not_the_shared_secret_0123456789", body, now)),
        "stale": await deliver(body, signature(SECRET, body, now - 6 * 60)),
        "future": await deliver(body, signature(SECRET, body, now + 6 * 60)),
        "unsigned": await deliver(body, None),
    }
    kinds = {name: response.json()["type"].rsplit(":", 1)[1] for name, response in refusals.items()}
    assert kinds == {
        "tampered": "webhook-signature-invalid",
        "forged": "webhook-signature-invalid",
        "stale": "webhook-timestamp-out-of-tolerance",
        "future": "webhook-timestamp-out-of-tolerance",
        "unsigned": "webhook-signature-malformed",
    }
    assert {response.status_code for response in refusals.values()} == {400}
    assert {response.headers["content-type"] for response in refusals.values()} == {PROBLEM_JSON}
    assert await system.outbox(payment["payment_id"]) == []
    assert await system.db.fetchval("SELECT count(*) FROM provider_events") == 0

    # The very same bytes, correctly signed now, are accepted: the refusals were for the signature alone.
    accepted = await deliver(body, signature(SECRET, body, int(time.time())))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {"outcome": "settled", "duplicate": False}
    # A captured copy replayed later is refused as stale, even though billing has seen the event.
    replayed = await deliver(body, signature(SECRET, body, now - 10 * 60))
    assert replayed.status_code == 400
    assert await system.outbox(payment["payment_id"]) == [PaymentSettled.TYPE]


async def test_a_settlement_of_the_wrong_amount_is_refused_and_recorded(system: Billing) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    session_id = (await system.check_out(payment, learner))["session_id"]

    paid = await system.pay(session_id, amount=4500)
    resent = await system.simulator.post(f"/events/{paid['event']['id']}/resend")

    for delivery in (paid["delivery"], resent.json()):
        assert delivery["status_code"] == 422
        assert json.loads(delivery["answer"])["type"] == "urn:microcred:problem:payment-discrepancy"
    discrepancies = await system.db.fetch(
        "SELECT payment_id, reason, received_minor, received_currency, charge_id FROM payment_discrepancies"
    )
    assert [dict(row) for row in discrepancies] == [
        {
            "payment_id": uuid.UUID(payment["payment_id"]),
            "reason": "amount_mismatch",
            "received_minor": 4500,
            "received_currency": "EUR",
            "charge_id": paid["session"]["charge_id"],
        }
    ]
    assert await system.outbox(payment["payment_id"]) == [], "a wrong settlement emitted an event"
    view = await system.api.get(f"/payments/{payment['payment_id']}", headers=system.learner(learner))
    assert view.json()["status"] == "due"


async def test_staff_refund_a_settled_payment_in_parts_never_beyond_what_was_paid(
    system: Billing, topic_reader: Callable[..., Any], topic_prefix: str
) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    unpaid = await system.payment_due(await system.enroll(learner))
    await system.pay((await system.check_out(payment, learner))["session_id"])
    refunds = f"/payments/{payment['payment_id']}/refunds"

    by_learner = await system.api.post(refunds, headers=system.learner(learner))
    assert by_learner.status_code == 403
    not_settled = await system.api.post(f"/payments/{unpaid['payment_id']}/refunds", headers=system.staff())
    assert not_settled.status_code == 409
    assert not_settled.json()["type"] == "urn:microcred:problem:payment-not-settled"

    part = await system.api.post(
        refunds,
        json={"amount": {"amount_minor": 1500, "currency": "EUR"}, "reason": "Missed the first week."},
        headers=system.staff(),
    )
    assert part.status_code == 201, part.text
    assert part.json()["payment"]["status"] == "settled"
    assert part.json()["payment"]["refunded"] == {"amount_minor": 1500, "currency": "EUR"}
    too_much = await system.api.post(
        refunds, json={"amount": {"amount_minor": 3401, "currency": "EUR"}}, headers=system.staff()
    )
    assert too_much.status_code == 409
    assert too_much.json()["type"] == "urn:microcred:problem:refund-exceeds-payment"
    rest = await system.api.post(refunds, headers=system.staff())
    assert rest.status_code == 201, rest.text
    assert rest.json()["amount"] == {"amount_minor": 3400, "currency": "EUR"}
    assert rest.json()["payment"]["status"] == "refunded"
    again = await system.api.post(refunds, headers=system.staff())
    assert again.status_code == 409
    assert again.json()["type"] == "urn:microcred:problem:payment-already-refunded"

    events = await billing_events(topic_reader, topic_prefix, payment["payment_id"], 3)
    assert [event.TYPE for event in events] == [PaymentSettled.TYPE, RefundIssued.TYPE, RefundIssued.TYPE]
    issued = [event for event in events if isinstance(event, RefundIssued)]
    assert [event.amount.amount_minor for event in issued] == [1500, 3400]
    assert [event.reason for event in issued] == ["Missed the first week.", "Refunded by staff."]
    assert [str(event.refund_id) for event in issued] == [part.json()["refund_id"], rest.json()["refund_id"]]
    recorded = await system.db.fetch(
        "SELECT amount_minor, issued_by, provider_refund_id FROM refunds ORDER BY issued_at"
    )
    assert [(row["amount_minor"], row["issued_by"]) for row in recorded] == [
        (1500, "staff:staff-1"),
        (3400, "staff:staff-1"),
    ]
    assert [event.issued_by for event in issued] == ["staff:staff-1", "staff:staff-1"]
    assert part.json()["issued_by"] == "staff:staff-1"
    assert all(row["provider_refund_id"].startswith("re_") for row in recorded)


async def test_learners_see_only_their_own_payments_and_staff_see_all(system: Billing) -> None:
    ada, bob = uuid.uuid4(), uuid.uuid4()
    adas = await system.payment_due(await system.enroll(ada))
    bobs = await system.payment_due(await system.enroll(bob))

    assert (
        await system.api.get(f"/payments/{bobs['payment_id']}", headers=system.learner(ada))
    ).status_code == 404
    stolen = await system.api.post(f"/payments/{bobs['payment_id']}/checkout", headers=system.learner(ada))
    assert stolen.status_code == 404
    assert stolen.json()["type"] == "urn:microcred:problem:payment-not-found"
    own = (await system.api.get("/payments", headers=system.learner(ada))).json()
    assert [item["payment_id"] for item in own["items"]] == [adas["payment_id"]]

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(3):
        params: dict[str, str | int] = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = (await system.api.get("/payments", params=params, headers=system.staff())).json()
        seen += [item["payment_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [bobs["payment_id"], adas["payment_id"]], "staff pages are newest first, complete"
    staff_view = await system.api.get(f"/payments/{bobs['payment_id']}", headers=system.staff())
    assert staff_view.status_code == 200
    bad_cursor = await system.api.get("/payments", params={"cursor": "bm90IG91cnM"}, headers=system.staff())
    assert bad_cursor.status_code == 400


async def test_cancelling_the_enrollment_voids_a_payment_still_due(system: Billing) -> None:
    learner = uuid.uuid4()
    enrollment = await system.enroll(learner)
    payment = await system.payment_due(enrollment)

    await system.send(
        EnrollmentCancelled(
            enrollment_id=enrollment.enrollment_id,
            learner_id=learner,
            course_id=enrollment.course_id,
            reason=CancellationReason.LEARNER_REQUEST,
            cancelled_at=datetime.now(UTC),
        )
    )

    async def status() -> str | None:
        view = await system.api.get(f"/payments/{payment['payment_id']}", headers=system.learner(learner))
        return view.json()["status"] if view.json()["status"] == "voided" else None

    assert await system.wait_for(status) == "voided"
    checkout = await system.api.post(
        f"/payments/{payment['payment_id']}/checkout", headers=system.learner(learner)
    )
    assert checkout.status_code == 409
    assert await system.outbox(payment["payment_id"]) == []


class LockProbingProvider:
    """The simulator adapter, but before each call it tries to lock the payment row from a connection
    of its own, and looks for a billing session left idle inside a transaction: what it finds while
    billing waits for the provider."""

    def __init__(self, inner: SimulatorProvider, db: asyncpg.Connection, payment_id: str) -> None:
        self._inner = inner
        self._db = db
        self._payment_id = uuid.UUID(payment_id)
        self.name = inner.name
        self.parse_webhook = inner.parse_webhook
        self.found: list[str] = []

    async def _probe(self, call: str) -> None:
        try:
            async with self._db.transaction():
                await self._db.execute(
                    "SELECT 1 FROM payments WHERE payment_id = $1 FOR UPDATE NOWAIT", self._payment_id
                )
        except asyncpg.LockNotAvailableError:
            self.found.append(f"{call}: the payment row is locked")
        idle = await self._db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
        )
        if idle:
            self.found.append(f"{call}: {idle} billing session(s) idle in a transaction")

    async def create_checkout(
        self, *, amount: Money, reference: str, idempotency_key: str
    ) -> CheckoutSession:
        await self._probe("checkout")
        return await self._inner.create_checkout(
            amount=amount, reference=reference, idempotency_key=idempotency_key
        )

    async def refund(self, *, charge_id: str, amount: Money, idempotency_key: str) -> str:
        await self._probe("refund")
        return await self._inner.refund(charge_id=charge_id, amount=amount, idempotency_key=idempotency_key)


async def test_no_lock_or_transaction_is_held_while_the_provider_is_called(system: Billing) -> None:
    # A slow provider must not hold the payment row (and a pooled connection mid-transaction) hostage:
    # the webhook settling the payment, and every other request about it, would wait behind the call.
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    probing = LockProbingProvider(system.provider, system.db, payment["payment_id"])
    system.app.dependency_overrides[api.payment_provider] = lambda: probing

    await system.pay((await system.check_out(payment, learner))["session_id"])
    refund = await system.api.post(
        f"/payments/{payment['payment_id']}/refunds",
        json={"amount": {"amount_minor": 900, "currency": "EUR"}},
        headers=system.staff(),
    )
    assert refund.status_code == 201, refund.text

    assert probing.found == []
    view = (await system.api.get(f"/payments/{payment['payment_id']}", headers=system.staff())).json()
    assert view["refunded"] == {"amount_minor": 900, "currency": "EUR"}


class FailingRefunds:
    """The simulator adapter, but its refunds fail with `error` before reaching the simulator."""

    def __init__(self, inner: SimulatorProvider, error: ProviderError) -> None:
        self.name = inner.name
        self.create_checkout = inner.create_checkout
        self.parse_webhook = inner.parse_webhook
        self._error = error

    async def refund(self, *, charge_id: str, amount: Money, idempotency_key: str) -> str:
        raise self._error


async def test_a_refused_refund_is_forgotten_and_one_with_a_lost_answer_stays_reserved(
    system: Billing,
) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    await system.pay((await system.check_out(payment, learner))["session_id"])
    refunds = f"/payments/{payment['payment_id']}/refunds"
    part = {"amount": {"amount_minor": 4000, "currency": "EUR"}}

    system.app.dependency_overrides[api.payment_provider] = lambda: FailingRefunds(
        system.provider, ProviderRefused("the payment provider answered 409")
    )
    refused = await system.api.post(refunds, json=part, headers=system.staff())
    assert refused.status_code == 502
    assert refused.json()["type"] == "urn:microcred:problem:payment-provider-error"
    assert await system.db.fetchval("SELECT count(*) FROM refunds") == 0

    system.app.dependency_overrides[api.payment_provider] = lambda: FailingRefunds(
        system.provider, ProviderError("the payment provider is unreachable")
    )
    lost = await system.api.post(refunds, json=part, headers=system.staff())
    assert lost.status_code == 502
    assert await system.db.fetchval("SELECT status FROM refunds") == "requested"

    system.app.dependency_overrides[api.payment_provider] = lambda: system.provider
    # The provider may have returned those 4000 already: they are not refunded a second time.
    beyond = await system.api.post(refunds, json=part, headers=system.staff())
    assert beyond.status_code == 409
    assert beyond.json()["type"] == "urn:microcred:problem:refund-exceeds-payment"
    rest = await system.api.post(refunds, headers=system.staff())
    assert rest.status_code == 201, rest.text
    assert rest.json()["amount"] == {"amount_minor": 900, "currency": "EUR"}
    assert rest.json()["payment"]["refunded"] == {"amount_minor": 900, "currency": "EUR"}
    assert rest.json()["payment"]["status"] == "settled"


async def test_staff_list_what_money_and_enrollments_disagree_on_and_reconcile_it(system: Billing) -> None:
    async def paid(learner: uuid.UUID, **params: str | int) -> tuple[EnrollmentCreated, dict[str, Any]]:
        enrollment = await system.enroll(learner)
        payment = await system.payment_due(enrollment)
        await system.pay((await system.check_out(payment, learner))["session_id"], **params)
        return enrollment, payment

    async def listed() -> dict[tuple[str, str], dict[str, Any]]:
        answer = await system.api.get("/reconciliation/discrepancies", headers=system.staff())
        assert answer.status_code == 200, answer.text
        return {(item["kind"], item["subject"]): item for item in answer.json()["items"]}

    _, taken = await paid(uuid.uuid4())  # enrollment activates it below: nothing to reconcile
    _, not_taken = await paid(uuid.uuid4())
    cancelled_enrollment, kept = await paid(uuid.uuid4())
    await paid(uuid.uuid4(), amount=4500)  # collected, settles nothing
    _, unanswered = await paid(uuid.uuid4())
    await system.send(
        EnrollmentActivated(
            enrollment_id=uuid.UUID(taken["enrollment_id"]),
            learner_id=uuid.UUID(taken["learner_id"]),
            course_id=uuid.uuid4(),
            payment_id=uuid.UUID(taken["payment_id"]),
            activated_at=datetime.now(UTC),
        )
    )
    await system.send(
        EnrollmentCancelled(
            enrollment_id=cancelled_enrollment.enrollment_id,
            learner_id=cancelled_enrollment.learner.learner_id,
            course_id=cancelled_enrollment.course_id,
            reason=CancellationReason.LEARNER_REQUEST,
            detail="changed my mind",
            cancelled_at=datetime.now(UTC),
        )
    )
    system.app.dependency_overrides[api.payment_provider] = lambda: FailingRefunds(
        system.provider, ProviderError("the payment provider is unreachable")
    )
    lost = await system.api.post(f"/payments/{unanswered['payment_id']}/refunds", headers=system.staff())
    system.app.dependency_overrides[api.payment_provider] = lambda: system.provider
    assert lost.status_code == 502
    refund_id = str(await system.db.fetchval("SELECT refund_id FROM refunds WHERE status = 'requested'"))
    short_event = await system.db.fetchval("SELECT provider_event_id FROM payment_discrepancies")

    async def settled_in() -> dict[tuple[str, str], dict[str, Any]] | None:
        # Billing's view first, then the list: a list taken before the events were noted is stale.
        taken_seen = await system.db.fetchval(
            "SELECT enrollment_activated_at IS NOT NULL AND"
            " (SELECT enrollment_cancelled_at IS NOT NULL FROM payments WHERE payment_id = $2)"
            " FROM payments WHERE payment_id = $1",
            uuid.UUID(taken["payment_id"]),
            uuid.UUID(kept["payment_id"]),
        )
        return await listed() if taken_seen else None

    found = await system.wait_for(settled_in)
    assert found is not None, "billing did not hear of the activation and the cancellation"
    paged, cursor = [], None
    while True:
        page = await system.api.get(
            "/reconciliation/discrepancies",
            params={"limit": 2, **({"cursor": cursor} if cursor else {})},
            headers=system.staff(),
        )
        paged += [(item["kind"], item["subject"]) for item in page.json()["items"]]
        if (cursor := page.json()["next_cursor"]) is None:
            break
    assert paged == list(found), "paging two at a time gave another list than one page"
    assert set(found) == {
        ("settled_not_active", not_taken["payment_id"]),
        # Enrollment has not taken this one either (until its refund is through).
        ("settled_not_active", unanswered["payment_id"]),
        ("paid_enrollment_cancelled", kept["payment_id"]),
        ("unmatched_collection", f"simulator:{short_event}"),
        ("refund_unanswered", refund_id),
    }
    assert found[("paid_enrollment_cancelled", kept["payment_id"])]["amount"] == {
        "amount_minor": 4900,
        "currency": "EUR",
    }
    assert found[("unmatched_collection", f"simulator:{short_event}")]["amount"]["amount_minor"] == 4500

    # Staff of another institution see none of it; learners may not look.
    elsewhere = system.bearer("staff-2", "staff", issuers=[str(uuid.uuid4())])
    assert (await system.api.get("/reconciliation/discrepancies", headers=elsewhere)).json()["items"] == []
    learner = system.learner(uuid.UUID(kept["learner_id"]))
    assert (await system.api.get("/reconciliation/discrepancies", headers=learner)).status_code == 403

    # Reconciled: by hand with a note, once; the refund by asking the provider again.
    resolution = f"/reconciliation/discrepancies/paid_enrollment_cancelled/{kept['payment_id']}/resolution"
    retry = f"/payments/{unanswered['payment_id']}/refunds/{refund_id}/retry"
    note = {"note": "Course policy: no refund after the first module; the learner was told."}
    assert (await system.api.post(resolution, json=note, headers=elsewhere)).status_code == 404
    assert (await system.api.post(retry, headers=elsewhere)).status_code == 403
    system.app.dependency_overrides[api.payment_provider] = lambda: FailingRefunds(
        system.provider, ProviderRefused("the payment provider answered 409")
    )
    refused_retry = await system.api.post(retry, headers=system.staff())
    system.app.dependency_overrides[api.payment_provider] = lambda: system.provider
    assert refused_retry.status_code == 502
    # A refused retry proves nothing about the first request: the refund stays on the books.
    assert await system.db.fetchval(
        "SELECT status FROM refunds WHERE refund_id = $1", uuid.UUID(refund_id)
    ) == ("requested")
    by_hand = await system.api.post(resolution, json=note, headers=system.staff())
    again = await system.api.post(resolution, json=note, headers=system.staff())
    not_by_hand = await system.api.post(
        f"/reconciliation/discrepancies/refund_unanswered/{refund_id}/resolution",
        json=note,
        headers=system.staff(),
    )
    retried = await system.api.post(retry, headers=system.staff())
    retried_again = await system.api.post(retry, headers=system.staff())

    assert by_hand.status_code == 204, by_hand.text
    assert again.status_code == 404
    assert not_by_hand.status_code == 409
    assert not_by_hand.json()["type"] == "urn:microcred:problem:reconciled-at-provider"
    assert retried.status_code == 200, retried.text
    assert retried.json()["payment"]["status"] == "refunded"
    assert retried_again.status_code == 404
    assert await system.outbox(unanswered["payment_id"]) == [PaymentSettled.TYPE, RefundIssued.TYPE]
    assert set(await listed()) == {
        ("settled_not_active", not_taken["payment_id"]),
        ("unmatched_collection", f"simulator:{short_event}"),
    }
    assert await system.db.fetchval("SELECT resolved_by FROM reconciliations") == "staff:staff-1"


@pytest.mark.parametrize("system", [3600], indirect=True)
async def test_what_is_younger_than_reconcile_after_is_not_listed_nor_retried(system: Billing) -> None:
    learner = uuid.uuid4()
    payment = await system.payment_due(await system.enroll(learner))
    await system.pay((await system.check_out(payment, learner))["session_id"])
    system.app.dependency_overrides[api.payment_provider] = lambda: FailingRefunds(
        system.provider, ProviderError("the payment provider is unreachable")
    )
    lost = await system.api.post(f"/payments/{payment['payment_id']}/refunds", headers=system.staff())
    system.app.dependency_overrides[api.payment_provider] = lambda: system.provider
    refund_id = await system.db.fetchval("SELECT refund_id FROM refunds WHERE status = 'requested'")

    listed = await system.api.get("/reconciliation/discrepancies", headers=system.staff())
    retried = await system.api.post(
        f"/payments/{payment['payment_id']}/refunds/{refund_id}/retry", headers=system.staff()
    )

    assert lost.status_code == 502
    # Settled seconds ago, never activated, its refund unanswered: none of it is overdue yet.
    assert listed.json() == {"items": [], "next_cursor": None}
    assert retried.status_code == 409
    assert retried.json()["type"] == "urn:microcred:problem:refund-in-flight"
    assert (
        await system.db.fetchval("SELECT status FROM refunds WHERE refund_id = $1", refund_id) == "requested"
    )
