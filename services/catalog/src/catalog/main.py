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
    routers=[api.courses, api.pathways],
    description=(
        "Courses (microcredentials) and pathways that learners browse; staff create, publish and "
        "retire them. Publishes CoursePublished, CourseUpdated, CourseRetired and PathwayPublished."
    ),
)


def create_app(settings: Settings | None = None) -> FastAPI:
    return service.create_app(settings)
