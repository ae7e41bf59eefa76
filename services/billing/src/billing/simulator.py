"""A payment provider on your machine: checkout sessions, a checkout page, signed webhooks, refunds.

Billing's `SimulatorProvider` talks to it as it would to a hosted checkout (Stripe-like), so the
whole payment flow runs locally with no provider account and no money moving:

    SIMULATOR_WEBHOOK_SECRET=<billing's PAYMENT_WEBHOOK_SECRET> python -m billing.simulator

Environment: `SIMULATOR_HOST` (127.0.0.1), `SIMULATOR_PORT` (8090), `SIMULATOR_WEBHOOK_URL`
(http://127.0.0.1:8003/webhooks/provider, billing's endpoint) and `SIMULATOR_WEBHOOK_SECRET`
(required, at least 32 characters: the value billing has as `PAYMENT_WEBHOOK_SECRET`).

API (amounts are integers in the currency's minor unit, never decimals):
- `POST /sessions` {amount, currency, reference, webhook_url?} -> 201 the session and its checkout_url
- `GET /sessions/{id}`: the checkout page, with Pay and Decline buttons
- `POST /sessions/{id}/pay[?outcome=declined][&amount=..][&currency=..]`: pays (or declines) and
  sends the signed webhook at once; `amount`/`currency` simulate a settlement that differs from
  the session's
- `POST /events/{id}/resend`: delivers the same event again, freshly signed (a duplicate delivery)
- `POST /refunds` {charge_id, amount, currency} -> 201 the refund; never more than was paid
`POST /sessions` and `POST /refunds` honour an `Idempotency-Key` header: a repeat gets the first answer.

The webhook is `POST <webhook url>` with the JSON {id, type: payment.succeeded | payment.failed,
created (unix seconds), data: {session_id, reference, amount, currency, and charge_id, or
failure_code and failure_message}}, signed in the `Provider-Signature` header as
`billing.webhooks` describes. It is delivered once; the checkout page shows billing's answer.

Everything is kept in memory: a restart forgets every session.
"""

import contextlib
import html
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from microcred_runtime import Problem
from microcred_runtime.problems import install_problem_handlers

from .webhooks import SIGNATURE_HEADER, WebhookSecret, signature

T = TypeVar("T")

_AMOUNT = Field(strict=True, gt=0, le=2**63 - 1, description="Integer, in the currency's minor unit.")
_CURRENCY = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")
_DELIVERY_TIMEOUT_SECONDS = 10.0

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]


class SimulatorSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", env_file=None, env_prefix="SIMULATOR_")

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=1, le=65535)
    webhook_url: HttpUrl = Field(
        default=HttpUrl("http://127.0.0.1:8003/webhooks/provider"),
        description="Where webhooks go unless a session names its own URL.",
    )
    webhook_secret: WebhookSecret


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = _AMOUNT
    currency: str = _CURRENCY
    reference: str = Field(min_length=1, max_length=255, description="Echoed back in the webhooks.")
    webhook_url: HttpUrl | None = None


class Delivery(BaseModel):
    event_id: str
    status_code: int | None = Field(description="The receiver's HTTP status; null when unreachable.")
    answer: str = Field(description="The receiver's response body, or why it could not be reached.")


class Session(BaseModel):
    session_id: str
    checkout_url: str
    status: Literal["open", "paid", "declined"]
    amount: int
    currency: str
    reference: str
    webhook_url: str
    charge_id: str | None = None
    paid_amount: int | None = None
    paid_currency: str | None = None
    refunded: int = 0
    last_delivery: Delivery | None = None


class PayResult(BaseModel):
    session: Session
    event: dict[str, Any]
    delivery: Delivery


class RefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    charge_id: str = Field(min_length=1)
    amount: int = _AMOUNT
    currency: str = _CURRENCY


class Refund(BaseModel):
    refund_id: str
    charge_id: str
    amount: int
    currency: str


@dataclass
class _State:
    sessions: dict[str, Session] = field(default_factory=dict)
    session_by_charge: dict[str, str] = field(default_factory=dict)
    # event id -> (session id, the exact body sent), for resending.
    events: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    session_answers: dict[str, tuple[str, Session]] = field(default_factory=dict)
    refund_answers: dict[str, tuple[str, Refund]] = field(default_factory=dict)
    # Made at the first delivery, on the loop that serves the app; one for its life, so that each
    # webhook neither builds a TLS context nor opens a connection of its own.
    webhooks: httpx.AsyncClient | None = None


def create_app(
    settings: SimulatorSettings, *, webhook_transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """The simulator; `webhook_transport` lets tests deliver webhooks to an in-process billing."""
    state = _State()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if state.webhooks is not None:
            await state.webhooks.aclose()
            state.webhooks = None

    app = FastAPI(
        title="microcred payment provider simulator",
        description="Checkout sessions and signed webhooks for local development; no money moves.",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    secret = settings.webhook_secret.get_secret_value()

    def session_of(session_id: str) -> Session:
        session = state.sessions.get(session_id)
        if session is None:
            raise Problem(404, "session-not-found", f"no session {session_id}")
        return session

    async def deliver(session: Session, event_id: str, body: bytes) -> Delivery:
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: signature(secret, body, int(time.time())),
        }
        if state.webhooks is None:
            state.webhooks = httpx.AsyncClient(transport=webhook_transport, timeout=_DELIVERY_TIMEOUT_SECONDS)
        try:
            response = await state.webhooks.post(session.webhook_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            delivery = Delivery(event_id=event_id, status_code=None, answer=repr(exc))
        else:
            delivery = Delivery(
                event_id=event_id, status_code=response.status_code, answer=response.text[:2000]
            )
        session.last_delivery = delivery
        return delivery

    @app.post("/sessions", status_code=201, summary="Open a checkout session")
    async def create_session(request: Request, body: SessionRequest, key: IdempotencyKey = None) -> Session:
        fingerprint = body.model_dump_json()
        replayed = _replay(state.session_answers, key, fingerprint)
        if replayed is not None:
            return replayed
        session_id = f"cs_{secrets.token_hex(8)}"
        session = Session(
            session_id=session_id,
            checkout_url=str(request.url_for("checkout_page", session_id=session_id)),
            status="open",
            amount=body.amount,
            currency=body.currency,
            reference=body.reference,
            webhook_url=str(body.webhook_url or settings.webhook_url),
        )
        state.sessions[session_id] = session
        if key is not None:
            state.session_answers[key] = (fingerprint, session)
        return session

    @app.get("/sessions/{session_id}", summary="The checkout page", response_class=HTMLResponse)
    async def checkout_page(session_id: str) -> HTMLResponse:
        return HTMLResponse(_page(session_of(session_id)))

    @app.post(
        "/sessions/{session_id}/pay",
        summary="Pay or decline, and send the signed webhook",
        response_model=PayResult,
        responses={303: {"description": "From the checkout page: back to it."}},
    )
    async def pay(
        request: Request,
        session_id: str,
        outcome: Literal["succeeded", "declined"] = "succeeded",
        amount: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
        currency: Annotated[str | None, Query(pattern=r"^[A-Z]{3}$")] = None,
    ) -> Response:
        session = session_of(session_id)
        if session.status != "open":
            raise Problem(409, "session-closed", f"the session is {session.status}")
        data: dict[str, Any] = {
            "session_id": session.session_id,
            "reference": session.reference,
            "amount": session.amount if amount is None else amount,
            "currency": currency or session.currency,
        }
        if outcome == "succeeded":
            session.status = "paid"
            session.charge_id = f"ch_{secrets.token_hex(8)}"
            session.paid_amount, session.paid_currency = data["amount"], data["currency"]
            state.session_by_charge[session.charge_id] = session.session_id
            data["charge_id"] = session.charge_id
        else:
            session.status = "declined"
            data["failure_code"] = "card_declined"
            data["failure_message"] = "The card was declined."
        event_id = f"evt_{secrets.token_hex(10)}"
        event = {
            "id": event_id,
            "type": f"payment.{'succeeded' if outcome == 'succeeded' else 'failed'}",
            "created": int(time.time()),
            "data": data,
        }
        body = json.dumps(event, separators=(",", ":")).encode()
        state.events[event_id] = (session.session_id, body)
        delivery = await deliver(session, event_id, body)
        if "text/html" in request.headers.get("accept", ""):
            # A button on the checkout page: show the page again, now with the outcome.
            return RedirectResponse(f"/sessions/{session_id}", status_code=303)
        return Response(
            PayResult(session=session, event=event, delivery=delivery).model_dump_json(),
            media_type="application/json",
        )

    @app.post("/events/{event_id}/resend", summary="Deliver an event again (a duplicate delivery)")
    async def resend(event_id: str) -> Delivery:
        if event_id not in state.events:
            raise Problem(404, "event-not-found", f"no event {event_id}")
        session_id, body = state.events[event_id]
        return await deliver(session_of(session_id), event_id, body)

    @app.post("/refunds", status_code=201, summary="Refund (part of) a charge")
    async def refund(body: RefundRequest, key: IdempotencyKey = None) -> Refund:
        fingerprint = body.model_dump_json()
        replayed = _replay(state.refund_answers, key, fingerprint)
        if replayed is not None:
            return replayed
        session_id = state.session_by_charge.get(body.charge_id)
        if session_id is None:
            raise Problem(404, "charge-not-found", f"no charge {body.charge_id}")
        session = state.sessions[session_id]
        assert session.paid_amount is not None
        if body.currency != session.paid_currency:
            raise Problem(409, "refund-currency", f"the charge was in {session.paid_currency}")
        if session.refunded + body.amount > session.paid_amount:
            raise Problem(409, "refund-exceeds-charge", "more than what is left of the charge")
        session.refunded += body.amount
        answer = Refund(
            refund_id=f"re_{secrets.token_hex(8)}",
            charge_id=body.charge_id,
            amount=body.amount,
            currency=body.currency,
        )
        if key is not None:
            state.refund_answers[key] = (fingerprint, answer)
        return answer

    @app.get("/health/live", summary="The process is up")
    @app.get("/health/ready", summary="Ready (nothing to wait for)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _replay(answers: dict[str, tuple[str, T]], key: str | None, fingerprint: str) -> T | None:
    if key is None or key not in answers:
        return None
    first_request, answer = answers[key]
    if first_request != fingerprint:
        raise Problem(422, "idempotency-key-reused", "this Idempotency-Key came with a different request")
    return answer


def _page(session: Session) -> str:
    def text(value: object) -> str:
        return html.escape(str(value))

    actions = ""
    if session.status == "open":
        pay = f"/sessions/{text(session.session_id)}/pay"
        actions = (
            f'<form method="post" action="{pay}"><button>Pay</button></form>'
            f'<form method="post" action="{pay}?outcome=declined"><button>Decline</button></form>'
        )
    delivery = ""
    if session.last_delivery is not None:
        sent = session.last_delivery
        answer = f"HTTP {sent.status_code}" if sent.status_code is not None else "not delivered"
        delivery = (
            f"<p>Webhook {text(sent.event_id)}: <strong>{text(answer)}</strong></p>"
            f"<pre>{text(sent.answer)}</pre>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Simulated checkout</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto}}
form{{display:inline-block;margin-right:.5rem}}button{{font-size:1.1rem;padding:.4rem 1.2rem}}</style>
</head><body>
<h1>Simulated checkout</h1>
<p>Amount: <strong>{text(session.amount)} {text(session.currency)}</strong> (in minor units)</p>
<p>Reference: <code>{text(session.reference)}</code></p>
<p>Status: <strong>{text(session.status)}</strong></p>
{actions}
{delivery}
<p><small>Payment provider simulator for local development: no money moves.</small></p>
</body></html>"""


def main() -> None:
    try:
        settings = SimulatorSettings()
    except ValidationError as exc:
        lines = [
            f"  SIMULATOR_{str(error['loc'][0]).upper()}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        ]
        print("payment simulator: invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
