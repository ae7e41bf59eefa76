"""Wiring only: what the enrollment service is made of."""

from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Service

from . import api
from .settings import Settings
from .subscribers import subscriptions

service = Service(
    name="enrollment",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    routers=[api.router],
    subscriptions=subscriptions,
    description="Learners' enrollments and their state; keeps its own read model of the catalog.",
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
