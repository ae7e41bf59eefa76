"""Wiring only: what the catalog service is made of."""

import dataclasses
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware import Middleware

from microcred_runtime import Service, load_settings

from . import api
from .public_cache import PublicCache, ServedFromCache
from .settings import Settings


@dataclasses.dataclass(frozen=True)
class CatalogService(Service[Settings]):
    """A Service whose app keeps the published catalog's answers in a cache of its own."""

    def create_app(self, settings: Settings | None = None) -> FastAPI:
        settings = settings or load_settings(Settings)
        cache = PublicCache(settings.course_list_cache_seconds)
        bound = dataclasses.replace(
            self,
            middleware=[Middleware(ServedFromCache, cache=cache)],
            background=[cache.invalidated_by_writes],
        )
        app = Service.create_app(bound, settings)
        app.state.public_cache = cache
        return app


service = CatalogService(
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
