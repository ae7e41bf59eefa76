"""Wiring only: what the notifications service is made of."""

from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Service

from . import api, delivery
from .settings import Settings
from .subscribers import subscriptions

service = Service(
    name="notifications",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    routers=[api.inbox, api.webhooks],
    subscriptions=subscriptions,
    background=[delivery.workers],
    description="Tells people what happened: email, an in-app inbox, and signed webhooks to subscribers.",
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
