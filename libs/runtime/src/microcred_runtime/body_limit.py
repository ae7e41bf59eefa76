"""One limit on the size of request bodies, enforced while they are received.

FastAPI reads and parses a JSON body in full before any dependency runs, authentication
included: without a limit, an anonymous client makes a service buffer a body of any size. Every
body is counted as the app receives it; one that declares a Content-Length over the limit is
refused before a byte of it is read, a streamed one as soon as the count passes the limit, with
a 413 `body-too-large` problem. The limit is HTTP_MAX_BODY_BYTES, or a route's own
(`max_body_bytes`) where it legitimately takes more or less.
"""

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import ServiceSettings

EndpointT = TypeVar("EndpointT", bound=Callable[..., Any])
SettingsT = TypeVar("SettingsT", bound=ServiceSettings)

_DECLARED = "__microcred_max_body_bytes__"


class BodyTooLarge(HTTPException):
    """The body passed its limit. An HTTPException because FastAPI lets those through as they
    are, where it would turn any other error of reading the body into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body is larger than {limit} bytes")
        self.limit = limit


def max_body_bytes(limit: int | Callable[[SettingsT], int]) -> Callable[[EndpointT], EndpointT]:
    """Give a route another body limit than HTTP_MAX_BODY_BYTES: bytes, or read from the settings.

    The runtime documents a 413 with HTTP_MAX_BODY_BYTES: such a route documents its own.
    """

    def declare(endpoint: EndpointT) -> EndpointT:
        setattr(endpoint, _DECLARED, limit)
        return endpoint

    return declare


class BodySizeLimit:
    """Pure ASGI middleware: counts each request's body as the app receives it."""

    def __init__(self, app: ASGIApp, *, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, scope: Scope) -> int:
        # Starlette's routing puts the chosen endpoint in the scope before the app reads the body.
        declared = getattr(scope.get("endpoint"), _DECLARED, None)
        if declared is None:
            return self.settings.http_max_body_bytes
        return int(declared(self.settings) if callable(declared) else declared)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared_length = Headers(scope=scope).get("content-length", "")
        received = 0

        async def counted() -> Message:
            nonlocal received
            limit = self._limit(scope)
            if declared_length.isdigit() and int(declared_length) > limit:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)
