"""Wiring only: what the billing service is made of."""

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Runtime, Service

from . import api, provider
from .settings import Settings
from .subscribers import subscriptions


@dataclasses.dataclass(frozen=True)
class BillingService(Service[Settings]):
    """A Service whose app holds the payment provider's client from its start to its stop."""

    def create_app(self, settings: Settings | None = None) -> FastAPI:
        app: FastAPI

        @contextlib.asynccontextmanager
        async def payment_provider(runtime: Runtime[Settings]) -> AsyncIterator[provider.PaymentProvider]:
            async with provider.opened(runtime.settings) as opened:
                app.state.payment_provider = opened
                yield opened

        app = Service.create_app(
            dataclasses.replace(self, background=[*self.background, payment_provider]), settings
        )
        return app


service = BillingService(
    name="billing",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    routers=[api.payments, api.webhooks, api.reconciliation],
    subscriptions=subscriptions,
    description="Payments and refunds for enrollments in paid courses.",
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
