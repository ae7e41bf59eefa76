"""Rate limits per client address and per token subject, on the routes that ask for them.

A route opts in with `RateLimited` (per client address: public and signed routes) or takes its
caller as `LimitedCaller` (per address before the token is checked, then per subject). Each route
has its own counters: RATE_LIMIT_PER_ADDRESS and RATE_LIMIT_PER_SUBJECT are per route, per
service. Over a limit the caller gets a 429 `rate-limited` problem with `Retry-After`, before the
route does anything.

The counting is the `limits` package's moving window, in this process's memory by default: each
replica then limits on its own (N replicas admit up to N times a limit). RATE_LIMIT_STORAGE_URI
points every replica at one shared store instead (`async+redis://...`). When that store cannot be
reached the request is let through and a warning logged: an outage of the limiter's store must
not take the API down with it.

The client address is the TCP peer's, or, when the peer is one of HTTP_TRUSTED_PROXIES, the
nearest address in X-Forwarded-For that is not a trusted proxy (`Service` installs uvicorn's
proxy-headers middleware with that list, and only that list); the header of anyone else is ignored.
"""

import logging
import math
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from .auth import Caller, Principal
from .problems import Problem, problem_doc
from .settings import ServiceSettings

log = logging.getLogger(__name__)


def _storage(uri: str) -> Storage:
    # redis-py (the `limits[redis]` extra) rather than limits' default client, coredis.
    options: dict[str, Any] = {"implementation": "redispy"} if "redis" in uri.partition(":")[0] else {}
    storage = storage_from_string(uri, wrap_exceptions=True, **options)
    assert isinstance(storage, Storage), "settings admit asynchronous stores only"
    return storage


class RateLimiter:
    """One service's limits and the counters behind them."""

    def __init__(self, service: str, settings: ServiceSettings) -> None:
        self._service = service
        self._per_address = parse_many(settings.rate_limit_per_address)
        self._per_subject = parse_many(settings.rate_limit_per_subject)
        self._window = MovingWindowRateLimiter(_storage(settings.rate_limit_storage_uri))

    async def by_address(self, request: Request) -> None:
        address = request.client.host if request.client else "unknown"
        await self._hit(request, "address", address, self._per_address)

    async def by_subject(self, request: Request, subject: str) -> None:
        await self._hit(request, "subject", subject, self._per_subject)

    async def _hit(self, request: Request, kind: str, who: str, items: list[RateLimitItem]) -> None:
        route = request.scope.get("route")
        counter = (self._service, request.method, getattr(route, "path", request.url.path), kind, who)
        for item in items:
            try:
                if await self._window.hit(item, *counter):
                    continue
                reset = (await self._window.get_window_stats(item, *counter)).reset_time
            except StorageError as exc:
                log.warning("rate limit not applied: its store failed: %s", exc.storage_error)
                return
            retry_after = max(1, math.ceil(reset - time.time()))
            raise Problem(
                429,
                "rate-limited",
                f"too many requests from this {'client address' if kind == 'address' else 'caller'} "
                f"(limit: {item}); try again in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
                retry_after_seconds=retry_after,
            )


def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.rate_limiter
    return limiter


async def _by_address(request: Request) -> None:
    await _limiter(request).by_address(request)


async def _by_subject(
    request: Request, _: Annotated[None, Depends(_by_address)], caller: Caller
) -> Principal:
    # The address is counted before the token is checked: a flood of bad tokens is refused too.
    await _limiter(request).by_subject(request, caller.subject)
    return caller


RateLimited = Depends(_by_address)
"""For a route's `dependencies=[...]`: limited per client address (RATE_LIMIT_PER_ADDRESS)."""
LimitedCaller = Annotated[Principal, Depends(_by_subject)]
"""Any authenticated caller, limited per client address and then per token subject."""

_RATE_LIMITED = {
    **problem_doc("Too many requests from this client address or caller (`rate-limited`)."),
    "headers": {
        "Retry-After": {"description": "Seconds until a request may succeed.", "schema": {"type": "integer"}}
    },
}


def _limited(dependant: Dependant) -> bool:
    return any(
        dependency.call in (_by_address, _by_subject) or _limited(dependency)
        for dependency in dependant.dependencies
    )


def with_rate_limit_problems(
    app: FastAPI, openapi: Callable[[], dict[str, Any]]
) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document, plus the 429 of every rate-limited operation."""

    def document() -> dict[str, Any]:
        schema = openapi()
        for route in app.routes:
            if isinstance(route, APIRoute) and _limited(route.dependant):
                operations = schema["paths"].get(route.path_format, {})
                for method in route.methods or ():
                    if method.lower() in operations:
                        operations[method.lower()]["responses"].setdefault("429", _RATE_LIMITED)
        return schema

    return document
