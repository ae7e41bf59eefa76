"""Wiring only: what the billing service is made of."""

from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Service

from . import api
from .settings import Settings
from .subscribers import subscriptions

service = Service(
    name="billing",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    routers=[api.payments, api.webhooks],
    subscriptions=subscriptions,
    description="Payments and refunds for enrollments in paid courses.",
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
