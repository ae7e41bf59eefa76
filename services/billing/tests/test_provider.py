"""The simulator adapter against the simulator itself, in-process: sessions, webhooks, refunds."""

import json
from datetime import UTC, datetime

import httpx
import pytest

from billing.provider import ChargeFailed, ChargeSucceeded, ProviderError, ProviderRefused, SimulatorProvider
from billing.simulator import SimulatorSettings, create_app
from billing.webhooks import SIGNATURE_HEADER, InvalidWebhook, signature
from microcred_events import Money

SECRET = "whsec_4c0f1d2e9b8a7c6d5e4f3a2b1c0d9e8f"
PRICE = Money(amount_minor=4900, currency="EUR")
REFERENCE = "9c3e5a7b-1d2f-4b8a-9e64-0f7c2d1a3b85"


class Receiver:
    """Stands in for billing's webhook endpoint: keeps what the simulator sends."""

    def __init__(self) -> None:
        self.received: list[httpx.Request] = []

    def transport(self) -> httpx.MockTransport:
        def answer(request: httpx.Request) -> httpx.Response:
            self.received.append(request)
            return httpx.Response(200, json={"outcome": "settled", "duplicate": False})

        return httpx.MockTransport(answer)


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
def to_simulator(receiver: Receiver) -> httpx.ASGITransport:
    settings = SimulatorSettings(webhook_url="http://billing/webhooks/provider", webhook_secret=SECRET)
    return httpx.ASGITransport(app=create_app(settings, webhook_transport=receiver.transport()))


@pytest.fixture
def simulator(to_simulator: httpx.ASGITransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=to_simulator, base_url="http://simulator")


@pytest.fixture
def provider(to_simulator: httpx.ASGITransport) -> SimulatorProvider:
    return SimulatorProvider("http://simulator", SECRET, transport=to_simulator)


def notice_from(provider: SimulatorProvider, request: httpx.Request) -> ChargeSucceeded | ChargeFailed | None:
    return provider.parse_webhook(request.headers, request.content, now=datetime.now(UTC))


async def test_a_checkout_session_is_created_once_per_idempotency_key(
    provider: SimulatorProvider, simulator: httpx.AsyncClient
) -> None:
    first = await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="p1:checkout")
    again = await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="p1:checkout")
    other = await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="p2:checkout")

    assert first == again
    assert other.session_id != first.session_id
    assert first.checkout_url == f"http://simulator/sessions/{first.session_id}"
    page = await simulator.get(first.checkout_url)
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert ">Pay</button>" in page.text
    assert ">Decline</button>" in page.text
    assert "4900 EUR" in page.text


async def test_paying_sends_a_signed_webhook_the_adapter_reads_as_the_charge(
    provider: SimulatorProvider, simulator: httpx.AsyncClient, receiver: Receiver
) -> None:
    session = await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="k")
    paid = await simulator.post(f"/sessions/{session.session_id}/pay")

    assert paid.status_code == 200, paid.text
    assert paid.json()["delivery"]["status_code"] == 200
    [request] = receiver.received
    assert str(request.url) == "http://billing/webhooks/provider"
    assert request.headers[SIGNATURE_HEADER].startswith("t=")
    notice = notice_from(provider, request)
    assert isinstance(notice, ChargeSucceeded)
    assert (notice.reference, notice.session_id, notice.amount) == (REFERENCE, session.session_id, PRICE)
    assert notice.charge_id == paid.json()["session"]["charge_id"]
    assert notice.event_id == paid.json()["event"]["id"]


async def test_a_decline_is_read_as_a_failed_charge_with_a_stable_reason_code(
    provider: SimulatorProvider, simulator: httpx.AsyncClient, receiver: Receiver
) -> None:
    session = await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="k")
    await simulator.post(f"/sessions/{session.session_id}/pay", params={"outcome": "declined"})

    notice = notice_from(provider, receiver.received[0])
    assert isinstance(notice, ChargeFailed)
    assert (notice.reason_code, notice.amount) == ("card_declined", PRICE)
    closed = await simulator.post(f"/sessions/{session.session_id}/pay")
    assert closed.status_code == 409


async def test_a_wrong_settlement_reports_the_money_actually_collected(
    provider: SimulatorProvider, simulator: httpx.AsyncClient, receiver: Receiver
) -> None:
    session = await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="k")
    await simulator.post(f"/sessions/{session.session_id}/pay", params={"amount": 4500, "currency": "USD"})

    notice = notice_from(provider, receiver.received[0])
    assert isinstance(notice, ChargeSucceeded)
    assert notice.amount == Money(amount_minor=4500, currency="USD")


async def test_a_resent_event_is_the_same_event_freshly_signed(
    provider: SimulatorProvider, simulator: httpx.AsyncClient, receiver: Receiver
) -> None:
    session = await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="k")
    event_id = (await simulator.post(f"/sessions/{session.session_id}/pay")).json()["event"]["id"]
    resent = await simulator.post(f"/events/{event_id}/resend")

    assert resent.status_code == 200
    first, second = receiver.received
    assert first.content == second.content
    first_notice, second_notice = notice_from(provider, first), notice_from(provider, second)
    assert first_notice is not None
    assert second_notice is not None
    assert first_notice.event_id == second_notice.event_id == event_id


async def test_refunds_at_the_simulator_never_exceed_the_charge(
    provider: SimulatorProvider, simulator: httpx.AsyncClient
) -> None:
    session = await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="k")
    charge_id = (await simulator.post(f"/sessions/{session.session_id}/pay")).json()["session"]["charge_id"]

    part = Money(amount_minor=4000, currency="EUR")
    refund_id = await provider.refund(charge_id=charge_id, amount=part, idempotency_key="r0")
    assert refund_id.startswith("re_")
    assert await provider.refund(charge_id=charge_id, amount=part, idempotency_key="r0") == refund_id
    # A refusal is told apart: billing may then forget the refund it asked for.
    with pytest.raises(ProviderRefused, match="409"):
        await provider.refund(charge_id=charge_id, amount=part, idempotency_key="r4000")


async def test_an_unreachable_provider_is_a_provider_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    provider = SimulatorProvider("http://simulator", SECRET, transport=httpx.MockTransport(refuse))
    with pytest.raises(ProviderError, match="unreachable") as raised:
        await provider.create_checkout(amount=PRICE, reference=REFERENCE, idempotency_key="k")
    # Whether the request had an effect is unknown: not a refusal.
    assert not isinstance(raised.value, ProviderRefused)


def signed(event: dict[str, object]) -> tuple[dict[str, str], bytes]:
    body = json.dumps(event).encode()
    now = int(datetime.now(UTC).timestamp())
    return {SIGNATURE_HEADER: signature(SECRET, body, now)}, body


DATA: dict[str, object] = {
    "session_id": "cs_1",
    "reference": REFERENCE,
    "amount": 4900,
    "currency": "EUR",
    "charge_id": "ch_1",
}
EVENT: dict[str, object] = {"id": "evt_1", "type": "payment.succeeded", "created": 1742465832, "data": DATA}


def test_an_amount_that_is_not_an_integer_is_refused() -> None:
    provider = SimulatorProvider("http://simulator", SECRET)
    for amount in (4900.0, "4900", 49.5):
        headers, body = signed({**EVENT, "data": {**DATA, "amount": amount}})
        with pytest.raises(InvalidWebhook) as refused:
            provider.parse_webhook(headers, body, now=datetime.now(UTC))
        assert refused.value.kind == "webhook-payload-invalid"


def test_an_authentic_event_of_another_type_is_passed_over() -> None:
    provider = SimulatorProvider("http://simulator", SECRET)
    headers, body = signed({**EVENT, "type": "payout.paid", "data": {}})
    assert provider.parse_webhook(headers, body, now=datetime.now(UTC)) is None


def test_a_settlement_without_a_charge_is_refused() -> None:
    provider = SimulatorProvider("http://simulator", SECRET)
    data = {key: value for key, value in DATA.items() if key != "charge_id"}
    headers, body = signed({**EVENT, "data": data})
    with pytest.raises(InvalidWebhook, match="charge_id"):
        provider.parse_webhook(headers, body, now=datetime.now(UTC))


def test_the_adapter_checks_the_signature_before_reading_anything() -> None:
    provider = SimulatorProvider("http://simulator", SECRET)
    headers, body = signed(EVENT)
    with pytest.raises(InvalidWebhook) as refused:
        provider.parse_webhook(headers, body.replace(b"4900", b"1"), now=datetime.now(UTC))
    assert refused.value.kind == "webhook-signature-invalid"
