from collections.abc import AsyncIterable, AsyncIterator
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from microcred_runtime import ServiceSettings, max_body_bytes
from microcred_runtime.body_limit import BodySizeLimit
from microcred_runtime.problems import PROBLEM_JSON, install_problem_handlers

DEFAULT = 1024
CHUNK = 256


def from_settings(settings: ServiceSettings) -> int:
    return settings.http_max_body_bytes // 2


class Endpoints:
    """An app with a JSON route on the default limit and raw routes with limits of their own;
    remembers which endpoints ran."""

    def __init__(self) -> None:
        self.called: list[str] = []
        self.app = FastAPI()
        install_problem_handlers(self.app)

        @self.app.post("/json")
        async def parsed(body: dict[str, Any]) -> int:
            self.called.append("json")
            return len(body)

        @self.app.post("/large")
        @max_body_bytes(4 * DEFAULT)
        async def large(request: Request) -> int:
            self.called.append("large")
            return len(await request.body())

        @self.app.post("/from-settings")
        @max_body_bytes(from_settings)
        async def configured(request: Request) -> int:
            self.called.append("from-settings")
            return len(await request.body())

        settings = ServiceSettings.model_construct(http_max_body_bytes=DEFAULT)
        self.app.add_middleware(BodySizeLimit, settings=settings)

    async def post(self, path: str, content: bytes | AsyncIterable[bytes]) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=content, headers={"content-type": "application/json"})


class Streamed:
    """A body of `size` bytes sent in chunks without a Content-Length; counts what was taken."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.taken < self.size:
            chunk = b" " * min(CHUNK, self.size - self.taken)
            self.taken += len(chunk)
            yield chunk


def json_of(size: int) -> bytes:
    return b'{"x": "' + b"x" * (size - 9) + b'"}'


def assert_too_large(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json() == {
        "type": "urn:microcred:problem:body-too-large",
        "title": HTTPStatus.REQUEST_ENTITY_TOO_LARGE.phrase,
        "status": 413,
        "detail": f"the body is larger than {limit} bytes",
        "instance": response.request.url.path,
        "limit": limit,
    }


async def test_a_body_within_the_limit_reaches_the_route() -> None:
    endpoints = Endpoints()

    response = await endpoints.post("/json", json_of(DEFAULT))

    assert response.request.headers["content-length"] == str(DEFAULT)
    assert response.status_code == 200, response.text
    assert endpoints.called == ["json"]


async def test_a_declared_length_over_the_limit_is_refused_before_the_route_runs() -> None:
    endpoints = Endpoints()

    response = await endpoints.post("/json", json_of(DEFAULT + 1))

    assert_too_large(response, DEFAULT)
    assert endpoints.called == []


async def test_a_streamed_body_is_refused_once_it_passes_the_limit_and_no_more_is_read() -> None:
    endpoints, body = Endpoints(), Streamed(100 * DEFAULT)

    response = await endpoints.post("/json", body)

    assert "content-length" not in response.request.headers
    assert_too_large(response, DEFAULT)
    assert body.taken <= DEFAULT + CHUNK
    assert endpoints.called == []


@pytest.mark.parametrize(
    ("path", "limit"),
    [("/large", 4 * DEFAULT), ("/from-settings", DEFAULT // 2)],
    ids=["more, in bytes", "less, from the settings"],
)
async def test_a_route_with_its_own_limit_takes_up_to_it_declared_or_streamed(path: str, limit: int) -> None:
    endpoints = Endpoints()

    fits = await endpoints.post(path, b" " * limit)
    fits_streamed = await endpoints.post(path, Streamed(limit))
    declared = await endpoints.post(path, b" " * (limit + 1))
    streamed = Streamed(100 * DEFAULT)
    too_large = await endpoints.post(path, streamed)

    assert (fits.status_code, fits.json()) == (200, limit)
    assert (fits_streamed.status_code, fits_streamed.json()) == (200, limit)
    assert_too_large(declared, limit)
    assert_too_large(too_large, limit)
    assert streamed.taken <= limit + CHUNK
