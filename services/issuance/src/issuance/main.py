"""Wiring only: what the issuance service is made of."""

from pathlib import Path

from fastapi import FastAPI

from microcred_runtime import Service

from .settings import Settings

service = Service(
    name="issuance",
    settings_class=Settings,
    migrations=Path(__file__).parent / "migrations",
    description="Mints, signs, records and publishes verifiable credentials; verifies any OB 3.0 credential.",
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
