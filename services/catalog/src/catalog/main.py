"""Wiring only: what the catalog service is made of."""

from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Service

from . import api
from .settings import Settings

service = Service(
    name="catalog",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    routers=[api.router],
    description="Courses and pathways that learners browse; publishes catalog events.",
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
