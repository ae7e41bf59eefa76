"""Wiring only: what the enrollment service is made of."""

from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Service

from . import api
from .settings import Settings
from .subscribers import ensuring_partner_topics, subscriptions

service = Service(
    name="enrollment",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    routers=[api.router, api.partners],
    subscriptions=subscriptions,
    background=[ensuring_partner_topics],
    description=(
        "Learners' enrollments and their state; keeps its own read model of the catalog; the registry "
        "of partner institutions and the completions they report."
    ),
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
