"""Wiring only: what the billing service is made of."""

from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Service

from .settings import Settings

service = Service(
    name="billing",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    description="Payments and refunds for enrollments in paid courses.",
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
