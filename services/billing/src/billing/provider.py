"""The payment provider seam: what billing needs from a provider, and the adapter for the simulator.

Billing's use cases see only `PaymentProvider` and the plain values it returns. A real provider
(Stripe, Adyen, ...) is another class with the same methods: it maps its own API and webhook
payloads onto these values, as `SimulatorProvider` does for `billing.simulator`.

The adapter parses the simulator's payloads with its own models rather than importing the
simulator's: it is a client of a provider's API, and the tests should catch the two disagreeing.
"""

import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from microcred_events import Money

from .settings import Settings
from .webhooks import SIGNATURE_HEADER, InvalidWebhook, verify

_TIMEOUT_SECONDS = 10.0
_REASON_CODE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class CheckoutSession:
    """Where the learner goes to pay."""

    session_id: str
    checkout_url: str


@dataclass(frozen=True)
class ChargeSucceeded:
    """An authentic webhook: the provider collected `amount` for the payment named by `reference`."""

    event_id: str
    reference: str
    session_id: str
    amount: Money
    charge_id: str
    succeeded_at: datetime


@dataclass(frozen=True)
class ChargeFailed:
    """An authentic webhook: the provider will not collect the payment named by `reference`."""

    event_id: str
    reference: str
    session_id: str
    amount: Money
    reason_code: str
    reason: str
    failed_at: datetime


ProviderNotice = ChargeSucceeded | ChargeFailed


class ProviderError(Exception):
    """The provider could not be reached, or refused a request billing made."""


class ProviderRefused(ProviderError):
    """The provider answered, and refused: the request certainly had no effect there."""


class PaymentProvider(Protocol):
    @property
    def name(self) -> str:
        """Stable name of the provider, as events and stored payments carry it."""
        ...

    async def create_checkout(
        self, *, amount: Money, reference: str, idempotency_key: str
    ) -> CheckoutSession:
        """A checkout session collecting `amount`; its webhooks carry `reference` back."""
        ...

    async def refund(self, *, charge_id: str, amount: Money, idempotency_key: str) -> str:
        """Return `amount` of the charge to the payer; the provider's refund id."""
        ...

    def parse_webhook(
        self, headers: Mapping[str, str], body: bytes, *, now: datetime
    ) -> ProviderNotice | None:
        """Verify and read a webhook, or raise `InvalidWebhook`; None when it is not about a payment."""
        ...

    async def aclose(self) -> None:
        """Close its connections; the service calls it once, at its stop."""
        ...


class _EventData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    session_id: str = Field(min_length=1, max_length=255)
    reference: str = Field(min_length=1, max_length=255)
    # strict: an amount of 49.0 is refused, not rounded; money is never a float.
    amount: int = Field(strict=True, ge=0, le=2**63 - 1)
    currency: str = Field(pattern=r"^[A-Za-z]{3}$")
    charge_id: str | None = Field(default=None, min_length=1, max_length=255)
    failure_code: str | None = Field(default=None, max_length=100)
    failure_message: str | None = Field(default=None, max_length=1000)


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=255)
    type: str
    created: int = Field(strict=True, ge=0, le=2**40)
    data: dict[str, Any]


class _SessionCreated(BaseModel):
    session_id: str = Field(min_length=1)
    checkout_url: str = Field(min_length=1)


class _RefundCreated(BaseModel):
    refund_id: str = Field(min_length=1)


_AnswerT = TypeVar("_AnswerT", bound=BaseModel)


class SimulatorProvider:
    """Speaks the HTTP API of `billing.simulator`; `transport` lets tests reach it in-process."""

    name = "simulator"

    def __init__(
        self, base_url: str, webhook_secret: str, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._secret = webhook_secret
        # One client for the provider's life: its connections stay open between payments, and its
        # TLS context is made once (loading the CA bundle costs more CPU than a checkout's SQL).
        self._client = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=_TIMEOUT_SECONDS)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def create_checkout(
        self, *, amount: Money, reference: str, idempotency_key: str
    ) -> CheckoutSession:
        session = await self._post(
            "/sessions",
            {"amount": amount.amount_minor, "currency": amount.currency, "reference": reference},
            idempotency_key,
            _SessionCreated,
        )
        return CheckoutSession(session_id=session.session_id, checkout_url=session.checkout_url)

    async def refund(self, *, charge_id: str, amount: Money, idempotency_key: str) -> str:
        refund = await self._post(
            "/refunds",
            {"charge_id": charge_id, "amount": amount.amount_minor, "currency": amount.currency},
            idempotency_key,
            _RefundCreated,
        )
        return refund.refund_id

    def parse_webhook(
        self, headers: Mapping[str, str], body: bytes, *, now: datetime
    ) -> ProviderNotice | None:
        verify(self._secret, body, headers.get(SIGNATURE_HEADER), now=now)
        try:
            event = _Event.model_validate_json(body)
            if event.type not in ("payment.succeeded", "payment.failed"):
                return None
            data = _EventData.model_validate(event.data)
            amount = Money(amount_minor=data.amount, currency=data.currency.upper())
        except ValidationError as exc:
            raise InvalidWebhook("webhook-payload-invalid", _first_error(exc)) from None
        at = datetime.fromtimestamp(event.created, UTC)
        if event.type == "payment.succeeded":
            if data.charge_id is None:
                raise InvalidWebhook(
                    "webhook-payload-invalid", "a payment.succeeded event names no charge_id"
                )
            return ChargeSucceeded(event.id, data.reference, data.session_id, amount, data.charge_id, at)
        code = data.failure_code
        return ChargeFailed(
            event.id,
            data.reference,
            data.session_id,
            amount,
            # The event contract wants a provider-independent snake_case code.
            reason_code=code if code and _REASON_CODE.fullmatch(code) else "declined",
            reason=data.failure_message or "The payment was declined.",
            failed_at=at,
        )

    async def _post(
        self, path: str, body: dict[str, Any], idempotency_key: str, answer: type[_AnswerT]
    ) -> _AnswerT:
        # The idempotency key makes a retry (after a timeout, or a rolled-back transaction) get the
        # provider's first answer instead of a second session or a second refund.
        try:
            response = await self._client.post(path, json=body, headers={"Idempotency-Key": idempotency_key})
        except httpx.HTTPError as exc:
            raise ProviderError(f"the payment provider is unreachable: {exc!r}") from exc
        if response.is_client_error:
            raise ProviderRefused(
                f"the payment provider answered {response.status_code}: {response.text[:500]}"
            )
        if not response.is_success:
            raise ProviderError(
                f"the payment provider answered {response.status_code}: {response.text[:500]}"
            )
        try:
            return answer.model_validate_json(response.content)
        except ValidationError as exc:
            raise ProviderError(
                f"the payment provider's answer is not understood: {_first_error(exc)}"
            ) from None


def provider_from(settings: Settings) -> PaymentProvider:
    """The provider the settings configure."""
    return SimulatorProvider(
        str(settings.payment_provider_url), settings.payment_webhook_secret.get_secret_value()
    )


@contextlib.asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[PaymentProvider]:
    """The configured provider for as long as the service runs, closed at its stop."""
    provider = provider_from(settings)
    try:
        yield provider
    finally:
        await provider.aclose()


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{location}: {error['msg']}"
